"""qomni.tensor_file reads what safetensors writes, into memory of its own."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from qomni.tensor_file import DTYPES, TensorFileError, read_header, read_tensors


def _tensors():
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES.values()):
        base = torch.randn(3, 5, generator=gen) * 50
        out[f"t{i}"] = (base > 0) if dtype is torch.bool else base.to(dtype)
    out["scalar"] = torch.tensor(7, dtype=torch.int64)
    out["empty"] = torch.empty(0, 4)
    return out


def test_round_trip_every_dtype(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(_tensors(), str(path))
    expected = load_file(str(path))
    got = dict(read_tensors(path))
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_tensors_do_not_alias_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(1000, dtype=torch.int32)}, str(path))
    [(_, a)] = read_tensors(path, ["a"])
    path.write_bytes(b"\0" * path.stat().st_size)  # the same pages, overwritten
    assert torch.equal(a, torch.arange(1000, dtype=torch.int32))


def test_a_subset_and_a_missing_key(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(path))
    assert [k for k, _ in read_tensors(path, ["b"])] == ["b"]
    with pytest.raises(KeyError, match="c"):
        list(read_tensors(path, ["a", "c"]))


def test_broken_files_are_named(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(1000)}, str(path))
    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-100])
    with pytest.raises(TensorFileError, match="ends inside tensor 'a'"):
        list(read_tensors(tmp_path / "short.safetensors"))
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(TensorFileError, match="shorter than 8 bytes"):
        read_header(tmp_path / "tiny.safetensors")
    (tmp_path / "junk.safetensors").write_bytes((5).to_bytes(8, "little") + b"{nope")
    with pytest.raises(TensorFileError, match="unreadable safetensors header"):
        read_header(tmp_path / "junk.safetensors")
