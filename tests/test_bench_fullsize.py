"""`qomni bench --full-size`: its config is the published Instruct config; its checkpoint is
written directly quantized (no full-precision copy of the quantized linears, in a valid
compressed-tensors layout the library reads), and one turn runs on it. Run here on a small
config through the hidden --full-size-config option: the full-size build takes the whole
machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from quant_fixtures import WIDE, decompress_with_library, read_tensors

from qomni.bench.fullsize import full_size_config
from qomni.config import OmniConfig
from qomni.quant.plan import component_of

FIXTURE = Path(__file__).parent / "fixtures" / "instruct_config.json"
SETTINGS = ["--set", "audio_seconds=2.5", "--set", "image_size=64", "--set", "decode_tokens=3",
            "--set", "talker_frames=2", "--set", "code2wav_frames=6", "--set", "e2e_frames=4",
            "--set", "reply_tokens=4", "--set", "reply_frames=6"]


def bench(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    return subprocess.run([sys.executable, "-m", "qomni", "bench", *args], capture_output=True,
                          text=True, timeout=900, check=False, env=env)


def test_config_is_the_published_one():
    assert OmniConfig.from_hf(full_size_config()) == OmniConfig.from_hf(FIXTURE)


@pytest.mark.slow
def test_full_size_run_on_a_small_config(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(WIDE))
    out = tmp_path / "results.json"
    proc = bench(tmp_path / "cache", "--full-size", "--quantization", "int4,lm_heads=int8",
                 "--full-size-config", str(config), "--quick", *SETTINGS, "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    q = results["qomni"]
    assert q["dtype"] == "bfloat16" and results["settings"]["batches"] == [1]
    assert q["quantization"]["thinker"].startswith("pack-quantized int4 group 128")
    assert q["quantization"]["code_predictor"].startswith("pack-quantized int4 group 128")
    assert q["quantization"]["lm_heads"] == "int8 (quantized on load)"
    for key in ("peak_rss_gib", "load_s"):
        assert q[key] > 0
    assert 0 < q["peak_rss_load_gib"] <= q["peak_rss_gib"]
    for name in ("prefill", "thinker_decode", "talker", "code2wav_stream"):
        assert q["stages"][name]["seconds"] > 0
    for name in ("thinker_decode", "thinker_decode_layer", "talker_step_layer"):
        assert q["stages"][name]["floor_seconds"] > 0
    # a layer's share is part of the step it was timed in
    assert q["stages"]["thinker_decode_layer"]["seconds"] < q["stages"]["thinker_decode"]["seconds"]
    e2e = q["e2e"]
    assert e2e["time_to_first_audio_s"] > 0 and q["throughput"][0]["audio_s"] > 0
    # the turn's reply streamed to its end (past its first chunk), and its real-time factor
    assert e2e["audio_s"] > e2e["first_chunk_s"] > 0
    assert e2e["rtf"] == pytest.approx(e2e["wall_s"] / e2e["audio_s"])
    assert "real-time factor" in proc.stdout and "one decoder layer" in proc.stdout

    [path] = (tmp_path / "cache" / "qomni").glob("fullsize-*")
    tensors = read_tensors(path)
    packed = {k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")}
    assert any(".mlp.experts." in k for k in packed)
    for key, t in tensors.items():
        module = key.rpartition(".")[0]
        if key.endswith(".weight") and t.ndim == 2 and component_of(module) in (
                "thinker", "talker", "code_predictor"):
            pytest.fail(f"{key} was written in full precision")
    assert tensors["thinker.lm_head.weight"].dtype.itemsize == 2  # bf16, quantized on load
    # a valid compressed-tensors checkpoint: the library dequantizes every packed module
    dense = decompress_with_library(path)
    for module in packed:
        assert dense[f"{module}.weight"].shape == tuple(tensors[f"{module}.weight_shape"])


def test_full_size_needs_quantization(tmp_path):
    proc = bench(tmp_path, "--full-size")
    assert proc.returncode == 2 and "--full-size needs --quantization" in proc.stderr
