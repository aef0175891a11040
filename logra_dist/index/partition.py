"""Which training rows each scoring rank reads; pure arithmetic, identical on every rank.

The scoring world size is independent of the logging one: an index logged on 4 ranks can be
scored on 1, 2 or 3. Whole shards are handed out when there are at least as many shards as
ranks and that split is balanced (each file is then read by one rank, sequentially); otherwise
the global row space is cut into contiguous, row-balanced ranges that may cross shard
boundaries.
"""

from __future__ import annotations

Ranges = list[tuple[int, int]]

# A shard split is used only if its busiest rank reads at most this much more than the mean.
SHARD_SPLIT_SLACK = 1.25


def split_rows(total: int, world: int) -> list[Ranges]:
    """Contiguous ranges of [0, total), sizes differing by at most one row."""
    base, extra = divmod(total, world)
    out, start = [], 0
    for r in range(world):
        stop = start + base + (1 if r < extra else 0)
        out.append([(start, stop)] if stop > start else [])
        start = stop
    return out


def shard_owners(shard_rows: list[int], world: int) -> list[list[int]]:
    """Shard numbers per rank (ascending), largest shard first to the least loaded rank (ties:
    lower rank); always whole shards, so a rank may get none (ANN files are per shard)."""
    loads, owned = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(shard_rows)), key=lambda i: (-shard_rows[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        loads[r] += shard_rows[i]
        owned[r].append(i)
    return [sorted(own) for own in owned]


def split_shards(shard_rows: list[int], world: int) -> list[Ranges] | None:
    """Whole shards per rank, largest first to the least loaded rank (ties: lower rank), or None
    when that would leave a rank idle or overload one beyond SHARD_SPLIT_SLACK."""
    if len(shard_rows) < world:
        return None
    offsets = [sum(shard_rows[:i]) for i in range(len(shard_rows))]
    owned = shard_owners(shard_rows, world)
    loads = [sum(shard_rows[i] for i in own) for own in owned]
    total = sum(shard_rows)
    if total and max(loads) > SHARD_SPLIT_SLACK * total / world:
        return None
    return [[(offsets[i], offsets[i] + shard_rows[i]) for i in sorted(own) if shard_rows[i] > 0] for own in owned]


def assign_rows(shard_rows: list[int], world: int) -> list[Ranges]:
    """Row ranges [start, stop) of the global row space for every scoring rank: disjoint, in
    ascending order, together covering every row exactly once."""
    if world < 1:
        raise ValueError(f"assign_rows: world size must be >= 1, got {world}")
    by_shard = split_shards(shard_rows, world)
    return by_shard if by_shard is not None else split_rows(sum(shard_rows), world)
