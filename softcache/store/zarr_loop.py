"""Keep zarr's I/O loop quiet after a failed read.

zarr runs its reads as asyncio tasks on an event loop of its own. A read that fails (a damaged chunk) raises
while its sibling tasks are still pending, and the inner gathers that also failed are never awaited. So after
softcache's one-line error asyncio would print "Task was destroyed but it is pending!" for every pending task
(zarr's exit hook closes the loop under them) and "_GatheringFuture exception was never retrieved" for every
failed gather. The exit hook registered here runs before zarr's (exit hooks run last-registered first) and
cancels the pending tasks; the loop's exception handler logs the unretrieved errors at debug level, since the
reader has already reported the damage (naming the array and samples).
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
from typing import Any

import zarr.core.sync

log = logging.getLogger(__name__)


def _handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    if "never retrieved" in context.get("message", ""):
        log.debug("%s: %r", context["message"], context.get("exception"))
        return
    loop.default_exception_handler(context)


async def _cancel_pending() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def settle() -> None:
    """Cancel and finish every task still pending on zarr's loop (none, mostly)."""
    loop = getattr(zarr.core.sync, "loop", [None])[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return
    with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):  # the loop is going away anyway
        asyncio.run_coroutine_threadsafe(_cancel_pending(), loop).result(timeout=5)


# the loop zarr runs every read on; `_get_loop` is zarr's own (private) way to it: a zarr without it keeps the
# noise, nothing else
if hasattr(zarr.core.sync, "_get_loop"):
    zarr.core.sync._get_loop().set_exception_handler(_handle)
atexit.register(settle)
