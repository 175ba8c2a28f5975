"""Read tensors from a .safetensors file into memory of their own, one at a time.

safetensors' `safe_open(...).get_tensor` returns tensors that alias the file's memory map: a
kept tensor pins its pages, and every page read stays in the process's resident set (RssFile)
while the mapping lives. Loading a model that way counts the shard being read on top of the
weights already held (measured: 2 GiB shards put a 19.7 GiB int4 model at 21.2 GiB peak RSS), and
parameters left in the checkpoint's dtype would stay file-backed. Here each tensor is read with
pread into a fresh tensor: the file passes through the page cache only, which the kernel can
reclaim and which is not the process's memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

# safetensors dtype names (the format's spec)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
          "BOOL": torch.bool}
_MAX_HEADER = 100 << 20  # the limit safetensors itself applies


class TensorFileError(ValueError):
    """A .safetensors file that cannot be read."""


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} and where the data starts."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TensorFileError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise TensorFileError(f"{path}: header of {n} bytes; not a safetensors file?")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TensorFileError(f"{path}: unreadable safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n


def read_tensors(path: Path, keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for `keys` in their order (default: all, in file order), each in its
    own memory. A key the file lacks raises KeyError. The order is the caller's: safetensors
    writes tensors grouped by dtype, so in file order a quantized module's packed weights
    (int32) would all come before their scales (bf16), and a loader would hold a shard's worth
    of them waiting."""
    header, base = read_header(path)
    names = sorted(header, key=lambda k: header[k]["data_offsets"][0]) if keys is None \
        else list(keys)
    for name in names:
        if name not in header:
            raise KeyError(name)
    fd = os.open(path, os.O_RDONLY)
    try:
        for name in names:
            yield name, _read(fd, path, name, header[name], base)
    finally:
        os.close(fd)


def _read(fd: int, path: Path, name: str, info: dict, base: int) -> torch.Tensor:
    try:
        dtype, shape = DTYPES[info["dtype"]], [int(s) for s in info["shape"]]
        start, end = (int(o) for o in info["data_offsets"])
    except KeyError as e:
        raise TensorFileError(f"{path}: tensor {name!r} has no {e} or an unknown dtype "
                              f"{info.get('dtype')!r}") from None
    tensor = torch.empty(shape, dtype=dtype)
    size = math.prod(shape) * tensor.element_size()
    if end - start != size:
        raise TensorFileError(f"{path}: tensor {name!r} spans {end - start} bytes, its dtype and "
                              f"shape need {size}")
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < size:
        got = os.preadv(fd, [view[done:]], base + start + done)
        if got <= 0:
            raise TensorFileError(f"{path} ends inside tensor {name!r}")
        done += got
    return tensor
