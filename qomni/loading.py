"""Finding and loading a checkpoint: its directory, the device and dtype, and the network with
its weights (what `Omni.load` does before it builds the processor and the engine)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from qomni.config import OmniConfig
from qomni.engine.placement import parse_stage_devices, stage_of
from qomni.models.layers import pack_attention
from qomni.models.model import OmniModel
from qomni.models.moe import pack_experts
from qomni.models.packed_linear import native_bf16, pack_linears, packed_dtypes
from qomni.quant.linear import join_attention
from qomni.quant.plan import quantize_modules
from qomni.weights import (
    checkpoint_files,
    load_weights,
    meta_parameters,
    release_free_memory,
    share_one_heap,
)

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """A checkpoint directory: a local path, a hub id already in the local Hugging Face cache,
    or (None) the tiny random demo checkpoint, made on first use."""
    if model is None:
        from qomni.tiny import demo_checkpoint

        return demo_checkpoint()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if isinstance(model, str) and _HUB_ID.fullmatch(model):
        hub = Path(os.environ.get("HF_HUB_CACHE") or Path(
            os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
        snapshots = sorted((hub / f"models--{model.replace('/', '--')}" / "snapshots").glob("*"))
        if snapshots:
            return snapshots[-1]
        raise FileNotFoundError(
            f"{model!r} is not a local directory and is not in the Hugging Face cache at {hub}; "
            f"download it first (e.g. `hf download {model}`) or pass its directory")
    raise FileNotFoundError(f"model directory {str(path)!r} does not exist")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None: the GPU when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None: bfloat16 on CUDA (the checkpoint's dtype) and on CPUs with bf16 matrix instructions
    (AVX512-BF16, AMX), where every stage runs faster in bf16 than in fp32 (1.6-4x on a Zen 5,
    bench/cpu_dtypes.py); float32 on other CPUs (bf16 matmuls emulated)."""
    if dtype is None:
        native = device.type == "cuda" or (device.type == "cpu" and native_bf16())
        return torch.bfloat16 if native else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def compute_dtype(dtype: torch.dtype, devices: Iterable[torch.device],
                  quantized: bool) -> torch.dtype:
    """What weights of `dtype` on `devices` (every stage's) are computed in. bfloat16 all on a CPU without bf16 matrix
    instructions (AVX2-only x86): float32, the weights rounded to bf16 as loaded and then held
    in fp32. There oneDNN cannot pack bf16 and torch's bf16 matmuls convert as they go: on a
    2-core AVX2 EPYC a 1152 x 512 linear over 8 rows takes 0.59 ms in bf16 against 0.17 ms
    packed in fp32, 128 rows 9.3 against 1.1 ms, and the medium thinker decodes a batch of 8
    about 6x slower (`qomni bench --vs-vllm`). The price is twice the weights' memory, so a
    quantized model (chosen for its memory) keeps bf16."""
    if (dtype == torch.bfloat16 and all(d.type == "cpu" for d in devices) and not quantized
            and not native_bf16()):
        return torch.float32
    return dtype



def load_model(path: Path, cfg: OmniConfig, dtype: str | torch.dtype | None,
               device: str | torch.device | None, audio_output: bool | None,
               quantization: str | Mapping[str, str] | None, progress: bool,
               stage_devices: str | Mapping[str, str] | None = None, thinker: bool = True
               ) -> tuple[OmniModel, Any]:
    """The network of the checkpoint at `path`, its weights read once into place, and what
    was quantized (`quantize_modules`). audio_output None: speech when the checkpoint has a
    talker. `stage_devices` ("thinker=cuda:0,talker=cuda:1"): each stage on its own device
    (qomni.engine.placement); the others on `device`. thinker=False: the speech stages
    alone (a talker apart from its thinker); none of the thinker's weights are read."""
    device = resolve_device(device)
    devices = parse_stage_devices(stage_devices, device)
    dtype = resolve_dtype(dtype, devices["thinker" if thinker else "talker"])
    if audio_output and not cfg.has_audio_output:
        raise ValueError(f"{path} has no talker (a Thinking or Captioner checkpoint, "
                         "enable_audio_output=false): it cannot produce speech")
    if audio_output is None:
        audio_output = cfg.has_audio_output
    if not (thinker or audio_output):
        raise ValueError(f"{path}: a model without its thinker is its speech stages, and this "
                         "one has none (audio_output is off)")

    def device_of(name: str) -> torch.device:
        return devices[stage_of(name)]

    skip = ([] if audio_output else ["talker.", "code2wav."]) + ([] if thinker else ["thinker."])
    keys = [k for k in checkpoint_files(path) if thinker or not k.startswith("thinker.")]
    with meta_parameters():
        net = OmniModel(cfg, audio_output, thinker)
        quantized = quantize_modules(net, path, keys, quantization, dtype, device_of)
    load_weights(net, path, dtype=dtype, device=device_of, skip_prefixes=skip,
                 progress=progress)
    for name, stage in net.named_children():  # buffers too
        stage.to(device_of(name))
    net.eval()
    compute = compute_dtype(dtype, devices.values(), bool(quantized))
    if compute != dtype:
        net.to(compute)
        dtype = compute
    join_attention(net)  # quantized q, k, v of one kernel: one call
    if dtype in packed_dtypes():  # CPU weights only
        pack_attention(net, (dtype,))  # q, k, v joined: before the linears are packed
        pack_linears(net, (dtype,))  # decode-sized matmuls read the weights 1.3-3x faster
        pack_experts(net, (dtype,))
    release_free_memory()  # the packing's transient copies
    share_one_heap()  # the engine's thread, started next, reuses what loading freed
    return net, quantized
