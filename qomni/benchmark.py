"""`qomni bench`: per-stage speed at the real widths of Qwen3-Omni-30B-A3B, against floors.

The benchmark model has the real widths, head counts and expert counts of the published
Instruct checkpoint, a shallow depth (so it fits 24 GiB in fp32 and runs in minutes on 2 CPU
cores) and random weights; it is built once and cached. Each stage is timed and set against its
floor: for decode-type stages the bytes of weights (and KV) one step must read ÷ the memory
bandwidth measured in the same process; for prefill-type stages the FLOPs it runs ÷ the measured
GEMM rate. `measured/floor` is how far the stage is from what the hardware allows.

Stage rows time the model calls the engine makes, in a plain batch-1 loop; the end-to-end rows
(time to first audio, speech throughput) go through `Omni.stream` / `Omni.generate`, i.e. the
engine. The random model never emits EOS, so token and frame counts are fixed by the settings.
On a shared machine other work only ever slows a measurement, so: one-shot stages (prefill,
code2wav) report the best of REPEATS runs after a warm-up that also counts their FLOPs; step
loops (decode, talker frames) report the median step; the calibration is the faster of one
taken at the start and one at the end.
With `vs_transformers`, the same checkpoint runs through transformers'
`Qwen3OmniMoeForConditionalGeneration.generate` and the headline numbers are compared. Each
backend runs in its own process, so its memory is its own and is freed when it ends.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from qomni.config import OmniConfig, TextConfig
from qomni.events import AudioChunk, TextDelta
from qomni.models.code2wav_stream import StreamingCode2Wav
from qomni.models.layers import KVCache
from qomni.models.moe import SparseMoE
from qomni.models.omni import OmniModel
from qomni.models.packed_linear import PackedLinear
from qomni.models.rope import decode_positions
from qomni.multimodal.processor import ProcessedInputs
from qomni.sampling import SamplingParams
from qomni.tiny import TINY_CONFIG, make_tiny

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations are never evaluated at run time

_ROPE = {"rope_type": "default", "interleaved": True, "mrope_interleaved": True}
_MROPE = {**_ROPE, "mrope_section": [24, 20, 20]}

# Widths, head counts and expert counts of the published Qwen3-Omni-30B-A3B-Instruct config.json
# (depths are set by SHALLOW_DEPTH); the code predictor and code2wav are at full depth.
REAL_WIDTHS: dict[str, Any] = {
    "thinker_config": {
        "audio_config": {"encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "d_model": 1280,
                         "output_dim": 2048, "n_window_infer": 800,
                         "downsample_hidden_size": 480},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                          "out_hidden_size": 2048},
        "text_config": {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4,
                        "head_dim": 128, "moe_intermediate_size": 768, "num_experts": 128,
                        "num_experts_per_tok": 8, "rope_scaling": _MROPE},
    },
    "talker_config": {
        "thinker_hidden_size": 2048,
        "text_config": {"hidden_size": 1024, "num_attention_heads": 16, "head_dim": 128,
                        "intermediate_size": 2048, "moe_intermediate_size": 384,
                        "num_experts": 128, "num_experts_per_tok": 6,
                        "shared_expert_intermediate_size": 768, "rope_scaling": _MROPE},
        "code_predictor_config": {"hidden_size": 1024, "intermediate_size": 3072,
                                  "num_hidden_layers": 5, "num_attention_heads": 16,
                                  "num_key_value_heads": 8, "head_dim": 128},
    },
    "code2wav_config": {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16,
                        "num_key_value_heads": 16, "intermediate_size": 3072,
                        "decoder_dim": 1536},
}

# Depth small enough to fit 24 GiB in fp32 and run in minutes on 2 cores (real: 48 thinker
# layers, 32 audio, 27 vision with deepstack after blocks 8/16/24, 20 talker, accept layer 24).
# Vision keeps 3 blocks so all 3 deepstack mergers run, as in the real model.
SHALLOW_DEPTH: dict[str, Any] = {
    "thinker_config": {"audio_config": {"encoder_layers": 2},
                       "vision_config": {"depth": 3, "deepstack_visual_indexes": [0, 1, 2]},
                       "text_config": {"num_hidden_layers": 2}},
    "talker_config": {"accept_hidden_layer": 1, "text_config": {"num_hidden_layers": 2}},
}
BUILD_VERSION = 1  # bump when the checkpoint written here changes

# One-shot stages (prefill, code2wav) report the best of this many timed runs after a warm-up:
# other work on a shared machine only ever makes a run slower.
REPEATS = 2
# The engine's default vocoder chunks (frames): a small first chunk for latency, then larger.
FIRST_CHUNK, CHUNK = 1, 25
# = the reference's generate(talker_do_sample=False): greedy with its repetition penalty.
GREEDY_TALKER = SamplingParams(temperature=0.0, repetition_penalty=1.05)
SPEAKER = "Ethan"
SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
          "perceiving auditory and visual inputs, as well as generating text and speech.")
TEXT_CONVERSATION = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]


@dataclasses.dataclass(frozen=True)
class Settings:
    audio_seconds: float = 10.0  # the prompt's synthetic audio clip
    image_size: int = 448  # the prompt's synthetic square image (448 -> 196 tokens)
    decode_tokens: int = 16  # thinker decode steps timed, and text tokens in end-to-end runs
    talker_frames: int = 16  # talker + code predictor frames timed
    code2wav_frames: int = 50  # frames vocoded (80 ms each)
    e2e_frames: int = 24  # speech frames per request in the speech-throughput runs
    # Time to first audio is taken on a long spoken reply: 64 text tokens and 4 frames (320 ms
    # of speech) per token, about the pace of normal speech (~3 tokens/s at 12.5 frames/s).
    # The random model never stops by itself, so both backends are held to these counts.
    reply_tokens: int = 64
    reply_frames: int = 256
    batches: tuple[int, ...] = (1, 4, 8)  # concurrent requests for speech throughput

    def __post_init__(self) -> None:
        # per-step medians need a few steps (the reference's first step is its prefill)
        if (self.decode_tokens < 3 or self.talker_frames < 2 or self.e2e_frames < 3
                or self.reply_tokens < 3 or self.reply_frames < 3):
            raise ValueError("need decode_tokens >= 3, talker_frames >= 2, e2e_frames >= 3, "
                             "reply_tokens >= 3, reply_frames >= 3")


DEFAULT = Settings()
QUICK = Settings(audio_seconds=4.0, image_size=224, decode_tokens=6, talker_frames=6,
                 code2wav_frames=16, e2e_frames=8, reply_tokens=8, reply_frames=24,
                 batches=(1, 2))


# -- the benchmark checkpoint ---------------------------------------------------------------------

def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and key.endswith("config") and key in base:
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def bench_config() -> dict[str, Any]:
    """config.json of the benchmark model: the tiny config's ids, real widths, shallow depth."""
    config = copy.deepcopy(TINY_CONFIG)
    _merge(config, REAL_WIDTHS)
    _merge(config, SHALLOW_DEPTH)
    return config


def bench_checkpoint(config: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """The random-weight checkpoint for `config` in the user cache, keyed by the config; built on
    first use (5.6 GB, a few minutes)."""
    config = config or bench_config()
    key = json.dumps({"config": config, "seed": seed, "version": BUILD_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qomni"
    path = cache / f"bench-{digest}"
    if (path / "config.json").exists():
        return path
    _log(f"building the random real-width checkpoint in {path} (once; a few minutes)")
    tmp = cache / f"bench-{digest}.tmp{os.getpid()}"
    # Built in bf16 (the published checkpoint's dtype): an fp32 model plus its random state dict
    # would not fit 24 GiB. The loader converts to the benchmark's dtype.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        make_tiny(tmp, config=config, seed=seed, max_shard_bytes=2 << 30)
    finally:
        torch.set_default_dtype(default)
    if path.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        tmp.replace(path)
    return path


def media_conversation(settings: Settings) -> list[dict[str, Any]]:
    """System prompt + a synthetic image and audio clip + a question (a few hundred tokens)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    t = np.arange(int(settings.audio_seconds * 16000)) / 16000
    audio = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.01 * rng.standard_normal(t.size)
    size = settings.image_size
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": [
                {"type": "image", "image": image},
                {"type": "audio", "audio": audio.astype(np.float32)},
                {"type": "text", "text": "What can you see and hear? Answer in one sentence."}]}]


# -- measuring ------------------------------------------------------------------------------------

def _log(message: str) -> None:
    print(f"qomni bench: {message}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _best(fn: Callable[[], Any], device: torch.device, budget_s: float = 1.0) -> float:
    """Best of up to 5 timed runs after a warm-up, as many as fit `budget_s` (bf16 GEMMs on a
    CPU without bf16 instructions take seconds each)."""
    first, _ = _timed(fn, device)  # warm-up
    reps = max(1, min(5, int(budget_s / first)))
    return min(_timed(fn, device)[0] for _ in range(reps))


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[-1] * math.prod(out_shape)


def _sdpa_flops(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, s, d = q_shape
    return 4 * b * h * s * k_shape[-2] * d  # q·kᵀ and p·v


def _packed_linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[-1] * math.prod(out_shape)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, plus the ops the models use that it does not know (MoE grouped
    GEMM; the CPU attention kernel; PackedLinear's oneDNN inner product)."""
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._grouped_mm: _grouped_mm_flops,
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
        torch.ops.mkldnn._linear_pointwise: _packed_linear_flops})


def param_count(model: nn.Module) -> int:
    """Parameters, with the weights PackedLinear holds outside them."""
    packed = sum(m.weight.numel() for m in model.modules() if isinstance(m, PackedLinear))
    return packed + sum(p.numel() for p in model.parameters())


class CallTimer:
    """Wall time of every call of some modules (forward hooks), and the FLOPs each ran when a
    FlopCounterMode is active: calls[name] = [(seconds, flops), ...]; starts[name] = the
    perf_counter() at each call's start."""

    def __init__(self, modules: Mapping[str, nn.Module], device: torch.device,
                 flops: FlopCounterMode | None = None):
        self.modules, self.device, self.flops = modules, device, flops
        self.calls: dict[str, list[tuple[float, int]]] = {name: [] for name in modules}
        self.starts: dict[str, list[float]] = {name: [] for name in modules}
        self._open: dict[str, tuple[float, int]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> Self:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(partial(self._start, name)))
            self._handles.append(module.register_forward_hook(partial(self._stop, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def seconds(self, name: str) -> float:
        return sum(s for s, _ in self.calls[name])

    def total_flops(self, name: str) -> int:
        return sum(f for _, f in self.calls[name])

    def _counted(self) -> int:
        return self.flops.get_total_flops() if self.flops is not None else 0

    def _start(self, name: str, module: nn.Module, args: Any) -> None:
        _sync(self.device)
        self._open[name] = (time.perf_counter(), self._counted())
        self.starts[name].append(self._open[name][0])

    def _stop(self, name: str, module: nn.Module, args: Any, out: Any) -> None:
        _sync(self.device)
        start, flops = self._open.pop(name)
        self.calls[name].append((time.perf_counter() - start, self._counted() - flops))


def calibrate(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Memory read bandwidth (sum over a tensor far larger than any cache) and GEMM rate in the
    benchmark's dtype, measured in this process."""
    big = torch.ones((1 << 30) // 4, device=device)  # 1 GiB of fp32
    read = _nbytes(big) / _best(big.sum, device)
    del big
    # Larger GEMMs run closer to peak; grow until one takes 0.1 s (bf16 on a CPU without bf16
    # instructions stays at the first size: it already takes seconds).
    n, largest = 1024, 8192 if device.type == "cuda" else 4096
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        seconds, _ = _timed(partial(torch.mm, a, b), device)
        if seconds >= 0.1 or n >= largest:
            break
        n *= 2
    rate = 2 * n**3 / _best(partial(torch.mm, a, b), device)
    return {"read_bytes_per_s": read, "matmul_flops_per_s": rate, "gemm_n": n}


def best_calibration(*runs: Mapping[str, float]) -> dict[str, float]:
    """The fastest of several calibrations (taken at the start and the end of a run): other work
    on a shared machine only ever slows a measurement, and a floor must not be inflated by it."""
    best = dict(max(runs, key=lambda c: c["matmul_flops_per_s"]))
    best["read_bytes_per_s"] = max(c["read_bytes_per_s"] for c in runs)
    return best


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes(module: nn.Module, tokens: int = 1) -> float:
    """Bytes of `module`'s weights one step over `tokens` tokens reads: every weight, except that
    MoE layers read only the experts the tokens pick (expected count under uniform routing) and
    embedding tables only the tokens' rows."""
    total, partial_ids = 0.0, set()
    for m in module.modules():
        if isinstance(m, SparseMoE):
            e = m.experts.num_experts
            used = e * (1 - (1 - m.top_k / e) ** tokens)
            for p in m.experts.parameters():
                total += _nbytes(p) * used / e
                partial_ids.add(id(p))
        elif isinstance(m, nn.Embedding):
            total += tokens * m.weight.shape[1] * m.weight.element_size()
            partial_ids.add(id(m.weight))
        elif isinstance(m, PackedLinear):  # its packed weight is no parameter
            total += _nbytes(m.weight)
    return total + sum(_nbytes(p) for p in module.parameters() if id(p) not in partial_ids)


def kv_bytes(cfg: TextConfig, context: float, element_size: int) -> float:
    """Keys and values one decode step reads at `context` cached tokens."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context \
        * element_size


def stage(seconds: float, work: float | None = None, unit: str | None = None, *,
          bytes_read: float | None = None, flops: float | None = None) -> dict[str, Any]:
    """One result row: `work` units (tok, frames, audio s) in `seconds`, and what bounds the
    same work on this hardware: the bytes of weights and KV it must read (decode-type) or the
    FLOPs it must run (prefill-type). `set_floors` turns those into seconds."""
    return {"seconds": seconds, "work": work, "unit": unit, "bytes_read": bytes_read,
            "flops": flops, "floor_seconds": None, "floor": None}


def set_floors(stages: Mapping[str, dict[str, Any]], calib: Mapping[str, float]) -> None:
    for row in stages.values():
        if row["bytes_read"]:
            row["floor_seconds"] = row["bytes_read"] / calib["read_bytes_per_s"]
            per = row["bytes_read"] / row["work"] / 1e9
            row["floor"] = f"memory: {per:.3g} GB/{row['unit'].removesuffix('s')}"
        elif row["flops"]:
            row["floor_seconds"] = row["flops"] / calib["matmul_flops_per_s"]
            row["floor"] = f"compute: {row['flops'] / 1e9:.3g} GFLOP"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# -- qomni ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Prefilled:
    embeds: torch.Tensor  # [1, S, D] input embeddings, media in place
    captured: torch.Tensor | None  # [1, S, D] hidden after accept_hidden_layer layers
    cache: KVCache  # with room for the decode steps
    token: torch.Tensor  # [1] first generated token


def _prefill_stages(model: OmniModel, inputs: ProcessedInputs, settings: Settings,
                    stages: dict[str, Any]) -> _Prefilled:
    from qomni.engine.generate import embed_batch

    thinker = model.thinker
    device = thinker.lm_head.weight.device
    capture = model.cfg.talker.accept_hidden_layer if model.audio_output else None

    def run() -> _Prefilled:
        embeds, pos, _, lengths, deepstack = embed_batch(thinker, [inputs], device)
        cache = thinker.model.new_cache(1, len(inputs) + settings.decode_tokens + 2)
        hidden, captured = thinker(embeds, pos, cache, lengths, deepstack, capture)
        return _Prefilled(embeds, captured, cache, thinker.logits(hidden[:, -1]).argmax(-1))

    parts = {"audio_encoder": thinker.audio_tower, "vision_encoder": thinker.visual,
             "thinker_lm": thinker}
    counter = flop_counter()
    with counter, CallTimer(parts, device, counter) as counted:
        run()  # warm-up, counting FLOPs
    best = None
    for _ in range(REPEATS):
        with CallTimer(parts, device) as timer:
            seconds, out = _timed(run, device)
        if best is None or seconds < best[0]:
            best = seconds, timer
    seconds, timer = best
    stages["prefill"] = stage(seconds, len(inputs), "tok", flops=counter.get_total_flops())
    for name in parts:
        stages[name] = stage(timer.seconds(name), flops=counted.total_flops(name))
    return out


def _decode_stage(model: OmniModel, inputs: ProcessedInputs, pre: _Prefilled, steps: int,
                  stages: dict[str, Any]) -> None:
    thinker = model.thinker
    device = thinker.lm_head.weight.device
    ones = torch.ones(1, dtype=torch.long, device=device)
    token = pre.token

    def step(tok: torch.Tensor) -> torch.Tensor:
        pos = decode_positions(pre.cache.lengths, inputs.rope_delta)
        hidden, _ = thinker(thinker.embed(tok[:, None]), pos, pre.cache, ones)
        return thinker.logits(hidden[:, 0]).argmax(-1)

    token = step(token)  # warm-up
    times = []
    for _ in range(steps):
        seconds, token = _timed(partial(step, token), device)
        times.append(seconds)
    per_step = weight_bytes(thinker.model) + weight_bytes(thinker.lm_head) + kv_bytes(
        model.cfg.thinker.text, len(inputs) + steps / 2, thinker.lm_head.weight.element_size())
    stages["thinker_decode"] = stage(median(times) * steps, steps, "tok",
                                     bytes_read=per_step * steps)


def _talker_stages(model: OmniModel, inputs: ProcessedInputs, pre: _Prefilled, frames: int,
                   stages: dict[str, Any]) -> None:
    """The talker's prefill, then frames of (code predictor for the frame's codebooks 1..15,
    talker step for the next frame's codebook 0), as the engine runs them."""
    from qomni.engine.speech import build_talker_prompt

    talker, tcfg = model.talker, model.cfg.talker
    device = talker.codec_head.weight.device
    prompt = build_talker_prompt(model, inputs, pre.embeds[0], pre.captured[0], int(pre.token),
                                 tcfg.speaker(SPEAKER))
    n = prompt.embeds.shape[0]
    cache = talker.new_cache(1, n + frames + 2)
    ones = torch.ones(1, dtype=torch.long, device=device)

    def choose(hidden: torch.Tensor) -> torch.Tensor:
        return talker.code0_logits(hidden).argmax(-1)

    def step(codec_next: torch.Tensor) -> torch.Tensor:
        text = talker.text_projection(model.thinker.embed(pre.token))  # the trailing text token
        pos = decode_positions(cache.lengths, prompt.rope_delta)
        return talker((codec_next + text)[:, None], pos, cache, ones)[:, 0]

    prefill_s, hidden = _timed(lambda: talker(prompt.embeds[None], prompt.positions[:, None],
                                              cache, torch.tensor([n], device=device))[:, -1],
                               device)
    code0 = choose(hidden)
    predictor, steps = [], []
    for frame in range(frames + 1):  # frame 0 is a warm-up
        t1, (_, codec_next) = _timed(partial(talker.predict_residuals, hidden, code0), device)
        t2, hidden = _timed(partial(step, codec_next), device)
        code0 = choose(hidden)
        if frame:
            predictor.append(t1)
            steps.append(t2)
    cp = talker.code_predictor
    element = talker.codec_head.weight.element_size()
    # every code-predictor step reads all its layers; each codebook's head is read once a frame
    cp_bytes = (tcfg.num_code_groups - 1) * weight_bytes(cp.model.layers) + weight_bytes(cp.lm_head)
    step_bytes = (weight_bytes(talker.model) + weight_bytes(talker.codec_head)
                  + weight_bytes(talker.text_projection)
                  + kv_bytes(tcfg.text, n + frames / 2, element))
    stages["talker_prefill"] = stage(prefill_s, n, "tok")
    both = [a + b for a, b in zip(predictor, steps)]
    stages["talker"] = stage(median(both) * frames, frames, "frames",
                             bytes_read=(cp_bytes + step_bytes) * frames)
    stages["code_predictor"] = stage(median(predictor) * frames, frames, "frames",
                                     bytes_read=cp_bytes * frames)
    stages["talker_step"] = stage(median(steps) * frames, frames, "frames",
                                  bytes_read=step_bytes * frames)


def random_codes(cfg: OmniConfig, frames: int, device: torch.device) -> torch.Tensor:
    """[1, G, frames] codec codes (the same for every backend)."""
    gen = torch.Generator().manual_seed(0)
    c = cfg.code2wav
    return torch.randint(0, c.codebook_size, (1, c.num_quantizers, frames), generator=gen
                         ).to(device)


def _code2wav_stages(model: OmniModel, frames: int, stages: dict[str, Any]) -> None:
    c2w = model.code2wav
    device = c2w.code_embedding.weight.device
    codes = random_codes(model.cfg, frames, device)
    rate = model.cfg.code2wav.sample_rate

    def stream() -> int:
        vocoder, done, size, samples = StreamingCode2Wav(c2w), 0, FIRST_CHUNK, 0
        while done < frames:
            samples += vocoder.push(codes[:, :, done: done + size]).shape[-1]
            done, size = done + size, CHUNK
        return samples

    for name, run in (("code2wav_stream", stream), ("code2wav_full", lambda: c2w(codes).shape[-1])):
        counter = flop_counter()
        with counter, torch.inference_mode():
            run()  # warm-up, counting FLOPs
        with torch.inference_mode():
            seconds, samples = min(_timed(run, device) for _ in range(REPEATS))
        stages[name] = stage(seconds, samples / rate, "audio s",
                             flops=counter.get_total_flops())


def _end_to_end(omni: Any, conversation: list, settings: Settings) -> dict[str, Any]:
    """One long spoken reply through Omni.stream: times from the call to the first text and the
    first audio chunk. The stream is closed there (which aborts the request): the rest of the
    reply is what the throughput runs measure."""
    kwargs = {"max_new_tokens": settings.reply_tokens, "max_audio_frames": settings.reply_frames,
              "talker_sampling": GREEDY_TALKER, "speaker": SPEAKER}
    first_text = first_audio = None
    stream = omni.stream(conversation, **kwargs)
    start = time.perf_counter()
    for event in stream:
        now = time.perf_counter() - start
        if isinstance(event, TextDelta) and first_text is None:
            first_text = now
        elif isinstance(event, AudioChunk):
            first_audio, first_samples = now, event.pcm.size
            break
    stream.close()
    if first_audio is None:
        raise RuntimeError("the reply ended without audio")
    return {"time_to_first_text_s": first_text, "time_to_first_audio_s": first_audio,
            "first_chunk_s": first_samples / omni.config.code2wav.sample_rate,
            "tokens": settings.reply_tokens, "frames": settings.reply_frames}


def _first_audio(omni: Any, conversation: list, settings: Settings, **extra: Any) -> float:
    kwargs = {"max_new_tokens": settings.reply_tokens, "max_audio_frames": settings.reply_frames,
              "talker_sampling": GREEDY_TALKER, "speaker": SPEAKER, **extra}
    stream = omni.stream(conversation, **kwargs)
    start = time.perf_counter()
    for event in stream:
        if isinstance(event, AudioChunk):
            stream.close()
            return time.perf_counter() - start
    raise RuntimeError("the reply ended without audio")


def spoken_turn(settings: Settings) -> list[dict[str, Any]]:
    """System prompt + a user turn that is only audio, as a voice assistant gets it. The clip's
    loudest moment is at its start, so its early windows are final once spoken (a louder moment
    later would raise the log-mel floor and change them)."""
    rng = np.random.default_rng(1)
    t = np.arange(int(settings.audio_seconds * 16000)) / 16000
    audio = 0.2 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.01 * rng.standard_normal(t.size)
    audio[:3200] *= 3
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "audio", "audio": audio.astype(np.float32)}]}]


def _voice_turn(omni: Any, settings: Settings) -> dict[str, Any]:
    """End of speech -> first audio for a spoken turn: prefilled whole when it ends, and with
    the conversation and the turn's finished encoder windows prefilled while it was spoken (the
    prefix a realtime session has opened by then). The audio encoder's window cache is emptied
    before each run, so only what was encoded while the turn was spoken is reused."""
    conversation = spoken_turn(settings)
    tower = omni.model.thinker.audio_tower
    size = tower.window_cache.max_windows if tower.window_cache else 0
    tower.cache_windows(size)
    whole = _first_audio(omni, conversation, settings)
    tower.cache_windows(size)
    audio = conversation[-1]["content"][0]["audio"]
    pre = omni.processor.pre
    windows = omni.processor.finished_audio_windows(audio.size // pre.hop_length)
    spoken = audio[:(windows * omni.processor.audio_window_frames + 2) * pre.hop_length]
    turn = [conversation[0], {"role": "user", "content": [{"type": "audio", "audio": spoken}]}]
    prefix = omni.open_prefix(turn, partial=True) if windows else omni.open_prefix(
        conversation[:1])
    deadline = time.monotonic() + 600
    while not prefix.ready:
        if time.monotonic() > deadline:
            raise RuntimeError("the prefix was never prefilled")
        time.sleep(0.01)
    engine = omni._loop().engine
    cached = engine.cached_tokens
    ahead = _first_audio(omni, conversation, settings, prefix=prefix)
    return {"prefilled_whole_s": whole, "prefilled_ahead_s": ahead, "prefix_tokens": len(prefix),
            "prompt_tokens": len(omni.process(conversation)), "windows": windows,
            "cached_tokens": engine.cached_tokens - cached}


def _throughput(omni: Any, batch: int, settings: Settings) -> dict[str, Any]:
    """`batch` speaking requests at once through Omni.generate (the engine batches them)."""
    convs = [TEXT_CONVERSATION] * batch
    wall, outs = _timed(lambda: omni.generate(
        convs, max_new_tokens=settings.decode_tokens, max_audio_frames=settings.e2e_frames,
        talker_sampling=GREEDY_TALKER, speaker=SPEAKER), omni.device)
    audio = sum(o.audio.size for o in outs) / omni.config.code2wav.sample_rate
    return {"batch": batch, "wall_s": wall, "audio_s": audio,
            "frames": sum(int(o.codes.shape[1]) for o in outs)}


def bench_qomni(path: str | Path, settings: Settings = DEFAULT, dtype: str | None = None,
                device: str | None = None) -> dict[str, Any]:
    """Every qomni measurement on the checkpoint at `path` (in this process)."""
    from qomni.omni import Omni

    omni = Omni.load(path, dtype=dtype, device=device, progress=False,
                     max_num_seqs=max(settings.batches), max_model_len=2048,
                     first_chunk_frames=FIRST_CHUNK, chunk_frames=CHUNK)
    dev, model = omni.device, omni.model
    if not model.audio_output:
        raise ValueError(f"{path} has no talker: qomni bench measures speech output too")
    _log(f"qomni: loaded on {dev} as {omni.dtype}; calibrating")
    calib = calibrate(dev, omni.dtype)
    conversation = media_conversation(settings)
    processing_s, inputs = _timed(lambda: omni.process(conversation), dev)
    stages: dict[str, Any] = {}
    with torch.inference_mode():
        _log(f"qomni: prefill of {len(inputs)} tokens")
        pre = _prefill_stages(model, inputs, settings, stages)
        _log("qomni: thinker decode")
        _decode_stage(model, inputs, pre, settings.decode_tokens, stages)
        _log("qomni: talker and code predictor")
        _talker_stages(model, inputs, pre, settings.talker_frames, stages)
        del pre
        _log("qomni: code2wav")
        _code2wav_stages(model, settings.code2wav_frames, stages)
    _log("qomni: end to end (Omni.stream)")
    omni.generate(TEXT_CONVERSATION, max_new_tokens=2, max_audio_frames=2)  # starts the engine
    e2e = _end_to_end(omni, conversation, settings)
    _log("qomni: a spoken turn, prefilled whole and while spoken")
    voice = _voice_turn(omni, settings)
    throughput = []
    for batch in settings.batches:
        _log(f"qomni: speech throughput at batch {batch}")
        throughput.append(_throughput(omni, batch, settings))
    calib = best_calibration(calib, calibrate(dev, omni.dtype))
    set_floors(stages, calib)
    return {"backend": "qomni", "device": str(dev), "dtype": str(omni.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "params": param_count(model), "calibration": calib,
            "prompt_tokens": len(inputs), "processing_s": processing_s, "stages": stages,
            "e2e": e2e, "voice_turn": voice, "throughput": throughput, "peak_rss_gib": peak_rss_gib(),
            "load_average_after": os.getloadavg()[0]}


# -- transformers ---------------------------------------------------------------------------------

def hf_inputs(x: ProcessedInputs, device: torch.device, batch: int = 1) -> dict[str, Any]:
    """transformers' generate() inputs from qomni's processor output (equal to its own
    processor's, see the parity tests). `batch` > 1 repeats a text-only prompt."""
    ids = x.input_ids[None].expand(batch, -1)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    media = x.media
    if batch > 1 and (media.audio_features is not None or media.pixel_values is not None):
        raise ValueError("batched transformers inputs are text-only here")
    if media.audio_features is not None:
        lengths = media.audio_lengths.tolist()
        feats = media.audio_features.new_zeros(len(lengths), media.audio_features.shape[0],
                                               max(lengths))
        mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
        for i, chunk in enumerate(media.audio_features.split(lengths, dim=-1)):
            feats[i, :, : chunk.shape[-1]] = chunk
            mask[i, : chunk.shape[-1]] = 1
        out |= {"input_features": feats, "feature_attention_mask": mask}
    if media.pixel_values is not None:
        out |= {"pixel_values": media.pixel_values, "image_grid_thw": media.image_grid_thw}
    return {k: v.to(device) for k, v in out.items()}


def _hf_generate(model: Any, inputs: dict[str, Any], tokens: int, frames: int) -> Any:
    return model.generate(**inputs, speaker=SPEAKER, return_audio=True,
                          thinker_max_new_tokens=tokens, thinker_do_sample=False,
                          talker_max_new_tokens=frames + 1,  # its cap counts the EOS step
                          talker_do_sample=False, talker_repetition_penalty=1.05)


def _hf_samples(wavs: Any) -> int:
    return sum(w.shape[-1] for w in wavs) if isinstance(wavs, list) else wavs.shape[-1]


def _hf_speech_run(model: Any, inputs: dict[str, Any], settings: Settings, sample_rate: int,
                   stages: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One multimodal speaking generate(); its stages timed by forward hooks."""
    parts = {"prefill": model.thinker, "audio_encoder": model.thinker.model.audio_tower,
             "vision_encoder": model.thinker.model.visual, "talker_call": model.talker,
             "code2wav": model.code2wav}
    with CallTimer(parts, device) as calls:
        total, (seqs, wavs) = _timed(
            lambda: _hf_generate(model, inputs, settings.reply_tokens, settings.reply_frames),
            device)
    tokens = seqs.shape[1] - inputs["input_ids"].shape[1]
    frames = len(calls.calls["talker_call"]) - 1  # each call after the prefill ends a frame
    # A decode step's cost, generate()'s own work included, is the time from one forward call
    # to the next (the first call is the prefill).
    decode = float(median(np.diff(calls.starts["prefill"][1:])))
    frame = float(median(np.diff(calls.starts["talker_call"][1:])))
    stages["prefill"] = stage(calls.calls["prefill"][0][0], inputs["input_ids"].shape[1], "tok")
    stages["audio_encoder"] = stage(calls.seconds("audio_encoder"))
    stages["vision_encoder"] = stage(calls.seconds("vision_encoder"))
    stages["thinker_decode"] = stage(decode * (tokens - 1), tokens - 1, "tok")
    stages["talker_prefill"] = stage(calls.calls["talker_call"][0][0])
    stages["talker"] = stage(frame * frames, frames, "frames")
    # no streaming: the first audio sample exists when generate() returns
    return {"time_to_first_audio_s": total, "total_s": total, "tokens": tokens, "frames": frames,
            "audio_s": _hf_samples(wavs) / sample_rate, "code2wav_s": calls.seconds("code2wav")}


def bench_transformers(path: str | Path, settings: Settings = DEFAULT, dtype: str | None = None,
                       device: str | None = None) -> dict[str, Any]:
    """The same measurements through transformers' reference implementation (in this process)."""
    try:
        import transformers
        from transformers import Qwen3OmniMoeForConditionalGeneration
    except ImportError as e:
        raise RuntimeError(f"--vs-transformers needs transformers, a test extra ({e}): "
                           "pip install 'qomni[test]'") from None
    from qomni.multimodal.processor import Processor
    from qomni.omni import resolve_dtype

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = resolve_dtype(dtype, dev)
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, dtype=dt).to(dev).eval()
    # The reference's Q1 bug: its talker reads audio_config, which only the thinker's config has
    # (audio together with an image crashes without this).
    model.talker.config.audio_config = model.config.thinker_config.audio_config
    _log(f"transformers {transformers.__version__}: loaded on {dev} as {dt}; calibrating")
    calib = calibrate(dev, dt)
    cfg = OmniConfig.from_hf(Path(path))
    processor = Processor(path, cfg)
    text = processor(TEXT_CONVERSATION)
    stages: dict[str, Any] = {}
    with torch.inference_mode():
        _hf_generate(model, hf_inputs(text, dev), 2, 2)  # warm-up
        _log("transformers: one multimodal generate(return_audio=True)")
        inputs = hf_inputs(processor(media_conversation(settings)), dev)
        e2e = _hf_speech_run(model, inputs, settings, cfg.code2wav.sample_rate, stages, dev)
        _log("transformers: code2wav")
        codes = random_codes(cfg, settings.code2wav_frames, dev)
        decode = partial(model.code2wav.chunked_decode, codes, chunk_size=300,
                         left_context_size=25)
        seconds, wav = min((_timed(decode, dev) for _ in range(REPEATS)), key=lambda r: r[0])
        stages["code2wav_full"] = stage(seconds, wav.shape[-1] / cfg.code2wav.sample_rate,
                                        "audio s")
        throughput = []
        for batch in settings.batches:
            _log(f"transformers: speech throughput at batch {batch}")
            run = partial(_hf_generate, model, hf_inputs(text, dev, batch),
                          settings.decode_tokens, settings.e2e_frames)
            wall, (_, wavs) = _timed(run, dev)
            throughput.append({"batch": batch, "wall_s": wall,
                               "audio_s": _hf_samples(wavs) / cfg.code2wav.sample_rate})
    calib = best_calibration(calib, calibrate(dev, dt))
    return {"backend": "transformers", "version": transformers.__version__, "device": str(dev),
            "dtype": str(dt).removeprefix("torch."), "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters()), "calibration": calib,
            "prompt_tokens": int(inputs["input_ids"].shape[1]), "stages": stages, "e2e": e2e,
            "throughput": throughput, "peak_rss_gib": peak_rss_gib(),
            "load_average_after": os.getloadavg()[0]}


# -- running and reporting ------------------------------------------------------------------------

def _child(name: str, args: tuple, out: str) -> None:
    try:
        result = globals()[name](*args)
    except Exception as e:  # noqa: BLE001 - reported by the parent, with the other backend
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    Path(out).write_text(json.dumps(result))


def in_subprocess(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """fn(*args) in a fresh process, so each backend's memory is its own and freed after."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = ctx.Process(target=_child, args=(fn.__name__, args, str(out)))
        proc.start()
        proc.join()
        if out.exists():
            return json.loads(out.read_text())
    hint = " (killed: out of memory?)" if proc.exitcode == -9 else ""
    return {"error": f"{fn.__name__} exited with code {proc.exitcode}{hint}"}


def machine_info() -> dict[str, Any]:
    cpu, flags, ram = platform.processor() or platform.machine(), set(), None
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    if Path("/proc/meminfo").exists():
        total_kib = Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]
        ram = int(total_kib) / 2**20
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram, "torch": torch.__version__,
            "python": platform.python_version(),
            # other work on the machine skews every number: recorded at the start and per backend
            "load_average": os.getloadavg()[0],
            # bf16 speed on CPU depends on these (see docs/benchmarks.md)
            "simd": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def model_summary(path: Path) -> dict[str, Any]:
    cfg = OmniConfig.from_hf(path)
    depth = {"thinker": cfg.thinker.text.num_hidden_layers,
             "audio": cfg.thinker.audio.encoder_layers, "vision": cfg.thinker.vision.depth}
    if cfg.talker is not None:
        depth |= {"talker": cfg.talker.text.num_hidden_layers,
                  "code predictor": cfg.talker.code_predictor.num_hidden_layers,
                  "code2wav": cfg.code2wav.num_hidden_layers}
    return {"path": str(path), "depth": depth}


def run(model: str | None = None, *, dtype: str | None = None, device: str | None = None,
        quick: bool = False, vs_transformers: bool = False) -> dict[str, Any]:
    """The whole benchmark; `model` None means the cached real-width shallow checkpoint."""
    from qomni.omni import resolve_model_path

    settings = QUICK if quick else DEFAULT
    path = bench_checkpoint() if model is None else resolve_model_path(model)
    results: dict[str, Any] = {"machine": machine_info(), "model": model_summary(path),
                               "settings": dataclasses.asdict(settings)}
    results["qomni"] = in_subprocess(bench_qomni, str(path), settings, dtype, device)
    if vs_transformers:
        results["transformers"] = in_subprocess(bench_transformers, str(path), settings, dtype,
                                                device)
        if "error" not in results["qomni"] and "error" not in results["transformers"]:
            results["comparison"] = compare(results["qomni"], results["transformers"])
    return results


def _rate(row: Mapping[str, Any]) -> float:
    return row["work"] / row["seconds"]


# metric -> (label, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "prefill_s": ("prefill incl. encoders (s)", False),
    "audio_encoder_s": ("  audio encoder (s)", False),
    "vision_encoder_s": ("  vision encoder (s)", False),
    "thinker_decode_tok_per_s": ("thinker decode, batch 1 (tok/s)", True),
    "talker_prefill_s": ("talker prefill (s)", False),
    "talker_frames_per_s": ("talker incl. code predictor (frames/s)", True),
    "code2wav_rtf": ("code2wav RTF, whole utterance", False),
    "time_to_first_audio_s": ("time to first audio (s)", False),
}


def headline(result: Mapping[str, Any]) -> dict[str, float]:
    """The numbers both backends report, by METRICS key (plus speech throughput per batch)."""
    s = result["stages"]
    out = {"prefill_s": s["prefill"]["seconds"], "audio_encoder_s": s["audio_encoder"]["seconds"],
           "vision_encoder_s": s["vision_encoder"]["seconds"],
           "thinker_decode_tok_per_s": _rate(s["thinker_decode"]),
           "talker_prefill_s": s["talker_prefill"]["seconds"],
           "talker_frames_per_s": _rate(s["talker"]),
           "code2wav_rtf": 1 / _rate(s["code2wav_full"]),
           "time_to_first_audio_s": result["e2e"]["time_to_first_audio_s"]}
    for t in result["throughput"]:
        out[f"speech_throughput_batch{t['batch']}"] = t["audio_s"] / t["wall_s"]
    return out


def _higher_is_better(metric: str) -> bool:
    return metric.startswith("speech_throughput") or METRICS[metric][1]


def compare(qomni: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """speedup > 1: qomni is faster (rate ratio qomni/transformers, time ratio
    transformers/qomni)."""
    q, r = headline(qomni), headline(reference)
    out = {}
    for metric in q.keys() & r.keys():
        ratio = q[metric] / r[metric]
        out[metric] = {"qomni": q[metric], "transformers": r[metric],
                       "speedup": ratio if _higher_is_better(metric) else 1 / ratio}
    return out


STAGE_LABELS = {
    "prefill": "prefill (encoders + thinker)", "audio_encoder": "  audio encoder",
    "vision_encoder": "  vision encoder", "thinker_lm": "  thinker LM",
    "thinker_decode": "thinker decode, batch 1", "talker_prefill": "talker prefill",
    "talker": "talker frame incl. code predictor", "code_predictor": "  code predictor (15 cb)",
    "talker_step": "  talker step", "code2wav_stream": "code2wav, streaming chunks",
    "code2wav_full": "code2wav, whole utterance",
}


def _stage_line(label: str, row: Mapping[str, Any]) -> str:
    rate = ""
    if row["unit"] == "audio s":
        rate = f"RTF {row['seconds'] / row['work']:.2f}"
    elif row["work"]:
        rate = f"{_rate(row):.2f} {row['unit']}/s"
    floor = ratio = ""
    if row["floor_seconds"]:
        floor = f"{row['floor_seconds']:.3f} s"
        ratio = f"{row['seconds'] / row['floor_seconds']:.1f}"
    return (f"{label:<36}{row['seconds']:>9.3f} s  {rate:<15}{floor:>9}  {ratio:>10}  "
            f"{row['floor'] or ''}").rstrip()


def _qomni_report(r: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    c = r["calibration"]
    lines = [
        (f"qomni on {r['device']} {r['dtype']}, {r['threads']} threads, "
         f"{r['params'] / 1e9:.2f} B parameters; peak RSS {r['peak_rss_gib']:.1f} GiB; load "
         f"average {r['load_average_after']:.1f} at the end"),
        (f"calibration: memory read {c['read_bytes_per_s'] / 1e9:.1f} GB/s; GEMM "
         f"{c['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s ({r['dtype']}, {c['gemm_n']}³)"),
        (f"prompt: {r['prompt_tokens']} tokens = system + {settings['image_size']}² image + "
         f"{settings['audio_seconds']:g} s audio + text (processed in "
         f"{r['processing_s']:.2f} s)"),
        "",
        f"{'stage':<36}{'time':>11}  {'rate':<15}{'floor':>9}  {'meas/floor':>10}  floor basis"]
    lines += [_stage_line(STAGE_LABELS[k], row) for k, row in r["stages"].items()]
    e = r["e2e"]
    lines += ["", (f"time to first audio, Omni.stream of a {e['tokens']}-token, {e['frames']}-frame "
                   f"reply: first text {e['time_to_first_text_s']:.2f} s, first audio "
                   f"{e['time_to_first_audio_s']:.2f} s ({e['first_chunk_s'] * 1e3:.0f} ms "
                   "chunk)"),
              _voice_line(r.get("voice_turn"), settings),
              (f"speech throughput, Omni.generate ({settings['decode_tokens']} text tokens + "
               f"{settings['e2e_frames']} frames per request):")]
    lines += [f"  batch {t['batch']}: {t['audio_s']:.2f} s of speech in {t['wall_s']:.2f} s = "
              f"{t['audio_s'] / t['wall_s']:.3f} audio s per s" for t in r["throughput"]]
    return lines


def _voice_line(v: Mapping[str, Any] | None, settings: Mapping[str, Any]) -> str:
    if v is None:
        return "spoken turn: not measured"
    return (f"spoken turn (system + {settings['audio_seconds']:g} s of audio, "
            f"{v['prompt_tokens']} tokens), end of speech -> first audio: "
            f"{v['prefilled_whole_s']:.2f} s prefilled whole, {v['prefilled_ahead_s']:.2f} s with "
            f"{v['prefix_tokens']} tokens ({v['windows']} audio windows) prefilled while spoken, "
            f"{v['cached_tokens']} of them continued")


def _comparison_report(results: Mapping[str, Any]) -> list[str]:
    ref = results["transformers"]
    c = ref["calibration"]
    lines = ["", (f"vs transformers {ref['version']} (same checkpoint, {ref['device']} "
                  f"{ref['dtype']}; peak RSS {ref['peak_rss_gib']:.1f} GiB; load average "
                  f"{ref['load_average_after']:.1f} at the end; during its run: memory read "
                  f"{c['read_bytes_per_s'] / 1e9:.1f} GB/s, GEMM "
                  f"{c['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s):"),
             f"{'metric':<42}{'qomni':>10}{'transformers':>14}{'speedup':>10}"]
    labels = dict(METRICS)
    for t in results["qomni"]["throughput"]:
        labels[f"speech_throughput_batch{t['batch']}"] = (
            f"speech throughput batch {t['batch']} (audio s/s)", True)
    for metric, (label, _) in labels.items():
        if metric in results["comparison"]:
            m = results["comparison"][metric]
            lines.append(f"{label:<42}{m['qomni']:>10.3f}{m['transformers']:>14.3f}"
                         f"{m['speedup']:>9.1f}×")
    lines.append("speedup: qomni rate / transformers rate, or transformers time / qomni time "
                 "(> 1: qomni is faster)")
    return lines


def format_report(results: Mapping[str, Any]) -> str:
    m = results["machine"]
    depth = ", ".join(f"{k} {v}" for k, v in results["model"]["depth"].items())
    lines = [f"machine: {m['cpu']} ({', '.join(m['simd']) or 'no AVX2'}), {m['cores']} cores, "
             f"{m['ram_gib']:.1f} GiB RAM, torch {m['torch']}"
             + (f", {m['gpu']}" if "gpu" in m else "")
             + f"; load average {m['load_average']:.1f} at the start",
             f"model: {results['model']['path']} (layers: {depth})", ""]
    q = results["qomni"]
    lines += [f"qomni failed: {q['error']}"] if "error" in q else \
        _qomni_report(q, results["settings"])
    ref = results.get("transformers")
    if ref is not None and "error" in ref:
        lines += ["", f"transformers failed: {ref['error']}"]
    elif "comparison" in results:
        lines += _comparison_report(results)
    return "\n".join(lines)
