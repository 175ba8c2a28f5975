"""Which modules are quantized, and how: the `quantization=` option and the checkpoint itself.

Before the weights are read, `quantize_modules` swaps modules of the (meta) model for their
quantized forms; the loader then fills them tensor by tensor.

1. Modules the checkpoint stores quantized (compressed-tensors keys such as
   `X.weight_packed`, or an FP8 `X.weight` with `X.weight_scale`) are read in their scheme, from
   config.json's `quantization_config`; no option needed.
2. The `quantization` option quantizes full-precision modules while they are read, by
   component. "int4" or "int8" covers the thinker's, the talker's and the code predictor's
   decoder layers; "int4,code_predictor=int8,lm_heads=int8" overrides components (a dict
   {"default": "int4", "code_predictor": "int8"} is the same). Everything else stays in the
   compute dtype unless named: see COMPONENTS.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from qomni.models.moe import Experts
from qomni.quant.compressed import QPARAM_SUFFIXES, CompressedConfig, QuantConfigError, Scheme
from qomni.quant.experts import PROJECTIONS, QuantExperts
from qomni.quant.linear import Dense, QuantEmbedding, QuantizeOnLoad, QuantLinear

COMPONENTS = {
    "thinker": "the thinker's decoder layers: attention and every MoE expert",
    "talker": "the talker's decoder layers: attention, experts and the shared expert",
    "code_predictor": "the code predictor's decoder layers",
    "lm_heads": "thinker.lm_head, talker.codec_head and the code predictor's heads",
    "embeddings": "thinker, talker and code predictor token/codec embeddings (int8 only)",
    "routers": "MoE routers (mlp.gate) and the talker's shared-expert gate",
    "projections": "the talker's text and hidden projections",
    "audio_tower": "the audio encoder's linears",
    "visual": "the vision encoder's linears",
    "code2wav": "the vocoder's transformer linears",
}
DEFAULT_COMPONENTS = ("thinker", "talker", "code_predictor")
METHODS = {"int8": 8, "int4": 4, "none": None}

_ROUTER = re.compile(r"\.mlp\.(gate|shared_expert_gate)$")
_PREFIXES = (("talker.code_predictor.model.layers.", "code_predictor"),
             ("thinker.model.layers.", "thinker"), ("talker.model.layers.", "talker"),
             ("thinker.audio_tower.", "audio_tower"), ("thinker.visual.", "visual"),
             ("talker.text_projection.", "projections"),
             ("talker.hidden_projection.", "projections"), ("code2wav.", "code2wav"))
_HEADS = re.compile(r"^(thinker\.lm_head|talker\.codec_head|talker\.code_predictor\.lm_head\.\d+)$")
_EMBEDDINGS = re.compile(r"^(thinker\.model\.embed_tokens|talker\.model\.codec_embedding|"
                         r"talker\.code_predictor\.model\.codec_embedding\.\d+)$")
_EXPERT = re.compile(r"^(?P<experts>.+\.mlp\.experts)\.\d+\.(?P<proj>gate_proj|up_proj|down_proj)$")


def parse_quantization(spec: str | Mapping[str, str] | None) -> dict[str, int]:
    """The `quantization` option -> {component: bits} for the components it quantizes."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        items: dict[str, str] = {}
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            comp, sep, method = part.partition("=")
            key = comp.strip() if sep else "default"
            if key in items:
                raise ValueError(f"quantization {spec!r} sets {key!r} twice")
            items[key] = (method if sep else comp).strip()
    elif isinstance(spec, Mapping):
        items = dict(spec)
    else:
        raise TypeError(f"quantization must be a string or a mapping, not {type(spec).__name__}")
    out: dict[str, int] = {}
    default = items.pop("default", None)
    for comp, method in [*((c, default) for c in DEFAULT_COMPONENTS if default), *items.items()]:
        if comp not in COMPONENTS:
            raise ValueError(f"unknown quantization component {comp!r}; choose from "
                             f"{', '.join(COMPONENTS)}")
        if method not in METHODS:
            raise ValueError(f"unknown quantization {method!r} for {comp}; choose from "
                             f"{', '.join(METHODS)}")
        bits = METHODS[method]
        if bits is None:
            out.pop(comp, None)
        elif comp == "embeddings" and bits != 8:
            raise ValueError("embeddings can be quantized to int8 only")
        else:
            out[comp] = bits
    return out


def component_of(name: str) -> str | None:
    """The COMPONENTS entry a module (by checkpoint name) belongs to."""
    if _ROUTER.search(name):
        return "routers"
    if _HEADS.match(name):
        return "lm_heads"
    if _EMBEDDINGS.match(name):
        return "embeddings"
    return next((comp for prefix, comp in _PREFIXES if name.startswith(prefix)), None)


def stored_quantized(keys: Iterable[str]) -> dict[str, set[str]]:
    """Checkpoint module name -> its quantization tensors, for modules stored quantized."""
    out: dict[str, set[str]] = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        if leaf in QPARAM_SUFFIXES:
            out.setdefault(module, set()).add(leaf)
    return out


def quantize_modules(model: nn.Module, path: Path, keys: Iterable[str],
                     quantization: str | Mapping[str, str] | None, dtype: torch.dtype,
                     device: torch.device | Callable[[str], torch.device]) -> dict[str, str]:
    """Swap `model`'s modules for quantized ones (see the module docstring) before loading,
    their weights to live on `device` (or device(module name)). Returns {module group: how it
    is quantized} for what was swapped."""
    device_of = device if callable(device) else lambda name: device
    wanted = parse_quantization(quantization)
    stored = stored_quantized(keys)
    replacements: dict[str, nn.Module] = {}
    summary: dict[str, str] = {}
    if stored:
        config = _compressed_config(path, next(iter(sorted(stored))))
        for name, module, scheme in _stored_modules(model, stored, config):
            comp = component_of(name)
            if isinstance(scheme, dict):  # experts: per projection; the rest as asked
                rest = QuantizeOnLoad(wanted[comp]) if comp in wanted else Dense()
                sources = {p: scheme.get(p, rest) for p in PROJECTIONS}
                replacements[name] = QuantExperts.replacing(module, sources, dtype,
                                                              device_of(name))
                scheme = next(iter(scheme.values()))
            else:
                replacements[name] = QuantLinear.replacing(module, scheme, dtype, device_of(name))
            summary.setdefault(comp or name, str(scheme))
    for name, module in model.named_modules():
        comp = component_of(name)
        if comp not in wanted or name in replacements:
            continue
        source = QuantizeOnLoad(wanted[comp])
        if isinstance(module, nn.Embedding):
            # only token/codec tables: an encoder's or the vocoder's own embedding (the vision
            # encoder's position table, code2wav's code table) is read whole, not by row
            if comp != "embeddings":
                continue
            replacements[name] = QuantEmbedding.replacing(module, dtype, device_of(name))
        elif isinstance(module, Experts):
            replacements[name] = QuantExperts.replacing(
                module, dict.fromkeys(PROJECTIONS, source), dtype, device_of(name))
        elif isinstance(module, nn.Linear):
            replacements[name] = QuantLinear.replacing(module, source, dtype, device_of(name))
        else:
            continue
        summary.setdefault(comp, str(source))
    for name, new in replacements.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return summary


def _compressed_config(path: Path, example: str) -> CompressedConfig:
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config")
    if not qc:
        raise QuantConfigError(f"{path}: tensors such as {example}.* are stored quantized but "
                               "config.json has no quantization_config")
    return CompressedConfig(qc)


def _stored_modules(model: nn.Module, stored: dict[str, set[str]], config: CompressedConfig
                    ) -> Iterable[tuple[str, nn.Module, Scheme | dict[str, Scheme]]]:
    """(qomni module name, module, scheme) for each module the checkpoint stores quantized.
    Per-expert modules fold into their experts module: {projection: scheme}, one scheme per
    projection for all experts."""
    experts: dict[str, dict[str, Scheme]] = {}
    modules = dict(model.named_modules())
    for name in sorted(stored):
        scheme = config.scheme_for(name)
        if scheme is None:
            raise QuantConfigError(f"{name} is stored quantized ({', '.join(sorted(stored[name]))}"
                                   ") but quantization_config ignores it or no config group "
                                   "targets it")
        m = _EXPERT.match(name)
        target = m["experts"] if m else name
        if target not in modules:
            continue  # a component not built (e.g. the talker without speech output)
        module = modules[target]
        if m:
            if not isinstance(module, Experts):
                raise QuantConfigError(f"{name}: qomni's {target} is not an MoE experts module")
            seen = experts.setdefault(target, {}).setdefault(m["proj"], scheme)
            if seen != scheme:
                raise QuantConfigError(f"{name}: {scheme}, but other experts of {target} use "
                                       f"{seen}")
        elif not isinstance(module, nn.Linear):
            raise QuantConfigError(f"{name} is stored quantized ({scheme}), but qomni's module "
                                   f"there is a {type(module).__name__}: only Linear layers and "
                                   "MoE experts can be quantized")
        else:
            yield name, module, scheme
    for target, scheme in experts.items():
        yield target, modules[target], scheme
