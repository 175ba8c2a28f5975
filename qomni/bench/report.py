"""The benchmark's results as text: the machine, every stage against its floor, the end-to-end
rows, and the headline numbers of both backends side by side."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# metric -> (label, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "prefill_s": ("prefill incl. encoders (s)", False),
    "audio_encoder_s": ("  audio encoder (s)", False),
    "vision_encoder_s": ("  vision encoder (s)", False),
    "thinker_decode_tok_per_s": ("thinker decode, batch 1 (tok/s)", True),
    "talker_prefill_s": ("talker prefill (s)", False),
    "talker_frames_per_s": ("talker incl. code predictor (frames/s)", True),
    "code2wav_rtf": ("code2wav RTF, whole utterance", False),
    "time_to_first_audio_s": ("time to first audio (s)", False),
}
THROUGHPUT = "speech_throughput_batch"  # + the batch: audio seconds per wall-clock second

STAGE_LABELS = {
    "prefill": "prefill (encoders + thinker)", "audio_encoder": "  audio encoder",
    "vision_encoder": "  vision encoder", "thinker_lm": "  thinker LM",
    "thinker_decode": "thinker decode, batch 1", "thinker_decode_layer": "  one decoder layer",
    "talker_prefill": "talker prefill", "talker_step_layer": "talker step: one decoder layer",
    "talker": "talker frame incl. code predictor", "code_predictor": "  code predictor (15 cb)",
    "talker_step": "  talker step", "code2wav_stream": "code2wav, streaming chunks",
    "code2wav_full": "code2wav, whole utterance",
}


def _rate(row: Mapping[str, Any]) -> float:
    return row["work"] / row["seconds"]


def headline(result: Mapping[str, Any]) -> dict[str, float]:
    """The numbers both backends report, by METRICS key (plus speech throughput per batch)."""
    s = result["stages"]
    out = {"prefill_s": s["prefill"]["seconds"], "audio_encoder_s": s["audio_encoder"]["seconds"],
           "vision_encoder_s": s["vision_encoder"]["seconds"],
           "thinker_decode_tok_per_s": _rate(s["thinker_decode"]),
           "talker_prefill_s": s["talker_prefill"]["seconds"],
           "talker_frames_per_s": _rate(s["talker"]),
           "code2wav_rtf": 1 / _rate(s["code2wav_full"]),
           "time_to_first_audio_s": result["e2e"]["time_to_first_audio_s"]}
    for t in result["throughput"]:
        out[f"{THROUGHPUT}{t['batch']}"] = t["audio_s"] / t["wall_s"]
    return out


def _higher_is_better(metric: str) -> bool:
    return metric.startswith(THROUGHPUT) or METRICS[metric][1]


def compare(qomni: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """speedup > 1: qomni is faster (rate ratio qomni/transformers, time ratio
    transformers/qomni)."""
    q, r = headline(qomni), headline(reference)
    out = {}
    for metric in q.keys() & r.keys():
        ratio = q[metric] / r[metric]
        out[metric] = {"qomni": q[metric], "transformers": r[metric],
                       "speedup": ratio if _higher_is_better(metric) else 1 / ratio}
    return out


def machine_line(m: Mapping[str, Any]) -> str:
    flags = ", ".join(m["cpu_flags"]) or "none of the listed SIMD flags"
    return (f"machine: {m['cpu']} ({flags}; torch CPU kernels: {m['torch_cpu_capability']}), "
            f"{m['cores']} cores, {m['ram_gib']:.1f} GiB RAM, torch {m['torch']}"
            + (f", {m['gpu']}" if "gpu" in m else "")
            + f"; load average {m['load_average']:.1f} at the start")


def _stage_line(label: str, row: Mapping[str, Any]) -> str:
    rate = ""
    if row["unit"] == "audio s":
        rate = f"RTF {row['seconds'] / row['work']:.2f}"
    elif row["work"]:
        rate = f"{_rate(row):.2f} {row['unit']}/s"
    floor = ratio = ""
    if row["floor_seconds"]:
        floor = f"{row['floor_seconds']:.3f} s"
        ratio = f"{row['seconds'] / row['floor_seconds']:.1f}"
    return (f"{label:<36}{row['seconds']:>9.3f} s  {rate:<15}{floor:>9}  {ratio:>10}  "
            f"{row['floor'] or ''}").rstrip()


def _voice_line(v: Mapping[str, Any] | None, settings: Mapping[str, Any]) -> str:
    if v is None:
        return "spoken turn: not measured"
    return (f"spoken turn (system + {settings['audio_seconds']:g} s of audio, "
            f"{v['prompt_tokens']} tokens), end of speech -> first audio: "
            f"{v['prefilled_whole_s']:.2f} s prefilled whole, {v['prefilled_ahead_s']:.2f} s with "
            f"{v['prefix_tokens']} tokens ({v['windows']} audio windows) prefilled while spoken, "
            f"{v['cached_tokens']} of them continued")


def _qomni_report(r: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    c = r["calibration"]
    lines = [
        (f"qomni on {r['device']} {r['dtype']}, {r['threads']} threads, "
         f"{r['params'] / 1e9:.2f} B parameters; peak RSS {r['peak_rss_gib']:.1f} GiB "
         f"({r['peak_rss_load_gib']:.1f} GiB by the end of loading); load average "
         f"{r['load_average_after']:.1f} at the end"),
        (f"loaded in {r['load_s']:.1f} s; quantized: " + (", ".join(
            f"{k} {v}" for k, v in r["quantization"].items()) or "nothing")),
        (f"calibration: memory read {c['read_bytes_per_s'] / 1e9:.1f} GB/s; GEMM "
         f"{c['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s ({r['dtype']}, {c['gemm_n']}³)"),
        (f"prompt: {r['prompt_tokens']} tokens = system + {settings['image_size']}² image + "
         f"{settings['audio_seconds']:g} s audio + text (processed in "
         f"{r['processing_s']:.2f} s)"),
        "",
        f"{'stage':<36}{'time':>11}  {'rate':<15}{'floor':>9}  {'meas/floor':>10}  floor basis"]
    lines += [_stage_line(STAGE_LABELS[k], row) for k, row in r["stages"].items()]
    e = r["e2e"]
    lines += ["", (f"time to first audio, Omni.stream of a {e['tokens']}-token, "
                   f"{e['frames']}-frame reply: first text {e['time_to_first_text_s']:.2f} s, first audio "
                   f"{e['time_to_first_audio_s']:.2f} s ({e['first_chunk_s'] * 1e3:.0f} ms "
                   "chunk)" + (f"; the whole turn {e['audio_s']:.2f} s of speech in "
                               f"{e['wall_s']:.2f} s, real-time factor {e['rtf']:.2f}"
                               if "rtf" in e else "")),
              _voice_line(r.get("voice_turn"), settings),
              (f"speech throughput, Omni.generate ({settings['decode_tokens']} text tokens + "
               f"{settings['e2e_frames']} frames per request):")]
    lines += [f"  batch {t['batch']}: {t['audio_s']:.2f} s of speech in {t['wall_s']:.2f} s = "
              f"{t['audio_s'] / t['wall_s']:.3f} audio s per s" for t in r["throughput"]]
    return lines


def _comparison_report(results: Mapping[str, Any]) -> list[str]:
    ref = results["transformers"]
    c = ref["calibration"]
    lines = ["", (f"vs transformers {ref['version']} (same checkpoint, {ref['device']} "
                  f"{ref['dtype']}; peak RSS {ref['peak_rss_gib']:.1f} GiB; load average "
                  f"{ref['load_average_after']:.1f} at the end; during its run: memory read "
                  f"{c['read_bytes_per_s'] / 1e9:.1f} GB/s, GEMM "
                  f"{c['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s):"),
             f"{'metric':<42}{'qomni':>10}{'transformers':>14}{'speedup':>10}"]
    labels = dict(METRICS)
    for t in results["qomni"]["throughput"]:
        labels[f"{THROUGHPUT}{t['batch']}"] = (
            f"speech throughput batch {t['batch']} (audio s/s)", True)
    for metric, (label, _) in labels.items():
        if metric in results["comparison"]:
            m = results["comparison"][metric]
            lines.append(f"{label:<42}{m['qomni']:>10.3f}{m['transformers']:>14.3f}"
                         f"{m['speedup']:>9.1f}×")
    lines.append("speedup: qomni rate / transformers rate, or transformers time / qomni time "
                 "(> 1: qomni is faster)")
    return lines


def format_report(results: Mapping[str, Any]) -> str:
    depth = ", ".join(f"{k} {v}" for k, v in results["model"]["depth"].items())
    lines = [machine_line(results["machine"]),
             f"model: {results['model']['path']} (layers: {depth})", ""]
    q = results["qomni"]
    lines += [f"qomni failed: {q['error']}"] if "error" in q else \
        _qomni_report(q, results["settings"])
    ref = results.get("transformers")
    if ref is not None and "error" in ref:
        lines += ["", f"transformers failed: {ref['error']}"]
    elif "comparison" in results:
        lines += _comparison_report(results)
    return "\n".join(lines)
