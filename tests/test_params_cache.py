"""The CUTLASS GEMMs' prepared-launch cache (kernels/gemm/params_cache.h) on the CPU: every key field
tells entries apart, the least recently used entry goes first when full, and concurrent use keeps
each entry whole. The GPU side (a launch from cached Params) is in test_cuda_gemm.py."""

import pytest

import dgemma_rt

ParamsCache = dgemma_rt._core._testing.ParamsCache


def test_every_key_field_counts():
    c = ParamsCache(64)
    base = dict(kernel=0x1000, device=0, ptrs=[0x10, 0x20, 0x30], dims=[256, 2816, 704])
    c.insert(**base, value=1)
    assert c.find(**base) == 1
    variants = [
        dict(base, kernel=0x2000),
        dict(base, device=1),
        dict(base, ptrs=[0x10, 0x20, 0x40]),
        dict(base, ptrs=[0x10, 0x20, 0x30, 0x50]),  # an epilogue pointer more
        dict(base, dims=[255, 2816, 704]),
        dict(base, dims=[256, 704, 2816]),
    ]
    for i, v in enumerate(variants):
        assert c.find(**v) is None, v
        c.insert(**v, value=10 + i)
    assert len(c) == 1 + len(variants)
    assert c.find(**base) == 1
    for i, v in enumerate(variants):
        assert c.find(**v) == 10 + i


def test_insert_replaces():
    c = ParamsCache(4)
    c.insert(1, 0, [8], [1], value=5)
    c.insert(1, 0, [8], [1], value=6)
    assert len(c) == 1 and c.find(1, 0, [8], [1]) == 6


def test_least_recently_used_goes_first():
    c = ParamsCache(3)
    assert c.capacity == 3
    for i in range(3):
        c.insert(1, 0, [i], [], value=i)
    assert c.find(1, 0, [0], []) == 0  # 0 is now the most recent; 1 the least
    c.insert(1, 0, [3], [], value=3)
    assert len(c) == 3
    assert c.find(1, 0, [1], []) is None
    assert [c.find(1, 0, [i], []) for i in (0, 2, 3)] == [0, 2, 3]
    for i in range(100):  # bounded whatever goes in
        c.insert(2, 0, [i], [i], value=i)
    assert len(c) == 3
    c.clear()
    assert len(c) == 0 and c.find(2, 0, [99], [99]) is None


def test_too_many_fields_refused():
    c = ParamsCache(4)
    with pytest.raises(ValueError, match="too many key fields"):
        c.insert(1, 0, list(range(7)), [], value=0)
    with pytest.raises(ValueError, match="too many key fields"):
        c.find(1, 0, [], list(range(5)))


@pytest.mark.parametrize("capacity,keys", [(16, 64), (1024, 64)])
def test_concurrent_use_keeps_entries_whole(capacity, keys):
    c = ParamsCache(capacity)
    assert c.hammer(threads=4, iters=20000, keys=keys) == 0
    assert len(c) <= capacity
