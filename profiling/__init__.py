"""tierflow's tensor-lifetime profiler: traces, memory timelines, reports.

Filled by the profiler issue; importable on its own, without ``trainer``.
"""

__all__: list = []
