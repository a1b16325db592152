"""The transfer scheduler: order, per-link limits, clean shutdown, Ctrl-C with transfers in flight.

Order and overlap are made observable with transfers the test holds and releases (:class:`_Gate`),
never with sleeps that merely tend to overlap; every wait fails the test when it runs out.
"""

import os
import signal
import subprocess
import sys
import textwrap
import threading

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
TIMEOUT_S = 10  # a wait this long means something is stuck; running out fails the test


def _tierflow_threads():
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive()]


def _link_workers(sched, link):
    return [t for t in sched.threads() if t.name.startswith(f"{THREAD_PREFIX}{link}-")]


class _Gate:
    """Transfers that block until the test opens the gate; counts how many started and ran at once.

    Used as a context manager *inside* the scheduler's ``with``, so it opens before the scheduler
    closes: a failing test never leaves a worker blocked for ``close()`` to join forever.
    """

    def __init__(self):
        self._open = threading.Event()
        self._cond = threading.Condition()
        self.started = self.running = self.peak = 0

    def transfer(self, ctx):
        with self._cond:
            self.started += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
            self._cond.notify_all()
        try:
            if not self._open.wait(TIMEOUT_S):
                raise TimeoutError(f"the test never opened the gate within {TIMEOUT_S} s")
        finally:
            with self._cond:
                self.running -= 1

    def wait_started(self, n):
        """Wait until ``n`` gated transfers have started (they are all blocked until :meth:`open`)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.started >= n, TIMEOUT_S):
                pytest.fail(f"{self.started} of {n} transfers started within {TIMEOUT_S} s")

    def open(self):
        self._open.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.open()


def test_prefetches_run_before_offloads_and_by_deadline():
    order = []
    with TransferScheduler(SchedulerConfig(max_inflight_per_link=1)) as sched, _Gate() as gate:
        # The blocker must hold the link's only slot before the rest queue up behind it.
        blocker = sched.submit("nvme:0", gate.transfer, kind=TransferKind.OFFLOAD)
        gate.wait_started(1)
        submitted = [("offload", 1.0), ("prefetch", 9.0), ("offload", 0.5), ("prefetch", 2.0), ("prefetch", 5.0)]
        futures = [sched.submit("nvme:0", lambda ctx, tag=(kind, d): order.append(tag),
                                kind=TransferKind.PREFETCH if kind == "prefetch" else TransferKind.OFFLOAD, deadline=d)
                   for kind, d in submitted]
        gate.open()
        for f in [blocker, *futures]:
            f.result(timeout=TIMEOUT_S)
    assert order == [("prefetch", 2.0), ("prefetch", 5.0), ("prefetch", 9.0), ("offload", 0.5), ("offload", 1.0)]


def test_each_link_respects_its_concurrency_limit_and_links_are_independent():
    gates = {"a": _Gate(), "b": _Gate()}
    with TransferScheduler(SchedulerConfig(max_inflight_per_link=2, link_limits={"b": 3})) as sched, \
            gates["a"], gates["b"]:
        assert sched.register_link("c", 5) == 5 and sched.register_link("b", 7) == 3  # config wins
        futures = [sched.submit(link, gates[link].transfer, kind=TransferKind.OFFLOAD, nbytes=10)
                   for _ in range(30) for link in "ab"]
        # Each link fills its own limit while the other's transfers are all held: they overlap up
        # to the limit and neither link waits for the other.
        gates["a"].wait_started(2)
        gates["b"].wait_started(3)
        # ...and never beyond it: a link has no more workers than its limit (they are made in
        # submit(), so this is final), each running one transfer at a time.
        assert len(_link_workers(sched, "a")) == 2 and len(_link_workers(sched, "b")) == 3
        assert (gates["a"].started, gates["b"].started) == (2, 3)
        for gate in gates.values():
            gate.open()
        for f in futures:
            f.result(timeout=TIMEOUT_S)
        stats = sched.stats()
    assert gates["a"].peak == 2 and gates["b"].peak == 3
    assert stats["a"].completed == 30 and stats["a"].nbytes == 300 and stats["b"].limit == 3


def test_close_cancels_queued_transfers_and_joins_every_worker():
    sched = TransferScheduler(SchedulerConfig(max_inflight_per_link=1))
    closer = threading.Thread(target=sched.close, name="test-closer", daemon=True)
    with _Gate() as gate:
        running = sched.submit("x", gate.transfer, kind=TransferKind.OFFLOAD)
        gate.wait_started(1)
        queued = [sched.submit("x", lambda ctx: None, kind=TransferKind.PREFETCH) for _ in range(5)]
        closer.start()
        # close() cancels the queue at once, without waiting for the transfer that is running...
        for f in queued:
            with pytest.raises(TransferCancelled):
                f.result(timeout=TIMEOUT_S)
        with pytest.raises(TransferCancelled, match="closed"):
            sched.submit("x", lambda ctx: None, kind=TransferKind.OFFLOAD)
        # ...which it lets finish: while the test holds it, close() is still joining its worker.
        assert not running.done() and closer.is_alive()
    closer.join(TIMEOUT_S)
    assert not closer.is_alive(), f"close() did not return within {TIMEOUT_S} s of the last transfer finishing"
    assert running.result(timeout=0) is None  # the running one finished, before close() returned
    assert sched.threads() == []


def test_a_waiting_caller_runs_a_queued_cpu_copy_itself_within_the_link_limit():
    ran_on = []
    me = threading.current_thread()
    with TransferScheduler(SchedulerConfig(max_inflight_per_link=1)) as sched:
        with sched._cond:  # keep the workers off the queue so the transfer is surely still queued
            f = sched.submit("host", lambda ctx: ran_on.append(threading.current_thread()),
                             kind=TransferKind.OFFLOAD, inline=True)
            assert sched.run_inline(f)
        assert f.result(timeout=TIMEOUT_S) is None and ran_on == [me]
        assert not sched.run_inline(f)  # already done
        with _Gate() as gate:
            blocker = sched.submit("host", gate.transfer, kind=TransferKind.OFFLOAD)
            gate.wait_started(1)
            g = sched.submit("host", lambda ctx: ran_on.append(threading.current_thread()),
                             kind=TransferKind.OFFLOAD, inline=True)
            assert not sched.run_inline(g)  # the link is at its limit: the caller waits instead
        blocker.result(timeout=TIMEOUT_S)
        g.result(timeout=TIMEOUT_S)
        assert ran_on[-1] is not me


def test_a_failing_transfer_reports_through_its_handle_and_the_link_keeps_working():
    with TransferScheduler() as sched:
        bad = sched.submit("x", lambda ctx: 1 / 0, kind=TransferKind.OFFLOAD)
        with pytest.raises(ZeroDivisionError):
            bad.result(timeout=TIMEOUT_S)
        assert sched.submit("x", lambda ctx: None, kind=TransferKind.OFFLOAD).result(timeout=TIMEOUT_S) is None


def test_keyboard_interrupt_with_transfers_in_flight_leaves_no_thread_and_no_file(tmp_path):
    before = set(_tierflow_threads())
    cfg = TiersConfig(host=HostTierConfig(enabled=True, budget_bytes=64 * MiB, slab_bytes=8 * MiB),
                      nvme=NvmeTierConfig(enabled=True, dirs=[str(tmp_path)], chunk_bytes=256 * 1024))
    handles = []
    # A process started in the background by a non-interactive shell (CI, say) ignores SIGINT;
    # the test is about our cleanup, so it restores Python's own handler for its duration.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with TierEngine(cfg) as engine:
                for i in range(32):
                    t = torch.full((MiB // 4,), float(i))
                    tier = engine.nvme if i % 2 else engine.host
                    handles.append(tier.write(tier.reserve(t.nbytes), t))
                signal.raise_signal(signal.SIGINT)  # Ctrl-C while most transfers are queued or running
                for h in handles:
                    h.wait(timeout=TIMEOUT_S)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert set(_tierflow_threads()) <= before
    assert all(h.done() for h in handles)  # each one finished or was cancelled: nobody waits forever
    assert os.listdir(tmp_path) == []


_CHILD = textwrap.dedent("""
    import os, select, signal, sys, torch
    from tierflow.offload import NvmeTier, NvmeTierConfig
    # Every signal also writes a byte here, so a Ctrl-C that lands just before the wait below still
    # ends it (a sleep would sleep through it and the parent would time out).
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    tier = NvmeTier(NvmeTierConfig(enabled=True, dirs=[sys.argv[1]], chunk_bytes=1 << 18))
    handles = [tier.write(tier.reserve(1 << 22), torch.ones(1 << 20)) for _ in range(64)]
    print("submitted", flush=True)
    if sys.argv[2] == "wait":
        for h in handles:
            h.wait()
        while True:  # until the parent's Ctrl-C raises KeyboardInterrupt (on the jump back at the latest)
            select.select([wake_r], [], [])
            os.read(wake_r, 1)
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
    from tierflow.offload.tiers._pool import SMALL_COPY_BYTES

    before = set(_tierflow_threads())
    host = HostTier(HostTierConfig(budget_bytes=MiB, slab_bytes=MiB))
    big = torch.zeros(2 * SMALL_COPY_BYTES // 4)  # a worker's copy (a small one runs on this thread)
    host.write(host.reserve(big.numel() * 4), big).wait(timeout=TIMEOUT_S)
    assert set(_tierflow_threads()) - before
    host.close()
    assert set(_tierflow_threads()) <= before
    host.close()  # idempotent


def test_handles_can_be_polled():
    # The tier owns its scheduler, so a failing test's close() cancels a write still queued
    # instead of waiting for it.
    with HostTier(HostTierConfig(budget_bytes=MiB, slab_bytes=MiB)) as host, _Gate() as gate:
        limit = host.scheduler.register_link("host")
        for _ in range(limit):  # hold every slot of the host link
            host.scheduler.submit("host", gate.transfer, kind=TransferKind.OFFLOAD)
        gate.wait_started(limit)
        h = host.write(host.reserve(4096), torch.zeros(1024))
        assert not h.done() and repr(h) == "TransferHandle(write host slot 0, 4096 B, pending)"  # never blocks
        gate.open()
        # A worker completes it with nobody calling wait() (exception() does not run it inline).
        assert h.exception(timeout=TIMEOUT_S) is None
        assert h.done() and repr(h) == "TransferHandle(write host slot 0, 4096 B, done)"


if sys.platform != "linux":  # pragma: no cover
    pytest.skip("the tier engine targets Linux", allow_module_level=True)


def test_a_small_host_copy_runs_on_the_calling_thread_unless_a_transfer_is_queued_ahead():
    # Note [small copies run here]: no worker hand-off (about 1 ms per tensor out and back on a
    # busy machine), the link's counters still count it, and nothing overtakes a queued transfer.
    before = set(_tierflow_threads())
    with HostTier(HostTierConfig(budget_bytes=MiB, slab_bytes=MiB)) as host, _Gate() as gate:
        src = torch.arange(1024, dtype=torch.float32)
        h = host.write(host.reserve(4096), src)
        assert h.done() and set(_tierflow_threads()) <= before  # no worker was started for it
        assert host.scheduler.stats()["host"].nbytes == 4096
        limit = host.scheduler.register_link("host")
        for _ in range(limit):  # every slot of the link busy: the next copy waits in line
            host.scheduler.submit("host", gate.transfer, kind=TransferKind.OFFLOAD)
        gate.wait_started(limit)
        queued = host.write(host.reserve(4096), src)
        assert not queued.done()
        gate.open()
        assert queued.exception(timeout=TIMEOUT_S) is None
