"""BlockPool: allocation, reference counts, sharing, and the errors that catch misuse."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from ember.cache.block_pool import BlockPool


def test_allocate_hands_out_distinct_blocks_in_range() -> None:
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert len(set(a + b)) == 8 and set(a + b) == set(range(8))
    assert pool.num_free == 0
    assert all(pool.ref_counts[x] == 1 for x in a + b)


def test_allocate_more_than_free_raises_and_takes_nothing() -> None:
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(MemoryError):
        pool.allocate(2)
    assert pool.num_free == 1
    assert pool.allocate(0) == []


def test_free_returns_blocks_for_reuse() -> None:
    pool = BlockPool(2)
    a = pool.allocate(2)
    pool.free(a)
    assert pool.num_free == 2
    assert sorted(pool.allocate(2)) == sorted(a)


def test_double_free_raises() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.free(a)
    with pytest.raises(ValueError, match="double free"):
        pool.free(a[:1])
    with pytest.raises(ValueError, match="double free"):
        pool.free([3])  # never allocated
    assert pool.num_free == 4


def test_share_keeps_block_until_last_reference_dropped() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.share(a)
    pool.share(a[:1])
    assert [pool.ref_counts[b] for b in a] == [3, 2]
    pool.free(a)
    assert pool.num_free == 2 and [pool.ref_counts[b] for b in a] == [2, 1]
    pool.free(a)
    assert pool.num_free == 3  # a[1] is back, a[0] still held once
    with pytest.raises(MemoryError):
        pool.allocate(4)
    pool.free(a[:1])
    assert pool.num_free == 4 and pool.ref_counts == [0, 0, 0, 0]


def test_share_of_free_block_raises() -> None:
    pool = BlockPool(3)
    with pytest.raises(ValueError, match="free"):
        pool.share([0])
    a = pool.allocate(1)
    pool.free(a)
    with pytest.raises(ValueError):
        pool.share(a)


def test_empty_pool_rejected() -> None:
    with pytest.raises(ValueError):
        BlockPool(0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "share", "free"]), st.integers(0, 5)),
                max_size=60))
def test_random_operations_keep_counts_consistent(ops) -> None:
    """Against a model: a dict of reference counts. Free blocks are exactly those at zero."""
    n = 12
    pool = BlockPool(n)
    held: list[int] = []   # one entry per reference we hold
    for op, k in ops:
        if op == "alloc":
            if k > pool.num_free:
                with pytest.raises(MemoryError):
                    pool.allocate(k)
                continue
            got = pool.allocate(k)
            assert not set(got) & set(held)
            held.extend(got)
        elif op == "share" and held:
            b = held[k % len(held)]
            pool.share([b])
            held.append(b)
        elif op == "free" and held:
            b = held.pop(k % len(held))
            pool.free([b])
        expected = {b: held.count(b) for b in set(held)}
        assert [pool.ref_counts[b] for b in range(n)] == [expected.get(b, 0) for b in range(n)]
        assert pool.num_free == n - len(expected)
    pool.free(held)
    assert pool.num_free == n
