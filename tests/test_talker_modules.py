"""Talker and code predictor modules against transformers 5.23 on tiny config "a" (fp32, CPU).

The checkpoint is written by transformers' save_pretrained (per-expert keys) and read by qomni's
own loader into a bare Talker. Tolerances (fp32): hidden/logits max|Δ| ≤ 1e-4, codes equal.
"""

import pytest
import torch
from torch import nn

from qomni.config import OmniConfig
from qomni.models.talker import Talker
from qomni.weights import (
    EXPERT_KEY,
    EXPERT_TARGETS,
    checkpoint_files,
    load_weights,
    meta_parameters,
)


def _diff(a, b):
    d = (a.float() - b.float()).abs()
    return f"max|Δ|={d.max().item():.3g} mean|Δ|={d.mean().item():.3g}"


class _Checkpoint(nn.Module):
    """Holds only `talker`, so the loader maps `talker.*` keys onto it."""

    def __init__(self, talker: Talker):
        super().__init__()
        self.talker = talker


@pytest.fixture(scope="module")
def pair(hf_tiny):
    path, hf = hf_tiny("a")
    cfg = OmniConfig.from_hf(path).talker
    with meta_parameters():
        root = _Checkpoint(Talker(cfg))
    load_weights(root, path, dtype=torch.float32, skip_prefixes=("thinker.", "code2wav."),
                 progress=False)
    return path, hf.talker, root.talker.eval()


def test_state_dict_keys_are_checkpoint_keys(pair):
    path, _, talker = pair
    on_disk = set()
    for key in checkpoint_files(path):
        if not key.startswith("talker."):
            continue
        m = EXPERT_KEY.match(key)
        on_disk.add(f"{m['prefix']}.{EXPERT_TARGETS[m['proj']][0]}" if m else key)
    ours = {f"talker.{k}" for k in talker.state_dict()}
    assert ours == on_disk, (sorted(ours - on_disk), sorted(on_disk - ours))
    # only rotary tables and the codebook-0 mask are buffers, and none of them is saved
    assert {n.rsplit(".", 1)[-1] for n, _ in talker.named_buffers()} <= {
        "inv_freq", "axis", "code0_suppress"}


def _positions(b: int, s: int) -> torch.Tensor:
    """[3, B, S] M-RoPE positions whose axes differ (as over an image) so the interleave matters."""
    t = torch.arange(s).expand(b, s)
    h = t + torch.tensor([[0], [2]])[:b] + (torch.arange(s) % 3)
    w = t + (torch.arange(s) % 4) * torch.tensor([[1], [2]])[:b]
    return torch.stack((t, h, w))


def test_trunk_and_codec_head_match(pair):
    from transformers import DynamicCache

    _, hf, talker = pair
    torch.manual_seed(1)
    b, s, d = 2, 9, talker.cfg.text.hidden_size
    embeds = torch.randn(b, s, d)
    pos = _positions(b, s)
    cache = talker.new_cache(b, 32)
    hf_cache = DynamicCache(config=hf.config.text_config)
    with torch.no_grad():
        for step in range(4):  # prefill, then 3 single-token decode steps
            ours = talker(embeds, pos, cache)
            ref = hf.model(inputs_embeds=embeds, position_ids=pos, past_key_values=hf_cache,
                           use_cache=True).last_hidden_state
            assert torch.allclose(ours, ref, atol=1e-4, rtol=0), f"step {step}: {_diff(ours, ref)}"
            logits, ref_logits = talker.logits(ours), hf.codec_head(ref)
            assert logits.shape == (b, embeds.shape[1], talker.cfg.text.vocab_size)
            assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=0), \
                f"step {step}: {_diff(logits, ref_logits)}"
            embeds = torch.randn(b, 1, d)
            pos = pos.amax(-1, keepdim=True) + 1  # decode: every axis advances by one


def test_projections_match(pair):
    _, hf, talker = pair
    torch.manual_seed(2)
    x = torch.randn(2, 5, talker.cfg.thinker_hidden_size)
    with torch.no_grad():
        for name in ("text_projection", "hidden_projection"):
            ours, ref = getattr(talker, name)(x), getattr(hf, name)(x)
            assert torch.allclose(ours, ref, atol=1e-6, rtol=0), f"{name}: {_diff(ours, ref)}"


def _reference_frames(hf, hidden: torch.Tensor, code0: torch.Tensor):
    """Codes 1..G-1 and the next talker input's codec part, exactly as the reference's
    `prepare_inputs_for_generation` computes them for greedy decoding."""
    e0 = hf.get_input_embeddings()(code0[:, None])
    out = hf.code_predictor.generate(
        inputs_embeds=torch.cat((hidden[:, None], e0), dim=1),
        max_new_tokens=hf.config.num_code_groups - 1, do_sample=False,
        output_hidden_states=True, return_dict_in_generate=True)
    mid = [h[0] for h in out.hidden_states[1:]]
    last = hf.code_predictor.get_input_embeddings()[-1](out.sequences[..., -1:])
    return out.sequences, torch.cat([e0, *mid, last], dim=1).sum(1)


def test_code_predictor_greedy_matches_generate(pair):
    _, hf, talker = pair
    groups = talker.cfg.num_code_groups
    torch.manual_seed(3)
    b = 4
    with torch.no_grad():
        # realistic first inputs: post-norm talker hiddens of a random prefill
        hidden = talker(torch.randn(1, b, talker.cfg.text.hidden_size), _positions(1, b),
                        talker.new_cache(1, b))[0]
        code0 = torch.randint(0, talker.cfg.code_predictor.vocab_size, (b,))
        ref_codes, ref_next = _reference_frames(hf, hidden, code0)

        e0 = talker.embed(code0)
        codes = talker.code_predictor.predict(hidden, e0)
        assert codes.shape == (b, groups - 1) and codes.dtype == torch.long
        assert torch.equal(codes, ref_codes), (codes, ref_codes)

        residual = talker.code_predictor.residual_embedding(codes)
        assert torch.allclose(e0 + residual, ref_next, atol=1e-5, rtol=0), \
            _diff(e0 + residual, ref_next)

        frames, next_codec = talker.predict_residuals(hidden, code0)
        assert torch.equal(frames, torch.cat((code0[:, None], ref_codes), dim=1))
        assert torch.allclose(next_codec, ref_next, atol=1e-5, rtol=0), _diff(next_codec, ref_next)

        # the reused per-batch-size scratch carries nothing between frames or batch sizes
        for i in range(b):
            one = talker.code_predictor.predict(hidden[i:i + 1], e0[i:i + 1])
            assert torch.equal(one[0], codes[i])
        assert torch.equal(talker.code_predictor.predict(hidden, e0), codes)


def test_code_predictor_uses_sample_fn(pair):
    _, _, talker = pair
    cp = talker.code_predictor
    seen = []

    def pick_last(logits):
        seen.append(logits.shape)
        return torch.full(logits.shape[:1], logits.shape[-1] - 1, dtype=torch.long)

    with torch.no_grad():
        hidden = torch.randn(3, talker.cfg.text.hidden_size)
        codes = cp.predict(hidden, talker.embed(torch.tensor([1, 2, 3])), pick_last)
    assert seen == [(3, cp.cfg.vocab_size)] * (cp.cfg.num_code_groups - 1)
    assert (codes == cp.cfg.vocab_size - 1).all()
