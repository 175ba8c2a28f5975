"""qomni's own CPU kernels, compiled on first use for the CPU that runs them: weight_stream.cpp
(the matmuls: dense, int4, int8, the MoE) and layer_ops.cpp (the row-wise work between them:
RMSNorm, q/k norm + rotary, the KV cache write), sharing vec.h.

`ops()` returns `torch.ops.qomni_cpu` (`linear(x, w)`, `moe(x, ids, weights, gate_up, down)`,
`rms_norm(x, w, eps)`, ...) or None where they cannot be built (no C++ compiler, not x86/ARM
Linux, QOMNI_CPU_OPS=0); the callers then keep torch's ops. The build is cached under
~/.cache/qomni/cpu_ops, in a folder named by the sources' hash and the CPU's flags (the code is
compiled with -march=native), and takes 30-60 s once per machine.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / "weight_stream.cpp", HERE / "layer_ops.cpp"]
HEADERS = [HERE / "vec.h"]


def _cpu_flags() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.partition(":")[2].strip()
    return platform.processor()


@functools.cache
def amx_bf16() -> bool:
    """The kernels multiply bf16 with AMX tiles (x86 with amx_bf16 and amx_tile)."""
    return {"amx_bf16", "amx_tile"} <= set(_cpu_flags().split())


def build_dir() -> Path:
    key = hashlib.sha256()
    for path in SOURCES + HEADERS:
        key.update(path.read_bytes())
    key.update(_cpu_flags().encode())
    key.update(torch.__version__.encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "qomni" / "cpu_ops" / key.hexdigest()[:16]


@functools.cache
def ops():
    """torch.ops.qomni_cpu, built and loaded once per process; None where unavailable."""
    if os.environ.get("QOMNI_CPU_OPS", "1") == "0" or platform.system() != "Linux":
        return None
    try:
        from torch.utils import cpp_extension

        out = build_dir()
        out.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name="qomni_cpu_ops", sources=[str(p) for p in SOURCES], build_directory=str(out),
            extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False, verbose=False)
        return torch.ops.qomni_cpu
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: torch's kernels remain
        log.warning("qomni's CPU kernels are not available (%s); using torch's", e)
        return None
