"""The machine a benchmark ran on: CPU and the instruction sets its kernels can use, memory, GPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

# CPU features the matmul kernels dispatch on, as /proc/cpuinfo names them: x86 AVX2 / AVX-512 /
# VNNI / AMX (bf16 matrix instructions are avx512_bf16 and amx_bf16), Arm NEON / SVE / BF16.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
                "asimd", "sve", "sve2", "bf16", "i8mm")


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and which KERNEL_FLAGS it has (Linux; elsewhere the name only)."""
    name, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() in ("flags", "Features"):  # x86, Arm
                flags = set(value.split())
    return name, [f for f in KERNEL_FLAGS if f in flags]


def machine_info() -> dict[str, Any]:
    cpu, flags = cpu_info()
    ram = None
    if Path("/proc/meminfo").exists():
        total_kib = Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]
        ram = int(total_kib) / 2**20
    info = {"cpu": cpu, "cpu_flags": flags,
            # the best instruction set torch's own CPU kernels use here (e.g. AVX2, AVX512)
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "ram_gib": ram, "torch": torch.__version__,
            "python": platform.python_version(),
            # other work on the machine skews every number: recorded at the start and per backend
            "load_average": os.getloadavg()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
