"""The trainer on a GPU: bf16 autocast, the CUDA allocator's peak, determinism. Skipped without CUDA."""

import pytest
import torch

from tierflow.trainer import cli
from tierflow.trainer.compose import load_config
from tierflow.trainer.train import train


@pytest.mark.cuda
def test_trains_on_cuda_with_bf16_and_reports_the_allocator_peak(quiet):
    cfg, _ = load_config(quiet + ["trainer.device=cuda", "trainer.steps=5"])
    result = train(cfg)
    assert result.summary["device"].startswith("cuda")
    assert result.summary["peak_memory_kind"] == "CUDA allocator"
    assert result.summary["peak_memory_bytes"] == torch.cuda.max_memory_allocated()
    if torch.cuda.is_bf16_supported():
        assert result.summary["precision"] == "bfloat16"


@pytest.mark.cuda
def test_cuda_runs_with_the_same_seed_are_identical(quiet):
    runs = [train(load_config(quiet + ["trainer.device=cuda", "trainer.steps=5", f"logging.run_name=c{i}"])[0])
            for i in range(2)]
    assert torch.equal(torch.tensor(runs[0].losses), torch.tensor(runs[1].losses))
    for pa, pb in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["train", "trainer.device=cuda", f"logging.run_root={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and "trainer.device=cuda but no CUDA device is visible" in err
    assert not (tmp_path / "runs").exists()
