"""Where each stage runs: `stage_devices="thinker=cuda:0,talker=cuda:1"` puts the talker, its code
predictor and code2wav on a second device; the engine hands the per-token states (the thinker's
embeddings and accept-layer hidden states, the generated tokens' embeddings) over to it.

Stages: "thinker" (with its audio and vision encoders) and "talker" (talker, code predictor and
code2wav). A stage not named runs on the load's `device`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

STAGES = {"thinker": ("thinker.",), "talker": ("talker.", "code2wav.")}


def parse_stage_devices(spec: str | Mapping[str, str] | None,
                        default: torch.device) -> dict[str, torch.device]:
    """`spec` ("thinker=cuda:0,talker=cuda:1", or a mapping) -> {stage: device} for every stage.
    Raises ValueError naming the problem: an unknown stage, a stage given twice, a device torch
    cannot parse, or one this machine does not have."""
    if spec is None or spec == "":
        items: dict[str, str] = {}
    elif isinstance(spec, str):
        items = {}
        for part in (p.strip() for p in spec.split(",")):
            stage, sep, device = part.partition("=")
            stage, device = stage.strip(), device.strip()
            if not sep or not stage or not device:
                raise ValueError(f"stage_devices {spec!r}: {part!r} is not STAGE=DEVICE "
                                 "(e.g. thinker=cuda:0,talker=cuda:1)")
            if stage in items:
                raise ValueError(f"stage_devices {spec!r} sets {stage!r} twice")
            items[stage] = device
    elif isinstance(spec, Mapping):
        items = {str(k): str(v) for k, v in spec.items()}
    else:
        raise ValueError(f"stage_devices must be a string or a mapping, not "
                         f"{type(spec).__name__}")
    out = dict.fromkeys(STAGES, torch.device(default))
    for stage, name in items.items():
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} in stage_devices; the stages are "
                             f"{', '.join(STAGES)}")
        out[stage] = check_device(name)
    return out


def check_device(name: str | torch.device) -> torch.device:
    """A device this machine has, or ValueError."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r}: this machine has no CUDA device")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA device"
                             f"{'s' if count > 1 else ''} (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r}: qomni runs on cpu or cuda devices")
    return device


def stage_of(name: str) -> str:
    """The stage a parameter or module (by checkpoint name) belongs to."""
    for stage, prefixes in STAGES.items():
        if name.startswith(prefixes) or name + "." in prefixes:
            return stage
    return "thinker"
