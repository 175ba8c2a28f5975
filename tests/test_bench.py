"""`qomni bench` run as a user runs it (a subprocess, --json), on the tiny checkpoint with small
settings: every stage is there; each floor is positive and below its measured time; the bytes and
FLOPs the floors come from equal what the checkpoint's tensors and config say; the comparison and
the report are built from the results. No timing thresholds: benchmarks are not tests. Also: the
benchmark model really has the published widths."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from qomni.config import OmniConfig
from qomni.tiny import make_tiny

# small enough for a test: 2.5 s of audio (one finished audio window in the tiny config)
SETTINGS = {"audio_seconds": 2.5, "image_size": 64, "decode_tokens": 3, "talker_frames": 2,
            "code2wav_frames": 6, "e2e_frames": 4, "reply_tokens": 4, "reply_frames": 6,
            "batches": [1, 2]}
STAGES = ["prefill", "audio_encoder", "vision_encoder", "thinker_lm", "thinker_decode",
          "thinker_decode_layer", "talker_prefill", "talker_step_layer", "talker",
          "code_predictor", "talker_step", "code2wav_stream", "code2wav_full"]
REFERENCE_STAGES = {"prefill", "audio_encoder", "vision_encoder", "thinker_decode",
                    "talker_prefill", "talker", "code2wav_full"}
METRICS = {"prefill_s", "audio_encoder_s", "vision_encoder_s", "thinker_decode_tok_per_s",
           "talker_prefill_s", "talker_frames_per_s", "code2wav_rtf", "time_to_first_audio_s"}
FIXTURE = Path(__file__).parent / "fixtures" / "instruct_config.json"
FP32 = 4  # bytes per weight: the runs below are float32


# Runs of `qomni bench` start Python, torch and the model in subprocesses.
slow = pytest.mark.slow


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qomni", "bench", *args], capture_output=True,
                          text=True, timeout=900, check=False)


def settings_args() -> list[str]:
    return [a for name, value in SETTINGS.items() for a in (
        "--set", f"{name}={','.join(map(str, value)) if isinstance(value, list) else value}")]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("bench") / "tiny")


@pytest.fixture(scope="module")
def run(checkpoint, tmp_path_factory):
    """One `qomni bench --vs-transformers` run: (results from --json, the printed report)."""
    out = tmp_path_factory.mktemp("bench_out") / "results.json"
    proc = bench("--model", str(checkpoint), "--quick", *settings_args(), "--dtype", "float32",
                 "--device", "cpu", "--vs-transformers", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def tensors(checkpoint):
    """name -> element count of every tensor in the checkpoint."""
    sizes = {}
    for shard in checkpoint.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                sizes[name] = math.prod(f.get_slice(name).get_shape())
    return sizes


def step_weights(tensors, prefix: str, text_cfg: dict) -> float:
    """Weights under `prefix` that one token's step reads: its top-k of a MoE layer's experts,
    one row of an embedding table, everything else whole."""
    total = 0.0
    for name, n in tensors.items():
        if not name.startswith(prefix):
            continue
        if ".mlp.experts." in name:
            total += n * text_cfg["num_experts_per_tok"] / text_cfg["num_experts"]
        elif "embed" in name:
            total += text_cfg["hidden_size"]
        else:
            total += n
    return total


def kv(text_cfg: dict, context: float) -> float:
    return 2 * text_cfg["num_hidden_layers"] * text_cfg["num_key_value_heads"] \
        * text_cfg["head_dim"] * context * FP32


@slow
def test_every_stage_is_measured_and_below_no_floor(run):
    results, _ = run
    q = results["qomni"]
    assert list(q["stages"]) == STAGES
    calib = q["calibration"]
    assert positive(calib["read_bytes_per_s"]) and positive(calib["matmul_flops_per_s"])
    for name, row in q["stages"].items():
        assert positive(row["seconds"]), name
        if name == "talker_prefill":  # the one stage without a floor
            assert row["floor_seconds"] is None
            continue
        assert positive(row["floor_seconds"]) and row["floor_seconds"] < row["seconds"], name
        # the floor is its bytes at the measured bandwidth, or its FLOPs at the GEMM rate
        if row["bytes_read"]:
            assert row["floor_seconds"] == pytest.approx(
                row["bytes_read"] / calib["read_bytes_per_s"], rel=1e-12)
        else:
            assert row["floor_seconds"] == pytest.approx(
                row["flops"] / calib["matmul_flops_per_s"], rel=1e-12)
    stages = q["stages"]
    assert stages["prefill"]["work"] == q["prompt_tokens"]
    assert stages["thinker_decode"]["work"] == SETTINGS["decode_tokens"]
    for name in ("talker", "code_predictor", "talker_step"):
        assert stages[name]["work"] == SETTINGS["talker_frames"]
    frame_s = 0.08
    for name in ("code2wav_stream", "code2wav_full"):
        assert 0 < stages[name]["work"] <= SETTINGS["code2wav_frames"] * frame_s
    # a decoder layer's row is its share of the step: the layers within the step's time and bytes
    cfg = OmniConfig.from_hf(results["model"]["path"])
    for layer, whole, n in (("thinker_decode_layer", "thinker_decode",
                             cfg.thinker.text.num_hidden_layers),
                            ("talker_step_layer", "talker_step", cfg.talker.text.num_hidden_layers)):
        assert stages[layer]["work"] == stages[whole]["work"]
        assert stages[layer]["seconds"] * n < stages[whole]["seconds"], layer
        assert stages[layer]["bytes_read"] * n < stages[whole]["bytes_read"], layer
    # one stage is the sum of its parts
    assert stages["talker"]["bytes_read"] == pytest.approx(
        stages["code_predictor"]["bytes_read"] + stages["talker_step"]["bytes_read"])
    assert stages["prefill"]["seconds"] >= stages["audio_encoder"]["seconds"] \
        + stages["vision_encoder"]["seconds"] + stages["thinker_lm"]["seconds"]


@slow
def test_bytes_per_step_are_the_weights_and_kv_the_config_says(run, checkpoint, tensors):
    results, _ = run
    q = results["qomni"]
    config = json.loads((checkpoint / "config.json").read_text())
    thinker = config["thinker_config"]["text_config"]
    talker = config["talker_config"]["text_config"]
    assert q["params"] == sum(tensors.values())  # packed linears included

    steps = SETTINGS["decode_tokens"]
    expected = step_weights(tensors, "thinker.model.", thinker) * FP32 \
        + tensors["thinker.lm_head.weight"] * FP32 + kv(thinker, q["prompt_tokens"] + steps / 2)
    assert q["stages"]["thinker_decode"]["bytes_read"] / steps == pytest.approx(expected)

    frames = SETTINGS["talker_frames"]
    prompt = q["stages"]["talker_prefill"]["work"]
    expected = FP32 * (step_weights(tensors, "talker.model.", talker)
                       + step_weights(tensors, "talker.codec_head.", talker)
                       + step_weights(tensors, "talker.text_projection.", talker)) \
        + kv(talker, prompt + frames / 2)
    assert q["stages"]["talker_step"]["bytes_read"] / frames == pytest.approx(expected)
    # each of the 15 code-predictor steps reads every layer; each codebook head is read once
    groups = config["talker_config"]["num_code_groups"]
    layers = sum(n for name, n in tensors.items()
                 if name.startswith("talker.code_predictor.model.layers."))
    heads = sum(n for name, n in tensors.items()
                if name.startswith("talker.code_predictor.lm_head."))
    assert q["stages"]["code_predictor"]["bytes_read"] / frames == pytest.approx(
        FP32 * ((groups - 1) * layers + heads))


@slow
def test_flops_are_the_matmuls_the_config_says(run, checkpoint):
    results, _ = run
    q = results["qomni"]
    text = json.loads((checkpoint / "config.json").read_text())["thinker_config"]["text_config"]
    stages, s = q["stages"], q["prompt_tokens"]
    d, h, kvh, dh = (text[k] for k in ("hidden_size", "num_attention_heads",
                                       "num_key_value_heads", "head_dim"))
    e, k, inter = text["num_experts"], text["num_experts_per_tok"], text["moe_intermediate_size"]
    per_token = d * (h + 2 * kvh) * dh + h * dh * d + d * e + k * 3 * d * inter  # every layer MoE
    linear = 2 * s * text["num_hidden_layers"] * per_token
    attention = stages["thinker_lm"]["flops"] - linear  # q·kᵀ and p·v over the cached keys
    per_key = 4 * text["num_hidden_layers"] * h * s * dh
    assert per_key * s <= attention <= per_key * (s + SETTINGS["decode_tokens"] + 2)
    # prefill = the encoders + the thinker + the first token's logits
    rest = stages["prefill"]["flops"] - sum(stages[n]["flops"] for n in (
        "audio_encoder", "vision_encoder", "thinker_lm"))
    assert rest == 2 * d * text["vocab_size"]
    assert positive(stages["audio_encoder"]["flops"]) and positive(stages["vision_encoder"]["flops"])
    # streamed or whole, the vocoder runs the same layers over the same frames
    assert stages["code2wav_stream"]["flops"] == pytest.approx(stages["code2wav_full"]["flops"],
                                                               rel=0.1)


@slow
def test_end_to_end_rows(run):
    results, _ = run
    q, ref = results["qomni"], results["transformers"]
    e2e = q["e2e"]
    assert 0 < e2e["time_to_first_text_s"] <= e2e["time_to_first_audio_s"]
    assert 0 < e2e["first_chunk_s"] <= 0.08  # the first chunk is one frame
    voice = q["voice_turn"]
    assert positive(voice["prefilled_whole_s"]) and positive(voice["prefilled_ahead_s"])
    # one finished audio window, prefilled while spoken and continued by the request
    assert voice["windows"] == 1 and voice["cached_tokens"] == voice["prefix_tokens"]
    assert 0 < voice["prefix_tokens"] < voice["prompt_tokens"]
    # the reference ran the same reply, and said as much speech per batch
    assert (ref["e2e"]["tokens"], ref["e2e"]["frames"]) == (
        SETTINGS["reply_tokens"], SETTINGS["reply_frames"])
    assert ref["prompt_tokens"] == q["prompt_tokens"] and ref["params"] == q["params"]
    for ours, theirs, batch in zip(q["throughput"], ref["throughput"], SETTINGS["batches"]):
        assert ours["batch"] == theirs["batch"] == batch
        assert ours["frames"] == batch * SETTINGS["e2e_frames"]
        assert positive(ours["wall_s"]) and positive(theirs["wall_s"])
        assert ours["audio_s"] == pytest.approx(theirs["audio_s"]) and ours["audio_s"] > 0
    assert set(ref["stages"]) == REFERENCE_STAGES
    assert all(positive(row["seconds"]) for row in ref["stages"].values())


@slow
def test_comparison_and_report(run):
    results, report = run
    q, comparison = results["qomni"], results["comparison"]
    assert set(comparison) == METRICS | {f"speech_throughput_batch{b}" for b in SETTINGS["batches"]}
    for m in comparison.values():
        assert all(positive(v) for v in m.values())
    decode = q["stages"]["thinker_decode"]
    m = comparison["thinker_decode_tok_per_s"]  # a rate: higher is better
    assert m["qomni"] == pytest.approx(decode["work"] / decode["seconds"])
    assert m["speedup"] == pytest.approx(m["qomni"] / m["transformers"])
    m = comparison["time_to_first_audio_s"]  # a time: lower is better
    assert m["speedup"] == pytest.approx(m["transformers"] / m["qomni"])
    assert f"prompt: {q['prompt_tokens']} tokens" in report
    for label in ("thinker decode, batch 1", "code predictor", "vs transformers",
                  "time to first audio", "spoken turn", "speech throughput batch 2"):
        assert label in report


@slow
def test_machine_reports_cpu_flags_and_torch_capability(run):
    import torch

    results, report = run
    machine = results["machine"]
    capability = torch.backends.cpu.get_cpu_capability()
    assert machine["torch_cpu_capability"] == capability
    assert f"torch CPU kernels: {capability}" in report.splitlines()[0]
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
    for flag in ("avx2", "avx512f", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "sve"):
        assert (flag in machine["cpu_flags"]) == (flag in flags), flag
    assert all(f in report.splitlines()[0] for f in machine["cpu_flags"])


@slow
def test_a_failing_backend_is_reported_not_raised(checkpoint, tmp_path):
    broken = tmp_path / "no-weights"
    broken.mkdir()
    (broken / "config.json").write_text((checkpoint / "config.json").read_text())
    out = tmp_path / "results.json"
    proc = bench("--model", str(broken), "--device", "cpu", *settings_args(), "--json", str(out))
    assert proc.returncode == 1, proc.stderr
    error = json.loads(out.read_text())["qomni"]["error"]
    assert error and f"qomni failed: {error}" in proc.stdout


def test_bad_settings_are_clear_errors(tmp_path, capsys):
    from qomni.cli import main

    for arg, message in (("nope=1", "NAME one of audio_seconds"),
                         ("decode_tokens=2.5", "not a valid decode_tokens"),
                         ("decode_tokens=1", "decode_tokens >= 3"),
                         ("batches=0", "batches must be")):
        assert main(["bench", "--model", str(tmp_path / "unused"), "--set", arg]) == 2
        assert message in capsys.readouterr().err, arg


@slow
def test_bench_model_has_the_published_widths():
    """Every width, head and expert count equals the published config; only depths are cut."""
    proc = bench("--print-config")
    assert proc.returncode == 0, proc.stderr
    bench_config = json.loads(proc.stdout)
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

    walk(bench_config, json.loads(FIXTURE.read_text()))
    thinker, talker = bench_config["thinker_config"], bench_config["talker_config"]
    layers = thinker["text_config"]["num_hidden_layers"]
    assert layers < 48 and 1 <= talker["accept_hidden_layer"] <= layers
    vision = thinker["vision_config"]
    assert len(vision["deepstack_visual_indexes"]) == 3  # all three mergers, as published
    assert max(vision["deepstack_visual_indexes"]) < vision["depth"] < 27

