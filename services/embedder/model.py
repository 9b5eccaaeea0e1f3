"""Which encoder the embedder runs: a backend (``encoders.BACKENDS``) over a sentence-transformers
model directory (default: the bundled all-MiniLM-L6-v2), the ONNX ones exported on first use
(``onnx_export``) into the spotmesh home."""

from __future__ import annotations

from pathlib import Path

from services.embedder.encoders import (
    Encoder,
    EncoderUnavailable,
    OnnxEncoder,
    TorchEncoder,
    default_model_dir,
    model_name,
    require,
)
from services.embedder.onnx_export import ensure_export
from spotmesh.home import home

BACKENDS = ("torch", "onnx", "onnx-int8")


def default_cache_dir() -> Path:
    return home() / "embedder"


def load_encoder(
    backend: str, model_dir: str | None, cache_dir: str | None = None, threads: int = 1
) -> Encoder:
    """Build the encoder for ``backend`` from a sentence-transformers model directory (default:
    the bundled all-MiniLM-L6-v2). ONNX backends export on first use into ``cache_dir`` and
    reuse the export afterwards. Raises :class:`EncoderUnavailable` with one actionable line."""
    if backend not in BACKENDS:
        raise EncoderUnavailable(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if threads < 1:
        raise EncoderUnavailable(f"threads must be >= 1, got {threads}")
    source = Path(model_dir).expanduser() if model_dir else default_model_dir()
    if not (source / "modules.json").is_file():
        raise EncoderUnavailable(
            f"{source} is not a sentence-transformers model directory (no modules.json)"
        )
    name = model_name(source)
    if backend == "torch":
        return TorchEncoder(source, name, threads)
    require("onnxruntime", "the onnx backends run on ONNX Runtime: pip install onnxruntime")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    export = ensure_export(source, cache / name, quantized=backend == "onnx-int8")
    return OnnxEncoder(export, backend, threads)
