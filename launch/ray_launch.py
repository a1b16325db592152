#!/usr/bin/env python3
"""Run tierflow training on a Ray cluster: N workers, each one torch.distributed rank.

    python launch/ray_launch.py --workers 2 trainer.steps=100            # a local Ray cluster
    python launch/ray_launch.py --address auto --workers 8 --gpus-per-worker 1 model=medium
    python launch/ray_launch.py --address ray://head:10001 --working-dir . --workers 16 ...

Every worker composes the same Hydra config from the overrides and calls ``tierflow.trainer.train.train``,
exactly as a torchrun rank would: the launcher only reserves the workers (one placement group, so
they start together or not at all), numbers them, gives each node's workers local ranks and points
them all at rank 0's address. When a worker dies (its process or its node), the whole group is torn
down and started again, like ``torchrun --max-restarts``: with ``checkpoint=memory`` the new group
resumes from the in-memory snapshots, otherwise from step 0. A worker that fails in a way no restart
can fix (a wrong setting, a full tier) ends the launch instead: its one line is printed, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class LaunchConfig:
    """How many workers, what each reserves, and how failures are handled."""

    workers: int
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    strategy: str = "PACK"  # PACK fills nodes first; SPREAD puts one worker per node where possible
    max_restarts: int = 0
    address: Optional[str] = None  # None starts a local cluster; "auto" joins the one on this node
    working_dir: Optional[str] = None  # shipped to every node (for clusters without the checkout)
    start_timeout_s: float = 300.0

    def problems(self) -> List[str]:
        p = []
        if self.workers < 1:
            p.append(f"--workers {self.workers} must be >= 1")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            p.append("--cpus-per-worker and --gpus-per-worker must be >= 0")
        if self.strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            p.append(f"--strategy {self.strategy} is not one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD")
        if self.max_restarts < 0:
            p.append(f"--max-restarts {self.max_restarts} must be >= 0")
        if self.working_dir and not Path(self.working_dir).is_dir():
            p.append(f"--working-dir {self.working_dir} is not a directory")
        return p


def rank_environment(rank: int, world_size: int, node_of_rank: Sequence[str], master_addr: str,
                     master_port: int) -> Dict[str, str]:
    """The torchrun-style environment of ``rank``: local ranks count the ranks on the same node."""
    node = node_of_rank[rank]
    same_node = [r for r in range(world_size) if node_of_rank[r] == node]
    nodes = list(dict.fromkeys(node_of_rank))  # node order of first appearance
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(same_node.index(rank)),
            "LOCAL_WORLD_SIZE": str(len(same_node)), "GROUP_RANK": str(nodes.index(node)),
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}


class UnrecoverableError(RuntimeError):
    """A worker failed in a way no restart can fix (a wrong setting, a full tier); the message is its
    one-line report. The group is not restarted (Note [errors a restart cannot fix] in trainer/cli.py)."""


class _Worker:
    """One rank. A Ray actor: its process lives as long as the group's attempt."""

    def where(self) -> Dict[str, Any]:
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "free_port": _free_port()}

    def train(self, env: Dict[str, str], overrides: List[str]) -> Dict[str, Any]:
        os.environ.update(env)
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from tierflow.trainer.cli import failure_of
        from tierflow.trainer.compose import load_config
        from tierflow.trainer.train import train

        rank = {"rank": int(env["RANK"]), "node_ip": env["TIERFLOW_NODE_IP"]}
        try:
            cfg, _ = load_config(overrides)
            result = train(cfg)
        except Exception as exc:
            failure = failure_of(exc)
            if failure is None or failure.restart_can_fix:
                raise  # the driver sees a RayTaskError and restarts the group
            return {**rank, "unrecoverable": failure.message}  # a value, so the driver can tell it apart
        return {**result.summary, **rank}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def launch(cfg: LaunchConfig, overrides: Sequence[str]) -> List[Dict[str, Any]]:
    """Train on ``cfg.workers`` Ray workers; returns every rank's summary, in rank order.

    Raises:
        ValueError: a launch setting is wrong, or the config fails to compose (checked before Ray starts).
        UnrecoverableError: a worker failed in a way no restart can fix; the group was not restarted.
        RuntimeError: the group failed more than ``cfg.max_restarts`` times, or could not be placed.
    """
    problems = cfg.problems()
    if problems:
        raise ValueError("; ".join(problems))
    sys.path.insert(0, str(REPO))
    from tierflow.trainer.compose import load_config
    from tierflow.trainer.config import micro_batch_size

    tcfg, _ = load_config(list(overrides))  # a bad override fails here, before any cluster work
    micro_batch_size(tcfg.trainer, cfg.workers)

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    runtime_env: Dict[str, Any] = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}}
    if cfg.working_dir:
        runtime_env["working_dir"] = cfg.working_dir
    init_kwargs: Dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": True,
                                   "include_dashboard": False}
    if cfg.address:
        init_kwargs["address"] = cfg.address
    else:  # a local cluster sized for the workers even on a machine with fewer cores
        init_kwargs["num_cpus"] = max(os.cpu_count() or 1, int(cfg.workers * cfg.cpus_per_worker + 0.999))
    ray.init(**init_kwargs)
    bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})}
    pg = placement_group([dict(bundle) for _ in range(cfg.workers)], strategy=cfg.strategy)
    try:
        if not _wait(pg.ready(), cfg.start_timeout_s):
            raise RuntimeError(f"Ray could not place {cfg.workers} workers of {bundle} within "
                               f"{cfg.start_timeout_s:.0f} s; the cluster has {ray.cluster_resources()}: lower "
                               "--workers or the per-worker resources, or add nodes")
        worker_cls = ray.remote(_Worker)

        def make_workers() -> List[Any]:
            return [worker_cls.options(
                num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                     placement_group_bundle_index=i)).remote()
                for i in range(cfg.workers)]

        return _attempts(ray, make_workers, overrides, max_restarts=cfg.max_restarts,
                         kill=lambda w: ray.kill(w, no_restart=True))
    finally:
        remove_placement_group(pg)
        ray.shutdown()


def _attempts(ray: Any, make_workers: Callable[[], List[Any]], overrides: Sequence[str], *, max_restarts: int,
              kill: Callable[[Any], None]) -> List[Dict[str, Any]]:
    """Run the group; when a worker dies, tear all down and start again, ``max_restarts`` times.

    An UnrecoverableError from the group passes through at once: running again would fail the same way.
    """
    for attempt in range(max_restarts + 1):
        workers = make_workers()
        try:
            return _run_group(ray, workers, overrides)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            left = max_restarts - attempt
            if left <= 0:
                raise RuntimeError(f"the worker group failed and --max-restarts {max_restarts} is spent: "
                                   f"{_short(e)}") from None
            print(f"ray_launch: a worker failed ({_short(e)}); restarting all {len(workers)} workers "
                  f"({left} restart{'s' if left != 1 else ''} left)", file=sys.stderr, flush=True)
        finally:
            for w in workers:
                kill(w)
    raise AssertionError("unreachable: the loop returns or raises")


def _run_group(ray: Any, workers: List[Any], overrides: Sequence[str]) -> List[Dict[str, Any]]:
    where = ray.get([w.where.remote() for w in workers])
    nodes = [w["node_id"] for w in where]
    master_addr, master_port = where[0]["ip"], where[0]["free_port"]
    futures = [w.train.remote({**rank_environment(r, len(workers), nodes, master_addr, master_port),
                               "TIERFLOW_NODE_IP": where[r]["ip"]}, list(overrides))
               for r, w in enumerate(workers)]
    pending = list(futures)
    while pending:  # fail fast: one dead rank must not leave the others waiting in a collective
        done, pending = ray.wait(pending, num_returns=1)
        result = ray.get(done[0])
        if "unrecoverable" in result:  # the others may wait for it in a collective: they are killed
            raise UnrecoverableError(result["unrecoverable"])
    return sorted(ray.get(futures), key=lambda s: s["rank"])


def _wait(ref: Any, timeout_s: float) -> bool:
    import ray

    ready, _ = ray.wait([ref], timeout=timeout_s)
    return bool(ready)


def _short(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(e).__name__


def _per_node(summaries: Sequence[Dict[str, Any]]) -> Dict[str, int]:
    count: Dict[str, int] = defaultdict(int)
    for s in summaries:
        count[s["node_ip"]] += 1
    return dict(count)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ray_launch.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=int(os.environ.get("TIERFLOW_RAY_WORKERS", "2")))
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--strategy", default="PACK")
    parser.add_argument("--max-restarts", type=int, default=0)
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="an existing cluster: 'auto' on one of its nodes, or ray://HEAD:10001")
    parser.add_argument("--working-dir", help="ship this directory to every node (clusters without the checkout)")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra override, e.g. trainer.steps=50")
    args = parser.parse_args(argv)
    cfg = LaunchConfig(workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                       gpus_per_worker=args.gpus_per_worker, strategy=args.strategy,
                       max_restarts=args.max_restarts, address=args.address, working_dir=args.working_dir)
    t0 = time.perf_counter()
    try:
        summaries = launch(cfg, args.overrides)
    except UnrecoverableError as e:  # printed here only: the worker said nothing
        print(e, file=sys.stderr)
        return 2
    except ValueError as e:  # a launch setting or an override: as wrong on the next try
        print(f"ray_launch: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"ray_launch: error: {e}", file=sys.stderr)
        return 1
    digests = {s["param_digests"][s["rank"]] for s in summaries}
    print(f"ray_launch: {len(summaries)} workers finished in {time.perf_counter() - t0:.1f} s "
          f"({_per_node(summaries)}); parameters identical on every rank: {len(digests) == 1}", flush=True)
    return 0 if len(digests) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
