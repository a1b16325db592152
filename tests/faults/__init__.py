"""Fault injection: each case of issue 15 reproduced, and the fixed behaviour shown.

Where each numbered case is tested (``tests/faults/`` unless a path says otherwise):

1. crash after the last step: ``tests/test_train.py::test_a_run_resumed_after_its_last_step_*``
2. resume after a reboot, from this run's own persisted copy, the resumed step's loss in
   metrics.jsonl: ``test_run_identity.py::test_the_same_command_after_a_reboot_*``
3. two runs never share snapshots: ``test_run_identity.py::test_another_run_with_the_same_config_*``
4. corrupt swap data: ``test_corrupt_swap.py`` (checksums by default, a flipped byte named by
   tier, file and offset, nothing read is used, the same command resumes to the same digest)
5. corrupt persisted checkpoints: ``test_checkpoint_files.py`` (flipped bit, truncated files,
   fallback to the next older copy, one line when none verifies)
6. evaluation with parameters on NVMe:
   ``tests/test_runtime_trainer.py::test_evaluation_between_steps_sees_every_tensor_*``
7. nothing runs from a checkpoint directory: ``test_checkpoint_files.py`` (crafted pickle,
   loose modes, another user's file)
8. segments of another user or writable by others: ``test_run_identity.py::test_a_segment_*``
9. to 11. bad input: ``test_bad_input.py`` (one line, exit 2, no run directory)
12. errors a restart cannot fix: ``test_launch_errors.py`` (torchrun and Ray: printed once, not
    restarted, exit 2; a failure on one rank mid-training ends every rank)
13. tier capacity checked when tiers open: ``test_tier_capacity.py``
14. leftovers: ``test_leftovers.py`` (wandb and torchelastic temp dirs, a too-long store_dir)
15. test honesty, NVMe aio: ``tests/test_tier_nvme.py::test_deepspeed_aio_backend_*`` skips with
    its reason
16. seeded kills, waits that fail on timeout, ordering by events:
    ``tests/test_checkpoint_recovery.py``, ``tests/test_tier_scheduler.py``,
    ``tests/test_tiered_optimizer.py``
17. the planner's own recompute, run end to end: ``test_planner_recompute.py``
"""
