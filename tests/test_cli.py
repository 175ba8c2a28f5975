"""The command line, run as a user runs it (subprocesses, real files)."""

import os
import subprocess
import sys

import pytest

# Each test starts Python, torch and a model in a subprocess.
pytestmark = pytest.mark.slow


def run(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "qomni", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    out = run("make-tiny", str(path))
    assert str(path) in out.stdout
    return path


def test_make_tiny_writes_the_official_layout(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    for required in ("config.json", "model.safetensors.index.json", "tokenizer.json",
                     "tokenizer_config.json", "chat_template.json", "preprocessor_config.json",
                     "generation_config.json", "vocab.json", "merges.txt"):
        assert required in names
    assert len([n for n in names if n.startswith("model-0")]) >= 2, "weights must be sharded"


def test_generate_streams_text_and_matches_the_api(tiny_dir):
    from qomni import Omni

    out = run("generate", "--model", str(tiny_dir), "--prompt", "Hello there",
              "--max-new-tokens", "12", "--quiet")
    omni = Omni.load(tiny_dir, dtype="float32", device="cpu", progress=False)
    expected = omni.generate([{"role": "user", "content": "Hello there"}], max_new_tokens=12)
    assert out.stdout == expected.text + "\n"


def test_generate_without_model_uses_demo_checkpoint_and_warns(tmp_path):
    out = run("generate", "--prompt", "Hi", "--max-new-tokens", "4",
              env={"XDG_CACHE_HOME": str(tmp_path)})
    assert "RANDOM weights" in out.stderr
    assert (tmp_path / "qomni").is_dir()


def test_bad_model_path_is_a_clear_error(tmp_path):
    out = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x", check=False)
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_generate_speaks_to_a_playable_wav(tiny_dir, tmp_path):
    import wave

    out_wav = tmp_path / "reply.wav"
    run("generate", "--model", str(tiny_dir), "--prompt", "Say hello", "--max-new-tokens", "4",
        "--speaker", "Chelsie", "--output", str(out_wav), "--max-audio-frames", "6", "--quiet")
    with wave.open(str(out_wav)) as w:
        assert w.getframerate() == 24000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        assert w.getnframes() == 1920 * 6 - 555  # the tiny model never says EOS: capped


def test_unknown_voice_is_a_clear_error(tiny_dir, tmp_path):
    out = run("generate", "--model", str(tiny_dir), "--prompt", "x", "--speaker", "Robot",
              "--output", str(tmp_path / "x.wav"), check=False)
    assert out.returncode == 2 and "available voices" in out.stderr


def test_engine_flags_give_the_engine_config():
    from qomni.cli import build_parser, engine_config
    from qomni.engine.config import EngineConfig

    parser = build_parser()
    for command in ("serve", "generate"):
        base = [command] + (["--prompt", "x"] if command == "generate" else [])
        assert engine_config(parser.parse_args(base)) == EngineConfig()
        args = parser.parse_args([*base, "--max-num-seqs", "3", "--max-model-len", "1024",
                                  "--max-talker-len", "2000", "--first-chunk-frames", "2",
                                  "--chunk-frames", "10", "--audio-cache-windows", "0",
                                  "--cuda-graphs", "on"])
        assert engine_config(args) == EngineConfig(
            max_num_seqs=3, max_model_len=1024, max_talker_len=2000, first_chunk_frames=2,
            chunk_frames=10, audio_cache_windows=0, cuda_graphs=True)
        off = parser.parse_args([*base, "--cuda-graphs", "off"])
        assert engine_config(off).cuda_graphs is False
    helped = run("serve", "--help").stdout
    for flag in ("--max-num-seqs", "--max-model-len", "--max-talker-len", "--first-chunk-frames",
                 "--chunk-frames", "--audio-cache-windows", "--cuda-graphs", "--stage-devices"):
        assert flag in helped


@pytest.mark.parametrize("flags, says", [
    (["--max-num-seqs", "0"], "--max-num-seqs: must be >= 1"),
    (["--max-model-len", "lots"], "--max-model-len: 'lots' is not an integer"),
    (["--cuda-graphs", "maybe"], "--cuda-graphs: invalid choice: 'maybe'"),
])
def test_bad_engine_flags_are_clear_errors(flags, says):
    out = run("serve", *flags, check=False)
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr


def test_engine_settings_that_contradict_are_a_clear_error(tiny_dir):
    out = run("generate", "--model", str(tiny_dir), "--prompt", "x", "--first-chunk-frames", "9",
              "--chunk-frames", "4", check=False)
    assert out.returncode == 2 and "first_chunk_frames" in out.stderr
    assert "Traceback" not in out.stderr


def test_stage_devices_flag(tiny_dir):
    run("generate", "--model", str(tiny_dir), "--prompt", "Hi", "--max-new-tokens", "3",
        "--stage-devices", "thinker=cpu,talker=cpu", "--cuda-graphs", "on", "--quiet")
    out = run("generate", "--model", str(tiny_dir), "--prompt", "x", "--stage-devices",
              "talker=cuda:9", check=False)
    assert out.returncode == 2 and "device 'cuda:9'" in out.stderr
    assert "Traceback" not in out.stderr
