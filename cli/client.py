"""Talking to a running mesh: ``spotmesh generate`` (stream a reply) and ``spotmesh cost`` (what
the gateway booked, per tenant and pool)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import grpc

from cli import say
from spotmesh.metrics import read_metrics
from spotmesh.statedir import StateDir, read_dev_key, state_dir
from spotmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def cmd_generate(a: argparse.Namespace) -> int:
    address, key = a.address, a.api_key or os.environ.get("SPOTMESH_API_KEY")
    if not address or not key:
        state = StateDir(state_dir(a.state_dir)).load_mesh()
        if state is None or state.gateway() is None:
            say("no running mesh found: start one with `spotmesh up`, or pass --address")
            return 2
        address = address or state.gateway().address
        key = key or read_dev_key(Path(state.api_keys))
        if not key:
            say("no API key: pass --api-key or set SPOTMESH_API_KEY")
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
                    say(f"\n[{reason} | {msg.served_by.replica} "
                         f"({common_pb2.Pool.Name(msg.served_by.pool)}) | prompt "
                         f"{u.prompt_tokens} (cached {u.cached_prompt_tokens}), completion "
                         f"{u.completion_tokens} tokens | first token {first * 1000:.0f} ms | "
                         f"${msg.cost_usd:.8f}{' | cache hit' if msg.cache_hit else ''}]")
        except grpc.RpcError as exc:
            say(f"\nerror: {exc.code().name}: {exc.details()}")
            return 1
    return 0


def report_from_metrics(samples) -> dict:
    """Per-tenant and per-pool cost, tokens and savings from a gateway's /metrics samples
    (:func:`spotmesh.metrics.read_metrics`)."""
    tenants: dict[str, dict] = {}
    pools: dict[str, dict] = {}
    saved: dict[str, float] = {}

    def tenant(name: str) -> dict:
        return tenants.setdefault(name, {"cost_usd": {}, "tokens": {}, "semantic_saved_usd": 0.0})

    def pool(name: str) -> dict:
        return pools.setdefault(name, {"cost_usd": 0.0, "tokens": {}})

    for name, labels, value in samples:
        if name == "spotmesh_gateway_cost_usd_total":
            t = tenant(labels["tenant"])["cost_usd"]
            t[labels["pool"]] = t.get(labels["pool"], 0.0) + value
        elif name == "spotmesh_gateway_tokens_total":
            tenant(labels["tenant"])["tokens"][labels["kind"]] = int(value)
        elif name == "spotmesh_semantic_cache_saved_usd_total":
            tenant(labels["tenant"])["semantic_saved_usd"] = value
        elif name == "spotmesh_cost_usd_total":
            pool(labels["pool"])["cost_usd"] = value
        elif name == "spotmesh_tokens_total":
            pool(labels["pool"])["tokens"][labels["kind"]] = int(value)
        elif name == "spotmesh_saved_usd_total":
            saved[labels["tier"]] = value
    for p in pools.values():
        served = p["tokens"].get("prompt", 0) + p["tokens"].get("completion", 0)
        p["cost_per_mtok_usd"] = 1e6 * p["cost_usd"] / served if served else None
    for t in tenants.values():
        served = t["tokens"].get("prompt", 0) + t["tokens"].get("completion", 0)
        total = sum(t["cost_usd"].values())
        t["total_usd"] = total
        t["cost_per_mtok_usd"] = 1e6 * total / served if served else None
    return {"tenants": tenants, "pools": pools, "saved_usd": saved}


def cmd_cost(a: argparse.Namespace) -> int:
    """Per-tenant, per-pool cost from the running mesh's gateway."""
    address = a.metrics
    if not address:
        state = StateDir(state_dir(a.state_dir)).load_mesh()
        gw = state.gateway() if state else None
        if gw is None or not gw.metrics:
            say("no running mesh (start one with `spotmesh up`, or pass --metrics HOST:PORT)")
            return 1
        address = gw.metrics
    try:
        report = report_from_metrics(read_metrics(address))
    except OSError as exc:
        say(f"cannot read the gateway's metrics at {address}: {exc}")
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


def add_parsers(sub: argparse._SubParsersAction) -> None:
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

    co = sub.add_parser("cost", help="per-tenant, per-pool cost and savings of the running mesh")
    co.add_argument("--metrics", default="", metavar="HOST:PORT",
                    help="a gateway's metrics endpoint (default: the local mesh's gateway)")
    co.add_argument("--json", action="store_true", help="print JSON instead of tables")
    co.set_defaults(fn=cmd_cost)
