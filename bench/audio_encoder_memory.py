"""Peak memory and wall time of the audio encoder on one long audio at real widths.

Real Qwen3-Omni AuT widths (d_model 1280, 20 heads, ffn 5120, output 2048, 480 conv channels,
100-frame chunks, 8-chunk attention windows) with only a few layers and random weights. Each dtype
runs in a fresh process so its peak RSS (ru_maxrss) is its own. On a CPU without native bf16
(no AVX-512-BF16 or AMX) torch emulates bf16 convolutions and matmuls some 30x slower than fp32:
give bf16 a shorter `--minutes` there.

    python bench/audio_encoder_memory.py                  # 30 min, 2 layers, fp32 and bf16
    python bench/audio_encoder_memory.py --minutes 5 --dtypes float32
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import torch

from qomni.config import AudioConfig
from qomni.models.audio_encoder import AudioEncoder, audio_token_count

FRAMES_PER_SECOND = 100  # Whisper features: hop 160 at 16 kHz


def real_config(layers: int) -> AudioConfig:
    return AudioConfig(
        num_mel_bins=128,
        encoder_layers=layers,
        encoder_attention_heads=20,
        encoder_ffn_dim=5120,
        d_model=1280,
        output_dim=2048,
        n_window=50,
        n_window_infer=800,
        conv_chunksize=500,
        downsample_hidden_size=480,
    )


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def run(dtype_name: str, minutes: float, layers: int) -> None:
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = AudioEncoder(real_config(layers)).to(dtype).eval()
    frames = int(minutes * 60 * FRAMES_PER_SECOND)
    features = torch.rand(128, frames) * 2 - 1  # the range of Whisper log-mel features
    lengths = torch.tensor([frames])
    before = _rss_gib()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(features, lengths)
    wall = time.perf_counter() - start
    assert out.shape == (audio_token_count(frames, 50), 2048) and torch.isfinite(out).all()
    print(
        f"{dtype_name:>8}: {minutes:g} min = {frames} frames -> {out.shape[0]} tokens, "
        f"{layers} layers, {torch.get_num_threads()} threads: {wall:.1f} s, "
        f"peak RSS {_rss_gib():.2f} GiB (model + features {before:.2f} GiB)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    for dtype_name in args.dtypes:
        proc = ctx.Process(target=run, args=(dtype_name, args.minutes, args.layers))
        proc.start()
        proc.join()
        if proc.exitcode:
            print(f"{dtype_name:>8}: failed (exit code {proc.exitcode})")


if __name__ == "__main__":
    main()
