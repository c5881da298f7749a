"""sage.common.fairbatch: every item is batched exactly once and in order, caps hold, and
no waiting request is starved."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from sage.common.fairbatch import take_batch


@dataclass(eq=False)
class Job:
    name: str
    costs: list[int]
    taken: int = 0


def test_a_new_small_request_shares_the_next_batch_with_a_huge_one() -> None:
    huge = Job("huge", [1] * 100)
    queue = deque([huge])
    assert take_batch(queue, 8, 1000) == [(huge, 0, 8)]
    small = Job("small", [1])
    queue.append(small)
    batch = take_batch(queue, 8, 1000)
    assert (small, 0, 1) in batch and (huge, 8, 15) in batch
    assert list(queue) == [huge]  # the small one is done; the huge one waits its turn


def test_one_item_over_the_cost_cap_still_goes_alone() -> None:
    big = Job("big", [5000, 1])
    queue = deque([big])
    assert take_batch(queue, 8, 100) == [(big, 0, 1)]
    assert take_batch(queue, 8, 100) == [(big, 1, 2)]
    assert not queue


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=40), min_size=1, max_size=12),
    st.integers(1, 16),
    st.integers(1, 200),
)
def test_every_item_once_in_order_within_caps_and_nobody_starves(
    requests: list[list[int]], max_count: int, max_cost: int
) -> None:
    jobs = [Job(str(i), costs) for i, costs in enumerate(requests)]
    queue = deque(jobs)
    seen: dict[str, list[int]] = {job.name: [] for job in jobs}
    waited = {job.name: 0 for job in jobs}
    rounds = 0
    while queue:
        rounds += 1
        batch = take_batch(queue, max_count, max_cost)
        assert batch, "a non-empty queue always yields a batch"
        count = sum(end - start for _, start, end in batch)
        cost = sum(sum(job.costs[start:end]) for job, start, end in batch)
        assert count <= max_count
        assert cost <= max_cost or count == 1
        served = {job.name for job, _, _ in batch}
        for job, start, end in batch:
            seen[job.name].extend(range(start, end))
        for job in queue:
            if job.name not in served:
                waited[job.name] += 1
                # Round-robin: a request is passed over at most once per other request.
                assert waited[job.name] <= len(jobs), (job.name, rounds)
            else:
                waited[job.name] = 0
        assert rounds <= sum(len(r) for r in requests)
    assert all(seen[job.name] == list(range(len(job.costs))) for job in jobs)
