"""Building and loading a model without holding it: tierflow against the peers, side by side.

Each configuration runs alone in its own subprocess; its figure is the growth of peak RSS
(``VmHWM``, measured by the kernel, reset after the imports) while the model is built or loaded,
and the wall time of that. Every configuration ends with a SHA-256 of the weights in state-dict
order, so equal digests prove bit-identical results.

Load a Hugging Face-format directory (a Llama written by ``save_pretrained`` in 500 MB shards):

* ``transformers``: ``AutoModelForCausalLM.from_pretrained(path)`` (the peer). It maps the files;
  weights become resident when read, so every in-memory configuration reads each weight once
  inside the measured window, as a first training step would.
* ``tierflow-ram``: ``build_model(model=hf, device=cpu)``: meta build, then one tensor at a time.
* ``tierflow-nvme``: the same into the NVMe tier (``TierPlacement``): nothing stays in memory.

Build the built-in GPT from scratch (random initialisation):

* ``eager``: ``GPT(cfg)`` in memory (the reference for the digest).
* ``tierflow-gpt-nvme``: meta build, materialised into the NVMe tier; bit-identical to eager.

Usage:
    python benchmarks/out_of_core.py --dir /tmp/ooc              # the recorded run (~1.4 GB of weights)
    python benchmarks/out_of_core.py --dir /tmp/ooc --quick      # seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20

SIZES = {  # Llama shapes; fp32 bytes = 4 x parameters
    "full": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=8),  # ~0.37B parameters, 1.4 GB
    "quick": dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4),  # ~8M parameters
}
GPT_SIZES = {"full": dict(vocab_size=32000, n_layer=24, n_head=16, d_model=1024),
             "quick": dict(vocab_size=4096, n_layer=4, n_head=4, d_model=256)}

_CHILD = r"""
import hashlib, json, sys, time
import torch

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def digest(named):
    h = hashlib.sha256()
    for name, t in named:
        h.update(name.encode()); h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]

kind, path, swap, gpt = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
from transformers import AutoModelForCausalLM
from tierflow.offload import NvmeTierConfig, TierEngine, TiersConfig
from tierflow.offload.runtime.materialize import TierPlacement, materialize, record_init
from tierflow.offload.runtime.weights import SafetensorsSource
from tierflow.trainer.config import ModelConfig
from tierflow.trainer.hf import HFCausalLM
from tierflow.trainer.model import GPT, GPTConfig, build_model
engine = TierEngine(TiersConfig(preset="none", nvme=NvmeTierConfig(enabled=True, dirs=[swap]))) if "nvme" in kind else None
gcfg = GPTConfig(vocab_size=gpt.pop("vocab_size"), seq_len=256, **gpt)
# Warm up what every configuration pays once (lazy imports of the Llama code, the first dispatch
# mode), so the figure below is the model's memory, not the libraries'.
from transformers import AutoConfig
tiny = AutoConfig.from_pretrained(path)
tiny.update(dict(num_hidden_layers=1, hidden_size=16, intermediate_size=16, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=16))
materialize(*record_init(lambda: AutoModelForCausalLM.from_config(tiny)))
materialize(*record_init(lambda: GPT(GPTConfig(vocab_size=16, seq_len=8, n_layer=1, n_head=2, d_model=8))))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base, t0 = status("VmRSS"), time.perf_counter()
torch.manual_seed(0)
if kind == "transformers":
    model = AutoModelForCausalLM.from_pretrained(path)
    named = [("lm." + k, v) for k, v in model.state_dict().items()]
elif kind == "tierflow-ram":
    model = build_model(ModelConfig(_target_="tierflow.trainer.hf.HFCausalLM", path=path), vocab_size=1,
                        seq_len=256, device=torch.device("cpu"))
    named = list(model.state_dict().items())
elif kind == "tierflow-nvme":
    model, program = record_init(lambda: HFCausalLM(path, vocab_size=1))
    placement = TierPlacement(engine.tiers["nvme"])
    materialize(model, program, source=SafetensorsSource(path, prefix="lm."), place=placement)
elif kind == "eager":
    model = GPT(gcfg)
    named = list(model.state_dict().items())
else:  # tierflow-gpt-nvme
    model, program = record_init(lambda: GPT(gcfg))
    placement = TierPlacement(engine.tiers["nvme"])
    materialize(model, program, place=placement)
if "nvme" not in kind:  # weights in memory are read once, as the first step reads them: a mapped file's
    with torch.no_grad():  # pages become resident only then
        for t in model.state_dict().values():
            t.float().sum()
seconds, peak = time.perf_counter() - t0, status("VmHWM")
if "nvme" in kind:  # read back one tensor at a time, after the measurement
    first, params = {}, dict(model.named_parameters(remove_duplicate=False))
    for n, p in params.items():
        first.setdefault(id(p), n)  # the name a tied weight was placed under
    buffers = dict(model.named_buffers())
    named = ((n, placement.read(first[id(params[n])]) if n in params else buffers[n])
             for n in model.state_dict(keep_vars=True))
print(json.dumps({"growth": peak - base, "seconds": seconds, "digest": digest(named)}))
"""


def _run(kind: str, path: Path, swap: Path, gpt: Dict[str, int]) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, kind, str(path), str(swap), json.dumps(gpt)],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="scratch directory on the disk to measure (checkpoint + swap)")
    parser.add_argument("--quick", action="store_true", help="a small model: seconds")
    args = parser.parse_args()
    size = "quick" if args.quick else "full"
    root = Path(args.dir).expanduser()
    ckpt, swap = root / f"llama-{size}", root / "swap"
    swap.mkdir(parents=True, exist_ok=True)
    if not (ckpt / "config.json").is_file():
        import torch
        import transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(max_position_embeddings=256, tie_word_embeddings=False, **SIZES[size])
        transformers.LlamaForCausalLM(cfg).save_pretrained(ckpt, max_shard_size="500MB")
    weights = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    print(f"checkpoint: {ckpt} ({weights / MiB:,.0f} MiB of safetensors)")
    results = {}
    for kind in ("transformers", "tierflow-ram", "tierflow-nvme", "eager", "tierflow-gpt-nvme"):
        started = time.perf_counter()
        results[kind] = _run(kind, ckpt, swap, GPT_SIZES[size])
        r = results[kind]
        print(f"  {kind:<18} peak RSS +{r['growth'] / MiB:8,.1f} MiB  {r['seconds']:7.2f} s  digest {r['digest']}  "
              f"({time.perf_counter() - started:.0f} s with start-up)")
    peer, ram, nvme = results["transformers"], results["tierflow-ram"], results["tierflow-nvme"]
    print("load a Hugging Face directory:")
    print(f"  tierflow-ram / transformers:  RSS growth {ram['growth'] / peer['growth']:.2f}x, "
          f"time {ram['seconds'] / peer['seconds']:.2f}x, identical weights: {ram['digest'] == peer['digest']}")
    print(f"  tierflow-nvme / transformers: RSS growth {nvme['growth'] / peer['growth']:.3f}x, "
          f"time {nvme['seconds'] / peer['seconds']:.2f}x, identical weights: {nvme['digest'] == peer['digest']}")
    eager, gpt = results["eager"], results["tierflow-gpt-nvme"]
    print("build the built-in GPT:")
    print(f"  tierflow-gpt-nvme / eager:    RSS growth {gpt['growth'] / eager['growth']:.3f}x, "
          f"time {gpt['seconds'] / eager['seconds']:.2f}x, bit-identical: {gpt['digest'] == eager['digest']}")
    (root / f"out_of_core-{size}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
