"""The transfer scheduler: order, per-link limits, clean shutdown, Ctrl-C with transfers in flight."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from tests.conftest import PYTHON, REPO
from tierflow.offload import (
    HostTier,
    HostTierConfig,
    NvmeTierConfig,
    SchedulerConfig,
    TierEngine,
    TiersConfig,
    TransferCancelled,
    TransferKind,
    TransferScheduler,
)
from tierflow.offload.tiers.scheduler import THREAD_PREFIX

MiB = 1 << 20


def _tierflow_threads():
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive()]


def test_prefetches_run_before_offloads_and_by_deadline():
    order = []
    gate, started = threading.Event(), threading.Event()
    with TransferScheduler(SchedulerConfig(max_inflight_per_link=1)) as sched:
        # The blocker must hold the link's only slot before the rest queue up behind it.
        blocker = sched.submit("nvme:0", lambda ctx: (started.set(), gate.wait()), kind=TransferKind.OFFLOAD)
        assert started.wait(timeout=10)
        submitted = [("offload", 1.0), ("prefetch", 9.0), ("offload", 0.5), ("prefetch", 2.0), ("prefetch", 5.0)]
        futures = [sched.submit("nvme:0", lambda ctx, tag=(kind, d): order.append(tag),
                                kind=TransferKind.PREFETCH if kind == "prefetch" else TransferKind.OFFLOAD, deadline=d)
                   for kind, d in submitted]
        gate.set()
        for f in [blocker, *futures]:
            f.result(timeout=10)
    assert order == [("prefetch", 2.0), ("prefetch", 5.0), ("prefetch", 9.0), ("offload", 0.5), ("offload", 1.0)]


def test_each_link_respects_its_concurrency_limit_and_links_are_independent():
    running = {"a": 0, "b": 0}
    peak = {"a": 0, "b": 0}
    lock = threading.Lock()

    def work(link):
        def run(ctx):
            with lock:
                running[link] += 1
                peak[link] = max(peak[link], running[link])
            time.sleep(0.005)
            with lock:
                running[link] -= 1
        return run

    with TransferScheduler(SchedulerConfig(max_inflight_per_link=2, link_limits={"b": 3})) as sched:
        assert sched.register_link("c", 5) == 5 and sched.register_link("b", 7) == 3  # config wins
        futures = [sched.submit(link, work(link), kind=TransferKind.OFFLOAD, nbytes=10) for _ in range(30) for link in "ab"]
        for f in futures:
            f.result(timeout=30)
        stats = sched.stats()
    assert peak["a"] == 2 and peak["b"] == 3
    assert stats["a"].completed == 30 and stats["a"].nbytes == 300 and stats["b"].limit == 3


def test_close_cancels_queued_transfers_and_joins_every_worker():
    gate, started = threading.Event(), threading.Event()
    sched = TransferScheduler(SchedulerConfig(max_inflight_per_link=1))
    running = sched.submit("x", lambda ctx: (started.set(), gate.wait()), kind=TransferKind.OFFLOAD)
    assert started.wait(10)
    queued = [sched.submit("x", lambda ctx: None, kind=TransferKind.PREFETCH) for _ in range(5)]
    threading.Timer(0.05, gate.set).start()
    sched.close()
    assert running.result(timeout=1) is None  # the running one finished
    for f in queued:
        with pytest.raises(TransferCancelled):
            f.result(timeout=1)
    assert sched.threads() == []
    with pytest.raises(TransferCancelled, match="closed"):
        sched.submit("x", lambda ctx: None, kind=TransferKind.OFFLOAD)


def test_a_waiting_caller_runs_a_queued_cpu_copy_itself_within_the_link_limit():
    ran_on = []
    me = threading.current_thread()
    with TransferScheduler(SchedulerConfig(max_inflight_per_link=1)) as sched:
        with sched._cond:  # keep the workers off the queue so the transfer is surely still queued
            f = sched.submit("host", lambda ctx: ran_on.append(threading.current_thread()),
                             kind=TransferKind.OFFLOAD, inline=True)
            assert sched.run_inline(f)
        assert f.result(timeout=5) is None and ran_on == [me]
        assert not sched.run_inline(f)  # already done
        gate, started = threading.Event(), threading.Event()
        blocker = sched.submit("host", lambda ctx: (started.set(), gate.wait()), kind=TransferKind.OFFLOAD)
        assert started.wait(10)
        g = sched.submit("host", lambda ctx: ran_on.append(threading.current_thread()),
                         kind=TransferKind.OFFLOAD, inline=True)
        assert not sched.run_inline(g)  # the link is at its limit: the caller waits instead
        gate.set()
        blocker.result(timeout=5)
        g.result(timeout=5)
        assert ran_on[-1] is not me


def test_a_failing_transfer_reports_through_its_handle_and_the_link_keeps_working():
    with TransferScheduler() as sched:
        bad = sched.submit("x", lambda ctx: 1 / 0, kind=TransferKind.OFFLOAD)
        with pytest.raises(ZeroDivisionError):
            bad.result(timeout=5)
        assert sched.submit("x", lambda ctx: None, kind=TransferKind.OFFLOAD).result(timeout=5) is None


def test_keyboard_interrupt_with_transfers_in_flight_leaves_no_thread_and_no_file(tmp_path):
    before = set(_tierflow_threads())
    cfg = TiersConfig(host=HostTierConfig(enabled=True, budget_bytes=64 * MiB, slab_bytes=8 * MiB),
                      nvme=NvmeTierConfig(enabled=True, dirs=[str(tmp_path)], chunk_bytes=256 * 1024))
    handles = []
    # A process started in the background by a non-interactive shell (CI, say) ignores SIGINT;
    # the test is about our cleanup, so it restores Python's own handler for its duration.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt):
        with TierEngine(cfg) as engine:
            for i in range(32):
                t = torch.full((MiB // 4,), float(i))
                tier = engine.nvme if i % 2 else engine.host
                handles.append(tier.write(tier.reserve(t.nbytes), t))
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while most transfers are queued or running
            for h in handles:
                h.wait()
    signal.signal(signal.SIGINT, previous)
    assert set(_tierflow_threads()) <= before
    assert all(h.done() for h in handles)  # each one finished or was cancelled: nobody waits forever
    assert os.listdir(tmp_path) == []


_CHILD = textwrap.dedent("""
    import sys, torch
    from tierflow.offload import NvmeTier, NvmeTierConfig
    tier = NvmeTier(NvmeTierConfig(enabled=True, dirs=[sys.argv[1]], chunk_bytes=1 << 18))
    handles = [tier.write(tier.reserve(1 << 22), torch.ones(1 << 20)) for _ in range(64)]
    print("submitted", flush=True)
    if sys.argv[2] == "wait":
        for h in handles:
            h.wait()
        import time; time.sleep(60)
    # "exit": leave without close(); the finalizers must stop the workers and remove the files
""")


@pytest.mark.parametrize("mode", ["wait", "exit"])
def test_a_process_never_hangs_at_exit_and_removes_its_swap_files(tmp_path, subprocess_env, mode):
    # SIG_DFL in the child (Python then raises KeyboardInterrupt), even when this process ignores SIGINT.
    proc = subprocess.Popen([PYTHON, "-c", _CHILD, str(tmp_path), mode], cwd=REPO, env=subprocess_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "submitted"
    if mode == "wait":
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the process hung at exit")
    # An uncaught KeyboardInterrupt ends Python with SIGINT (-2) or, on older versions, status 1.
    assert proc.returncode in ((1, -signal.SIGINT) if mode == "wait" else (0,)), err[-2000:]
    if mode == "wait":
        assert "KeyboardInterrupt" in err
    assert os.listdir(tmp_path) == []


def test_a_tier_that_owns_its_scheduler_cleans_up_on_close():
    before = set(_tierflow_threads())
    host = HostTier(HostTierConfig(budget_bytes=MiB, slab_bytes=MiB))
    host.write(host.reserve(4096), torch.zeros(1024)).wait()
    assert set(_tierflow_threads()) - before
    host.close()
    assert set(_tierflow_threads()) <= before
    host.close()  # idempotent


def test_handles_can_be_polled():
    with HostTier(HostTierConfig(budget_bytes=MiB, slab_bytes=MiB)) as host:
        h = host.write(host.reserve(4096), torch.zeros(1024))
        deadline = time.monotonic() + 10
        while not h.done():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert h.exception() is None and "write host slot 0" in repr(h)


if sys.platform != "linux":  # pragma: no cover
    pytest.skip("the tier engine targets Linux", allow_module_level=True)
