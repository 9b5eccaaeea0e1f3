"""Run one inference replica: ``python -m services.inference --model DIR --pool spot``."""

from __future__ import annotations

import logging
import os
import sys
import tempfile

from services.inference.config import EngineConfig, InferenceConfig, parse
from services.inference.engine import Engine, EngineError
from services.inference.server import InferenceServicer
from spotmesh.home import DEFAULT_MODEL_NAME, DefaultModelMissing, built_default_model
from spotmesh.runtime import ServerProcess, add_servicer, fields, run, setup_logging
from spotmesh.v1 import inference_pb2

log = logging.getLogger("spotmesh.inference")


def build_engine(cfg: EngineConfig) -> Engine:
    """The engine named by the config, with the model it should load."""
    model = cfg.model
    if not model:
        try:
            model = str(built_default_model(cfg.quantization or None))
        except (DefaultModelMissing, ValueError) as exc:
            raise EngineError(str(exc)) from None
        # vLLM reads the quantization method from the checkpoint; the flag only chose which
        # tiny variant to build.
        cfg.quantization = ""
        cfg.served_model_name = cfg.served_model_name or DEFAULT_MODEL_NAME
    if cfg.engine == "vllm":
        from services.inference.vllm_engine import VLLMEngine

        return VLLMEngine(cfg, model)
    from services.inference.trtllm_engine import TensorRTLLMEngine

    return TensorRTLLMEngine(cfg, model)


def kv_event_relay(cfg: InferenceConfig):
    """The KV-event relay for precise prefix routing (None without --prefix-cache); turns the
    engine's event publisher on."""
    if not cfg.prefix_cache:
        return None
    from services.inference.kv_events import KvEventRelay

    endpoint = cfg.kv_events_endpoint or (
        f"ipc://{tempfile.gettempdir()}/spotmesh-kv-events-{os.getpid()}.sock")
    cfg.engine.extra.setdefault("kv_events_config", {
        "enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint})
    return KvEventRelay(endpoint, cfg.prefix_cache, cfg.prefix_token, model="",
                        capacity_blocks=0)


async def main(cfg: InferenceConfig) -> None:
    relay = kv_event_relay(cfg)
    try:
        engine = build_engine(cfg.engine)
        info = await engine.start()
    except EngineError as exc:
        log.error(str(exc))
        sys.exit(2)
    service = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    proc = ServerProcess("inference", cfg.server, [service.full_name])
    servicer = InferenceServicer(
        engine,
        info,
        replica=cfg.replica or "pending",
        pool=cfg.pool,
        drain_grace_seconds=cfg.drain_grace_seconds,
        on_draining=proc.set_not_serving,
    )
    served = await proc.start(lambda server: add_servicer(server, servicer, service))
    servicer.replica = cfg.replica or served.address
    if relay is not None:
        relay.start(servicer.replica, info.model, info.kv_capacity_blocks)
    log.info("replica ready", extra=fields(replica=servicer.replica, pool=cfg.pool,
                                           model=info.model, engine=info.engine,
                                           max_model_len=info.max_model_len,
                                           kv_capacity_blocks=info.kv_capacity_blocks))

    async def on_stop() -> None:
        await servicer.drain.start()

    try:
        await proc.serve_until_signal(on_stop, grace_seconds=1.0)
    finally:
        if relay is not None:
            await relay.close()
        await engine.shutdown()


if __name__ == "__main__":
    config = parse()
    setup_logging(config.server.log_level, config.server.log_format, "inference")
    # One engine step at a time per replica; more OpenMP threads than cores only thrash.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(lambda: main(config))
