"""Configuration of the embedder: one typed object, flags and environment in one place."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from services.embedder.model import BACKENDS
from spotmesh.config import ServerConfig, add_server_flags, server_config_from_args

# The contract's bounds (protos/spotmesh/v1/embedder.proto).
MAX_TEXTS = 256
MAX_TEXT_BYTES = 64 * 1024
# A request at the contract's limits is 16 MiB of text; the shared 1 MiB default would turn a
# valid request into RESOURCE_EXHAUSTED before the servicer could name the field at fault.
# 16 bytes per text cover the field tag and length prefix.
DEFAULT_MAX_MESSAGE_BYTES = MAX_TEXTS * (MAX_TEXT_BYTES + 16) + (64 << 10)

# The default is chosen by cache precision first, then speed. Measured with 1 thread on a 2-core
# AMD EPYC (`python -m cli.measure.embedder`, benchmarks/results/embedder-backends.json);
# Banking77: 2000 test queries vs N stored train queries per intent (10 intents held out as
# out-of-scope), hit rate at the lowest threshold with precision >= 0.97, mean of 5 draws:
#
#   backend    1 text  32 texts/s  cos vs torch  STS-B rho  hit@P.97 N=1 / N=10  AP N=10
#   torch      8.2 ms     205        1.0000       0.8185      0.0379 / 0.2283     0.9207
#   onnx       3.2 ms     435        1.0000       0.8185      0.0379 / 0.2283     0.9207
#   onnx-int8  0.8 ms    1241        0.9922       0.8185      0.0361 / 0.2163     0.9186
#
# onnx (fp32) computes torch's vectors, 2.5x faster. int8 is 4x faster again but loses cache
# hits: at N=10 its hit rate at P >= 0.97 is 0.012 lower (5% of hits; twice the paired
# standard error is 0.010) and its average precision is lower in all 5 draws (-0.0021, twice
# the standard error 0.0012). A cache is worth its hits at a fixed false-hit budget, and 3 ms is
# far inside the gateway's 1 s embed deadline, so fp32 it is; --backend onnx-int8 remains for
# CPU-starved deployments.
DEFAULT_BACKEND = "onnx"


@dataclass
class EmbedderConfig:
    server: ServerConfig
    backend: str = DEFAULT_BACKEND
    model: str = ""  # a sentence-transformers model directory; empty: all-MiniLM-L6-v2
    cache_dir: str = ""  # ONNX exports; empty: $SPOTMESH_HOME/embedder or ~/.cache/...
    max_batch_size: int = 64  # texts per encoder call
    # How long the first caller of a batch waits for company. Callers arriving while a batch is
    # being encoded are merged regardless, so this only adds batching at light load. On 2 CPU
    # cores (onnx, loopback) 2 ms raised a lone caller's p50 from 4.9 to 7.3 ms and 16 callers'
    # throughput did not rise (466 vs 491 req/s at 0 ms): on a CPU a batch costs nearly the sum
    # of its texts. Waiting pays off where a batch costs little more than one text (a GPU), so
    # the default does not wait; raise it for a GPU embedder.
    max_wait_ms: float = 0.0
    max_queue: int = 4096  # texts waiting; beyond it: RESOURCE_EXHAUSTED
    threads: int = 1  # encoder intra-op threads


def parse(argv: list[str] | None = None) -> EmbedderConfig:
    p = argparse.ArgumentParser(prog="python -m services.embedder", description=__doc__)
    add_server_flags(p, default_port=50071)
    p.set_defaults(max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES)
    d = EmbedderConfig(server=ServerConfig())
    p.add_argument("--backend", choices=BACKENDS, default=d.backend)
    p.add_argument(
        "--model",
        default=d.model,
        metavar="DIR",
        help="sentence-transformers model directory (default: all-MiniLM-L6-v2)",
    )
    p.add_argument(
        "--cache-dir", default=d.cache_dir, metavar="DIR", help="where ONNX exports are kept"
    )
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms)
    p.add_argument("--max-queue", type=int, default=d.max_queue)
    p.add_argument("--threads", type=int, default=d.threads)
    a = p.parse_args(argv)
    if a.max_batch_size < 1:
        p.error("--max-batch-size must be >= 1")
    if a.max_wait_ms < 0:
        p.error("--max-wait-ms must be >= 0")
    if a.max_queue < MAX_TEXTS:
        # Smaller, and a valid request of MAX_TEXTS texts could never be admitted.
        p.error(f"--max-queue must be >= {MAX_TEXTS}")
    if a.threads < 1:
        p.error("--threads must be >= 1")
    return EmbedderConfig(
        server=server_config_from_args(a),
        backend=a.backend,
        model=a.model,
        cache_dir=a.cache_dir,
        max_batch_size=a.max_batch_size,
        max_wait_ms=a.max_wait_ms,
        max_queue=a.max_queue,
        threads=a.threads,
    )
