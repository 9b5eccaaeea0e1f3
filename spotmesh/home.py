"""Where spotmesh keeps what it can rebuild on a machine: ``$SPOTMESH_HOME``, else
``~/.cache/spotmesh`` (tests and CI point it at a scratch directory).

Two things live there: the embedder's ONNX exports (``embedder/``) and the default model
(``models/spotmesh-tiny[-VARIANT]``), the random-weight tiny model that `spotmesh up` builds
(``spotmesh model make-tiny``) and a replica or gateway started without ``--model`` serves.
The maker lives in the shell (``cli/tinymodel.py``); the services only need to know where it
put the model and whether it is there.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "SPOTMESH_HOME"
DEFAULT_MODEL_NAME = "spotmesh-tiny"
# The tiny model's variants: None (bf16), "awq" (4-bit), "w8a8" (int8).
TINY_MODEL_VARIANTS: tuple[str | None, ...] = (None, "awq", "w8a8")
# The maker writes this file last, so its presence means a finished model.
TINY_MODEL_MARKER = "spotmesh_tiny.json"


def home() -> Path:
    value = os.environ.get(HOME_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "spotmesh"


def tiny_variant(quantization: str | None) -> str:
    """The tiny model's variant name for ``quantization`` ("fp", "awq", "w8a8"); ValueError
    for a quantization it has no variant of."""
    if quantization not in TINY_MODEL_VARIANTS:
        raise ValueError(f"unsupported quantization {quantization!r}; expected one of "
                         f"{TINY_MODEL_VARIANTS}")
    return quantization or "fp"


def default_model_dir(quantization: str | None = None) -> Path:
    """Where the default tiny model of ``quantization`` lives (built or not)."""
    variant = tiny_variant(quantization)
    name = DEFAULT_MODEL_NAME if variant == "fp" else f"{DEFAULT_MODEL_NAME}-{variant}"
    return home() / "models" / name


class DefaultModelMissing(RuntimeError):
    """A server was started without ``--model`` before the default model was built."""


def built_default_model(quantization: str | None = None) -> Path:
    """The default model's directory; :class:`DefaultModelMissing` (one line saying what to run)
    when it has not been built."""
    path = default_model_dir(quantization)
    if not (path / TINY_MODEL_MARKER).is_file():
        flag = f" --quantization {quantization}" if quantization else ""
        raise DefaultModelMissing(
            f"no --model given and the default model is not built at {path}: run `spotmesh "
            f"model make-tiny {path}{flag}` (spotmesh up builds it) or pass --model DIR")
    return path
