"""The prepared GPU check (`scripts/gpu-check.sh`): correctness of the CUDA path on a tiny
checkpoint, then speed at the published size with random weights. Without CUDA (or with
`--dry-run`) the same code runs on the CPU at tiny sizes, in well under a minute.

Sections, each timed, each skipped (and said so) once the time budget is spent:
1. `tiny_bf16_vs_fp32`: a tiny checkpoint in bf16 on the device against fp32 on the CPU:
   prompt logits max|Δ| <= 2e-2 and greedy tokens equal (or parting at a bf16 tie: two tokens
   whose fp32 logits bf16 cannot tell apart, reported as greedy_parted). The tiny config routes
   every token to all its experts: with top-k of 8 random experts, precision alone flips
   near-tied routing decisions, which says nothing about the device.
2. `graphs`: the engine with CUDA graphs against the same static steps uncaptured (must be
   bitwise equal: tokens, codes, audio; a greedy and a sampling talker) and against the eager
   engine (reported; greedy), on a batch that pads to a bucket, speaking.
3. `full_size`: the published config (tests/fixtures/instruct_config.json), random weights
   drawn on the device (bf16; a card under 100 GB is not run: qomni stores FP8 weights widened
   to bf16, so only int4 would fit, and drawing int4 weights on the device is not built),
   CUDA graphs on, the checkpoint's talker sampling: time to first audio at concurrency 1,
   real-time factor at 1/8/32, requests per second at 64, peak memory.
Writes gpu-check.json and gpu-check.md (the table for docs/benchmarks.md) to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qomni import AudioChunk, Finished, Omni, SamplingParams
from qomni.engine.config import EngineConfig
from qomni.engine.graphs import StepGraphs
from qomni.multimodal.processor import ProcessedInputs
from qomni.tiny import TINY_CONFIG, make_tiny

REPO = Path(__file__).resolve().parents[2]
INSTRUCT_CONFIG = REPO / "tests" / "fixtures" / "instruct_config.json"
LOGITS_TOL = 2e-2
GREEDY_TALKER = SamplingParams(temperature=0, ignore_eos=True)
# The published checkpoint's talker sampling (its code predictor samples too), never stopping.
SAMPLED_TALKER = SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.05,
                                ignore_eos=True, seed=0)
PROMPTS = ["What is the capital of France?", "Tell me a story about a lighthouse keeper.",
           "Hi", "Count to ten.", "Explain how tides work."]
SHORT = [{"role": "user", "content": "Hi, how are you today?"}]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def log(message: str) -> None:
    print(f"gpu-check: {message}", file=sys.stderr, flush=True)


def environment(device: torch.device) -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "device": str(device), "grouped_mm": hasattr(torch.nn.functional, "grouped_mm")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
    return env


def tiny_checkpoint(workdir: Path) -> Path:
    config = copy.deepcopy(TINY_CONFIG)
    for part in ("thinker_config", "talker_config"):
        text = config[part]["text_config"]
        text["num_experts_per_tok"] = text["num_experts"]
    return make_tiny(workdir / "tiny", config)


def tiny_bf16_vs_fp32(path: Path, device: torch.device) -> dict[str, Any]:
    ref = Omni.load(path, dtype="float32", device="cpu", progress=False,
                    engine=EngineConfig(cuda_graphs=False))
    sub = Omni.load(path, dtype="bfloat16", device=device, progress=False,
                    engine=EngineConfig(cuda_graphs=False))
    worst, equal, ties = 0.0, [], []
    for i, text in enumerate(PROMPTS):
        inputs = ref.process(user(text))
        diff = (ref.prompt_logits(inputs) - sub.prompt_logits(inputs).cpu()).abs().max()
        worst = max(worst, float(diff))
        a = ref.generate(user(text), max_new_tokens=16, return_audio=False).token_ids
        b = sub.generate(user(text), max_new_tokens=16, return_audio=False).token_ids
        equal.append(a == b)
        if a != b:
            ties.append({"prompt": i, **_parting(ref, inputs, a, b)})
    speech = sub.generate(user(PROMPTS[1]), max_new_tokens=8, max_audio_frames=12,
                          talker_sampling=GREEDY_TALKER)
    frames = speech.codes.shape[1]
    speech_ok = bool(frames == 12 and np.isfinite(speech.audio).all()
                     and speech.audio.size == 1920 * frames - 555)
    return {"logits_max_abs_diff": worst, "logits_tol": LOGITS_TOL,
            "greedy_equal": f"{sum(equal)}/{len(equal)}", "greedy_parted": ties,
            "speech_bf16_ok": speech_ok,
            "pass": worst <= LOGITS_TOL and all(t["tie"] for t in ties) and speech_ok}


def _parting(ref: Omni, inputs: ProcessedInputs, a: list[int], b: list[int]) -> dict[str, Any]:
    """Where fp32's greedy ids `a` and bf16's `b` part: the step, and fp32's logits of the two
    picks there. A tie when they differ by no more than two bf16 steps of the larger: bf16
    cannot tell such tokens apart (its logits are rounded to 8 significant bits), so picking
    the other one says nothing about the device."""
    step = next(k for k in range(min(len(a), len(b))) if a[k] != b[k])
    ids = torch.cat([inputs.input_ids, torch.tensor(a[:step], dtype=torch.long)])
    new = torch.arange(len(inputs), len(ids), dtype=torch.float32) + inputs.rope_delta
    positions = torch.cat([inputs.positions, new.expand(3, -1)], dim=1)
    logits = ref.prompt_logits(dataclasses.replace(inputs, input_ids=ids, positions=positions))[-1]
    want, got = float(logits[a[step]]), float(logits[b[step]])
    bf16_step = 2.0 ** (math.floor(math.log2(abs(want))) - 7) if want else 0.0
    return {"step": step, "fp32_logit": want, "bf16_pick_fp32_logit": got,
            "tie": want - got <= 2 * bf16_step}


def uncaptured(omni: Omni) -> Omni:
    """The engine's static steps called as they are (what a CUDA graph replays)."""
    engine = omni._loop().engine
    talker = engine.talker.runner if engine.talker is not None else None
    talker_steps = (talker.talker_static, talker.vocoder) if talker is not None else ()
    for steps in (engine.runner.static, *talker_steps):
        if steps is not None:
            steps.graphs = StepGraphs(False)
    return omni


def graphs_on_vs_off(path: Path, device: torch.device, dtype: str) -> dict[str, Any]:
    opts = {"max_num_seqs": 4, "max_model_len": 256, "first_chunk_frames": 2,
            "chunk_frames": 5}
    eager = Omni.load(path, dtype=dtype, device=device, progress=False,
                      engine=EngineConfig(**opts, cuda_graphs=False))

    def sharing(graphs: bool) -> Omni:
        return Omni(eager.model, eager.processor, eager.path, eager.generation_config,
                    EngineConfig(**opts, cuda_graphs=graphs))

    graphs, static = sharing(True), uncaptured(sharing(True))
    captured = graphs._loop().engine.runner.static.graphs.capture
    convs = [user(t) for t in PROMPTS[:3]]  # 3 rows: a bucket of 4
    kw = {"max_new_tokens": 10, "max_audio_frames": 16, "talker_sampling": GREEDY_TALKER}
    outs = {}
    for name, omni in (("graphs", graphs), ("static", static), ("eager", eager)):
        omni.generate(convs, **kw)  # warm-up: captures the graphs
        start = time.perf_counter()
        outs[name] = omni.generate(convs, **kw)
        outs[name + "_s"] = time.perf_counter() - start
    # The sampling code predictor draws on the device (not as the eager engine draws): captured
    # against uncaptured only.
    for name, omni in (("graphs_sampled", graphs), ("static_sampled", static)):
        outs[name] = omni.generate(convs, **{**kw, "talker_sampling": SAMPLED_TALKER})

    def same(a: str, b: str) -> dict[str, Any]:
        return {"tokens": all(x.token_ids == y.token_ids for x, y in zip(outs[a], outs[b])),
                "codes": all(torch.equal(x.codes, y.codes) for x, y in zip(outs[a], outs[b])),
                "audio_max_abs_diff": max(float(np.abs(x.audio - y.audio).max())
                                          if x.audio.shape == y.audio.shape else float("inf")
                                          for x, y in zip(outs[a], outs[b]))}

    vs_static, vs_eager = same("graphs", "static"), same("graphs", "eager")
    sampled = same("graphs_sampled", "static_sampled")
    exact = all(d["tokens"] and d["codes"] and d["audio_max_abs_diff"] == 0
                for d in (vs_static, sampled))
    return {"captured": captured, "vs_uncaptured": vs_static,
            "vs_uncaptured_sampled": sampled, "vs_eager": vs_eager,
            "seconds": {k[:-2]: round(v, 3) for k, v in outs.items() if k.endswith("_s")},
            "pass": exact and (captured or device.type != "cuda")}


async def _one(omni: Omni, frames: int, tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    first = None
    samples = 0
    async for ev in omni.astream(SHORT, max_new_tokens=tokens, max_audio_frames=frames,
                                 sampling=SamplingParams(temperature=0, ignore_eos=True),
                                 talker_sampling=SAMPLED_TALKER):
        if isinstance(ev, AudioChunk):
            first = first or time.perf_counter() - start
            samples += ev.pcm.size
        elif isinstance(ev, Finished):
            break
    total = time.perf_counter() - start
    audio = samples / 24000
    return {"first_audio_s": first or total, "total_s": total, "audio_s": audio,
            "rtf": total / audio if audio else float("inf")}


def concurrent(omni: Omni, n: int, frames: int, tokens: int) -> tuple[list[dict], float]:
    async def run() -> list[dict]:
        return await asyncio.gather(*(_one(omni, frames, tokens) for _ in range(n)))

    start = time.perf_counter()
    results = asyncio.run(run())
    return results, time.perf_counter() - start


def full_size(config: dict[str, Any], workdir: Path, device: torch.device, dtype: torch.dtype,
              sizes: dict[str, int], deadline: float) -> dict[str, Any]:
    from qomni.bench.random_weights import parameter_count, random_omni

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    # Graphs insisted on: an error, not a silent eager run, if a stage could not be captured
    # (on the CPU: the static steps, uncaptured).
    engine = EngineConfig(max_num_seqs=sizes["rows"], max_model_len=256, cuda_graphs=True)
    omni = random_omni(config, workdir / "random", device, dtype, engine)
    out: dict[str, Any] = {"parameters_b": round(parameter_count(omni.model) / 1e9, 2),
                           "dtype": str(dtype).removeprefix("torch."),
                           "build_s": round(time.perf_counter() - start, 1)}
    frames, tokens = sizes["frames"], sizes["tokens"]
    out["settings"] = {"prompt": SHORT[0]["content"], "text_tokens": tokens,
                       "talker": "temperature 0.9, top-k 50, repetition penalty 1.05",
                       "audio_frames": frames, "audio_s": frames * 0.08,
                       "cuda_graphs": omni._loop().engine.runner.static is not None}
    for n in sorted({1, *sizes["rtf"], sizes["throughput"]}):
        if time.perf_counter() > deadline:
            out[f"c{n}"] = "skipped: time budget spent"
            continue
        concurrent(omni, n, frames, tokens)  # warm-up: graphs for these batch sizes
        results, wall = concurrent(omni, n, frames, tokens)
        out[f"c{n}"] = {"wall_s": round(wall, 3),
                        "first_audio_ms_p50": round(1e3 * float(np.median(
                            [r["first_audio_s"] for r in results])), 1),
                        "rtf_mean": round(float(np.mean([r["rtf"] for r in results])), 4),
                        "req_per_s": round(n / wall, 2)}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def _ties(tiny: dict[str, Any]) -> str:
    parted = tiny.get("greedy_parted", [])
    return "".join(f" (prompt {p['prompt']} parts at step {p['step']}: fp32 logits "
                   f"{p['fp32_logit']:.5f} / {p['bf16_pick_fp32_logit']:.5f}, "
                   f"{'a bf16 tie' if p['tie'] else 'NOT a tie'})" for p in parted)


def _same(d: dict[str, Any]) -> str:
    return (f"tokens {'equal' if d['tokens'] else 'DIFFER'}, codes "
            f"{'equal' if d['codes'] else 'DIFFER'}, audio max abs diff "
            f"{d['audio_max_abs_diff']:.2g}")


def markdown(report: dict[str, Any]) -> str:
    env, dry = report["environment"], report["dry_run"]
    title = (f"GPU check on {env.get('gpu', env['device'])} (torch {env['torch']}"
             f"{', dry run on the CPU: not GPU figures' if dry else ''}):")
    lines = [title, "", "| check | result |", "| --- | --- |"]
    tiny = report.get("tiny_bf16_vs_fp32", {})
    if isinstance(tiny, dict) and "logits_max_abs_diff" in tiny:
        lines.append(f"| tiny, bf16 on {env['device']} vs fp32 on the CPU | logits max abs diff "
                     f"{tiny['logits_max_abs_diff']:.2e} (tol {LOGITS_TOL}), greedy equal "
                     f"{tiny['greedy_equal']}{_ties(tiny)}: {'PASS' if tiny['pass'] else 'FAIL'} |")
    graphs = report.get("graphs", {})
    if isinstance(graphs, dict) and "vs_uncaptured" in graphs:
        lines.append(f"| CUDA graphs vs the same steps uncaptured | greedy: "
                     f"{_same(graphs['vs_uncaptured'])}; sampled: "
                     f"{_same(graphs['vs_uncaptured_sampled'])}: "
                     f"{'PASS' if graphs['pass'] else 'FAIL'} |")
        lines.append(f"| CUDA graphs vs the eager engine | {_same(graphs['vs_eager'])} |")
    for name in ("tiny_bf16_vs_fp32", "graphs"):
        if not isinstance(report.get(name), dict) or "error" in report[name]:
            lines.append(f"| {name} | {report.get(name)} |")
    full = report.get("full_size", {})
    if isinstance(full, dict) and "settings" in full:
        what = "the tiny config (dry run)" if dry else "the published size"
        st = full["settings"]
        about = (f"Full-size path at {what}: random weights, {full['parameters_b']} B "
                 f"parameters, {full['dtype']}, CUDA graphs {st['cuda_graphs']}; each request: "
                 f"{st['prompt']!r}, {st['text_tokens']} text tokens, {st['audio_frames']} "
                 f"codec frames ({st['audio_s']:.2f} s of speech).")
        lines += ["", about, "",
                  "| concurrency | first audio p50 (ms) | RTF mean | req/s | wall (s) |",
                  "| --- | --- | --- | --- | --- |"]
        for key, row in full.items():
            if not (key.startswith("c") and key[1:].isdigit()):
                continue
            if isinstance(row, dict):
                lines.append(f"| {key[1:]} | {row['first_audio_ms_p50']} | {row['rtf_mean']} "
                             f"| {row['req_per_s']} | {row['wall_s']} |")
            else:
                lines.append(f"| {key[1:]} | {row} | | | |")
        if "peak_memory_gib" in full:
            lines += ["", f"Peak GPU memory: {full['peak_memory_gib']} GiB."]
    elif full:
        lines += ["", f"Full size: {full}"]
    return "\n".join(lines) + "\n"


def run_section(report: dict, name: str, fn: Callable[[], Any], deadline: float) -> None:
    if time.perf_counter() > deadline:
        report[name] = "skipped: time budget spent"
        return
    log(f"{name} ...")
    start = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as e:  # noqa: BLE001 - one failed section leaves the others to run
        traceback.print_exc()
        report[name] = {"error": f"{type(e).__name__}: {e}", "pass": False}
    if isinstance(report[name], dict):
        report[name]["section_s"] = round(time.perf_counter() - start, 1)
    log(f"{name}: {report[name]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the CPU at tiny sizes (automatic "
                   "without CUDA)")
    p.add_argument("--out", default="out/gpu-check", help="folder for gpu-check.json and .md")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting sections after "
                   "this many seconds")
    p.add_argument("--config", default=str(INSTRUCT_CONFIG), help="full-size config.json")
    args = p.parse_args(argv)
    dry = args.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    deadline = time.perf_counter() + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"dry_run": dry, "environment": environment(device)}
    log(f"{'dry run on the CPU' if dry else 'on ' + report['environment']['gpu']}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = tiny_checkpoint(work)
        run_section(report, "tiny_bf16_vs_fp32", lambda: tiny_bf16_vs_fp32(path, device),
                    deadline)
        run_section(report, "graphs",
                    lambda: graphs_on_vs_off(path, device, "float32" if dry else "bfloat16"),
                    deadline)
        if dry:  # the same code path at the tiny size
            config, sizes = TINY_CONFIG, {"rows": 2, "frames": 6, "tokens": 4, "rtf": [2],
                                          "throughput": 2}
        else:
            config = json.loads(Path(args.config).read_text())
            sizes = {"rows": 64, "frames": 50, "tokens": 24, "rtf": [8, 32], "throughput": 64}
        gib = report["environment"].get("gpu_memory_gib", 0)
        if not dry and gib < 100:
            report["full_size"] = (f"not run: {gib} GiB; the bf16 model needs ~70 GB plus "
                                   "caches, and random FP8/int4 weights on the device are not "
                                   "built")
        else:
            run_section(report, "full_size",
                        lambda: full_size(config, work, device, torch.bfloat16 if not dry
                                          else torch.float32, sizes, deadline), deadline)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu-check.md").write_text(markdown(report))
    log(f"wrote {out / 'gpu-check.json'} and {out / 'gpu-check.md'}")
    failed = [k for k, v in report.items() if isinstance(v, dict) and v.get("pass") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
