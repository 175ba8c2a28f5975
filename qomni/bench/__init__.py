"""`qomni bench`: per-stage speed at the real widths of Qwen3-Omni-30B-A3B, against floors.

- `setup`: the benchmark checkpoint (real widths, shallow depth, random weights, cached), the
  settings and the prompts;
- `floors`: timing, the machine's measured rates, bytes and FLOPs per stage, floors;
- `machine`: the CPU, its kernel-relevant flags, memory, GPU;
- `stages`: qomni, stage by stage and end to end;
- `reference`: the same through transformers (`--vs-transformers`);
- `report`: the text report and the comparison;
- `vs_vllm`: `--vs-vllm`, the thinker against vLLM's CPU build, which `vllm_peer` drives in its
  own venv.

Each backend runs in its own process, so its memory is its own and is freed when it ends.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qomni.bench.machine import machine_info
from qomni.bench.reference import bench_transformers
from qomni.bench.report import compare
from qomni.bench.setup import DEFAULT, Load, Settings, bench_checkpoint, model_summary
from qomni.bench.stages import bench_qomni
from qomni.loading import resolve_model_path


def _child(fn: Callable[..., dict[str, Any]], args: tuple, out: str) -> None:
    try:
        result = fn(*args)
    except Exception as e:  # noqa: BLE001 - reported by the parent, with the other backend
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    Path(out).write_text(json.dumps(result))


def in_subprocess(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """fn(*args) in a fresh process, so each backend's memory is its own and freed after; an
    error there comes back as {"error": ...}."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = ctx.Process(target=_child, args=(fn, args, str(out)))
        proc.start()
        proc.join()
        if out.exists():
            return json.loads(out.read_text())
    hint = " (killed: out of memory?)" if proc.exitcode == -9 else ""
    return {"error": f"{fn.__name__} exited with code {proc.exitcode}{hint}"}


def run(model: str | None = None, *, settings: Settings = DEFAULT, load: Load | None = None,
        vs_transformers: bool = False) -> dict[str, Any]:
    """The whole benchmark; `model` None means the cached real-width shallow checkpoint."""
    load = load or Load()
    path = bench_checkpoint() if model is None else resolve_model_path(model)
    results: dict[str, Any] = {"machine": machine_info(), "model": model_summary(path),
                               "settings": dataclasses.asdict(settings)}
    results["qomni"] = in_subprocess(bench_qomni, str(path), settings, load)
    if vs_transformers:
        results["transformers"] = in_subprocess(bench_transformers, str(path), settings, load)
        if "error" not in results["qomni"] and "error" not in results["transformers"]:
            results["comparison"] = compare(results["qomni"], results["transformers"])
    return results
