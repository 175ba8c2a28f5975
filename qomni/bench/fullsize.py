"""`qomni bench --full-size`: the published Qwen3-Omni-30B-A3B-Instruct at full depth and width.

Its random-weight checkpoint is built once into the user cache, written directly in quantized
form: the linears of the quantized components (`--quantization`, e.g. int4: the thinker's,
talker's and code predictor's decoder layers) are drawn as compressed-tensors tensors, random
int32 words (each 32/b random b-bit values, a valid packing of any values) with random scales,
so no full-precision copy of those weights exists, in memory or on disk; every other tensor is
drawn in bf16. One tensor at a time, one shard (2 GiB) held at most. int4 takes 20 GB of disk.
The config is the published one (checked against tests/fixtures/instruct_config.json).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qomni.bench.setup import bench_config, log
from qomni.config import OmniConfig
from qomni.quant.plan import DEFAULT_COMPONENTS, component_of, parse_quantization
from qomni.quant.writer import ALWAYS_IGNORED, COMPONENT_PATTERN
from qomni.tiny import _STACKED, cached_checkpoint, random_tensor, user_cache, write_side_files
from qomni.weights import INDEX_FILE

# Depths of the published Instruct config (bench_config() has its widths at a shallow depth).
REAL_DEPTH: dict[str, Any] = {
    "thinker_config": {"audio_config": {"encoder_layers": 32},
                       "vision_config": {"depth": 27, "deepstack_visual_indexes": [8, 16, 24]},
                       # unused by an all-MoE thinker, but part of the published config
                       "text_config": {"num_hidden_layers": 48, "intermediate_size": 768}},
    "talker_config": {"accept_hidden_layer": 24, "text_config": {"num_hidden_layers": 20}},
}
GROUP_SIZE = {4: 128, 8: None}  # int4 in groups of 128 (the published W4A16 layout), int8 per row
SHARD_BYTES = 2 << 30
BUILD_VERSION = 1


def full_size_config() -> dict[str, Any]:
    config = bench_config()
    for section, values in REAL_DEPTH.items():
        for sub, fields in values.items():
            if isinstance(fields, dict):
                config[section][sub].update(fields)
            else:
                config[section][sub] = fields
    return config


def stored_bits(quantization: str | None) -> dict[str, int]:
    """Components written quantized: the decoder-layer components the option names (the rest of
    the option, e.g. lm_heads=int8, applies when loading)."""
    bits = {c: b for c, b in parse_quantization(quantization).items() if c in DEFAULT_COMPONENTS}
    if not bits:
        raise ValueError("--full-size needs --quantization (e.g. int4): the model in full "
                         "precision takes ~70 GB")
    return bits


def full_size_checkpoint(quantization: str, config: dict[str, Any] | None = None,
                         seed: int = 0) -> Path:
    """The cached checkpoint for `config` (default: the published one), built on first use."""
    config = copy.deepcopy(config or full_size_config())
    bits = stored_bits(quantization)
    key = json.dumps({"config": config, "bits": bits, "seed": seed, "version": BUILD_VERSION},
                     sort_keys=True)
    path = user_cache() / f"fullsize-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def build(tmp: Path) -> None:
        log(f"building the random full-size checkpoint in {path}, written quantized "
            f"({', '.join(f'{c} int{b}' for c, b in bits.items())}); once, tens of minutes")
        build_quantized(tmp, config, bits, seed)

    return cached_checkpoint(path, build)


def build_quantized(dest: Path, config: dict[str, Any], bits: dict[str, int], seed: int,
                    shard_bytes: int = SHARD_BYTES) -> None:
    from qomni.models.model import OmniModel
    from qomni.weights import meta_parameters

    dest.mkdir(parents=True, exist_ok=True)
    cfg = OmniConfig.from_hf(config)
    with meta_parameters():
        model = OmniModel(cfg, audio_output=cfg.has_audio_output)
    torch.manual_seed(seed)
    shards: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    total = size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            save_file(shard, str(dest / f"part-{len(shards):05d}.safetensors"),
                      metadata={"format": "pt"})
            shards.append(sorted(shard))
            shard, size = {}, 0

    from tqdm.auto import tqdm

    params = list(model.state_dict().items())
    for name, p in tqdm(params, desc="Writing the full-size checkpoint", unit="tensor"):
        for key, tensor in _tensors(name, p, cfg, bits):
            shard[key] = tensor
            size += tensor.numel() * tensor.element_size()
            total += tensor.numel() * tensor.element_size()
            if size >= shard_bytes:
                flush()
    flush()
    weight_map = {}
    for i, keys in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (dest / f"part-{i:05d}.safetensors").replace(dest / final)
        weight_map.update(dict.fromkeys(keys, final))
    (dest / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    write_side_files(dest, config)
    write_quantization_config(dest, bits)


def _tensors(name: str, p: torch.Tensor, cfg: OmniConfig, bits: dict[str, int]):
    """(checkpoint key, tensor) pairs for the model parameter `name`: per-expert keys for
    stacked experts; packed tensors for the linears of quantized components."""
    m = _STACKED.match(name)
    if m:
        comp = component_of(m["prefix"])
        e, rows, cols = p.shape
        for expert in range(e):
            base = f"{m['prefix']}.{expert}"
            projs = ("down_proj",) if m["param"] == "down_proj" else ("gate_proj", "up_proj")
            for proj in projs:
                shape = (rows // len(projs), cols)
                yield from _linear(f"{base}.{proj}", shape, bits.get(comp))
        return
    module, _, leaf = name.rpartition(".")
    comp = component_of(module)
    if leaf == "weight" and p.ndim == 2 and comp in bits:
        yield from _linear(module, tuple(p.shape), bits[comp])
        return
    yield name, random_tensor(name, torch.empty(p.shape, dtype=torch.bfloat16), cfg, True)


def _linear(module: str, shape: tuple[int, int], b: int | None):
    o, k = shape
    if b is None:
        yield f"{module}.weight", (torch.randn(o, k) * 0.02).bfloat16()
        return
    group = GROUP_SIZE[b] or k
    # uniform b-bit values have std ~ 2^b / sqrt(12): scales that make the weights ~0.02-std
    scale = 0.02 * 12 ** 0.5 / 2 ** b * (1 + 0.1 * torch.rand(o, k // group))
    yield f"{module}.weight_packed", torch.randint(
        0, 256, (o, k * b // 8), dtype=torch.uint8).view(torch.int32)
    yield f"{module}.weight_scale", scale.bfloat16()
    yield f"{module}.weight_shape", torch.tensor([o, k])


def write_quantization_config(dest: Path, bits: dict[str, int]) -> None:
    """config.json's quantization_config, written by compressed-tensors (as llm-compressor
    does): one config group per bit width, targeting its components' decoder layers."""
    from qomni.quant.writer import library

    lib = library()
    groups = {}
    for b in sorted(set(bits.values())):
        g = GROUP_SIZE[b]
        args = lib.QuantizationArgs(num_bits=b, type="int", symmetric=True,
                                    strategy="group" if g else "channel", group_size=g)
        targets = [COMPONENT_PATTERN[c] for c, cb in bits.items() if cb == b]
        groups[f"group_{len(groups)}"] = lib.QuantizationScheme(
            targets=targets, weights=args, format="pack-quantized")
    config = lib.QuantizationConfig(config_groups=groups, ignore=ALWAYS_IGNORED,
                                    quantization_status="compressed", format="pack-quantized")
    lib.ModelCompressor(quantization_config=config).update_config(str(dest))
