import os
import warnings

import pytest
import torch
from reference import save_hf_checkpoint

torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings("ignore", message=".*rope_parameters.*")


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """name -> (checkpoint dir, transformers model) for tiny configs "a" and "b", built once."""
    built = {}

    def get(name: str = "a"):
        if name not in built:
            path = tmp_path_factory.mktemp(f"hf_tiny_{name}")
            built[name] = (path, save_hf_checkpoint(name, path))
        return built[name]

    return get


@pytest.fixture(scope="session")
def omni_tiny(hf_tiny):
    """name -> qomni Omni loaded (fp32, CPU) from the transformers-saved checkpoint."""
    from qomni import Omni

    loaded = {}

    def get(name: str = "a", **kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key not in loaded:
            path, _ = hf_tiny(name)
            loaded[key] = Omni.load(path, dtype="float32", device="cpu", progress=False, **kwargs)
        return loaded[key]

    return get
