"""The shell: the ``spotmesh`` command and everything it runs on one machine.

The layer above the services: the CLI commands (``main.py`` assembles them), the local mesh
supervisor (``supervisor.py``), benchmarks (``bench/``), the trace simulator (``simulate/``),
measurement tools (``measure/``), the tiny-model maker, threshold calibration and readers of
the public data (``datasets.py``). It may import ``services`` and ``spotmesh``; nothing below
imports it (``tests/test_layers.py`` checks).
"""

from __future__ import annotations

import sys


def say(msg: str) -> None:
    """Progress and errors go to stderr; what a command answers goes to stdout."""
    print(msg, file=sys.stderr, flush=True)
