"""Storage identity in the runtime's and the tracer's bookkeeping (profiling/keys.py)."""

import gc

import torch

from profiling.keys import StorageMap


def _storage_reusing_id(dead_id: int) -> torch.UntypedStorage:
    """A new storage whose Python object sits where a dead one's was (CPython recycles it)."""
    keep = []
    for _ in range(10_000):
        st = torch.empty(4).untyped_storage()
        if id(st) == dead_id:
            return st
        keep.append(st)  # hold the misses so the allocator moves on to other slots
    raise AssertionError("CPython never recycled the storage object's address; cannot build the case")


def test_a_dead_storages_recycled_id_is_not_taken_for_it():
    # ZeRO-3 frees a gathered parameter buffer after its module ran; an activation allocated later
    # can get the freed storage object's id. It must not be taken for the parameter.
    param = torch.empty(8).untyped_storage()
    m = StorageMap([(param, "blocks.0.w")])
    assert param in m and m.get(param) == "blocks.0.w"
    dead_id = id(param)
    del param
    gc.collect()
    activation = _storage_reusing_id(dead_id)
    assert id(activation) == dead_id
    assert activation not in m and m.get(activation, "none") == "none"


def test_a_live_storage_is_found_through_any_tensor_viewing_it():
    w = torch.randn(4, 4)
    m = StorageMap({w.untyped_storage(): "w"})
    assert m.get(w.t().untyped_storage()) == "w" and w[1:].untyped_storage() in m
    assert torch.randn(4, 4).untyped_storage() not in m
