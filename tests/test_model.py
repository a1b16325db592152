"""The built-in GPT: shapes, causality, tied head, sizes; and building a user's own module."""

import pytest
import torch

from tierflow.trainer.compose import load_config
from tierflow.trainer.config import ConfigError, ModelConfig
from tierflow.trainer.model import GPT, GPTConfig, build_model, count_parameters


def _tiny(**kw):
    base = dict(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32)
    base.update(kw)
    return GPT(GPTConfig(**base))


def test_logits_shape():
    model = _tiny()
    assert model(torch.randint(64, (3, 10))).shape == (3, 10, 64)


def test_changing_future_tokens_does_not_change_past_logits():
    torch.manual_seed(0)
    model = _tiny().eval()
    tokens = torch.randint(64, (2, 16))
    altered = tokens.clone()
    altered[:, 9:] = torch.randint(64, (2, 7))
    with torch.no_grad():
        a, b = model(tokens), model(altered)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])  # the future really differs


def test_head_is_tied_to_token_embedding():
    model = _tiny()
    assert model.head.weight is model.tok_emb.weight
    assert count_parameters(model) == sum(p.numel() for p in set(model.parameters()))


def test_sequence_longer_than_seq_len_is_rejected():
    with pytest.raises(ValueError, match="exceeds the model's seq_len=16"):
        _tiny()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("size, low, high", [("tiny", 0.3e6, 1e6), ("small", 10e6, 12e6),
                                             ("medium", 80e6, 90e6), ("gpt1b", 1.1e9, 1.3e9)])
def test_named_sizes_have_their_parameter_counts(size, low, high):
    cfg, _ = load_config([f"model={size}"])
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size=cfg.data.vocab_size, seq_len=cfg.data.seq_len)
    assert low <= count_parameters(model) <= high


def test_user_module_gets_the_arguments_it_accepts():
    cfg = ModelConfig(_target_="tests.helpers.BigramLM", kwargs={"hidden": 8})
    model = build_model(cfg, vocab_size=50, seq_len=16)
    assert model.emb.weight.shape == (50, 8)


@pytest.mark.parametrize("target, match", [
    ("tests.helpers.Missing", "cannot be imported"),
    ("tests.helpers.NotAModule", "is not an nn.Module subclass"),
])
def test_bad_user_module_is_a_config_error(target, match):
    with pytest.raises(ConfigError, match=match):
        build_model(ModelConfig(_target_=target), vocab_size=50, seq_len=16)


def test_user_module_rejecting_arguments_is_a_config_error():
    cfg = ModelConfig(_target_="tests.helpers.BigramLM", kwargs={"width": 8})
    with pytest.raises(ConfigError, match=r"rejected its arguments.*\+model.kwargs"):
        build_model(cfg, vocab_size=50, seq_len=16)
