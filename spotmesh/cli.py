"""The ``spotmesh`` command: run a mesh, talk to it, build its tiny model, benchmark it."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_up(a: argparse.Namespace) -> int:
    from spotmesh.mesh import LocalMesh, state_dir
    from spotmesh.tinymodel import DEFAULT_MODEL_NAME, ensure_default_model

    if a.replicas < 1:
        _err("--replicas must be >= 1")
        return 2
    spot = a.replicas - 1 if a.spot_replicas is None else a.spot_replicas
    if not 0 <= spot <= a.replicas:
        _err(f"--spot-replicas must be in [0, {a.replicas}]")
        return 2
    if a.model:
        model, name = a.model, a.served_model_name or Path(a.model).name
    else:
        _err("building the tiny offline model (first run only)...")
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
        log=_err,
    )
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        state = mesh.start(timeout=a.start_timeout)
    except RuntimeError as exc:
        _err(f"spotmesh up failed: {exc}")
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
    _err("stopping the mesh...")
    mesh.stop()
    _err("stopped")
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    from spotmesh.mesh import state_dir, status

    doc = status(state_dir(a.state_dir))
    print(json.dumps(doc, indent=2))
    return 0 if doc["running"] else 1


def cmd_cost(a: argparse.Namespace) -> int:
    """Per-tenant, per-pool cost from the running mesh's gateway."""
    from services.gateway.ledger import report_from_metrics
    from spotmesh.mesh import MeshState, state_dir
    from spotmesh.metrics import read_metrics

    address = a.metrics
    if not address:
        state = MeshState.load(state_dir(a.state_dir))
        gw = state.gateway() if state else None
        if gw is None or not gw.metrics:
            _err("no running mesh (start one with `spotmesh up`, or pass --metrics HOST:PORT)")
            return 1
        address = gw.metrics
    try:
        report = report_from_metrics(read_metrics(address))
    except OSError as exc:
        _err(f"cannot read the gateway's metrics at {address}: {exc}")
        return 1
    if a.json:
        print(json.dumps(report, indent=2))
        return 0

    def per_mtok(v):
        return f"{v:.4f}" if v is not None else "-"

    print(f"{'tenant':<20} {'pool':<10} {'cost $':>12} {'tokens':>10} {'$ / 1M tok':>11}")
    for name, t in sorted(report["tenants"].items()):
        tokens = t["tokens"].get("prompt", 0) + t["tokens"].get("completion", 0)
        for pool_name, cost in sorted(t["cost_usd"].items()):
            print(f"{name:<20} {pool_name:<10} {cost:>12.6f}")
        print(f"{name:<20} {'all':<10} {t['total_usd']:>12.6f} {tokens:>10} "
              f"{per_mtok(t['cost_per_mtok_usd']):>11}   semantic cache saved "
              f"${t['semantic_saved_usd']:.6f}")
    print()
    print(f"{'pool':<10} {'cost $':>12} {'prompt':>10} {'cached':>10} {'completion':>10} "
          f"{'$ / 1M tok':>11}")
    for name, p in sorted(report["pools"].items()):
        tk = p["tokens"]
        print(f"{name:<10} {p['cost_usd']:>12.6f} {tk.get('prompt', 0):>10} "
              f"{tk.get('cached_prompt', 0):>10} {tk.get('completion', 0):>10} "
              f"{per_mtok(p['cost_per_mtok_usd']):>11}")
    print()
    for tier, usd in sorted(report["saved_usd"].items()):
        print(f"saved by the {tier} tier: ${usd:.6f}")
    return 0


def cmd_preempt(a: argparse.Namespace) -> int:
    """Reclaim a replica the way a cloud reclaims a spot instance: a notice (the replica drains),
    then termination when the notice runs out; optionally no spot capacity for a while."""
    from services.autoscaler.actuator import reclaim_admit_seconds
    from services.autoscaler.local import kill_group
    from spotmesh.files import write_atomically
    from spotmesh.mesh import pid_alive, state_dir, status

    if a.notice < 0 or a.spot_unavailable_for < 0:
        _err("--notice and --spot-unavailable-for must be >= 0")
        return 2
    admit = reclaim_admit_seconds(a.notice) if a.admit_seconds is None else a.admit_seconds
    if not 0 <= admit <= a.notice:
        _err(f"--admit-seconds must be in [0, --notice ({a.notice:g})], got {admit:g}")
        return 2
    directory = state_dir(a.state_dir)
    doc = status(directory)
    target = next((p for p in doc["processes"]
                   if p["role"] == "inference" and p["replica"] == a.replica), None)
    if target is None or not target["pid"]:
        names = [p["replica"] for p in doc["processes"] if p["role"] == "inference"]
        _err(f"no running replica {a.replica!r}; replicas: {', '.join(names) or 'none'}")
        return 2
    home = directory / "autoscaler"
    if a.spot_unavailable_for:
        write_atomically(home / "market.json", json.dumps(
            {"unavailable_until": time.time() + a.spot_unavailable_for}))
    write_atomically(home / "notices" / a.replica, json.dumps({"at": time.time()}))
    pid = target["pid"]
    _err(f"reclaiming {a.replica} (pid {pid}): {a.notice:.0f}s notice, admitting for "
         f"{admit:.0f}s of it")
    if admit > 0 and target.get("address"):
        # The notice, as a node-termination handler would relay it: serve on while the
        # replacement starts, stop admitting `admit` seconds in, evict at the notice's end.
        import grpc

        from spotmesh.v1 import inference_pb2, inference_pb2_grpc

        try:
            with grpc.insecure_channel(target["address"]) as ch:
                inference_pb2_grpc.InferenceStub(ch).Drain(
                    inference_pb2.DrainRequest(grace_seconds=a.notice, admit_seconds=admit),
                    timeout=5.0)
        except grpc.RpcError as exc:
            _err(f"Drain of {a.replica} failed ({exc.code().name}): it stops admitting now")
    # SIGTERM: the replica drains (on the terms of a Drain already under way) and exits.
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + a.notice
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        kill_group(pid)  # the instance goes, with everything running on it
        _err(f"{a.replica} terminated at the end of its notice")
    else:
        _err(f"{a.replica} drained and exited within its notice")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    import grpc

    from spotmesh.mesh import MeshState, read_dev_key, state_dir
    from spotmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    address, key = a.address, a.api_key or os.environ.get("SPOTMESH_API_KEY")
    if not address or not key:
        state = MeshState.load(state_dir(a.state_dir))
        if state is None or state.gateway() is None:
            _err("no running mesh found: start one with `spotmesh up`, or pass --address")
            return 2
        address = address or state.gateway().address
        key = key or read_dev_key(Path(state.api_keys))
        if not key:
            _err("no API key: pass --api-key or set SPOTMESH_API_KEY")
            return 2
    sampling = common_pb2.SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature)
    if a.seed is not None:
        sampling.seed = a.seed
    req = gateway_pb2.GenerateRequest(model=a.model, sampling=sampling)
    if a.chat:
        req.messages.append(gateway_pb2.ChatMessage(role="user", content=a.prompt))
    else:
        req.prompt = a.prompt
    started = time.monotonic()
    first = None
    with grpc.insecure_channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        try:
            for msg in stub.Generate(req, metadata=[("authorization", f"Bearer {key}")],
                                     timeout=a.timeout):
                if first is None:
                    first = time.monotonic() - started
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                if msg.finish_reason:
                    u = msg.usage
                    reason = common_pb2.FinishReason.Name(msg.finish_reason)
                    _err(f"\n[{reason} | {msg.served_by.replica} "
                         f"({common_pb2.Pool.Name(msg.served_by.pool)}) | prompt "
                         f"{u.prompt_tokens} (cached {u.cached_prompt_tokens}), completion "
                         f"{u.completion_tokens} tokens | first token {first * 1000:.0f} ms | "
                         f"${msg.cost_usd:.8f}{' | cache hit' if msg.cache_hit else ''}]")
        except grpc.RpcError as exc:
            _err(f"\nerror: {exc.code().name}: {exc.details()}")
            return 1
    return 0


def cmd_make_tiny(a: argparse.Namespace) -> int:
    from spotmesh.tinymodel import make_tiny

    out = make_tiny(a.dir, quantization=a.quantization or None, seed=a.seed)
    print(out)
    return 0


def cmd_proto_gen(a: argparse.Namespace) -> int:
    from spotmesh import protogen

    return protogen.main()


def cmd_bench_cache(a: argparse.Namespace) -> int:
    from spotmesh.bench import cache

    return cache.main(a)


def cmd_bench_prefix_sim(a: argparse.Namespace) -> int:
    from spotmesh.bench import prefix_sim

    return prefix_sim.main(a)


def cmd_bench_prefix(a: argparse.Namespace) -> int:
    from spotmesh.bench import prefix

    return prefix.main(a)


def cmd_cache_calibrate(a: argparse.Namespace) -> int:
    from services.cache import calibrate

    return calibrate.main(a.passthrough_args)


def cmd_bench_serve(a: argparse.Namespace) -> int:
    from spotmesh.bench import serve

    return serve.main(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spotmesh", description=__doc__)
    p.add_argument("--state-dir", default=None,
                   help="where the mesh keeps its state (default $SPOTMESH_STATE_DIR or "
                        "~/.local/state/spotmesh/default)")
    sub = p.add_subparsers(dest="command", required=True)

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

    co = sub.add_parser("cost", help="per-tenant, per-pool cost and savings of the running mesh")
    co.add_argument("--metrics", default="", metavar="HOST:PORT",
                    help="a gateway's metrics endpoint (default: the local mesh's gateway)")
    co.add_argument("--json", action="store_true", help="print JSON instead of tables")
    co.set_defaults(fn=cmd_cost)

    pe = sub.add_parser("preempt", help="reclaim a replica as a cloud reclaims spot: a notice "
                                        "(it drains), then termination")
    pe.add_argument("replica", help="the replica's name, e.g. spot-1 (see spotmesh status)")
    pe.add_argument("--notice", type=float, default=30.0,
                    help="seconds between the notice and termination (AWS gives 120)")
    pe.add_argument("--admit-seconds", type=float, default=None,
                    help="seconds of the notice the replica keeps admitting new streams "
                         "(default: all but the last 30 s; 0 stops admission at the notice)")
    pe.add_argument("--spot-unavailable-for", type=float, default=0.0,
                    help="also make spot capacity unavailable for this many seconds")
    pe.set_defaults(fn=cmd_preempt)

    from services.autoscaler import simulate

    simulate.add_parser(sub)

    st = sub.add_parser("status", help="print the running mesh as JSON")
    st.set_defaults(fn=cmd_status)

    gen = sub.add_parser("generate", help="stream a reply to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message")
    gen.add_argument("--model", default="")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--address", default="")
    gen.add_argument("--api-key", default="")
    gen.add_argument("--timeout", type=float, default=120.0)
    gen.set_defaults(fn=cmd_generate)

    model = sub.add_parser("model", help="model utilities").add_subparsers(dest="sub",
                                                                           required=True)
    mt = model.add_parser("make-tiny", help="write the tiny offline Llama model")
    mt.add_argument("dir")
    mt.add_argument("--quantization", choices=["", "awq", "w8a8"], default="")
    mt.add_argument("--seed", type=int, default=0)
    mt.set_defaults(fn=cmd_make_tiny)

    proto = sub.add_parser("proto", help="contract utilities").add_subparsers(dest="sub",
                                                                             required=True)
    pg = proto.add_parser("gen", help="regenerate spotmesh/v1 from protos/")
    pg.set_defaults(fn=cmd_proto_gen)

    cache = sub.add_parser("cache", help="semantic-cache tools").add_subparsers(dest="sub",
                                                                               required=True)
    cal = cache.add_parser("calibrate", add_help=False,
                           help="choose a similarity threshold from labelled data "
                                "(calibrate --help for its options)")
    cal.set_defaults(fn=cmd_cache_calibrate, passthrough=True)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="sub", required=True)
    bs = bench.add_parser("serve", help="through-mesh vs engine-direct tokens/s and TTFT")
    bs.add_argument("--concurrency", default="1,8,32")
    bs.add_argument("--requests", type=int, default=0,
                    help="requests per concurrency level (default 4x concurrency, >= 16)")
    bs.add_argument("--max-tokens", type=int, default=64)
    bs.add_argument("--stream-interval", type=int, default=1,
                    help="vLLM stream_interval on both sides (tokens per streamed chunk)")
    bs.add_argument("--prompts", default="",
                    help="JSONL of prompts (default: ../shared/data/prefix_cache/"
                         "awesome_chatgpt_system_prompts.jsonl when present)")
    bs.add_argument("--json", default="", help="write the results here")
    bs.add_argument("--model", default="")
    bs.set_defaults(fn=cmd_bench_serve)
    bc = bench.add_parser("cache", help="semantic-cache hit rate, precision and latency on "
                                        "labelled queries, through a mesh")
    bc.add_argument("--intents", default="",
                    help="Banking77-style CSV split,intent,text (default: ../shared/data/"
                         "semantic_cache/banking77_intents.csv)")
    bc.add_argument("--split", default="test")
    bc.add_argument("--queries", type=int, default=1000, help="queries after the seeds")
    bc.add_argument("--prefill", type=int, default=10000, help="unrelated entries cached first")
    bc.add_argument("--threshold", type=float, default=0.0,
                    help="the tenant's similarity threshold (default: spotmesh's)")
    bc.add_argument("--oos-intents", type=int, default=10,
                    help="intents held out of the seeds (out-of-scope questions)")
    bc.add_argument("--max-tokens", type=int, default=24)
    bc.add_argument("--dim", type=int, default=384, help="embedding dimension")
    bc.add_argument("--seed", type=int, default=0)
    bc.add_argument("--milvus-server", action="store_true",
                    help="back the cache with a real Milvus 2.3.5 server (the `milvus` "
                         "package, in its own network namespace) instead of milvus-lite")
    bc.add_argument("--lookup-consistency", default="",
                    choices=["", "Session", "Bounded", "Eventually", "Strong"],
                    help="the cache's lookup consistency on a Milvus server (default: what "
                         "spotmesh up uses, Bounded)")
    bc.add_argument("--cache-args", default="",
                    help="more flags for the cache process, e.g. '--flush-every 32'")
    bc.add_argument("--json", default="")
    bc.set_defaults(fn=cmd_bench_cache)
    bp = bench.add_parser("prefix-sim", help="prefix-aware routing replayed on a trace of "
                                             "block hashes (simulated KV caches)")
    bp.add_argument("--trace", default="",
                    help="Mooncake-format JSONL (default: ../shared/data/prefix_cache/"
                         "mooncake_fast25_synthetic_trace.jsonl)")
    bp.add_argument("--replicas", type=int, default=4)
    bp.add_argument("--capacity-blocks", type=int, default=4096)
    bp.add_argument("--prefix-weight", type=float, default=1.0)
    bp.add_argument("--queue-weight", type=float, default=1.0)
    bp.add_argument("--kv-weight", type=float, default=0.2)
    bp.add_argument("--queue-tolerance", type=float, default=4.0,
                    help="queued requests that cancel a full prefix match")
    bp.add_argument("--json", default="")
    bp.set_defaults(fn=cmd_bench_prefix_sim)
    from spotmesh.bench import load

    ld = bench.add_parser("load", help="many concurrent streams, or a real arrival trace, "
                                       "through one gateway")
    load.add_arguments(ld)
    ld.set_defaults(fn=load.main)
    bl = bench.add_parser("prefix", help="prefix-aware vs round-robin routing through live "
                                         "meshes (vLLM's own prefix-cache counters, TTFT)")
    bl.add_argument("--replicas", type=int, default=2)
    bl.add_argument("--kv-capacity-blocks", type=int, default=96,
                    help="KV blocks per replica (128 tokens each on CPU)")
    bl.add_argument("--system-prompts", type=int, default=48,
                    help="distinct system prompts (of 256-1200 tokens) in the workload")
    bl.add_argument("--min-prompt-tokens", type=int, default=256)
    bl.add_argument("--max-prompt-tokens", type=int, default=1200)
    bl.add_argument("--block-size", type=int, default=128,
                    help="the engines' KV block size (vLLM CPU: 128), for the ideal hit ratio")
    bl.add_argument("--requests", type=int, default=400)
    bl.add_argument("--concurrency", type=int, default=4)
    bl.add_argument("--max-tokens", type=int, default=8)
    bl.add_argument("--seed", type=int, default=0)
    bl.add_argument("--policies", default="",
                    help="comma-separated subset of prefix_approximate, prefix_precise, "
                         "round_robin (default: all)")
    bl.add_argument("--prompts", default="",
                    help="JSONL with a 'prompt' field (default: ../shared/data/prefix_cache/"
                         "awesome_chatgpt_system_prompts.jsonl)")
    bl.add_argument("--model", default="")
    bl.add_argument("--json", default="")
    bl.set_defaults(fn=cmd_bench_prefix)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        # Tools with their own option parser (and --help) get the rest of the command line.
        args.passthrough_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
