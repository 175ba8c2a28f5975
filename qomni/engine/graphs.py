"""CUDA graphs for the static decode steps: batch-size buckets, host inputs without a host
synchronisation, capture on first use, replay after.

Legend: B bucket (rows in a captured step), n rows in use (n <= B), K key slots read.

A static step (`qomni.engine.static_steps`, `qomni.engine.static_vocoder`) owns its input and
output buffers and has one method, `compute()`, that reads the inputs and writes the outputs
with shapes fixed by the bucket: no host reads, no data-dependent shapes. On CUDA `StepGraphs`
records `compute()` once per key into a `torch.cuda.CUDAGraph` and replays it; elsewhere it calls
`compute()` itself, so the code a graph would hold is the code the CPU tests run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
KEY_BLOCK = 256  # attention reads the cache in multiples of this many slots


def bucket_for(n: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket that holds n rows."""
    if n < 1:
        raise ValueError(f"a step needs at least one row, got {n}")
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} rows exceed the largest batch bucket ({buckets[-1]})")


def key_bucket(longest: int, capacity: int) -> int:
    """Key slots a step reads when its longest row will hold `longest` entries: rounded up to
    KEY_BLOCK (fewer graphs), at most the cache's `capacity` (its slots plus the scratch one)."""
    if longest > capacity - 1:
        raise ValueError(f"sequence exceeds the KV cache capacity of {capacity - 1} tokens")
    return min(capacity, -(-max(longest, 1) // KEY_BLOCK) * KEY_BLOCK)


class StaticStep(Protocol):
    def compute(self) -> None: ...

    def idle(self) -> None:
        """Point every row at scratch (what capture's warm-up runs may touch)."""


class HostInput:
    """A static device buffer filled from host values. On CUDA the values go through a pinned
    staging tensor with a non-blocking copy: a pageable copy would wait for the GPU queue."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer
        self.cuda = buffer.device.type == "cuda"
        self.staging = (torch.empty_like(buffer, device="cpu").pin_memory() if self.cuda
                        else None)
        self.copied: torch.cuda.Event | None = None

    def fill(self, values: Sequence | torch.Tensor, pad: float | bool) -> None:
        """buffer[:n] = values, buffer[n:] = pad."""
        n = len(values)
        if not self.cuda:
            self.buffer[:n] = torch.as_tensor(values, dtype=self.buffer.dtype)
            self.buffer[n:] = pad
            return
        if self.copied is not None:
            self.copied.synchronize()  # the last copy has read the staging tensor
        self.staging[:n] = torch.as_tensor(values, dtype=self.buffer.dtype)
        self.staging[n:] = pad
        self.buffer.copy_(self.staging, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()


def fill_rows(buffer: torch.Tensor, values: torch.Tensor) -> None:
    """buffer[:n] = values (device tensors), the rest zeros."""
    n = values.shape[0]
    buffer[:n].copy_(values)
    buffer[n:].zero_()


def capture_blockers(model: nn.Module) -> list[str]:
    """Modules whose forward reads device values back to the host (a graph cannot hold them):
    quantized experts pick their matmuls by per-expert counts on the host."""
    from qomni.quant.experts import QuantExperts

    return [name for name, m in model.named_modules() if isinstance(m, QuantExperts)]


class StepGraphs:
    """Static steps by key (built once), captured as CUDA graphs when `capture` is set. All
    graphs share one memory pool; a step's results live in buffers allocated outside it, so a
    replay never overwrites another graph's outputs."""

    def __init__(self, capture: bool):
        self.capture = capture
        self.steps: dict[tuple, StaticStep] = {}
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def get(self, key: tuple, build: Callable[[], StaticStep]) -> StaticStep:
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = build()
            if self.capture:
                self.graphs[key] = self._capture(step)
        return step

    def run(self, key: tuple) -> None:
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
        else:
            self.steps[key].compute()

    def _capture(self, step: StaticStep) -> torch.cuda.CUDAGraph:
        step.idle()
        # Warm-up runs on a side stream (lazy initialisations, allocator pools), as capture
        # itself must; they touch scratch rows only.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step.compute()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step.compute()
        return graph
