"""Run the embedder: ``python -m services.embedder --port 0 --ready-file F [--backend onnx]``.

The model is loaded (and on first use exported to ONNX) before the server listens, so health
reports SERVING only once an Embed call can be answered at full speed.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from services.embedder.batcher import MicroBatcher
from services.embedder.config import EmbedderConfig, parse
from services.embedder.encoders import EncoderUnavailable
from services.embedder.model import load_encoder
from services.embedder.server import EmbedderServicer
from spotmesh.runtime import ServerProcess, add_servicer, fields, run, setup_logging
from spotmesh.v1 import embedder_pb2

log = logging.getLogger("spotmesh.embedder")


async def main(cfg: EmbedderConfig) -> None:
    started = time.perf_counter()
    try:
        encoder = load_encoder(cfg.backend, cfg.model or None, cfg.cache_dir or None, cfg.threads)
    except EncoderUnavailable as exc:
        log.error(str(exc))
        sys.exit(2)
    # The first call of a fresh session allocates and plans; pay for it before serving.
    encoder.encode(["warm-up"])
    log.info(
        "encoder ready",
        extra=fields(
            model=encoder.name,
            backend=encoder.backend,
            dim=encoder.dim,
            threads=cfg.threads,
            load_seconds=round(time.perf_counter() - started, 2),
        ),
    )
    batcher = MicroBatcher(
        encoder,
        max_batch_size=cfg.max_batch_size,
        max_wait_ms=cfg.max_wait_ms,
        max_queue=cfg.max_queue,
    )
    service = embedder_pb2.DESCRIPTOR.services_by_name["Embedder"]
    proc = ServerProcess("embedder", cfg.server, [service.full_name])
    servicer = EmbedderServicer(batcher)
    await proc.start(lambda server: add_servicer(server, servicer, service))
    try:
        # Calls already admitted finish within the grace period; the batcher keeps encoding
        # until the server has stopped.
        await proc.serve_until_signal(grace_seconds=5.0)
    finally:
        await batcher.close()


if __name__ == "__main__":
    config = parse()
    setup_logging(config.server.log_level, config.server.log_format, "embedder")
    # The encoder's own threads are the parallelism; tokenizer threads on top only contend.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(lambda: main(config))
