"""`softcache` for torchrun with the ranks made to diverge: every rank visits rank 0's share of each global
batch, so together they see other samples than one process does. The DDP equivalence tests run it to show
that they notice."""
from __future__ import annotations

import softcache.batches
from softcache.cli import main
from softcache.distributed import World, rank_share


def rank_zero_share(order, batch, world):
    return rank_share(order, batch, World(0, world.size, world.local_rank))


softcache.batches.rank_share = rank_zero_share
main()
