"""The ``tierflow`` command-line tools, one module per sub-command.

Only these read ``tierflow.conf`` presets or parse arguments; the library packages never do.
"""

__all__: list = []
