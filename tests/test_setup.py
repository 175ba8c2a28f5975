"""The make targets a newcomer runs: set-up steps that run again only when pyproject.toml
changes, `make demo` writing where git ignores it, and package metadata setuptools accepts
without deprecation notices."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _dry_run(target: str, venv: Path, *flags: str) -> str:
    """The commands `make -n` would run for `target` with the venv at `venv`."""
    return subprocess.run(["make", "-n", "-C", str(ROOT), target, f"VENV={venv}", *flags],
                          check=True, capture_output=True, text=True).stdout


def _venv_set_up(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    # Stamps made after pyproject.toml, as a finished set-up leaves them.
    for stamp in (".setup-core", ".setup-serve", ".setup-test"):
        (venv / stamp).touch()
    return venv


@needs_make
@pytest.mark.parametrize("target", ["serve", "demo"])
def test_set_up_venv_installs_nothing_again(tmp_path, target):
    venv = _venv_set_up(tmp_path)
    assert "pip install" not in _dry_run(target, venv)
    # pyproject.toml changed (-W: as if newer): the set-up runs again
    assert "pip install -q -e ." in _dry_run(target, venv, "-W", "pyproject.toml")
    assert "pip install" in _dry_run(target, tmp_path / "fresh")


@needs_make
def test_ci_prints_the_slowest_tests(tmp_path):
    assert "pytest -q --durations=20" in _dry_run("test", _venv_set_up(tmp_path))


@needs_make
def test_demo_writes_its_reply_where_git_ignores_it(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    cmd = _dry_run("demo", _venv_set_up(tmp_path))
    out = cmd.split("--output", 1)[1].split()[0]
    assert Path(out).parent != Path("."), out  # not in the repository root
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", out], check=False)
    assert ignored.returncode == 0, f"{out} is not git-ignored"


def test_license_metadata_is_an_spdx_expression():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(project["license"], str)  # a table is deprecated by setuptools
    assert project["license-files"] and all((ROOT / f).is_file() for f in project["license-files"])
