"""``spotmesh preempt``: reclaim a local replica the way a cloud reclaims a spot instance."""

from __future__ import annotations

import argparse
import os
import signal
import time

import grpc

from cli import say
from cli.up import status
from services.autoscaler.actuator import reclaim_admit_seconds
from spotmesh.processes import kill_group, pid_alive
from spotmesh.statedir import StateDir, state_dir
from spotmesh.v1 import inference_pb2, inference_pb2_grpc


def cmd_preempt(a: argparse.Namespace) -> int:
    """Reclaim a replica the way a cloud reclaims a spot instance: a notice (the replica drains),
    then termination when the notice runs out; optionally no spot capacity for a while."""
    if a.notice < 0 or a.spot_unavailable_for < 0:
        say("--notice and --spot-unavailable-for must be >= 0")
        return 2
    admit = reclaim_admit_seconds(a.notice) if a.admit_seconds is None else a.admit_seconds
    if not 0 <= admit <= a.notice:
        say(f"--admit-seconds must be in [0, --notice ({a.notice:g})], got {admit:g}")
        return 2
    directory = state_dir(a.state_dir)
    doc = status(directory)
    target = next((p for p in doc["processes"]
                   if p["role"] == "inference" and p["replica"] == a.replica), None)
    if target is None or not target["pid"]:
        names = [p["replica"] for p in doc["processes"] if p["role"] == "inference"]
        say(f"no running replica {a.replica!r}; replicas: {', '.join(names) or 'none'}")
        return 2
    state = StateDir(directory)
    if a.spot_unavailable_for:
        state.make_spot_unavailable(time.time() + a.spot_unavailable_for)
    state.post_notice(a.replica, time.time())
    pid = target["pid"]
    say(f"reclaiming {a.replica} (pid {pid}): {a.notice:.0f}s notice, admitting for "
         f"{admit:.0f}s of it")
    if admit > 0 and target.get("address"):
        # The notice, as a node-termination handler would relay it: serve on while the
        # replacement starts, stop admitting `admit` seconds in, evict at the notice's end.
        try:
            with grpc.insecure_channel(target["address"]) as ch:
                inference_pb2_grpc.InferenceStub(ch).Drain(
                    inference_pb2.DrainRequest(grace_seconds=a.notice, admit_seconds=admit),
                    timeout=5.0)
        except grpc.RpcError as exc:
            say(f"Drain of {a.replica} failed ({exc.code().name}): it stops admitting now")
    # SIGTERM: the replica drains (on the terms of a Drain already under way) and exits.
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + a.notice
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        kill_group(pid)  # the instance goes, with everything running on it
        say(f"{a.replica} terminated at the end of its notice")
    else:
        say(f"{a.replica} drained and exited within its notice")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
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
