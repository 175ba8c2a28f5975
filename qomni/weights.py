"""Load safetensors checkpoints (single file or sharded with an index) into qomni modules.

Module attribute names equal checkpoint names, so most keys map to themselves. The one rewrite is
declared in EXPERT_KEY / EXPERT_TARGETS: the checkpoint stores every MoE expert as separate
`gate_proj`/`up_proj`/`down_proj` tensors, which are stacked into fused `gate_up_proj [E, 2I, D]`
and `down_proj [E, D, I]` parameters as they are read.

Parameters are created on the meta device and each one is filled exactly once from disk, so a
60 GB checkpoint never exists twice in memory. Any checkpoint key left unused, any parameter left
unfilled, and any shape mismatch is an error listing the names.

A module with a `load_part(name, tensor)` method (a quantized linear, embedding or experts
module: qomni.quant) takes the checkpoint tensors under its name that are not parameters, one
at a time as they are read, and converts them itself; `missing_parts()` then names what it
still lacks.
"""

from __future__ import annotations

import ctypes
import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qomni.tensor_file import read_header, read_tensors


class WeightsError(ValueError):
    """The checkpoint's tensors do not fit the model built from its config."""


EXPERT_KEY = re.compile(
    r"^(?P<prefix>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
# checkpoint projection -> (stacked parameter, which half of its rows; None = the whole slice)
EXPERT_TARGETS = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                  "down_proj": ("down_proj", None)}

INDEX_FILE = "model.safetensors.index.json"
TRIM_EVERY = 256  # tensors read between two release_free_memory() calls
SINGLE_FILE = "model.safetensors"


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Map every tensor name of a checkpoint directory to the file holding it."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{index} is not a valid safetensors index: {e}") from None
        files = {k: path / f for k, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise WeightsError(f"{index} names {f.name}, which does not exist")
        return files
    single = path / SINGLE_FILE
    if not single.exists():
        raise WeightsError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
    return dict.fromkeys(read_header(single)[0], single)


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Create parameters on the meta device (no memory) while buffers stay real: buffers such
    as rotary frequencies are computed in __init__ and are not stored in checkpoints."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)


def load_weights(model: nn.Module, path: str | Path, *, dtype: torch.dtype,
                 device: torch.device | str | Callable[[str], torch.device] = "cpu",
                 skip_prefixes: Iterable[str] = (), progress: bool = True) -> None:
    """Fill `model`'s (meta) parameters from the checkpoint at `path`, on `device` (or, when
    it is a function, on device(key) for each checkpoint key: stages on several devices).

    Keys under `skip_prefixes` (e.g. "talker." when speech output is off) are ignored."""
    path = Path(path)
    device_of = device if callable(device) else lambda key: device
    files = checkpoint_files(path)
    skip = tuple(skip_prefixes)
    params = dict(model.named_parameters())
    expected = {n: p.shape for n, p in params.items()}
    sinks = {n: m for n, m in model.named_modules() if hasattr(m, "load_part")}
    filled: set[str] = set()
    expert_parts: dict[str, set[tuple[int, int | None]]] = {}
    stacked: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    errors: list[str] = []

    by_file: dict[Path, list[str]] = {}
    for key, f in files.items():
        if not (skip and key.startswith(skip)):
            by_file.setdefault(f, []).append(key)
    total = sum(len(v) for v in by_file.values())
    bar = _progress(total, progress)
    read = 0

    for file, keys in sorted(by_file.items()):
        present = set(read_header(file)[0])
        for key in sorted(set(keys) - present):
            bar.update(1)
            errors.append(f"{key}: listed in the index but missing from {file.name}")
        # each tensor in memory of its own (a memory map's pages would count as this
        # process's until the mapping is gone: see qomni.tensor_file); by name, so that a
        # module's tensors arrive together and are converted at once
        for key, tensor in read_tensors(file, sorted(k for k in keys if k in present)):
            bar.update(1)
            read += 1
            if read % TRIM_EVERY == 0:
                release_free_memory()
            sink = _sink_of(key, sinks) if sinks and key not in expected else None
            if sink is not None:
                try:
                    sinks[sink].load_part(key[len(sink) + 1:], tensor)
                except ValueError as e:
                    errors.append(f"{key.rpartition('.')[0]}: {e}")
                continue
            m = EXPERT_KEY.match(key)
            if m:
                _fill_expert(m, tensor, expected, stacked, expert_parts, unused, errors,
                             dtype, device_of(key))
                continue
            if key not in expected:
                unused.append(key)
                continue
            if tuple(tensor.shape) != tuple(expected[key]):
                errors.append(f"{key}: checkpoint shape {tuple(tensor.shape)}, "
                              f"model expects {tuple(expected[key])}")
                continue
            _set_param(model, key, _convert(tensor, dtype, device_of(key)))
            filled.add(key)
    bar.close()

    for name, tensor in stacked.items():
        num_experts = tensor.shape[0]
        halves = (0, 1) if name.endswith("gate_up_proj") else (None,)
        missing = [f"expert {e}{'' if h is None else ('.gate' if h == 0 else '.up')}"
                   for e in range(num_experts) for h in halves
                   if (e, h) not in expert_parts[name]]
        if missing:
            errors.append(f"{name}: no checkpoint tensor for {', '.join(missing[:8])}"
                          + (" ..." if len(missing) > 8 else ""))
        else:
            _set_param(model, name, tensor)
            filled.add(name)

    for name, sink in sinks.items():
        missing = sink.missing_parts()
        if missing:
            errors.append(f"{name}: no checkpoint tensor for " + _names(missing, 8))
    if unused:
        errors.append("checkpoint tensors the model has no place for: " + _names(unused))
    unfilled = sorted(set(expected) - filled - set(stacked))
    if unfilled:
        errors.append("model parameters missing from the checkpoint: " + _names(unfilled))
    if errors:
        raise WeightsError(f"cannot load {path}:\n  " + "\n  ".join(errors))


def read_rows(path: str | Path, key: str, rows: Iterable[int]) -> torch.Tensor:
    """Rows of one checkpoint tensor, as stored, without reading the rest of it (a talker
    alone needs three rows of the thinker's 151k-token embedding table)."""
    files = checkpoint_files(Path(path))
    if key not in files:
        raise WeightsError(f"{path} has no tensor {key}")
    with safe_open(files[key], "pt", device="cpu") as f:
        table = f.get_slice(key)
        return torch.cat([table[r: r + 1] for r in rows])


def _fill_expert(m: re.Match, tensor: torch.Tensor, expected: dict, stacked: dict,
                 parts: dict, unused: list, errors: list, dtype: torch.dtype, device) -> None:
    target, half = EXPERT_TARGETS[m["proj"]]
    name = f"{m['prefix']}.{target}"
    key, expert = m.group(0), int(m["expert"])
    if name not in expected:
        unused.append(key)
        return
    shape = tuple(expected[name])  # [E, 2I, D] or [E, D, I]
    rows = shape[1] // 2 if half is not None else shape[1]
    if expert >= shape[0] or tuple(tensor.shape) != (rows, shape[2]):
        errors.append(f"{key}: checkpoint shape {tuple(tensor.shape)} does not fit {name} "
                      f"{shape} (expert {expert})")
        return
    if name not in stacked:
        stacked[name] = torch.empty(shape, dtype=dtype, device=device)
        parts[name] = set()
    dest = stacked[name][expert]
    if half is not None:
        dest = dest[half * rows:(half + 1) * rows]
    dest.copy_(tensor)
    parts[name].add((expert, half))


def _sink_of(key: str, sinks: dict[str, nn.Module]) -> str | None:
    """The name of the module with load_part that `key` lies under, if any."""
    name = key
    while "." in name:
        name = name.rpartition(".")[0]
        if name in sinks:
            return name
    return None


def _convert(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def _names(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    # leave=True: the finished bar ends its line, so what is printed next starts on its own.
    return tqdm(total=total, desc="Loading weights", unit="tensor", disable=not enabled,
                leave=True)


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim, which also releases
    free chunks inside the heap). Converting a quantized checkpoint allocates, per weight, the
    tensor read, its unpacked values and the kernel's layout, and keeps only the last: glibc
    reuses the freed holes poorly, and without trimming the resident set of a full-size int4
    load grew ~4x faster than its weights (measured: over 20.5 GiB a third of the way through a
    19 GiB model). Elsewhere (no glibc) nothing happens."""
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:
        pass


def share_one_heap() -> None:
    """Let threads started from now on allocate from the existing heaps (glibc's M_ARENA_MAX
    = 1) instead of one of their own: memory freed in one heap is never reused by another, so
    the engine's thread, running its first prefill on a heap of its own beside the loaded
    model, added 0.6 GiB to a full-size turn's resident set. Elsewhere nothing happens."""
    try:
        _LIBC.mallopt(_M_ARENA_MAX, 1)
    except AttributeError:
        pass


_M_ARENA_MAX = -8  # glibc's malloc.h
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:
    _LIBC = None
