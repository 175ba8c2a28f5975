"""The error quantizing the parts qomni leaves in the compute dtype would add, at real widths.

Builds the audio encoder, the vision encoder and code2wav at the published widths (random
weights at torch's default init; a few layers, as stated), runs the same input through the fp32
module and through a copy whose every nn.Linear is quantized as qomni quantizes on load (int8
per channel, int4 in groups of 128), and prints the output's relative L2 error. For the MoE
router it prints how often a token's top-k expert set changes when the router weight alone is
quantized (random hidden states).

    PYTHONPATH=. python bench/quant_error.py --layers 4
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from qomni.bench.fullsize import full_size_config
from qomni.config import OmniConfig
from qomni.models.audio_encoder import AudioEncoder
from qomni.models.code2wav import Code2Wav
from qomni.models.vision_encoder import VisionEncoder
from qomni.quant.linear import QuantizeOnLoad, QuantLinear


def quantized(module: nn.Module, bits: int) -> nn.Module:
    """A copy of `module` with every nn.Linear quantized on load."""
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                q = QuantLinear.replacing(child, QuantizeOnLoad(bits), torch.float32, "cpu")
                q.load_part("weight", child.weight.data)
                q.bias = child.bias
                setattr(parent, name, q)
    return module


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def report(label: str, module: nn.Module, run) -> None:
    with torch.inference_mode():
        ref = run(module)
        errs = {bits: rel(run(quantized(module, bits)), ref) for bits in (8, 4)}
    print(f"{label:44s} int8 {errs[8]:.2e}   int4 {errs[4]:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4, help="encoder layers / vision blocks")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = full_size_config()
    th = config["thinker_config"]
    th["audio_config"]["encoder_layers"] = args.layers
    th["vision_config"].update(depth=args.layers, deepstack_visual_indexes=[0, 1, 2])
    cfg = OmniConfig.from_hf(config)

    audio = AudioEncoder(cfg.thinker.audio).eval()
    feats = torch.randn(128, 800)  # 8 s of log-mel frames
    report(f"audio encoder ({args.layers} layers), 8 s", audio,
           lambda m: m(feats, torch.tensor([800])))

    vision = VisionEncoder(cfg.thinker.vision).eval()
    grid = torch.tensor([[1, 16, 16]])  # one 256 x 256 image
    pixels = torch.randn(256, 3 * 2 * 16 * 16)
    report(f"vision encoder ({args.layers} blocks), 256x256 image", vision,
           lambda m: m(pixels, grid)[0])

    c2w = Code2Wav(cfg.code2wav).eval()
    codes = torch.randint(0, cfg.code2wav.codebook_size, (1, cfg.code2wav.num_quantizers, 25))
    report("code2wav (8 layers), 25 frames: waveform", c2w, lambda m: m(codes))

    text = cfg.thinker.text
    router = nn.Sequential(nn.Linear(text.hidden_size, text.num_experts, bias=False))
    nn.init.normal_(router[0].weight, std=0.02)
    h = torch.randn(4096, text.hidden_size)
    with torch.inference_mode():
        ref = router(h).topk(text.num_experts_per_tok).indices.sort(-1).values
        for bits in (8, 4):
            got = quantized(router, bits)(h).topk(text.num_experts_per_tok).indices.sort(-1).values
            changed = (got != ref).any(-1).float().mean().item()
            print(f"{'thinker router: tokens whose top-8 set changes':44s} int{bits} "
                  f"{changed:.1%}")


if __name__ == "__main__":
    main()
