"""The streaming target reader, for caches larger than memory.

Reading a shuffled batch row by row from a chunked store pulls a whole chunk per sample. Instead, an epoch
visits samples in a quasi-random order (as FFCV's quasi-random order and WebDataset's shuffle buffer do):
blocks of consecutive samples, one shard each, are taken in shuffled order, `window` blocks at a time, and
the samples of a window are shuffled among themselves. A background thread reads each window's blocks whole,
in order, picks each sample's replayed view, and queues the rows (pinned, on CUDA) a few windows ahead; the
training loop takes its batch as the next contiguous slice, with no per-sample Python and no read that pulls
a chunk for one sample.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Callable, Sequence

import numpy as np
import torch

from softcache.store import CacheReader

READ_AHEAD = 2  # windows queued ahead of the one being trained on


def window_order(n: int, *, block: int, window: int, seed: int, epoch: int) -> np.ndarray:
    """Quasi-random order `[n]`: shuffled blocks of `block` samples, shuffled within windows of `window` blocks.

    With `block * window >= n` it is a full random permutation.
    """
    rng = np.random.default_rng([seed, epoch, 0xB10C])
    blocks = rng.permutation(-(-n // block))
    parts = []
    for w in range(0, len(blocks), window):
        members = np.concatenate([np.arange(b * block, min((b + 1) * block, n)) for b in blocks[w:w + window]])
        parts.append(rng.permutation(members))
    return np.concatenate(parts)


class StreamingTargets:
    """Cached targets delivered in epoch order from whole-block reads; same contract as `CacheTargets`.

    `arrays` are the cache arrays to deliver (name -> `decode` key), `order(epoch) -> (order [N], choice [N])`
    the epoch's visiting order and per-sample view, `windows(order) -> list of (start, stop)` positions of
    each window in that order, `assemble(rows by name) -> (kd target, features)` turns rows into targets.
    """

    def __init__(self, cache: CacheReader, names: Sequence[str], *, block: int, window: int,
                 order: Callable[[int], tuple[np.ndarray, np.ndarray]], assemble: Callable, device: torch.device):
        self.cache, self.names, self.block, self.window = cache, list(names), block, window
        self.order, self.assemble, self.device = order, assemble, device
        self._queue: queue.Queue | None = None  # set_epoch starts the reader; the batches' EpochBatches calls it
        self._order: np.ndarray | None = None
        self._buffers: deque[tuple[int, dict[str, torch.Tensor]]] = deque()
        self._cursor = 0

    def set_epoch(self, epoch: int) -> None:
        """Start reading `epoch`'s windows in the background (an unfinished epoch's reader is abandoned)."""
        order, choice = self.order(epoch)
        self._order, self._cursor, self._buffers = order, 0, deque()
        self._queue = queue.Queue(maxsize=READ_AHEAD)
        threading.Thread(target=self._read, args=(order, choice, self._queue), daemon=True,
                         name="softcache-stream").start()

    def _read(self, order: np.ndarray, choice: np.ndarray, out: queue.Queue) -> None:
        span = self.block * self.window
        try:
            for start in range(0, len(order), span):
                members = order[start:start + span]
                blocks = np.unique(members // self.block)
                # where each block's first sample lands in the concatenation of the blocks read
                first = np.zeros(blocks.max() + 1, dtype=np.int64)
                sizes = np.minimum(self.block, len(order) - blocks * self.block)
                first[blocks] = np.concatenate([[0], np.cumsum(sizes)[:-1]])
                positions = first[members // self.block] + members % self.block
                rows = {}
                for name in self.names:
                    data = np.concatenate([self.cache.read(name, b * self.block, b * self.block + size)
                                           for b, size in zip(blocks, sizes)])
                    picked = data[positions, choice[members]]
                    tensor = torch.from_numpy(picked.view(np.int16) if picked.dtype == np.uint16 else picked)
                    rows[name] = tensor.pin_memory() if self.device.type == "cuda" else tensor
                out.put((start, rows))
        except Exception as err:  # handed to the training loop, which raises it
            out.put((-1, err))

    def _take(self, stop: int) -> None:
        while not self._buffers or self._buffers[-1][0] + len(next(iter(self._buffers[-1][1].values()))) < stop:
            start, rows = self._queue.get()
            if start < 0:
                raise rows
            self._buffers.append((start, rows))

    def __call__(self, views: torch.Tensor, index: torch.Tensor, view: torch.Tensor):
        assert self._order is not None, "call set_epoch before the first batch"
        lo, hi = self._cursor, self._cursor + len(index)
        assert np.array_equal(self._order[lo:hi], index.cpu().numpy()), "batches must follow the streaming order"
        self._take(hi)
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        for start, rows in self._buffers:
            size = len(next(iter(rows.values())))
            a, b = max(lo, start), min(hi, start + size)
            if a < b:
                for name in self.names:
                    parts[name].append(rows[name][a - start:b - start])
        while self._buffers and self._buffers[0][0] + len(next(iter(self._buffers[0][1].values()))) <= hi:
            self._buffers.popleft()  # fully consumed
        self._cursor = hi
        # a batch inside one window is a slice of its pinned buffer: copied without staging
        batch = {name: (p[0] if len(p) == 1 else torch.cat(p)).to(self.device, non_blocking=True)
                 for name, p in parts.items()}
        return self.assemble(batch)
