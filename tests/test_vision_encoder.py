"""VisionEncoder equals transformers' Qwen3OmniMoeVisionEncoder (tiny config "a", fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import hf_config

from qomni.config import OmniConfig
from qomni.models.vision_encoder import VisionEncoder
from qomni.multimodal.vision import preprocess_image

TOL = 1e-4


@pytest.fixture(scope="module")
def encoders():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeVisionEncoder,
    )

    config = hf_config("a")
    torch.manual_seed(0)
    hf = Qwen3OmniMoeVisionEncoder._from_config(config.thinker_config.vision_config).eval()
    # transformers' init leaves norms at 1 and biases at 0: perturb so every weight matters.
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = VisionEncoder(OmniConfig.from_hf(config.to_dict()).thinker.vision).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def test_state_dict_keys_are_the_checkpoint_keys(encoders):
    hf, ours = encoders
    keys = set(ours.state_dict())
    assert keys == set(hf.state_dict())
    for key in (
        "patch_embed.proj.weight", "pos_embed.weight", "blocks.0.attn.qkv.weight",
        "blocks.0.norm1.weight", "blocks.0.mlp.linear_fc1.weight", "merger.ln_q.weight",
        "merger.mlp.0.weight", "merger.mlp.2.weight", "merger_list.0.ln_q.weight",
    ):
        assert key in keys
    assert not any("inv_freq" in k for k in keys)


@pytest.mark.parametrize(
    "grids",
    [
        [[1, 4, 6]],  # a 70x100 image
        [[1, 16, 20]],
        [[1, 4, 6], [1, 8, 4]],  # two images of different grids in one call
        [[3, 4, 4]],  # a video: attention stays inside each frame
        [[2, 6, 4], [1, 2, 2], [1, 10, 8]],  # video and images mixed
    ],
    ids=["image", "bigger", "two-images", "video", "mixed"],
)
def test_matches_reference(encoders, grids):
    hf, ours = encoders
    grid_thw = torch.tensor(grids)
    torch.manual_seed(1)
    pixels = torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 16 * 16)
    _check(hf, ours, pixels, grid_thw)


def test_matches_reference_on_a_preprocessed_image(encoders):
    hf, ours = encoders
    y, x = np.mgrid[0:90, 0:130]
    img = np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8)
    pixels, grid = preprocess_image(img)
    _check(hf, ours, pixels, grid[None])


def _check(hf, ours, pixels: torch.Tensor, grid_thw: torch.Tensor) -> None:
    with torch.no_grad():
        ref = hf(pixels, grid_thw)
        embeds, deepstack = ours(pixels, grid_thw)
    merged = int(grid_thw.prod(-1).sum()) // 4
    assert embeds.shape == ref.pooler_output.shape == (merged, 64)
    assert len(deepstack) == len(ref.deepstack_features) == 3
    for name, a, b in [("embeds", embeds, ref.pooler_output)] + [
        (f"deepstack[{i}]", a, b) for i, (a, b) in enumerate(zip(deepstack, ref.deepstack_features))
    ]:
        diff = (a - b).abs()
        assert diff.max() <= TOL, f"{name}: max|Δ| {diff.max():.3g}, mean {diff.mean():.3g}"


def test_grid_mismatch_is_an_error(encoders):
    _, ours = encoders
    with pytest.raises(ValueError, match="needs 24"):
        ours(torch.randn(20, 1536), torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match="multiples of 2"):
        ours(torch.randn(15, 1536), torch.tensor([[1, 3, 5]]))
