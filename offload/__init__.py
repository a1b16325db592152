"""tierflow's offload engine: storage tiers, planners, the simulator and the runtime.

Filled by the tier-engine, planner and runtime issues; importable on its own, without ``trainer``.
"""

__all__: list = []
