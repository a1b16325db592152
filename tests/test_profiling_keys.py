"""Storage identity in the runtime's and the tracer's bookkeeping (profiling/keys.py)."""

import gc

import torch

from tierflow.profiling.keys import StorageMap


def test_a_dead_storages_recycled_id_is_not_taken_for_it(monkeypatch):
    # ZeRO-3 frees a gathered parameter buffer after its module ran; CPython may give the freed
    # storage object's id to an activation allocated later. Whether it does depends on the
    # allocator's state (it did not in a full-suite run), so the recycling is forced: every object
    # gets the same id, as a dead parameter storage and its successor would.
    import tierflow.profiling.keys

    monkeypatch.setattr(tierflow.profiling.keys, "id", lambda obj: 7, raising=False)
    param = torch.empty(8).untyped_storage()
    m = StorageMap([(param, "blocks.0.w")])
    assert param in m and m.get(param) == "blocks.0.w"
    del param
    gc.collect()
    activation = torch.empty(8).untyped_storage()
    assert activation not in m and m.get(activation, "none") == "none"
    # Even while the first is alive, another storage with its id is not it.
    live = torch.empty(8).untyped_storage()
    m.add(live, "blocks.1.w")
    assert m.get(live) == "blocks.1.w" and activation not in m


def test_a_live_storage_is_found_through_any_tensor_viewing_it():
    w = torch.randn(4, 4)
    m = StorageMap({w.untyped_storage(): "w"})
    assert m.get(w.t().untyped_storage()) == "w" and w[1:].untyped_storage() in m
    assert torch.randn(4, 4).untyped_storage() not in m
