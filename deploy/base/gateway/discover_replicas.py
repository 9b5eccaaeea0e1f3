"""Keep the gateway's replicas file equal to the ready inference pods.

The gateway re-reads ``--replicas-file`` (a JSON list of ``host:port``) whenever it changes, and
polls each replica's ``Load`` itself. On Kubernetes the pods of both pools sit behind one
headless Service, whose DNS name resolves to the IPs of the pods that are Ready (gRPC health
SERVING); this loop writes those answers into the file. DNS needs no API token and no RBAC.

A lookup that says the name does not exist (a headless Service with no ready pod) empties the
list; any other failure (the resolver briefly unreachable) keeps the last list, so a DNS hiccup
never takes every replica away from the gateway. A heartbeat file, touched on every pass, tells
the probes that the loop is alive.

Standard library only: it runs as a sidecar of the gateway pod (deploy/base/gateway), from a
ConfigMap, in the same image as the gateway.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

# glibc answers EAI_NONAME for NXDOMAIN and EAI_NODATA (where defined) for a name without
# addresses; both mean "no ready pod", not "DNS is down".
NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


class LookupFailed(RuntimeError):
    """The resolver could not answer (as opposed to answering that the name does not exist)."""


def resolve(service: str, port: int) -> list[str]:
    """The sorted addresses (``ip:port``, ``[ipv6]:port``) behind ``service``; [] when the name
    does not exist."""
    try:
        infos = socket.getaddrinfo(service, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in NO_SUCH_NAME:
            return []
        raise LookupFailed(f"resolving {service}: {exc}") from exc
    ips = {info[4][0] for info in infos}
    return sorted(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips)


def heartbeat_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.alive")


def publish(out: Path, addresses: list[str]) -> bool:
    """Write the list if it differs from the file's (atomically: the gateway never reads half a
    file, and an unchanged list leaves its mtime alone). Returns whether it changed."""
    text = json.dumps(addresses)
    try:
        if out.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    return True


def refresh(service: str, port: int, out: Path) -> list[str] | None:
    """One pass: resolve, publish, touch the heartbeat. Returns the published list, or None when
    the lookup failed and the previous list was kept."""
    try:
        addresses = resolve(service, port)
    except LookupFailed as exc:
        log("lookup failed; keeping the last list", error=str(exc))
        addresses = None
    if addresses is not None and publish(out, addresses):
        log("replicas changed", replicas=addresses)
    heartbeat_path(out).touch()
    return addresses


def is_alive(out: Path, max_age_seconds: float) -> bool:
    try:
        age = time.time() - heartbeat_path(out).stat().st_mtime
    except FileNotFoundError:
        return False
    return age <= max_age_seconds


def log(msg: str, **fields: object) -> None:
    # The same one-JSON-object-per-line shape as spotmesh's servers (spotmesh/runtime.py).
    entry = {
        "ts": round(time.time(), 3),
        "level": "info",
        "logger": "discover-replicas",
        "msg": msg,
        **fields,
    }
    print(json.dumps(entry), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--service", default="inference", help="the headless Service's DNS name")
    p.add_argument("--port", type=int, default=50061, help="the replicas' gRPC port")
    p.add_argument("--out", type=Path, help="the gateway's --replicas-file")
    p.add_argument("--interval-seconds", type=float, default=2.0)
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.add_argument(
        "--check",
        type=Path,
        metavar="OUT",
        help="probe: exit 0 if the loop writing OUT touched its heartbeat recently",
    )
    p.add_argument("--max-age-seconds", type=float, default=30.0)
    a = p.parse_args(argv)
    if a.check is not None:
        return 0 if is_alive(a.check, a.max_age_seconds) else 1
    if a.out is None:
        p.error("--out is required")
    if a.interval_seconds <= 0:
        p.error("--interval-seconds must be > 0")
    while True:
        refresh(a.service, a.port, a.out)
        if a.once:
            return 0
        time.sleep(a.interval_seconds)


if __name__ == "__main__":
    sys.exit(main())
