"""Which modules FSDP2 shards as units (Note [which modules are units]): found by structure, so a
model the trainer has never seen gathers one block at a time where FSDP2 allows it."""

from torch import nn

from tests._models import TitanLlama, ZooLM
from tierflow.offload.integrations.fsdp2 import block_modules
from tierflow.trainer.model import GPT, GPTConfig


def _names(model: nn.Module) -> list:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(u)] for u in block_modules(model)]


def test_gpts_blocks_are_its_units():
    gpt = GPT(GPTConfig(vocab_size=64, seq_len=8, n_layer=3, n_head=2, d_model=16))
    assert _names(gpt) == ["blocks.0", "blocks.1", "blocks.2"]


def test_repeated_blocks_are_found_by_structure_and_what_fsdp2_cannot_split_stays_with_the_root():
    # Sequential blocks and nested stages are units, innermost first; the layer held twice, the
    # blocks that share a weight (encoder.0, stages.1 and its blocks.0) and the block whose weight
    # the root holds too (encoder.2) are left to the root.
    assert _names(ZooLM(vocab_size=64, seq_len=8, n_layer=3)) == [
        "encoder.1", "stages.0.blocks.0", "stages.0.blocks.1", "stages.0", "stages.1.blocks.1"]


def test_torchtitans_moduledict_of_layers_gives_one_unit_per_layer():
    assert _names(TitanLlama(vocab_size=64, seq_len=8, n_layer=3)) == ["layers.0", "layers.1", "layers.2"]


def test_containers_that_are_not_repeated_blocks_give_no_units():
    mixed = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))  # an MLP, not a stack of blocks
    holder = nn.Module()
    holder.mlp, holder.drops = mixed, nn.ModuleList([nn.Dropout(), nn.Dropout()])  # no parameters
    assert block_modules(holder) == []
