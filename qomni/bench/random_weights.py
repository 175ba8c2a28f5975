"""A model with random weights drawn directly on its device, from a config, with no checkpoint:
the published size (35 B parameters, ~70 GB in bf16) is ready in seconds on a GPU, where
writing and reading a checkpoint of it would take most of a short GPU lease.

Values follow the tiny checkpoints' rule (qomni.tiny.random_tensor): N(0, 0.02) weights, unit
norms, zero biases, small layer scales. The side files (config, tokenizer, chat template) are
written to a directory so the processor reads them as it reads a checkpoint's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qomni.config import OmniConfig
from qomni.engine.config import EngineConfig
from qomni.models.model import OmniModel
from qomni.multimodal.processor import Processor
from qomni.omni import Omni
from qomni.tiny import GENERATION_CONFIG, random_tensor, write_side_files
from qomni.weights import _set_param, meta_parameters


def random_model(config: dict[str, Any], device: torch.device | str, dtype: torch.dtype,
                 seed: int = 0) -> OmniModel:
    """The network of `config` (a config.json dict), each parameter drawn on `device`."""
    cfg = OmniConfig.from_hf(config)
    device = torch.device(device)
    with meta_parameters():
        net = OmniModel(cfg, cfg.has_audio_output)
    torch.manual_seed(seed)
    for name, p in list(net.named_parameters()):
        empty = torch.empty(p.shape, dtype=dtype, device=device)
        with torch.no_grad():
            _set_param(net, name, random_tensor(name, empty, cfg, audible=False))
    return net.to(device).eval()  # buffers follow


def random_omni(config: dict[str, Any], workdir: str | Path, device: torch.device | str,
                dtype: torch.dtype, engine: EngineConfig | None = None, seed: int = 0) -> Omni:
    """`Omni` over `random_model(config)`, its side files in `workdir`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_side_files(workdir, config)
    net = random_model(config, device, dtype, seed)
    cfg = net.cfg
    gen = GENERATION_CONFIG if cfg.has_audio_output else {}
    return Omni(net, Processor(workdir, cfg), workdir, gen, engine or EngineConfig())


def parameter_count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
