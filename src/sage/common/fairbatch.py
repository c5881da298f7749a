"""Fair micro-batches from many callers' requests: one rule for the embedding service's
batcher and our embedding engine's.

A request bigger than a batch is cut into slices; each batch first gives every waiting
request an equal share of the batch's caps, then fills what is left in queue order, and the
requests it served go to the back of the line (round-robin). A small request that arrives
behind a huge one therefore rides in the very next batch, and a stream of small requests
cannot starve the huge one, which keeps at least its share of every batch.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol, TypeVar


class Splittable(Protocol):
    """A queued request: the cost of each of its items and how many are already batched."""

    costs: list[int]
    taken: int


S = TypeVar("S", bound=Splittable)


def take_batch(queue: deque[S], max_count: int, max_cost: int) -> list[tuple[S, int, int]]:
    """(request, start, end) slices for the next batch, at most `max_count` items and
    `max_cost` in all (one item alone may exceed it); advances each request's `taken` and
    reorders `queue` (requests served go to the back, finished ones leave it)."""
    jobs = list(queue)
    if not jobs:
        return []
    max_count, max_cost = max(1, max_count), max(1, max_cost)
    starts = [job.taken for job in jobs]
    count = cost = 0

    def fill(job: S, share_count: int, share_cost: int) -> None:
        nonlocal count, cost
        got_count = got_cost = 0
        while job.taken < len(job.costs):
            item = job.costs[job.taken]
            if count and (count >= max_count or cost + item > max_cost):
                return  # the batch is full for this item
            if got_count and (got_count >= share_count or got_cost + item > share_cost):
                return  # this request has had its share
            count, cost = count + 1, cost + item
            got_count, got_cost = got_count + 1, got_cost + item
            job.taken += 1

    share_count = max(1, max_count // len(jobs))
    share_cost = max(1, max_cost // len(jobs))
    for job in jobs:
        fill(job, share_count, share_cost)
    for job in jobs:
        if count >= max_count:
            break
        fill(job, max_count, max_cost)

    served = [i for i, job in enumerate(jobs) if job.taken > starts[i]]
    waiting = [job for i, job in enumerate(jobs) if job.taken == starts[i] < len(job.costs)]
    queue.clear()
    queue.extend(waiting)
    queue.extend(jobs[i] for i in served if jobs[i].taken < len(jobs[i].costs))
    return [(jobs[i], starts[i], jobs[i].taken) for i in served]
