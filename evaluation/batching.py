"""Attribution batches sized to the device: a batch that runs out of GPU memory is halved and
retried (with a log line) instead of failing the trial after its probe was trained; each batch
runs in exact float32 (no TF32 on the GPU), as on the CPU."""

from __future__ import annotations

from typing import Callable, Iterator, TypeVar

import torch

from probing.devices import exact_float32

__all__ = ["halving_batches"]

T = TypeVar("T")


def halving_batches(
    n: int, batch_size: int, run: Callable[[int, int], T], what: str, log: Callable[[str], None] = print
) -> Iterator[T]:
    """``run(start, stop)`` over ``[0, n)`` in batches of ``batch_size``, yielding each batch's result
    once it completed. On ``torch.cuda.OutOfMemoryError`` the batch is retried at half the size,
    which then holds for the rest; a batch of one that does not fit raises. ``run`` must keep its
    results to itself until it returns, so that a retried batch is not counted twice."""
    start, size = 0, batch_size
    while start < n:
        stop = min(start + size, n)
        try:
            with exact_float32():
                result = run(start, stop)
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            size = max(1, size // 2)
            log(f"{what}: out of GPU memory at {stop - start} per batch; retrying with {size}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        yield result
        start = stop
