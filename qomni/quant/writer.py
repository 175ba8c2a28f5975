"""`qomni quantize SRC DST`: write a compressed-tensors checkpoint from a full-precision one.

Shard by shard and tensor by tensor, so memory holds one source tensor plus one output shard.
The packing, scales and `quantization_config` come from the compressed-tensors library (the
format llm-compressor writes and vLLM loads): round-to-nearest weights with min/max scales (the
library's `calculate_qparams`, as llm-compressor's default observer), packed by its
PackedQuantizationCompressor. Keys keep the checkpoint's names (per-expert
`...mlp.experts.N.gate_proj.weight_packed`, ...). Every Linear left in full precision is named in
`ignore`: the components not quantized (encoders, routers, heads, projections, code2wav, any
`--keep` component) as regexes, and single linears whose in_features the group size does not
divide by name.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from qomni.quant.plan import DEFAULT_COMPONENTS, component_of
from qomni.tensor_file import read_tensors
from qomni.weights import INDEX_FILE, checkpoint_files

SCHEMES = {"w4a16": 4, "w8a16": 8}
# Linear modules outside the quantized components, as compressed-tensors "re:" patterns.
ALWAYS_IGNORED = ["re:^thinker\\.audio_tower\\.", "re:^thinker\\.visual\\.",
                   "re:.*\\.mlp\\.gate$", "re:.*\\.mlp\\.shared_expert_gate$",
                   "thinker.lm_head", "talker.codec_head",
                   "re:^talker\\.code_predictor\\.lm_head\\.",
                   "re:^talker\\.(text|hidden)_projection\\.", "re:^code2wav\\."]
COMPONENT_PATTERN = {"thinker": "re:^thinker\\.model\\.layers\\.",
                      "talker": "re:^talker\\.model\\.layers\\.",
                      "code_predictor": "re:^talker\\.code_predictor\\.model\\.layers\\."}


def library() -> SimpleNamespace:
    """The compressed-tensors pieces the writers use (imported on demand: it imports
    transformers, ~10 s)."""
    try:
        from compressed_tensors.compressors import BaseCompressor, ModelCompressor
        from compressed_tensors.quantization import (
            QuantizationArgs,
            QuantizationConfig,
            QuantizationScheme,
        )
        from compressed_tensors.quantization.utils import calculate_qparams
    except ImportError as e:
        raise RuntimeError("writing compressed-tensors checkpoints needs the compressed-tensors "
                           f"library: pip install 'qomni[quant]' ({e})") from None
    return SimpleNamespace(BaseCompressor=BaseCompressor, ModelCompressor=ModelCompressor,
                           QuantizationArgs=QuantizationArgs,
                           QuantizationConfig=QuantizationConfig,
                           QuantizationScheme=QuantizationScheme,
                           calculate_qparams=calculate_qparams)


def quantize_checkpoint(src: str | Path, dst: str | Path, scheme: str = "w4a16",
                        group_size: int | None = None, keep: Iterable[str] = (),
                        symmetric: bool = True, progress: bool = True) -> Path:
    """Write `src` quantized to `dst`. `group_size`: None = 128 for w4a16, per channel for
    w8a16; 0 = per channel. `keep`: components left in full precision."""
    lib = library()
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    keep = set(keep)
    if keep - set(DEFAULT_COMPONENTS):
        raise ValueError(f"--keep takes {', '.join(DEFAULT_COMPONENTS)}; got "
                         f"{', '.join(sorted(keep - set(DEFAULT_COMPONENTS)))}")
    bits = SCHEMES[scheme]
    if group_size is None:
        group_size = 128 if bits == 4 else 0
    if group_size < 0:
        raise ValueError(f"group size must be positive (or 0: per channel), got {group_size}")
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError("DST must differ from SRC")
    files = checkpoint_files(src)
    components = [c for c in DEFAULT_COMPONENTS if c not in keep]
    args = lib.QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="group" if group_size else "channel",
                            group_size=group_size or None)
    qscheme = lib.QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    compressor = lib.BaseCompressor.get_value_from_registry("pack-quantized")

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():  # config, tokenizer, templates, ...
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX_FILE:
            shutil.copyfile(f, dst / f.name)
    by_file: dict[Path, list[str]] = {}
    for key, f in files.items():
        by_file.setdefault(f, []).append(key)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(files), desc="Quantizing", unit="tensor", disable=not progress)
    weight_map, total, undivided = {}, 0, []
    for file, keys in sorted(by_file.items()):
        out: dict[str, torch.Tensor] = {}
        for key, tensor in read_tensors(file, sorted(keys)):
            bar.update(1)
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and tensor.ndim == 2 and (
                    component_of(module) in components):
                if group_size and tensor.shape[1] % group_size:
                    undivided.append(module)
                else:
                    out.update({f"{module}.{k}": v for k, v in _compress(
                        tensor, args, qscheme, compressor, lib.calculate_qparams).items()})
                    continue
            out[key] = tensor.contiguous()
        save_file(out, str(dst / file.name), metadata={"format": "pt"})
        weight_map.update({k: file.name for k in out})
        total += sum(t.numel() * t.element_size() for t in out.values())
    bar.close()
    if (src / INDEX_FILE).exists():
        (dst / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2) + "\n")
    ignore = ALWAYS_IGNORED + [COMPONENT_PATTERN[c] for c in sorted(keep)] + undivided
    config = lib.QuantizationConfig(config_groups={"group_0": qscheme}, ignore=ignore,
                                    quantization_status="compressed", format="pack-quantized")
    lib.ModelCompressor(quantization_config=config).update_config(str(dst))
    return dst


def _compress(w: torch.Tensor, args, scheme, compressor, calculate_qparams) -> dict:
    """One weight [O, K] -> weight_packed, weight_scale, weight_shape (+ weight_zero_point)."""
    o, k = w.shape
    view = w.view(o, k // args.group_size, args.group_size) if args.group_size else w[:, None]
    scale, zero = calculate_qparams(view.amin(-1), view.amax(-1), args)  # [O, G]
    return compressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zero},
                               scheme=scheme)
