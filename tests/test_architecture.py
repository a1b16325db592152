"""The package as users install it: one `tierflow` namespace, the layers kept, no import cycles, lint clean.

The wheel is built once from this checkout and unpacked outside it; the import contracts and the
cycle check run against that unpacked tree, which is exactly what `pip install tierflow` gives.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Set

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel of this checkout, unpacked into a folder outside it (as site-packages would hold it)."""
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    shutil.copytree(REPO, build / "src", ignore=shutil.ignore_patterns(".venv", ".git", "runs", "*.egg-info", "build",
                                                                        "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(build / "src")], check=True, capture_output=True, text=True)
    wheel = next(out.glob("tierflow-*.whl"))
    site = out / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return site


def _names(site: Path) -> List[str]:
    return sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file())


def test_wheel_holds_only_the_tierflow_namespace(installed):
    names = _names(installed)
    outside = [n for n in names if not n.startswith(("tierflow/", "tierflow-"))]
    assert not outside, f"the wheel installs files outside tierflow/: {outside[:10]}"
    for required in ("tierflow/__init__.py", "tierflow/conf/config.yaml", "tierflow/conf/model/tiny.yaml",
                     "tierflow/offload/tiers/nvme.py", "tierflow/offload/plan/context.py",
                     "tierflow/offload/runtime/offload_runtime.py", "tierflow/trainer/commands/train.py",
                     "tierflow/profiling/window.py"):
        assert required in names, f"{required} is missing from the wheel"
    assert not any(n.startswith(("tierflow/tests", "tierflow/benchmarks")) for n in names)


def test_bare_names_do_not_import_from_an_installed_wheel(installed, tmp_path):
    """Outside the checkout, `import offload` finds nothing of ours; tierflow.* comes from the wheel."""
    code = (
        "import importlib.util, sys\n"
        "for bare in ('offload', 'trainer', 'profiling', 'conf'):\n"
        "    spec = importlib.util.find_spec(bare)\n"
        "    assert spec is None or 'tierflow' not in str(spec.origin), (bare, spec)\n"
        "import tierflow, tierflow.offload, tierflow.trainer.compose\n"
        f"assert tierflow.offload.__file__.startswith({str(installed)!r}), tierflow.offload.__file__\n"
        "from tierflow import OffloadRuntime, TieredOptimizer\n"
        "from tierflow.trainer.compose import config_dir\n"
        "assert (config_dir() / 'config.yaml').is_file()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(installed)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_import_contracts_hold(installed, tmp_path):
    """import-linter's layers (pyproject.toml): trainer > integrations > runtime|optim > plan|tiers > core > profiling."""
    env = {**os.environ, "PYTHONPATH": str(installed)}
    # Run outside the checkout: lint-imports puts its working directory first on sys.path.
    proc = subprocess.run([str(BIN / "lint-imports"), "--no-cache", str(REPO / "pyproject.toml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_in_a_cycle(installed, tmp_path):
    """Every import counts, including those inside functions: a cycle hidden in a function is still one.

    A package's ``__init__`` re-exporting its own modules is not a cycle unless one of those
    modules imports the package back.
    """
    code = ("import grimp, json\n"
            "g = grimp.build_graph('tierflow', cache_dir=None)\n"
            "print(json.dumps({m: sorted(g.find_modules_directly_imported_by(m)) for m in g.modules}))\n")
    env = {**os.environ, "PYTHONPATH": str(installed)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    edges = {m: set(deps) for m, deps in json.loads(proc.stdout).items()}
    assert len(edges) > 50 and "tierflow.offload.runtime._exec" in edges, sorted(edges)[:10]
    cycles = _cycles(edges)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_ruff_is_clean():
    proc = subprocess.run([str(BIN / "ruff"), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
