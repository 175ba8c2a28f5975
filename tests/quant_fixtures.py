"""Tiny checkpoints for the quantization tests, and compressed-tensors fixtures made by the
compressed-tensors library itself (never by qomni's writer).

Two random-weight models from `qomni.tiny.make_tiny`:
- SMALL: the tiny config with a 2-layer thinker (for quantize-on-load, speech, `qomni quantize`);
- WIDE: every width a multiple of 128, so schemes with groups of 32, 64 and 128 cover every
  decoder linear.
Their routers are scaled up (x10): with make_tiny's 0.02-std routers the top-k choice is a near
tie for many tokens, and any perturbation as small as bf16 rounding flips an expert for some of
them, a discrete change that would dominate a relative-error comparison.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from qomni.models.model import OmniModel
from qomni.tiny import TINY_CONFIG, make_tiny, save_sharded
from qomni.weights import checkpoint_files, meta_parameters

_ROPE = {"rope_type": "default", "interleaved": True, "mrope_interleaved": True}

SMALL = copy.deepcopy(TINY_CONFIG)
SMALL["thinker_config"]["text_config"]["num_hidden_layers"] = 2
SMALL["talker_config"]["accept_hidden_layer"] = 1

WIDE = copy.deepcopy(SMALL)
_wide_rope = {**_ROPE, "mrope_section": [8, 4, 4]}
WIDE["thinker_config"]["text_config"].update(
    hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2, rope_scaling=_wide_rope)
WIDE["thinker_config"]["audio_config"]["output_dim"] = 128
WIDE["thinker_config"]["vision_config"]["out_hidden_size"] = 128
WIDE["talker_config"]["thinker_hidden_size"] = 128
WIDE["talker_config"]["text_config"].update(
    hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=128, moe_intermediate_size=128, shared_expert_intermediate_size=128,
    rope_scaling=_wide_rope)
WIDE["talker_config"]["code_predictor_config"].update(
    hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32)

# Modules a quantized Qwen3-Omni checkpoint typically leaves in full precision.
IGNORE = ["re:.*audio_tower.*", "re:.*visual.*", "re:.*mlp\\.gate$", "re:.*shared_expert_gate$",
          "re:.*lm_head.*", "re:.*codec_head$", "re:.*_projection.*", "re:code2wav.*"]

CONVERSATION = [{"role": "user", "content": "Give me three facts about the Moon, please."}]


def quant_tiny(dest: Path, config: dict) -> Path:
    """make_tiny(dest, config) with the routers scaled x10 (see the module docstring)."""
    make_tiny(dest, config=config, seed=1)
    for f in dest.glob("*.safetensors"):
        tensors = load_file(f)
        for k in tensors:
            if k.endswith("mlp.gate.weight"):
                tensors[k] = tensors[k] * 10
        save_file(tensors, str(f), metadata={"format": "pt"})
    return dest


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for key, f in checkpoint_files(path).items():
        with safe_open(f, "pt") as sf:
            out[key] = sf.get_tensor(key)
    return out


def _copy_side_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model"):
            shutil.copyfile(f, dst / f.name)


def linear_names(path: Path, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Checkpoint names of the model's Linear layers, experts as per-expert Linears (as in the
    published checkpoint and transformers 4.x)."""
    from qomni.config import OmniConfig

    with meta_parameters():
        model = OmniModel(OmniConfig.from_hf(path), audio_output=True)
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names |= {k.removesuffix(".weight") for k in tensors if ".mlp.experts." in k}
    return sorted(names)


def compress_with_library(src: Path, dst: Path, weights: dict, ignore=IGNORE,
                          fmt: str | None = None) -> Path:
    """A compressed-tensors checkpoint of `src` made the way llm-compressor makes one: the Linear
    layers in a module tree, compressed-tensors' apply_quantization_config, min/max scales from
    its calculate_qparams, ModelCompressor.compress_model, and its update_config for config.json.
    `weights` are QuantizationArgs fields."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    tensors = read_tensors(src)
    tree = nn.Module()
    for name in linear_names(src, tensors):
        w = tensors.pop(f"{name}.weight")
        lin = nn.Linear(w.shape[1], w.shape[0], bias=f"{name}.bias" in tensors)
        lin.weight.data = w
        if lin.bias is not None:
            lin.bias.data = tensors.pop(f"{name}.bias")
        parent = tree
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(name.rsplit(".", 1)[-1], lin)
    args = QuantizationArgs(**weights)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        targets=["Linear"], weights=args, format=fmt)}, ignore=list(ignore))
    apply_quantization_config(tree, config)
    with torch.no_grad():
        for module in tree.modules():
            if hasattr(module, "weight_scale"):
                w = module.weight
                view = (w.view(w.shape[0], -1, args.group_size) if args.strategy == "group"
                        else w[:, None] if args.strategy == "channel" else w.reshape(1, 1, -1))
                scale, zero = calculate_qparams(view.amin(-1), view.amax(-1), args)
                module.weight_scale.data = scale.reshape(module.weight_scale.shape)
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.data = zero.reshape(module.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(tree, quantization_format=fmt)
    compressor.compress_model(tree)
    tensors.update({k: v.detach().contiguous() for k, v in tree.state_dict().items()})
    _copy_side_files(src, dst)
    save_sharded(tensors, dst, 20_000_000)
    compressor.update_config(str(dst))
    return dst


def decompress_with_library(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a compressed-tensors checkpoint, quantized weights dequantized to fp32 by
    compressed-tensors' own dequantizer. It is handed the quantized modules' tensors only: without
    a model it takes every `weight` of a targeted, non-ignored name for a quantized one (for FP8
    checkpoints, whose quantized weights are called `weight` too, that would include
    embeddings and convolutions)."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
        CompressedTensorsDequantizer,
    )

    tensors = read_tensors(path)
    quantized = {k.rpartition(".")[0] for k in tensors if k.endswith(".weight_scale")}
    mine = {k: v for k, v in tensors.items() if k.rpartition(".")[0] in quantized}
    rest = {k: v for k, v in tensors.items() if k not in mine}
    return rest | CompressedTensorsDequantizer(path, dtype=torch.float32).process(mine)


def write_dense(tensors: dict[str, torch.Tensor], like: Path, dst: Path) -> Path:
    """A full-precision checkpoint of `tensors` with `like`'s side files, without its
    quantization_config."""
    _copy_side_files(like, dst)
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    save_sharded({k: v.float().contiguous() for k, v in tensors.items()}, dst, 20_000_000)
    return dst


def hf_prompt_logits(path: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers 5.23's thinker logits [S, V] (fp32) for a full-precision checkpoint."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    hf = Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf.thinker(input_ids=input_ids[None]).logits[0]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
