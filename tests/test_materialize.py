"""Build on the meta device, materialise one tensor at a time: bit-identical to eager, small in memory."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tierflow.offload.runtime.materialize import MaterializeError, materialize, record_init
from tierflow.offload.runtime.weights import SafetensorsSource
from tierflow.trainer.config import ConfigError, ModelConfig
from tierflow.trainer.model import GPT, GPTConfig, build_model

REPO = Path(__file__).resolve().parent.parent


def _eager_and_materialized(build, seed=7):
    torch.manual_seed(seed)
    eager = build()
    eager_rng = torch.get_rng_state()
    torch.manual_seed(seed)
    model, program = record_init(build)
    stats = materialize(model, program)
    return eager, eager_rng, model, stats


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
        assert sa[name].requires_grad == sb[name].requires_grad, name
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert list(ba) == list(bb)
    for name in ba:
        assert torch.equal(ba[name], bb[name]), name


@pytest.mark.parametrize("n_layer,d_model", [(1, 32), (3, 96)])
def test_gpt_materialises_bit_identically_and_consumes_the_generator_alike(n_layer, d_model):
    cfg = GPTConfig(vocab_size=128, seq_len=32, n_layer=n_layer, n_head=4, d_model=d_model)
    eager, eager_rng, model, stats = _eager_and_materialized(lambda: GPT(cfg))
    _assert_same(eager, model)
    assert torch.equal(torch.get_rng_state(), eager_rng)  # the next random draw is the same too
    assert model.head.weight is model.tok_emb.weight  # tied weights stay one parameter
    largest = max(p.numel() * p.element_size() for p in eager.parameters())
    total = sum(p.numel() * p.element_size() for p in eager.parameters())
    # Earlier initialisations of a weight are scratch that dies at once: memory holds about one tensor.
    assert stats["peak_live_bytes"] <= 2 * largest < total
    assert stats["scratch_draws"] > 0 and stats["uninitialised"] == 0


class OddInit(nn.Module):
    """Initialisers a model may use: in-place scaling after a draw, a computed buffer, a write into
    a view, a shared parameter, a frozen one, an explicit generator and constants written as data
    (which make meta tensors without any operation: Note [constants from data])."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 8)
        self.b.weight = nn.Parameter(self.a.weight.t().contiguous() * 0.0)  # replaced: its draw is discarded
        with torch.no_grad():
            self.a.weight.normal_(0.0, 0.5).mul_(2.0)
            self.a.bias[:4].fill_(1.0)
            self.b.weight.uniform_(-0.1, 0.1)
        self.frozen = nn.Parameter(torch.randn(3, 3), requires_grad=False)
        gen = torch.Generator().manual_seed(123)
        self.mixed = nn.Parameter(torch.empty(5).uniform_(generator=gen))
        self.register_buffer("steps", torch.arange(6, dtype=torch.float32).pow(2))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.shared = self.a  # the same module twice
        self.gain = nn.Parameter(torch.tensor([0.5, 2.0]) * torch.randn(2))
        self.register_buffer("table", torch.as_tensor(np.linspace(0.0, 1.0, 5)).float())
        self.temperature = nn.Parameter(torch.tensor(0.07, requires_grad=False))

    def forward(self, x):
        return self.b(self.a(x))


def test_custom_initialisers_replay_exactly():
    eager, eager_rng, model, _ = _eager_and_materialized(OddInit)
    _assert_same(eager, model)
    assert torch.equal(torch.get_rng_state(), eager_rng)
    x = torch.randn(2, 8)
    assert torch.equal(eager(x), model(x))


def test_trainer_build_model_on_a_device_equals_eager_construction():
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=64)
    torch.manual_seed(3)
    eager = build_model(cfg, vocab_size=100, seq_len=16)
    torch.manual_seed(3)
    streamed = build_model(cfg, vocab_size=100, seq_len=16, device=torch.device("cpu"))
    _assert_same(eager, streamed)


def test_a_constructor_that_needs_real_tensors_is_built_eagerly_with_a_warning():
    class NeedsValues(nn.Module):
        def __init__(self, vocab_size: int) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))
            if float(self.w.abs().sum()) > 0:  # reads a value: impossible on the meta device
                self.scale = 2.0

        def forward(self, x):
            return x * self.w.sum()

    sys.modules[__name__].NeedsValues = NeedsValues
    cfg = ModelConfig(_target_=f"{__name__}.NeedsValues")
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="cannot be built on the meta device"):
        model = build_model(cfg, vocab_size=10, seq_len=4, device=torch.device("cpu"))
    torch.manual_seed(0)
    assert torch.equal(model.w, NeedsValues(10).w)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="60KB")
    return path


def test_hf_directory_loads_shard_by_shard_and_equals_the_saved_weights(llama_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert (llama_dir / "model.safetensors.index.json").is_file()  # several shards
    model = build_model(ModelConfig(_target_="tierflow.trainer.hf.HFCausalLM", path=str(llama_dir)),
                        vocab_size=256, seq_len=32, device=torch.device("cpu"))
    saved = {}
    for shard in sorted(llama_dir.glob("*.safetensors")):
        saved.update(load_file(shard))
    state = model.state_dict()
    assert sorted(k.removeprefix("lm.") for k in state) == sorted(saved)
    for name, tensor in saved.items():
        assert torch.equal(state["lm." + name], tensor), name
    reference = AutoModelForCausalLM.from_pretrained(llama_dir)
    for name, buf in reference.named_buffers():  # non-persistent buffers come from the constructor
        assert torch.equal(dict(model.named_buffers())["lm." + name], buf), name
    tokens = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(tokens), reference(input_ids=tokens).logits)


def test_hf_directory_trains_with_offloading_bit_identically(tmp_path, quiet):
    """A transformers Llama (random weights from its config) at 25% of its unconstrained peak."""
    from tierflow.trainer.compose import load_config
    from tierflow.trainer.train import train

    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    cfg.save_pretrained(tmp_path / "llama")  # config.json only: the architecture's own initialisation
    common = [q for q in quiet if q != "offload=none"] + [
        "model=hf", f"model.path={tmp_path / 'llama'}", "data.vocab_size=256", "data.seq_len=32", "trainer.steps=5",
        "trainer.global_batch=4"]
    plain = train(load_config(common + ["offload=none", "logging.run_name=plain"])[0])
    offloaded = train(load_config(common + ["offload=lifetime", "offload.device_budget_fraction=0.25",
                                            "logging.run_name=offloaded"])[0])
    assert torch.equal(torch.tensor(plain.losses), torch.tensor(offloaded.losses))
    for (name, a), (_, b) in zip(plain.model.named_parameters(), offloaded.model.named_parameters()):
        assert torch.equal(a, b), name
    assert offloaded.summary["offload"]["steps"].get("planned", 0) > 0


def test_corrupt_or_missing_weights_are_refused_with_the_file_named(llama_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in llama_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = sorted(bad.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    with pytest.raises(ConfigError, match=shard.name):
        build_model(ModelConfig(_target_="tierflow.trainer.hf.HFCausalLM", path=str(bad)), vocab_size=256,
                    seq_len=32, device=torch.device("cpu"))
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(MaterializeError, match="header"):
        SafetensorsSource(bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[-1]
    (bad / missing).unlink()
    with pytest.raises(MaterializeError, match="missing"):
        SafetensorsSource(bad)
    with pytest.raises(ConfigError, match="model.path is required"):
        ModelConfig(_target_="tierflow.trainer.hf.HFCausalLM")
    with pytest.raises(ConfigError, match="no config.json"):
        build_model(ModelConfig(_target_="tierflow.trainer.hf.HFCausalLM", path=str(tmp_path)), vocab_size=256,
                    seq_len=32, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="vocab_size=256 but data.vocab_size=1000"):
        build_model(ModelConfig(_target_="tierflow.trainer.hf.HFCausalLM", path=str(llama_dir)), vocab_size=1000,
                    seq_len=32, device=torch.device("cpu"))


_CHILD = textwrap.dedent("""
    import json, sys, torch
    from tierflow.offload import NvmeTierConfig, TierEngine, TiersConfig
    from tierflow.offload.runtime.materialize import TierPlacement, materialize, record_init
    from tierflow.offload.runtime.weights import SafetensorsSource
    from tierflow.trainer.hf import HFCausalLM

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    path, swap = sys.argv[1], sys.argv[2]
    engine = TierEngine(TiersConfig(preset="none", nvme=NvmeTierConfig(
        enabled=True, dirs=[swap], chunk_bytes=1 << 20, io_depth=2)))
    model, program = record_init(lambda: HFCausalLM(path, vocab_size=4096))
    placement = TierPlacement(engine.tiers["nvme"])
    source = SafetensorsSource(path, prefix="lm.")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: what follows is the load alone
    base = status("VmRSS")
    materialize(model, program, source=source, place=placement)
    peak = status("VmHWM")
    from safetensors import safe_open
    equal = True
    for shard in sorted(__import__("pathlib").Path(path).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                equal &= torch.equal(placement.read("lm." + name), f.get_tensor(name))
    print(json.dumps({"growth": peak - base, "placed": placement.nbytes, "source": source.nbytes(),
                      "equal": bool(equal), "held": sum(p.untyped_storage().nbytes() for p in model.parameters())}))
    engine.close()
""")


def test_a_directory_four_times_the_budget_loads_into_nvme_within_the_budget(tmp_path, subprocess_env):
    """Peak RSS (VmHWM, measured by the kernel) grows by less than the budget while a model four
    times the budget streams from safetensors shards into the NVMe tier, one tensor at a time."""
    transformers = pytest.importorskip("transformers")
    budget = 16 << 20
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=22,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    path = tmp_path / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="20MB")
    swap = tmp_path / "swap"
    swap.mkdir()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(swap)], env=subprocess_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["source"] >= 4 * budget and r["placed"] >= r["source"]  # plus the computed rotary buffers
    assert r["equal"] and r["held"] == 0  # every weight waits in the tier, none in memory
    print(f"load: {r['source'] / 2**20:.1f} MiB placed, peak RSS growth {r['growth'] / 2**20:.1f} MiB")
    assert r["growth"] < budget, f"peak RSS grew by {r['growth'] / 2**20:.1f} MiB for a {budget >> 20} MiB budget"


def test_weights_load_from_a_tierflow_checkpoint_one_tensor_at_a_time(tmp_path):
    """model.path may name a torch.distributed.checkpoint: tierflow's own persisted copies load too."""
    from tierflow.trainer.checkpoint.persist import save_checkpoint

    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32)
    torch.manual_seed(11)
    trained = build_model(cfg, vocab_size=64, seq_len=16)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # not what any initialisation gives
    step_dir = save_checkpoint(tmp_path, 7, {f"model.{k}": v for k, v in trained.state_dict().items()},
                               {"rng": {}, "step": 7}, rank=0, world_size=1)
    loaded = build_model(ModelConfig(n_layer=2, n_head=2, d_model=32, path=str(step_dir)), vocab_size=64,
                         seq_len=16, device=torch.device("cpu"))
    _assert_same(trained, loaded)
    assert loaded.head.weight is loaded.tok_emb.weight
    with pytest.raises(ConfigError, match="neither safetensors weights nor a torch.distributed.checkpoint"):
        build_model(ModelConfig(path=str(tmp_path / "nothing")), vocab_size=64, seq_len=16,
                    device=torch.device("cpu"))
