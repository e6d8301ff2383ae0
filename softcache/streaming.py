"""The streaming target reader, for caches larger than memory.

Reading a shuffled batch row by row from a chunked store pulls a whole chunk per sample. Instead, an epoch
visits samples in a quasi-random order (as FFCV's quasi-random order and WebDataset's shuffle buffer do):
blocks of consecutive samples, one inner chunk each, are taken in shuffled order, `window` blocks at a time,
and the samples of a window are shuffled among themselves. A window gathers its blocks from all over the
cache, so a dataset stored class by class (an ImageFolder) still gives batches of every class. Every sample
replays the same stored view slot in an epoch (`views.replay_slot`), and the cache stores each view slot in
chunks of its own, so the reader fetches exactly the epoch's slot of each block it visits: an epoch reads 1/V
of the cache.

Background threads read each window's blocks (several blocks at once: zarr and Blosc decompress outside the
GIL), put the rows in visiting order and queue them (pinned, on CUDA) a few windows ahead, running on into
the next epoch's first windows when an epoch's reads are done; the training loop takes its batch as the next
contiguous slice, with no per-sample Python and no read of a view it does not use.
"""
from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence

import numpy as np
import torch

from softcache.store import CacheReader

READ_AHEAD = 2     # windows queued ahead of the one being trained on
READ_THREADS = 4   # blocks read (and decompressed) at once


def window_order(n: int, *, block: int, window: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Quasi-random order `[n]`: shuffled blocks of `block` samples, shuffled within windows of at most `window`
    blocks (as many windows as that needs, holding equal numbers of blocks, so that no window is a small rest);
    and the windows' bounds `[W + 1]` (positions in the order where each window starts, then n).

    Windows are cut at block boundaries, so a window never reads part of a block another window reads too
    (a short last block inside the order shifts the later windows, and their bounds say so).
    With `block * window >= n` it is a full random permutation, whatever the block size.
    """
    rng = np.random.default_rng([seed, epoch, 0xB10C])
    if -(-n // block) <= window:
        return rng.permutation(n), np.asarray([0, n], dtype=np.int64)
    blocks = rng.permutation(-(-n // block))
    parts, bounds = [], [0]
    for members_blocks in np.array_split(blocks, -(-len(blocks) // window)):  # windows of equal block counts
        members = np.concatenate([np.arange(b * block, min((b + 1) * block, n)) for b in members_blocks])
        parts.append(rng.permutation(members))
        bounds.append(bounds[-1] + len(members))
    return np.concatenate(parts), np.asarray(bounds, dtype=np.int64)


class StreamingTargets:
    """Cached targets delivered in epoch order from reads of one view slot per block; same contract as `CacheTargets`.

    `names` are the cache arrays to deliver; `order(epoch) -> (order [N], window bounds)` is the epoch's
    visiting order (`window_order`), `slot(epoch)` the view slot every sample replays; `assemble(rows by name)
    -> (kd target, features)` turns rows into targets. Call `set_epoch` before each epoch's first batch.
    """

    def __init__(self, cache: CacheReader, names: Sequence[str], *, block: int,
                 order: Callable[[int], tuple[np.ndarray, np.ndarray]], slot: Callable[[int], int],
                 assemble: Callable, device: torch.device, threads: int = READ_THREADS):
        self.cache, self.names, self.block = cache, list(names), block
        self.order, self.slot, self.assemble, self.device = order, slot, assemble, device
        self.threads = threads
        self.delivered_bytes = 0  # bytes of the rows handed to training (what an epoch uses)
        self.read_rows = 0        # samples whose rows were read, read-ahead included
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._next_epoch = -1     # the epoch whose first window the running reader delivers next
        self._epoch = -1
        self._buffers: deque[tuple[int, dict[str, torch.Tensor]]] = deque()
        self._cursor = 0

    def set_epoch(self, epoch: int) -> None:
        """Take `epoch`'s windows from the running reader (already reading ahead into it), or start one there."""
        self._epoch, self._cursor, self._buffers = epoch, 0, deque()
        if self._queue is not None and self._next_epoch == epoch:
            self._drain_to(epoch)
        else:
            self.close()
            self._queue, self._stop = queue.Queue(maxsize=READ_AHEAD), threading.Event()
            threading.Thread(target=self._read, args=(epoch, self._queue, self._stop), daemon=True,
                             name="softcache-stream").start()
        self._next_epoch = epoch + 1

    def close(self) -> None:
        """Stop the background reader (it exits at its next queue put)."""
        if self._stop is not None:
            self._stop.set()
            while True:  # unblock a reader waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
        self._queue = self._stop = None

    def _drain_to(self, epoch: int) -> None:
        """Drop what is left of the previous epoch (the last, partial batch's rows) up to `epoch`'s first window."""
        while True:
            item = self._get()
            if item[0] == epoch:
                self._buffers.append((item[1], item[2]))
                return

    def _get(self) -> tuple:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def _read(self, epoch: int, out: queue.Queue, stop: threading.Event) -> None:
        pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="softcache-read")
        try:
            while not stop.is_set():
                self._read_epoch(epoch, out, stop, pool)
                epoch += 1
        except Exception as err:  # handed to the training loop, which raises it
            out.put(err)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _read_epoch(self, epoch: int, out: queue.Queue, stop: threading.Event, pool: ThreadPoolExecutor) -> None:
        order, bounds = self.order(epoch)
        slot, n = self.slot(epoch), self.cache.shape(self.names[0])[0]  # samples in the cache (blocks' sizes)
        for lo, hi in itertools.pairwise(bounds):
            if hi == lo:  # a window with none of this rank's samples (torchrun)
                continue
            members = order[lo:hi]
            blocks = np.unique(members // self.block)
            sizes = np.minimum(self.block, n - blocks * self.block)
            # where each block's first sample lands in the concatenation of the blocks read
            first = np.zeros(blocks.max() + 1, dtype=np.int64)
            first[blocks] = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            positions = first[members // self.block] + members % self.block
            reads = {name: [pool.submit(self.cache.read, name, int(b) * self.block,
                                        int(b) * self.block + int(size), slot)
                            for b, size in zip(blocks, sizes)] for name in self.names}
            rows = {}
            for name in self.names:
                data = np.concatenate([f.result() for f in reads[name]])[positions]
                tensor = torch.from_numpy(data.view(np.int16) if data.dtype == np.uint16 else data)
                rows[name] = tensor.pin_memory() if self.device.type == "cuda" else tensor
            self.read_rows += len(members)
            while not stop.is_set():
                try:
                    out.put((epoch, int(lo), rows), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return

    def _take(self, stop: int) -> None:
        while not self._buffers or self._buffers[-1][0] + len(next(iter(self._buffers[-1][1].values()))) < stop:
            epoch, start, rows = self._get()
            assert epoch == self._epoch, f"the reader is on epoch {epoch}, training on {self._epoch}"
            self._buffers.append((start, rows))

    def __call__(self, views: torch.Tensor, index: torch.Tensor, view: torch.Tensor):
        """Targets of the next `len(index)` samples of the epoch's order (the batch's samples: every data path
        follows that order), read ahead by the background threads; reads no device tensor back."""
        assert self._queue is not None, "call set_epoch before the first batch"
        lo, hi = self._cursor, self._cursor + len(index)
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
        batch = {name: (p[0] if len(p) == 1 else torch.cat(p)) for name, p in parts.items()}
        self.delivered_bytes += sum(t.numel() * t.element_size() for t in batch.values())
        return self.assemble({name: t.to(self.device, non_blocking=True) for name, t in batch.items()})
