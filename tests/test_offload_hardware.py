"""HardwareModel (pure data), the tiers config group and its presets, and `tierflow calibrate`."""

import json
import re

import pytest

from tierflow.offload import HardwareModel, LinkModel, LinkSample, TierConfigError, TierModel, TiersConfig, fit_link
from tierflow.trainer.cli import main as cli_main
from tierflow.trainer.commands.calibrate import load_tiers_config
from tierflow.trainer.compose import group_options, load_config
from tierflow.trainer.config import ConfigError

PRESETS = ["a100_pcie4_1nvme", "cxl_2expanders", "h100_sxm_pcie5_2nvme", "host", "none"]


def _model():
    return HardwareModel(
        name="toy",
        tiers=(TierModel("host", "host", 1 << 30), TierModel("nvme:0", "nvme", 1 << 40, "/mnt/a")),
        links=(LinkModel("host", "nvme:0", 2e9, 1e-4, 4, (LinkSample(1 << 20, 1, 6e-4),), "measured"),
               LinkModel("nvme:0", "host", 3e9, 8e-5)),
        source="test", created="2026-01-01T00:00:00+00:00")


def test_json_round_trip_is_exact(tmp_path):
    model = _model()
    assert HardwareModel.from_json(model.to_json()) == model
    path = tmp_path / "hw.json"
    model.save(str(path))
    assert HardwareModel.load(str(path)) == model
    assert json.loads(path.read_text())["schema_version"] == 1


def test_lookups_and_prediction():
    model = _model()
    assert model.link("host", "nvme:0").transfer_s(2_000_000_000) == pytest.approx(1.0001)
    assert model.tier("nvme:0").detail == "/mnt/a"
    with pytest.raises(KeyError, match="no link device->host .* it has: host->nvme:0, nvme:0->host"):
        model.link("device", "host")


def test_validation_reports_every_problem_at_once():
    data = _model().to_dict()
    data["tiers"].append({"name": "gpu", "kind": "gpu", "capacity_bytes": -1})
    data["links"][0]["bandwidth_bytes_per_s"] = 0
    data["links"][1]["latency_s"] = -1
    data["links"].append(dict(data["links"][1], latency_s=0.0))
    problems = HardwareModel.problems_in_dict(data)
    text = "; ".join(problems)
    for part in ("kind 'gpu'", "capacity_bytes=-1", "bandwidth_bytes_per_s=0", "latency_s=-1", "appears twice"):
        assert part in text, text
    assert len(problems) == 5
    with pytest.raises(TierConfigError):
        HardwareModel.from_dict(data)


def test_unknown_and_missing_keys_are_named():
    problems = HardwareModel.problems_in_dict({"name": "x", "links": [{"src": "host", "bandwith": 1}]})
    text = "; ".join(problems)
    assert "unknown key 'bandwith'" in text and "missing 'dst'" in text and "missing 'bandwidth_bytes_per_s'" in text


def test_fit_link_recovers_bandwidth_and_latency_from_exact_samples():
    bw, lat = 4e9, 50e-6
    aggregate = {1: bw, 2: 2 * bw, 4: 1.5 * bw}  # two in flight fill the link, four contend
    samples = [LinkSample(n, c, lat + n * c / aggregate[c]) for n in (1 << 20, 8 << 20, 64 << 20) for c in (1, 2, 4)]
    bandwidth, latency, best = fit_link(samples)
    n = 64 << 20
    assert best == 2 and bandwidth == pytest.approx(2 * n / (lat + n / bw), rel=1e-9)
    assert latency == pytest.approx(lat, rel=1e-6)
    with pytest.raises(ValueError, match="at least one sample"):
        fit_link([])


def test_presets_are_valid_hardware_models_and_host_is_the_default():
    assert group_options("tiers") == PRESETS
    cfg, _ = load_config([])  # the default offloads to a host pool, planned with nominal links
    assert cfg.tiers.preset == "host" and cfg.tiers.hardware_model() is None
    assert cfg.tiers.host.enabled and not (cfg.tiers.numa.enabled or cfg.tiers.nvme.enabled)
    cfg, _ = load_config(["tiers=none"])
    assert not (cfg.tiers.host.enabled or cfg.tiers.numa.enabled or cfg.tiers.nvme.enabled)
    for preset in PRESETS[:-2]:
        cfg, _ = load_config([f"tiers={preset}"])
        model = cfg.tiers.hardware_model()
        assert model.name == preset and model.links and model.tiers
        assert all(link.source for link in model.links)  # every figure says where it comes from
        assert load_tiers_config([f"tiers={preset}"]) == cfg.tiers  # calibrate composes the same group


def test_tiers_overrides_and_errors_through_the_trainer_config():
    cfg, _ = load_config(["tiers=h100_sxm_pcie5_2nvme", "tiers.nvme.dirs=[/a,/b,/c]", "tiers.host.budget_bytes=4096"])
    assert cfg.tiers.nvme.dirs == ["/a", "/b", "/c"] and cfg.tiers.host.budget_bytes == 4096
    with pytest.raises(ConfigError, match="tiers.nvme.io_depth=0 must be >= 1"):
        load_config(["tiers.nvme.io_depth=0"])
    with pytest.raises(ConfigError, match="tiers.hardware_file=/nope.json does not exist; write one with `tierflow calibrate"):
        load_config(["tiers.hardware_file=/nope.json"])
    with pytest.raises(ConfigError, match="unknown option tiers=dgx"):
        load_config(["tiers=dgx"])


def test_calibrate_command_rejects_non_tier_overrides():
    with pytest.raises(TierConfigError, match="calibrate takes tiers overrides only"):
        load_tiers_config(["trainer.steps=3"])
    assert isinstance(load_tiers_config(["tiers.scheduler.max_inflight_per_link=3"]), TiersConfig)


def test_calibrate_writes_a_hardware_model_for_this_machine(tmp_path, capsys):
    out = tmp_path / "hw.json"
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    rc = cli_main(["calibrate", "--out", str(out), "--nvme-dir", str(ssd), "--numa-node", "0",
                   "--sizes", "256K,1M", "--concurrency", "1,2", "--repeats", "1", "tiers.nvme.chunk_bytes=262144"])
    assert rc == 0, capsys.readouterr().err
    model = HardwareModel.load(str(out))
    device_links = {"device->host", "host->device", "device->nvme:0", "nvme:0->device"}
    assert {l.name for l in model.links} == {"host->numa:0", "numa:0->host", "host->nvme:0", "nvme:0->host"} | device_links
    assert model.tier("device").capacity_bytes > 0
    assert {t.name for t in model.tiers} >= {"host", "numa:0", "nvme:0"}
    for link in model.links:
        assert len(link.samples) == 4 and link.bandwidth_bytes_per_s > 0 and link.latency_s >= 0
    assert list(ssd.iterdir()) == []  # swap files removed
    cfg, _ = load_config([f"tiers.hardware_file={out}"])
    assert cfg.tiers.hardware_model() == model  # the planner reads it through the config


def test_calibrate_fails_before_measuring_when_a_directory_is_missing(tmp_path, capsys):
    rc = cli_main(["calibrate", "--out", str(tmp_path / "hw.json"), "--nvme-dir", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist; create it" in err and err.count("\n") == 1
    assert not (tmp_path / "hw.json").exists()


@pytest.mark.parametrize("content,expected", [
    (b'{"links":"x","tiers":3}', "tiers must be a list of objects, not 3; links must be a list of objects"),
    (b"[1, 2]", "a hardware model is a JSON object, not list"),
    (b"\xff\xfe{", "is not UTF-8 JSON"),
    (b'{"name": "x", "tiers": [], "links": [{"src": "device", "samples": 5}]}', "links[0].samples must be a list"),
])
def test_a_malformed_hardware_file_is_refused_in_one_line_naming_it(tmp_path, content, expected):
    from tierflow.offload import TierConfigError, TiersConfig

    path = tmp_path / "hw.json"
    path.write_bytes(content)
    with pytest.raises(TierConfigError, match=re.escape(expected)) as info:
        TiersConfig(hardware_file=str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
