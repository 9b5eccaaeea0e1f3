"""Exporting a sentence-transformers model to ONNX for the ``onnx`` backends: once, checked
against sentence-transformers before it is published, atomically.

Exports are cached under ``$SPOTMESH_HOME/embedder`` (else ``~/.cache/spotmesh/embedder``), one
directory per model and variant, keyed by a marker naming the source model and the library
versions that produced it, so a changed model or toolchain re-exports instead of serving stale
files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from services.embedder.encoders import (
    ONNX_FILE,
    POOLING_MODES,
    SPEC_FILE,
    TOKENIZER_FILE,
    EncoderSpec,
    EncoderUnavailable,
    OnnxEncoder,
    model_name,
    require,
)
from spotmesh.files import publish_directory
from spotmesh.runtime import fields

log = logging.getLogger("spotmesh.embedder")

# Bumped whenever the exported files or their layout change, so old caches are rebuilt.
EXPORT_FORMAT = 1
MARKER_FILE = "spotmesh-export.json"
# Exports are checked against torch on this padded batch before they are published; a traced
# graph that baked in one shape or mask would fail here rather than in production.
_CHECK_TEXTS = (
    "A plane is taking off.",
    "How do I top up my card with a bank transfer from another account?",
    "ok",
)
_CHECK_TOLERANCE = 1e-3
_CHECK_FLOOR_INT8 = 0.9
# Per-tensor int8 weights cost MiniLM a mean cosine of 0.967 to fp32 (0.86 on short texts);
# per-channel scales bring it to 0.993. 7-bit weights (reduce_range) avoid the u8s8 overflow
# of CPUs without VNNI, so replicas on different hardware compute the same vectors, for about
# 0.001 of cosine.
INT8_OPTIONS: dict[str, Any] = {"per_channel": True, "reduce_range": True}
# The legacy sentence-transformers Pooling config: one flag per mode, concatenated in this order.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}




@dataclass
class SourceModel:
    path: Path
    name: str
    transformer_dir: Path
    pooling: list[str]
    max_seq_length: int
    do_lower_case: bool


def read_source(model_dir: Path) -> SourceModel:
    """The parts of a sentence-transformers directory the ONNX path re-implements; anything
    else (Dense layers, routers, ...) is refused rather than silently skipped."""
    modules = json.loads((model_dir / "modules.json").read_text())
    transformer_dir = pooling_dir = None
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        path = model_dir / module.get("path", "")
        if kind == "Transformer" and transformer_dir is None:
            transformer_dir = path
        elif kind == "Pooling" and pooling_dir is None:
            pooling_dir = path
        elif kind != "Normalize":
            raise EncoderUnavailable(
                f"{model_dir}: module {module.get('type')!r} has no ONNX equivalent here; "
                "use --backend torch"
            )
    if transformer_dir is None or pooling_dir is None:
        raise EncoderUnavailable(
            f"{model_dir}: the onnx backends need a Transformer and a Pooling module; "
            "use --backend torch"
        )
    pooling = _pooling_modes(json.loads((pooling_dir / "config.json").read_text()))
    st_config = _read_json(transformer_dir / "sentence_bert_config.json")
    hf_config = _read_json(transformer_dir / "config.json")
    tok_config = _read_json(transformer_dir / "tokenizer_config.json")
    limits = [
        st_config.get("max_seq_length"),
        tok_config.get("model_max_length"),
        hf_config.get("max_position_embeddings"),
    ]
    limits = [int(x) for x in limits if isinstance(x, int | float) and 0 < x < 1_000_000]
    if not limits:
        raise EncoderUnavailable(f"{model_dir}: no max_seq_length in sentence_bert_config.json")
    return SourceModel(
        path=model_dir.resolve(),
        name=model_name(model_dir),
        transformer_dir=transformer_dir,
        pooling=pooling,
        max_seq_length=min(limits),
        do_lower_case=bool(st_config.get("do_lower_case", False)),
    )


def _pooling_modes(config: dict) -> list[str]:
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        modes = modes or ["mean"]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    for m in modes:
        if m not in POOLING_MODES:
            raise EncoderUnavailable(f"pooling mode {m!r} is not supported; use --backend torch")
    return modes


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


# --------------------------------------------------------------------------
# Export: once, atomically, keyed by a marker


def _versions(*packages: str) -> dict[str, str]:
    out = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "absent"
    return out


def _weights_signature(transformer_dir: Path) -> dict[str, int]:
    """Sizes and mtimes of the weight files: a cheap way to notice a model replaced in place."""
    sig = {}
    for pattern in ("*.safetensors", "*.bin"):
        for f in sorted(transformer_dir.glob(pattern)):
            st = f.stat()
            sig[f.name] = st.st_size ^ int(st.st_mtime)
    return sig


def _expected_marker(src: SourceModel, quantized: bool) -> dict[str, Any]:
    return {
        "format": EXPORT_FORMAT,
        "variant": "int8" if quantized else "fp32",
        "source": str(src.path),
        "weights": _weights_signature(src.transformer_dir),
        "versions": _versions("torch", "transformers", "onnx", "onnxruntime"),
        **({"quantization": INT8_OPTIONS} if quantized else {}),
    }


def read_marker(export_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((export_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_current(export_dir: Path, expected: dict[str, Any]) -> bool:
    marker = read_marker(export_dir)
    if not marker or {k: marker.get(k) for k in expected} != expected:
        return False
    # Sizes guard against files damaged or truncated after publication.
    for name, size in marker.get("files", {}).items():
        path = export_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return bool(marker.get("files"))


def ensure_export(model_dir: Path, cache_dir: Path, *, quantized: bool) -> Path:
    """The directory holding the ONNX export of ``model_dir`` (int8 if ``quantized``), building
    it if it is missing or was made from another model or toolchain."""
    src = read_source(model_dir)
    out = cache_dir / ("onnx-int8" if quantized else "onnx")
    expected = _expected_marker(src, quantized)
    if _is_current(out, expected):
        return out
    fp32 = ensure_export(model_dir, cache_dir, quantized=False) if quantized else None
    log.info(
        "exporting encoder to ONNX",
        extra=fields(model=src.name, variant=expected["variant"], dir=str(out)),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    # Same parent, same filesystem: the final rename is atomic, so readers never see half.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make a shared cache unreadable
        if fp32 is None:
            _export_fp32(src, tmp)
        else:
            _quantize(fp32, tmp)
        _check_export(src, tmp, quantized=quantized)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        marker = {**expected, "files": files}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        publish_directory(tmp, out, lambda d: _is_current(d, expected))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _export_fp32(src: SourceModel, out: Path) -> None:
    try:
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise EncoderUnavailable(
            "exporting to ONNX needs torch, transformers and onnx once: "
            "pip install torch transformers onnx"
        ) from None
    require("onnx", "exporting to ONNX needs the onnx package: pip install onnx")

    tokenizer = AutoTokenizer.from_pretrained(str(src.transformer_dir), use_fast=True)
    if not getattr(tokenizer, "is_fast", False):
        raise EncoderUnavailable(f"{src.path}: no fast tokenizer; use --backend torch")
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise EncoderUnavailable(f"{src.path}: left-padding tokenizer; use --backend torch")
    backend_tok = tokenizer.backend_tokenizer
    # Truncation lives in the saved tokenizer, exactly as sentence-transformers asks for it;
    # padding is done per sub-batch by the encoder.
    backend_tok.enable_truncation(max_length=src.max_seq_length, strategy="longest_first")
    backend_tok.no_padding()
    backend_tok.save(str(out / TOKENIZER_FILE))

    # Eager attention: the traced SDPA path bakes the example's mask into the graph and gives
    # wrong vectors for other batches.
    model = AutoModel.from_pretrained(str(src.transformer_dir), attn_implementation="eager")
    model.eval()
    input_names = [
        n
        for n in ("input_ids", "attention_mask", "token_type_ids")
        if n in tokenizer.model_input_names
    ]

    class LastHiddenState(torch.nn.Module):
        # Keyword arguments: positional order of forward() differs between transformers versions.
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return self.inner(**dict(zip(input_names, args, strict=True))).last_hidden_state

    # A padded example, so the traced graph keeps the attention mask on its data path.
    example = tokenizer(list(_CHECK_TEXTS), padding=True, return_tensors="pt")
    args = tuple(example[n] for n in input_names)
    axes = {n: {0: "batch", 1: "sequence"} for n in [*input_names, "last_hidden_state"]}
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        # The tracer's warnings are about shapes it treats as constant; _check_export verifies
        # the graph on other shapes instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            LastHiddenState(model),
            args,
            str(out / ONNX_FILE),
            input_names=input_names,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )
    spec = EncoderSpec(
        name=src.name,
        dim=int(model.config.hidden_size) * len(src.pooling),
        max_seq_length=src.max_seq_length,
        pooling=src.pooling,
        do_lower_case=src.do_lower_case,
        input_names=input_names,
        pad_token_id=int(tokenizer.pad_token_id or 0),
    )
    (out / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2) + "\n")


def _quantize(fp32_dir: Path, out: Path) -> None:
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise EncoderUnavailable(
            "int8 quantization needs onnxruntime and onnx: pip install onnxruntime onnx"
        ) from None
    root = logging.getLogger()
    level = root.level
    # The quantizer logs one INFO line per tensor through the root logger, and a WARNING that
    # suggests shape pre-processing, which dynamic quantization of MatMul weights does not need.
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(
            str(fp32_dir / ONNX_FILE),
            str(out / ONNX_FILE),
            weight_type=QuantType.QInt8,
            **INT8_OPTIONS,
        )
    finally:
        root.setLevel(level)
    for name in (TOKENIZER_FILE, SPEC_FILE):
        shutil.copy2(fp32_dir / name, out / name)


def _check_export(src: SourceModel, export_dir: Path, *, quantized: bool) -> None:
    """Refuse to publish an export whose vectors stray from sentence-transformers'."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(src.path), device="cpu").encode(
        list(_CHECK_TEXTS), normalize_embeddings=True, convert_to_numpy=True
    )
    backend = "onnx-int8" if quantized else "onnx"
    got = OnnxEncoder(export_dir, backend, threads=1).encode(list(_CHECK_TEXTS))
    cosines = (reference * got).sum(axis=1)
    # int8 weights move vectors a little by design; a broken graph moves them a lot.
    floor = _CHECK_FLOOR_INT8 if quantized else 1 - _CHECK_TOLERANCE
    if got.shape != reference.shape or float(cosines.min()) < floor:
        raise RuntimeError(
            f"ONNX export of {src.path} disagrees with sentence-transformers "
            f"(cosines {np.round(cosines, 4).tolist()}); not publishing it"
        )
