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
