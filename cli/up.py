"""``spotmesh up`` (start the whole mesh on this machine) and ``spotmesh status`` (what runs)."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli import say
from cli.supervisor import LocalMesh
from spotmesh.processes import pid_alive
from spotmesh.statedir import StateDir, state_dir


def cmd_up(a: argparse.Namespace) -> int:
    from cli.tinymodel import ensure_default_model
    from spotmesh.home import DEFAULT_MODEL_NAME

    if a.replicas < 1:
        say("--replicas must be >= 1")
        return 2
    spot = a.replicas - 1 if a.spot_replicas is None else a.spot_replicas
    if not 0 <= spot <= a.replicas:
        say(f"--spot-replicas must be in [0, {a.replicas}]")
        return 2
    if a.model:
        model, name = a.model, a.served_model_name or Path(a.model).name
    else:
        say("building the tiny offline model (first run only)...")
        model = str(ensure_default_model(a.quantization or None))
        name = a.served_model_name or DEFAULT_MODEL_NAME
    inference_args = [] if a.no_enforce_eager else ["--enforce-eager"]
    if a.max_model_len:
        inference_args += ["--max-model-len", str(a.max_model_len)]
    if a.stream_interval != 1:
        inference_args += ["--stream-interval", str(a.stream_interval)]
    if a.kv_capacity_blocks:
        # vLLM's num_gpu_blocks_override: a KV cache smaller than --kv-cache-gib allows (to
        # study eviction and routing on a machine with plenty of memory).
        inference_args += ["--engine-args",
                           json.dumps({"num_gpu_blocks_override": a.kv_capacity_blocks})]
    directory = state_dir(a.state_dir)
    mesh = LocalMesh(
        directory,
        replicas=a.replicas,
        spot_replicas=spot,
        port=a.port,
        api_keys=a.api_keys,
        model=model,
        served_model_name=name,
        inference_args=inference_args,
        kv_cache_gib=a.kv_cache_gib,
        semantic_cache=not a.no_cache,
        cache_milvus_uri=a.cache_milvus_uri,
        routing=a.routing,
        prefix_mode=a.prefix_mode,
        autoscale=a.autoscale,
        autoscale_args=shlex.split(a.autoscale_args),
        log=say,
    )
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        state = mesh.start(timeout=a.start_timeout)
    except RuntimeError as exc:
        say(f"spotmesh up failed: {exc}")
        mesh.stop(grace=5)
        return 1
    gw = state.gateway()
    assert gw is not None
    key = mesh.dev_key or "<a key from your --api-keys file>"
    print(f"spotmesh is up: gateway {gw.address} (state {directory})", flush=True)
    print(f"development API key: {key}", flush=True)
    print("try it:", flush=True)
    print('  spotmesh generate "Tell me about spot instances"', flush=True)
    print(f"  grpcurl -plaintext -H 'authorization: Bearer {key}' -d "
          f"'{{\"prompt\": \"Hello\", \"sampling\": {{\"max_tokens\": 16}}}}' "
          f"{gw.address} spotmesh.v1.Gateway/Generate", flush=True)
    print("Ctrl-C stops the mesh.", flush=True)
    mesh.watch(lambda: stop["now"])
    say("stopping the mesh...")
    mesh.stop()
    say("stopped")
    return 0


def health_of(address: str, timeout: float = 1.0) -> str:
    """SERVING / NOT_SERVING from the standard gRPC health service, or UNREACHABLE."""
    try:
        with grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    except grpc.RpcError:
        return "UNREACHABLE"


def status(directory: Path) -> dict:
    """The running mesh as ``spotmesh status`` prints it."""
    sd = StateDir(directory)
    state = sd.load_mesh()
    if state is None or not pid_alive(state.supervisor_pid):
        return {"state_dir": str(directory), "running": False, "processes": []}
    procs = []
    for p in state.processes:
        alive = pid_alive(p.pid)
        procs.append({
            "role": p.role,
            "replica": p.replica,
            "pid": p.pid,
            "address": p.address,
            "pool": p.pool,
            "metrics": p.metrics,
            "health": health_of(p.address) if alive and p.address else
            ("STARTING" if alive else "EXITED"),
        })
    try:
        record = sd.load_autoscaler()
    except ValueError:
        record = None
    for m in record.instances if record else []:
        alive = pid_alive(m.pid) if m.pid else False
        procs.append({
            "role": "inference", "replica": m.name, "pid": m.pid,
            "address": m.address, "pool": m.pool, "metrics": m.metrics,
            "managed_by": "autoscaler",
            "health": ("DRAINING" if m.draining else
                       health_of(m.address) if alive and m.address else
                       "STARTING" if alive else
                       "PENDING" if not m.pid else "EXITED"),
        })
    return {"state_dir": str(directory), "running": True, "api_keys": state.api_keys,
            "processes": procs}


def cmd_status(a: argparse.Namespace) -> int:
    doc = status(state_dir(a.state_dir))
    print(json.dumps(doc, indent=2))
    return 0 if doc["running"] else 1


def add_parsers(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start the whole mesh on this machine")
    up.add_argument("--replicas", type=int, default=2)
    up.add_argument("--spot-replicas", type=int, default=None,
                    help="how many replicas run in the spot pool (default: all but one)")
    up.add_argument("--port", type=int, default=50051, help="the gateway's port")
    up.add_argument("--api-keys", default=None, help="API keys file (default: a dev key)")
    up.add_argument("--model", default="", help="model directory (default: the tiny model)")
    up.add_argument("--served-model-name", default="")
    up.add_argument("--quantization", choices=["", "awq", "w8a8"], default="",
                    help="serve a quantized variant of the tiny model")
    up.add_argument("--max-model-len", type=int, default=0)
    up.add_argument("--kv-cache-gib", type=int, default=1, help="KV cache per CPU replica, GiB")
    up.add_argument("--stream-interval", type=int, default=1,
                    help="tokens per streamed message (vLLM stream_interval)")
    up.add_argument("--no-enforce-eager", action="store_true",
                    help="let vLLM compile graphs (slower start, faster decode)")
    up.add_argument("--start-timeout", type=float, default=300.0)
    up.add_argument("--no-cache", action="store_true",
                    help="run without the embedder and the semantic cache (the prefix index "
                         "still runs)")
    up.add_argument("--routing", choices=["prefix", "round-robin"], default="prefix",
                    help="prefix: prefix affinity balanced against load; round-robin: baseline")
    up.add_argument("--prefix-mode", choices=["approximate", "precise"], default="approximate",
                    help="approximate: gateways record where they routed; precise: replicas "
                         "relay their engines' KV-cache events")
    up.add_argument("--autoscale", action="store_true",
                    help="let the autoscaler start and stop replicas (spot and on-demand) "
                         "from load; --replicas is then ignored")
    up.add_argument("--autoscale-args", default="",
                    help="flags for the autoscaler, e.g. \"--target-load 4 --spot-max 3\" "
                         "(python -m services.autoscaler --help)")
    up.add_argument("--kv-capacity-blocks", type=int, default=0,
                    help="cap each replica's KV cache at this many blocks (0: --kv-cache-gib)")
    up.add_argument("--cache-milvus-uri", default="",
                    help="a Milvus server for the semantic cache (default: embedded "
                         "milvus-lite in the state directory)")
    up.set_defaults(fn=cmd_up)

    st = sub.add_parser("status", help="print the running mesh as JSON")
    st.set_defaults(fn=cmd_status)
