"""DeepSpeed's process group as the test jobs start it: CPU accelerator, gloo, no op to build."""

import importlib


def init_deepspeed_on_gloo() -> None:
    """``deepspeed.init_distributed`` over gloo, without DeepSpeed's shared-memory all-reduce.

    That op (CPU accelerator) is C++ built on first use, 77 s of a clean CI run; the jobs test
    tierflow on ZeRO, not it, and gloo reduces the same. It is patched by module name: the
    package attribute ``deepspeed.comm.torch`` is torch itself.
    """
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
