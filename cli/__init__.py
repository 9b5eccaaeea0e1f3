"""The shell: the ``spotmesh`` command and everything it runs on one machine.

The layer above the services: the CLI commands (``main.py`` assembles them), the local mesh
supervisor (``supervisor.py``), benchmarks (``bench/``), the trace simulator (``simulate/``),
measurement tools (``measure/``), the tiny-model maker, threshold calibration and readers of
the public data (``datasets.py``). It may import ``services`` and ``spotmesh``; nothing below
imports it (``tests/test_layers.py`` checks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_json(path: str, doc: object) -> None:
    """A result document, indented, creating the directory it goes in."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def say(msg: str) -> None:
    """Progress and errors go to stderr; what a command answers goes to stdout."""
    print(msg, file=sys.stderr, flush=True)
