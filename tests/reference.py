"""Tiny Qwen3-Omni configurations and helpers for building the transformers reference.

transformers is a test-only dependency: only tests import this module.
Config "a" is qomni's own tiny config (real ids, tiny widths); "b" differs in head counts,
head_dim, expert count/top-k, norm_topk_prob, mrope_section and depth.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from qomni.tiny import ASSETS, GENERATION_CONFIG, PREPROCESSOR_CONFIG, TINY_CONFIG, write_tokenizer

_ROPE = {"rope_type": "default", "interleaved": True, "mrope_interleaved": True}

TINY_A = copy.deepcopy(TINY_CONFIG)

TINY_B = copy.deepcopy(TINY_CONFIG)
TINY_B["thinker_config"]["text_config"].update(
    hidden_size=48, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3,
    head_dim=12, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=3,
    norm_topk_prob=False, rope_scaling={**_ROPE, "mrope_section": [2, 2, 2]},
)
TINY_B["thinker_config"]["audio_config"]["output_dim"] = 48
TINY_B["thinker_config"]["vision_config"]["out_hidden_size"] = 48
TINY_B["talker_config"].update(thinker_hidden_size=48, accept_hidden_layer=3)

TINY_CONFIGS = {"a": TINY_A, "b": TINY_B}


def hf_config(name: str = "a", **overrides):
    """A transformers Qwen3OmniMoeConfig for one of the tiny configs."""
    from transformers import Qwen3OmniMoeConfig

    cfg = copy.deepcopy(TINY_CONFIGS[name])
    cfg.update(overrides)
    return Qwen3OmniMoeConfig(**cfg)


def save_hf_checkpoint(name: str, dest: Path, seed: int = 0):
    """Build the transformers model at a tiny config with seeded random weights, save it with
    `save_pretrained` (sharded, official on-disk layout) plus tokenizer, chat template and
    preprocessor config. Returns the transformers model (fp32, eval)."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(hf_config(name)).eval()
    # transformers 5.23 leaves the talker's fused expert tensors uninitialised (whatever was in
    # memory: sometimes NaN), so draw them here; then perturb everything, as its init leaves
    # norms at 1 and many weights tiny, so the comparison exercises every weight.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.normal_(0.0, 0.02)
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(dest, max_shard_size="20MB")
    write_tokenizer(dest)
    template = (ASSETS / "chat_template.jinja").read_text()
    (dest / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (dest / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG))
    (dest / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return model


def hf_processor(path: Path):
    """transformers' real Qwen3OmniMoeProcessor for a checkpoint directory.

    Its constructor insists on a video processor, which needs torchvision (no CPU build here);
    the class check is bypassed and video_processor is None, so text, image and audio
    processing run the reference code unchanged."""
    from unittest import mock

    from transformers import AutoTokenizer, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import (
        Qwen3OmniMoeProcessor,
    )
    from transformers.processing_utils import ProcessorMixin

    pre = json.loads((Path(path) / "preprocessor_config.json").read_text())
    template = json.loads((Path(path) / "chat_template.json").read_text())["chat_template"]
    feature_keys = ("feature_size", "sampling_rate", "hop_length", "n_fft", "chunk_length",
                    "padding_value", "dither", "return_attention_mask")
    image_keys = ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels",
                  "image_mean", "image_std")
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class",
                           lambda self, name, arg: None):
        return Qwen3OmniMoeProcessor(
            image_processor=Qwen2VLImageProcessorPil(**{k: pre[k] for k in image_keys}),
            video_processor=None,
            feature_extractor=WhisperFeatureExtractor(**{k: pre[k] for k in feature_keys}),
            tokenizer=AutoTokenizer.from_pretrained(path, local_files_only=True),
            chat_template=template,
        )


def audible_vocoder(model: torch.nn.Module) -> torch.nn.Module:
    """Redraw a code2wav module's weights at their modules' initial scale: its own init
    (std 0.02, ConvNeXt gamma 1e-6, layer scale 0.01) gives a ~1e-7 waveform, which would make
    any tolerance meaningless (and runs slowly on denormal floats)."""
    from torch import nn

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.ConvTranspose1d, nn.Embedding,
                                nn.LayerNorm)):
                mod.reset_parameters()
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("alpha", "beta"):  # SnakeBeta, log space
                p.normal_(0.0, 0.5)
            elif leaf in ("gamma", "scale"):
                p.uniform_(0.2, 1.0)
            elif "norm" in name and leaf == "weight":
                p.normal_(1.0, 0.1)
        model.decoder[-1].conv.weight.mul_(0.25)  # keep most samples inside the clamp
    return model


def loaded_network(path) -> torch.nn.Module:
    """A checkpoint read by qomni's loader into its network, before any CPU kernel packing
    (`Omni.load` packs the experts for oneDNN and drops their stacked parameters)."""
    from qomni.config import OmniConfig
    from qomni.models.model import OmniModel
    from qomni.weights import load_weights, meta_parameters

    cfg = OmniConfig.from_hf(path)
    with meta_parameters():
        net = OmniModel(cfg, cfg.has_audio_output)
    load_weights(net, path, dtype=torch.float32, device="cpu", progress=False)
    return net.eval()
