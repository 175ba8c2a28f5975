"""AudioEncoder against transformers' Qwen3OmniMoeAudioEncoder (fp32, tiny configs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import hf_config

from qomni.config import OmniConfig
from qomni.models.audio_encoder import AudioEncoder, audio_token_count

modeling = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")

ATOL = 1e-4
# Config "a"/"b" as in tests/reference.py; "b-small-batches" also has 4 heads, 4-chunk windows and
# conv batches of 3 chunks, so the conv stem runs in several batches.
VARIANTS = {
    "a": ("a", {}),
    "b": ("b", {}),
    "b-small-batches": ("b", {"encoder_attention_heads": 4, "n_window_infer": 400, "conv_chunksize": 3}),
}


def _build(variant: str) -> tuple[torch.nn.Module, AudioEncoder]:
    name, overrides = VARIANTS[variant]
    hc = hf_config(name)
    for key, value in overrides.items():
        setattr(hc.thinker_config.audio_config, key, value)
    torch.manual_seed(0)
    ref = modeling.Qwen3OmniMoeAudioEncoder(hc.thinker_config.audio_config).eval()
    with torch.no_grad():  # the reference init zeroes biases, which would hide padding effects
        for p in ref.parameters():
            p.normal_(0.0, 0.1)
    ours = AudioEncoder(OmniConfig.from_hf(hc.to_dict()).thinker.audio).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request) -> tuple[torch.nn.Module, AudioEncoder]:
    return _build(request.param)


def _features(lengths: list[int], seed: int = 1) -> torch.Tensor:
    """Random frames in the range of Whisper log-mel features ((log10 - max + 4) / 4)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(128, sum(lengths), generator=g) * 2 - 1


def _compare(ref, ours, lengths: list[int]) -> torch.Tensor:
    x, lens = _features(lengths), torch.tensor(lengths)
    with torch.inference_mode():
        want = ref(x, feature_lens=lens).last_hidden_state
        got = ours(x, lens)
    assert got.shape == want.shape == (int(audio_token_count(lens, 50).sum()), want.shape[-1])
    diff = (got - want).abs()
    assert diff.max() <= ATOL, f"{lengths}: max|Δ| {diff.max():.3g}, mean {diff.mean():.3g}"
    return got


@pytest.mark.parametrize(
    "lengths",
    [
        pytest.param([37], id="sub-chunk"),
        pytest.param([100], id="one-chunk"),
        pytest.param([950], id="several-windows"),
        pytest.param([330, 37, 1000], id="mixed-batch"),
        pytest.param([37, 80, 12, 1], id="only-sub-chunk-Q7"),
        pytest.param([99, 101, 200, 201, 400], id="chunk-edges"),
    ],
)
def test_matches_reference(pair, lengths):
    _compare(*pair, lengths)


def test_padding_follows_batch(pair):
    """The reference pads every chunk to the batch's longest chunk and the conv biases turn that
    padding into signal in the chunk's last token, so a short clip's output depends on its batch
    mates. We reproduce it; this checks the effect is real, not just that both sides agree."""
    alone = _compare(*pair, [37])
    batched = _compare(*pair, [37, 100])[:5]
    assert (alone - batched).abs().max() > 10 * ATOL


def test_state_dict_keys_are_checkpoint_keys(pair):
    ref, ours = pair
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    assert "positional_embedding" not in ours.state_dict()
    table = ref.positional_embedding.positional_embedding
    assert torch.equal(ours.positional_embedding, table[: len(ours.positional_embedding)])


def test_token_count_matches_reference():
    lengths = torch.arange(2001)
    want = modeling._get_feat_extract_output_lengths(lengths, 50)
    assert torch.equal(audio_token_count(lengths, 50), want)
    assert [audio_token_count(n, 50) for n in (0, 1, 99, 100, 330, 1000)] == [
        int(want[n]) for n in (0, 1, 99, 100, 330, 1000)
    ]


@pytest.mark.slow
def test_long_audio_attends_window_by_window(monkeypatch):
    """5 minutes (30 000 frames) in one call: right shape, and no attention wider than a window."""
    _, ours = _build("a")
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append(k.shape[-2])
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    lengths = [30_000, 1234]
    with torch.inference_mode():
        out = ours(_features(lengths), torch.tensor(lengths))
    assert out.shape == (int(audio_token_count(torch.tensor(lengths), 50).sum()), 64)
    assert torch.isfinite(out).all()
    window = 13 * (200 // 100)
    assert seen and max(seen) == window


def test_bfloat16_close_to_reference():
    ref, ours = _build("a")
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    lengths = [330, 37]
    x, lens = _features(lengths), torch.tensor(lengths)
    with torch.inference_mode():
        want = ref(x, feature_lens=lens).last_hidden_state
        got = ours(x, lens)
    assert got.dtype == want.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() <= 2e-2


@pytest.mark.parametrize("lengths", [[], [0, 50], [10, -1]])
def test_rejects_bad_lengths(lengths):
    _, ours = _build("a")
    with pytest.raises(ValueError):
        ours(torch.zeros(128, max(sum(lengths), 0)), torch.tensor(lengths, dtype=torch.long))


def test_rejects_frame_count_mismatch():
    _, ours = _build("a")
    with pytest.raises(ValueError):
        ours(torch.zeros(128, 90), torch.tensor([100]))


def test_a_window_is_final_once_its_frames_exist(pair):
    """Windows are encoded alone with the same shapes: the finished windows of a clip still
    arriving are bit for bit those of the whole clip, alone or beside other clips (what lets
    speech be encoded while it is spoken)."""
    _, ours = pair
    size = ours.cfg.n_window_infer // 100 * 100
    whole = _features([3 * size + 57], seed=3)
    other = _features([170], seed=4)
    with torch.inference_mode():
        alone = ours(whole, torch.tensor([whole.shape[1]]))
        beside = ours(torch.cat([other, whole], 1), torch.tensor([170, whole.shape[1]]))
        per_window = int(audio_token_count(torch.tensor(size), 50))
        for k in (1, 2):
            part = ours(whole[:, : k * size], torch.tensor([k * size]))
            assert torch.equal(part, alone[: k * per_window])
    assert torch.equal(beside[-alone.shape[0]:], alone)


def test_window_cache_gives_the_same_tensors(pair):
    _, ours = pair
    x, lens = _features([950, 120], seed=5), torch.tensor([950, 120])
    with torch.inference_mode():
        fresh = ours(x, lens)
        ours.cache_windows(8)
        try:
            first = ours(x, lens)
            again = ours(x, lens)
            cache = ours.window_cache
            assert cache.hits == cache.misses == len(cache) > 1
        finally:
            ours.cache_windows(0)
    assert torch.equal(first, fresh) and torch.equal(again, fresh)
