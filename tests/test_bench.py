"""`qomni bench` machinery on the tiny checkpoint: every result is there, positive and finite,
and the report and comparison are built from them. No timing thresholds: benchmarks are not
tests. Also: the benchmark model really has the published widths."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from qomni import benchmark
from qomni.tiny import make_tiny

TINY = benchmark.Settings(audio_seconds=2.5, image_size=64, decode_tokens=3, talker_frames=2,
                          code2wav_frames=6, e2e_frames=4, reply_tokens=4, reply_frames=6,
                          batches=(1, 2))
STAGES = {"prefill", "audio_encoder", "vision_encoder", "thinker_lm", "thinker_decode",
          "talker_prefill", "talker", "code_predictor", "talker_step", "code2wav_stream",
          "code2wav_full"}
REFERENCE_STAGES = {"prefill", "audio_encoder", "vision_encoder", "thinker_decode",
                    "talker_prefill", "talker", "code2wav_full"}
FIXTURE = Path(__file__).parent / "fixtures" / "instruct_config.json"


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("bench") / "tiny")


@pytest.fixture(scope="module")
def qomni_result(checkpoint):
    return benchmark.bench_qomni(checkpoint, TINY, dtype="float32", device="cpu")


def check_common(result, stages):
    assert set(result["stages"]) == stages
    for name, row in result["stages"].items():
        assert positive(row["seconds"]), name
        if row["work"] is not None:
            assert positive(row["work"]), name
    calib = result["calibration"]
    assert positive(calib["read_bytes_per_s"]) and positive(calib["matmul_flops_per_s"])
    assert positive(result["params"]) and positive(result["peak_rss_gib"])
    e2e = result["e2e"]
    assert e2e["tokens"] == TINY.reply_tokens and e2e["frames"] == TINY.reply_frames
    assert positive(e2e["time_to_first_audio_s"])
    assert [t["batch"] for t in result["throughput"]] == list(TINY.batches)
    for t in result["throughput"]:
        assert positive(t["wall_s"]) and positive(t["audio_s"])


def test_qomni_results_are_complete(qomni_result):
    check_common(qomni_result, STAGES)
    voice = qomni_result["voice_turn"]
    assert positive(voice["prefilled_whole_s"]) and positive(voice["prefilled_ahead_s"])
    # 2.5 s of audio in the tiny config: one finished 2 s window, continued by the request
    assert voice["windows"] == 1 and voice["cached_tokens"] == voice["prefix_tokens"]
    assert 0 < voice["prefix_tokens"] < voice["prompt_tokens"]
    stages = qomni_result["stages"]
    for name in STAGES - {"talker_prefill"}:  # every other stage has a floor
        assert positive(stages[name]["floor_seconds"]), name
    assert stages["prefill"]["work"] == qomni_result["prompt_tokens"]
    assert stages["thinker_decode"]["work"] == TINY.decode_tokens
    assert stages["talker"]["work"] == TINY.talker_frames
    e2e = qomni_result["e2e"]
    # the first audio chunk comes after the first text
    assert 0 < e2e["time_to_first_text_s"] <= e2e["time_to_first_audio_s"]
    assert positive(e2e["first_chunk_s"])
    json.dumps(qomni_result)  # --json must be able to save it


def test_comparison_and_report(checkpoint, qomni_result):
    pytest.importorskip("transformers")
    reference = benchmark.bench_transformers(checkpoint, TINY, dtype="float32", device="cpu")
    check_common(reference, REFERENCE_STAGES)
    comparison = benchmark.compare(qomni_result, reference)
    assert set(comparison) == set(benchmark.METRICS) | {
        f"speech_throughput_batch{b}" for b in TINY.batches}
    assert all(positive(v) for m in comparison.values() for v in m.values())
    results = {"machine": benchmark.machine_info(), "model": benchmark.model_summary(checkpoint),
               "settings": dataclasses.asdict(TINY), "qomni": qomni_result,
               "transformers": reference, "comparison": comparison}
    report = benchmark.format_report(results)
    assert "thinker decode" in report and "vs transformers" in report
    json.dumps(results)


def test_report_shows_a_failed_backend(qomni_result):
    results = {"machine": benchmark.machine_info(),
               "model": {"path": "x", "depth": {"thinker": 2}},
               "settings": dataclasses.asdict(TINY), "qomni": qomni_result,
               "transformers": {"error": "RuntimeError: no transformers"}}
    assert "transformers failed: RuntimeError: no transformers" in \
        benchmark.format_report(results)


def test_bench_model_has_the_published_widths():
    """Every width, head and expert count equals the published config; only depths are cut."""
    depth = {"thinker_config.audio_config.encoder_layers", "thinker_config.vision_config.depth",
             "thinker_config.vision_config.deepstack_visual_indexes",
             "thinker_config.text_config.num_hidden_layers",
             "talker_config.accept_hidden_layer", "talker_config.text_config.num_hidden_layers"}

    def walk(ours, theirs, path=""):
        for key, value in ours.items():
            name = f"{path}{key}"
            if isinstance(value, dict) and key.endswith("config"):
                walk(value, theirs[key], f"{name}.")
            elif name in depth or key not in theirs:  # depth, or a key left to its default
                continue
            elif key == "rope_scaling":
                assert value["mrope_section"] == theirs[key]["mrope_section"], name
            else:
                assert value == theirs[key], name

    bench = benchmark.bench_config()
    walk(bench, json.loads(FIXTURE.read_text()))
    thinker, talker = bench["thinker_config"], bench["talker_config"]
    layers = thinker["text_config"]["num_hidden_layers"]
    assert layers < 48 and 1 <= talker["accept_hidden_layer"] <= layers
    vision = thinker["vision_config"]
    assert len(vision["deepstack_visual_indexes"]) == 3  # all three mergers, as published
    assert max(vision["deepstack_visual_indexes"]) < vision["depth"] < 27


def test_a_failing_backend_is_reported_not_raised(tmp_path):
    result = benchmark.in_subprocess(benchmark.bench_qomni, str(tmp_path / "missing"), TINY,
                                     None, "cpu")
    assert result["error"].startswith("FileNotFoundError")


def test_flops_and_params_count_packed_linears():
    import torch
    from torch import nn

    from qomni.models.packed_linear import pack_linears

    model = nn.Sequential(nn.Linear(64, 32))
    if not pack_linears(model):
        pytest.skip("no oneDNN")
    with benchmark.flop_counter() as counter, torch.inference_mode():
        model(torch.randn(10, 64))
    assert counter.get_total_flops() == 2 * 10 * 64 * 32
    assert benchmark.param_count(model) == 64 * 32 + 32
