"""Config composition, overrides, and the one-line errors for bad input."""

import pytest

from tierflow.trainer import cli
from tierflow.trainer.compose import group_options, load_config
from tierflow.trainer.config import ConfigError, TrainerConfig, micro_batch_size


def test_defaults_compose_to_typed_config():
    cfg, composed = load_config()
    assert cfg.model.n_layer == 2 and cfg.model.d_model == 128  # model=tiny
    assert cfg.data.kind == "synthetic" and cfg.optimizer.name == "adamw"
    assert cfg.logging.backend == "wandb" and cfg.offload.policy == "lifetime"
    assert composed.trainer.steps == cfg.trainer.steps


def test_group_options_and_key_overrides():
    cfg, _ = load_config(["model=small", "optimizer=sgd", "trainer.steps=7", "data.seq_len=32",
                          "trainer.precision=bf16"])
    assert (cfg.model.n_layer, cfg.model.d_model) == (6, 384)
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.lr == 0.1
    assert cfg.trainer.steps == 7 and cfg.data.seq_len == 32 and cfg.trainer.precision == "bf16"


def test_named_model_sizes_exist():
    assert set(group_options("model")) >= {"tiny", "small", "medium", "gpt1b"}


def test_model_target_and_kwargs_are_overridable():
    cfg, _ = load_config(["model._target_=tests.helpers.BigramLM", "+model.kwargs.hidden=16"])
    assert cfg.model._target_ == "tests.helpers.BigramLM"
    assert cfg.model.kwargs == {"hidden": 16}


@pytest.mark.parametrize("overrides, expected", [
    (["trainer.foo=1"], "unknown config key 'trainer.foo'; valid keys under trainer: steps"),
    (["model=huge"], "unknown option model=huge; valid options for model: gpt1b, hf, medium, small, tiny"),
    (["bogus=3"], "unknown config key 'bogus'"),
    (["trainer.steps"], "has no '='"),
    (["trainer.steps=abc"], "trainer.steps=abc"),
    (["model.n_layer=0"], "model.n_layer=0 must be > 0"),
    (["trainer.steps=-5"], "trainer.steps=-5 must be > 0"),
    (["trainer.global_batch=0"], "trainer.global_batch=0 must be > 0"),
    (["data.seq_len=0"], "data.seq_len=0 must be > 0"),
    (["model.d_model=100", "model.n_head=3"], "model.d_model=100 is not divisible by model.n_head=3"),
    (["trainer.global_batch=10", "trainer.grad_accum=3"],
     "trainer.global_batch=10 is not divisible by trainer.grad_accum=3; choose grad_accum among 1, 2, 5, 10"),
    (["data=tokens"], "data.path is required with data=tokens"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' is not valid; choose one of: auto, fp32, bf16"),
    (["offload.policy=lru"], "offload.policy='lru' is not valid; choose one of: lifetime, none, all_host"),
    (["trainer.steps=3", "trainer.profile_iterations=3"], "exceeds trainer.steps=3; profile fewer iterations"),
])
def test_bad_input_gives_one_line_error(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(["model.n_layer=0", "trainer.steps=-1", "optimizer.lr=0"])
    message = str(info.value)
    for key in ("model.n_layer=0", "trainer.steps=-1", "optimizer.lr=0.0"):
        assert key in message


@pytest.mark.parametrize("world, ok", [(1, True), (2, True), (4, True), (3, False), (5, False)])
def test_world_size_must_divide_the_global_batch(world, ok):
    cfg = TrainerConfig(global_batch=16, grad_accum=2)
    if ok:
        assert micro_batch_size(cfg, world) * world * 2 == 16
    else:
        with pytest.raises(ConfigError, match=f"world size {world} does not divide"):
            micro_batch_size(cfg, world)


def test_cli_reports_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys):
    runs = tmp_path / "runs"
    code = cli.main(["train", f"logging.run_root={runs}", "trainer.global_batch=10", "trainer.grad_accum=4"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("tierflow: error: trainer.global_batch=10 is not divisible") and err.count("\n") == 1
    assert not runs.exists()


def test_cli_missing_token_file_writes_nothing(tmp_path, capsys):
    runs = tmp_path / "runs"
    code = cli.main(["train", f"logging.run_root={runs}", "data=tokens", f"data.path={tmp_path / 'nope.bin'}"])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "data.path" in err
    assert not runs.exists()


def test_world_size_error_from_env_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    runs = tmp_path / "runs"
    code = cli.main(["train", f"logging.run_root={runs}", "trainer.global_batch=16"])
    err = capsys.readouterr().err
    assert code == 2 and "world size 3 does not divide" in err and err.count("\n") == 1
    assert not runs.exists()


def test_offloading_ranks_that_oversubscribe_host_memory_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import psutil

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks of this node, each asking for over half the RAM
    runs = tmp_path / "runs"
    too_big = psutil.virtual_memory().total // 2 + (1 << 30)
    code = cli.main(["train", "offload=lifetime", f"tiers.host.budget_bytes={too_big}", f"logging.run_root={runs}"])
    err = capsys.readouterr().err
    assert code == 2 and "host memory is oversubscribed: 2 rank(s) on this node" in err
    assert "tiers.host.budget_bytes" in err
    assert not runs.exists()


def test_checkpoint_settings_while_snapshots_are_off_warn():
    with pytest.warns(UserWarning, match=r"checkpoint.every_steps=5 ignored: snapshots are off; add checkpoint=memory"):
        load_config(["checkpoint.every_steps=5"])


def test_a_tier_too_small_for_the_optimizer_state_is_one_paragraph_not_a_traceback(tmp_path, capsys):
    code = cli.main(["train", "optimizer.tiered.enabled=true", "optimizer.tiered.paths=[host]",
                     "tiers.host.budget_bytes=65536", "tiers.host.slab_bytes=65536", "trainer.steps=2",
                     "logging=none", "logging.progress=false", f"logging.run_root={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("tierflow: error: TierFullError: the optimizer state") and "Traceback" not in err
    assert "raise the tiers' budgets" in err and len(err.splitlines()) == 1  # found when the tiers open


def test_a_model_target_that_does_not_import_is_one_line(capsys):
    code = cli.main(["train", "--dry-run", "model._target_=nopkg.Nope"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "cannot be imported (ModuleNotFoundError: No module named 'nopkg')" in err
