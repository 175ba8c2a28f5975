"""Each stage in float32 and in bfloat16 on this CPU, as Omni.load runs them (weights packed for
oneDNN where it packs them): which dtype is faster where.

The stages are built at the published widths from the benchmark config (qomni.bench.setup) with
a shallow depth and fewer experts (memory), random weights; the lm_heads are left out (one
matmul each, timed by bench/quant_kernels.py-style runs). Every workload runs in both dtypes
interleaved, one pass of each per round, and the best of `--rounds` is kept.

    PYTHONPATH=. python bench/cpu_dtypes.py
    PYTHONPATH=. python bench/cpu_dtypes.py --stages thinker_decode talker_frame --rounds 10

Workloads: a thinker decoder layer (32 experts top-8) decoding 1 and 8 rows at 256 cached
tokens, and prefilling 256 tokens; the audio encoder (2 layers) on 10 s; the vision encoder
(3 layers) on a 448x448 image; a talker frame (1 layer, 32 experts top-6: one step, then the code
predictor's 15 steps at full depth); code2wav streaming a 25-frame chunk at full depth.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch

from qomni.bench.machine import cpu_info
from qomni.bench.setup import bench_config
from qomni.config import OmniConfig
from qomni.models.layers import pack_attention
from qomni.models.moe import pack_experts
from qomni.models.packed_linear import pack_linears, packed_dtypes
from qomni.models.rope import decode_positions

DTYPES = (torch.float32, torch.bfloat16)


def _config() -> OmniConfig:
    raw = copy.deepcopy(bench_config())
    raw["thinker_config"]["text_config"].update(num_hidden_layers=1, num_experts=32)
    raw["talker_config"]["text_config"].update(num_hidden_layers=1, num_experts=32)
    return OmniConfig.from_hf(raw)


def _prepare(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    for p in module.parameters():  # small random weights keep activations finite
        torch.nn.init.normal_(p, std=0.02)
    module = module.to(dtype).eval()
    if dtype in packed_dtypes():
        pack_attention(module, (dtype,))
        pack_linears(module, (dtype,))
        pack_experts(module, (dtype,))
    return module


def thinker(cfg: OmniConfig, dtype: torch.dtype) -> dict[str, Callable]:
    from qomni.models.thinker import TextModel

    text = cfg.thinker.text
    model = _prepare(TextModel(text, 0), dtype)
    cache = model.new_cache(8, 512, dtype)
    out = {}
    for rows in (1, 8):
        x = torch.randn(rows, 1, text.hidden_size).to(dtype)
        view = cache.rows(list(range(rows)))

        def step(x=x, view=view, rows=rows):
            view.cache.lengths[:rows] = 256
            model(x, decode_positions(view.lengths, 0.0), view, torch.ones(rows, dtype=torch.long))
        out[f"thinker_decode b{rows}"] = step
    x = torch.randn(1, 256, text.hidden_size).to(dtype)
    pos = torch.arange(256.0)[None, None].expand(3, 1, 256)

    def prefill():
        cache.lengths.zero_()
        model(x, pos, cache.rows([0]))
    out["thinker_prefill 256"] = prefill
    return out


def audio(cfg: OmniConfig, dtype: torch.dtype) -> dict[str, Callable]:
    from qomni.models.audio_encoder import AudioEncoder

    a = copy.copy(cfg.thinker.audio)
    enc = _prepare(AudioEncoder(a), dtype)
    frames = 1000  # 10 s of 10 ms mel frames
    feats = torch.randn(a.num_mel_bins, frames).to(dtype)
    return {"audio_encoder 10s": lambda: enc(feats, torch.tensor([frames]))}


def vision(cfg: OmniConfig, dtype: torch.dtype) -> dict[str, Callable]:
    from qomni.models.vision_encoder import VisionEncoder

    v = cfg.thinker.vision
    enc = _prepare(VisionEncoder(v), dtype)
    grid = torch.tensor([[1, 28, 28]])  # 448x448, one frame pair
    pixels = torch.randn(28 * 28, v.in_channels * v.temporal_patch_size * v.patch_size ** 2)
    pixels = pixels.to(dtype)
    return {"vision_encoder 448px": lambda: enc(pixels, grid)}


def talker(cfg: OmniConfig, dtype: torch.dtype) -> dict[str, Callable]:
    from qomni.models.talker import Talker

    t = _prepare(Talker(cfg.talker), dtype)
    cache = t.new_cache(1, 512, dtype)
    d = cfg.talker.text.hidden_size
    x = torch.randn(1, 1, d).to(dtype)
    code0 = torch.tensor([5])

    def frame():
        cache.lengths[:] = 256
        hidden = t(x, decode_positions(cache.lengths, 0.0), cache, torch.ones(1, dtype=torch.long))
        t.predict_residuals(hidden[:, 0], code0)
    return {"talker_frame b1": frame}


def code2wav(cfg: OmniConfig, dtype: torch.dtype) -> dict[str, Callable]:
    from qomni.models.code2wav import Code2Wav
    from qomni.models.code2wav_stream import StreamingCode2Wav

    c = cfg.code2wav
    model = _prepare(Code2Wav(c), dtype)
    codes = torch.randint(0, c.codebook_size, (c.num_quantizers, 50))

    def chunk():
        stream = StreamingCode2Wav(model)
        stream.push(codes[:, :25])
        stream.push(codes[:, 25:])  # the timed chunk follows one already decoded
    return {"code2wav 2x25 frames": chunk}


STAGES = {"thinker": thinker, "audio": audio, "vision": vision, "talker": talker,
          "code2wav": code2wav}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    name, flags = cpu_info()
    print(f"{name} ({', '.join(flags)}); torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; packed dtypes: {[str(d) for d in packed_dtypes()]}")
    cfg = _config()
    with torch.inference_mode():
        for stage in args.stages:
            runs = {dt: STAGES[stage](cfg, dt) for dt in DTYPES}
            best = {(dt, k): float("inf") for dt in DTYPES for k in runs[dt]}
            for dt in DTYPES:  # warm-up
                for fn in runs[dt].values():
                    fn()
            for _ in range(args.rounds):
                for dt in DTYPES:
                    for k, fn in runs[dt].items():
                        t0 = time.perf_counter()
                        fn()
                        best[dt, k] = min(best[dt, k], time.perf_counter() - t0)
            for k in runs[DTYPES[0]]:
                f32, b16 = best[torch.float32, k], best[torch.bfloat16, k]
                print(f"  {k:24s} fp32 {f32 * 1e3:8.2f} ms   bf16 {b16 * 1e3:8.2f} ms   "
                      f"bf16 {f32 / b16:4.2f}x faster")
            del runs


if __name__ == "__main__":
    main()
