"""Storage identity in the runtime's and the tracer's bookkeeping (profiling/keys.py)."""

import gc

import torch

from profiling.keys import StorageMap


def test_a_dead_storages_recycled_id_is_not_taken_for_it():
    # ZeRO-3 frees a gathered parameter buffer after its module ran; an activation allocated later
    # can get the freed storage object's id. It must not be taken for the parameter. Many storages
    # die at once so that CPython surely hands one of their addresses to a new storage object.
    params = [torch.empty(8).untyped_storage() for _ in range(256)]
    m = StorageMap([(st, f"w{i}") for i, st in enumerate(params)])
    assert all(m.get(st) == f"w{i}" for i, st in enumerate(params))
    dead = {id(st) for st in params}
    del params
    gc.collect()
    fresh = [torch.empty(4).untyped_storage() for _ in range(4096)]
    recycled = [st for st in fresh if id(st) in dead]
    assert recycled, "CPython recycled none of 256 freed storage objects' addresses; cannot build the case"
    assert all(st not in m and m.get(st, "none") == "none" for st in recycled)


def test_a_live_storage_is_found_through_any_tensor_viewing_it():
    w = torch.randn(4, 4)
    m = StorageMap({w.untyped_storage(): "w"})
    assert m.get(w.t().untyped_storage()) == "w" and w[1:].untyped_storage() in m
    assert torch.randn(4, 4).untyped_storage() not in m
