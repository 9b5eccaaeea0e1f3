"""The local-process actuator: inference replicas as processes on this machine, labelled spot or
on-demand, for ``spotmesh up --autoscale`` (and for trying the autoscaler without a cloud).

Everything it knows lives in the state directory, so it is level-triggered and restart-safe::

    autoscaler/instances.json   every replica it started: name, pool, pid, ready file, since
    autoscaler/market.json      the local "spot market": {"unavailable_until": unix seconds}
    autoscaler/notices/NAME     a reclaim notice (`spotmesh preempt` writes it)
    replicas.json               ready replicas' addresses, which the gateway re-reads

A restarted autoscaler re-reads ``instances.json`` and adopts the processes still alive. A
spot launch while the market says spot is unavailable stays *pending* (no process), as a cloud
request does, until capacity returns or the policy gives up on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from services.autoscaler.actuator import Actuator, Instance, Observation
from spotmesh.files import write_atomically
from spotmesh.mesh import pid_alive
from spotmesh.runtime import fields

log = logging.getLogger("spotmesh.autoscaler")

POOL_PREFIX = {"spot": "spot", "on-demand": "od"}


@dataclass
class Managed:
    name: str
    pool: str
    created_at: float
    pid: int = 0  # 0: not launched (spot capacity unavailable)
    ready_file: str = ""
    log: str = ""
    draining: bool = False  # the autoscaler asked it to go
    reclaimed: bool = False  # the "cloud" announced its reclaim (counted as a preemption)
    address: str = ""
    metrics: str = ""
    warmed: bool = False  # hot prefixes replayed; only then does the gateway see it


class LocalActuator(Actuator):
    def __init__(self, directory: Path, inference_args: list[str],
                 env: dict[str, str] | None = None, clock=time.time, warmer=None) -> None:
        self.dir = Path(directory)
        self.home = self.dir / "autoscaler"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.dir / "run").mkdir(exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        self.inference_args = list(inference_args)
        self.env = dict(env if env is not None else os.environ)
        self.clock = clock
        # async (name, address) -> prefixes replayed; None: replicas serve as soon as ready.
        self.warmer = warmer
        self._warming: dict[str, asyncio.Task] = {}
        self._children: dict[int, subprocess.Popen] = {}  # reaped by us when ours
        self.instances: dict[str, Managed] = {}
        self.desired: dict[str, int] = {}
        self.next_index = 0
        self.preemptions = 0
        self.last_preemption_at: float | None = None
        self._load()

    # --- state --------------------------------------------------------------------------------

    def _load(self) -> None:
        path = self.home / "instances.json"
        if not path.exists():
            return
        doc = json.loads(path.read_text())
        self.instances = {m["name"]: Managed(**m) for m in doc.get("instances", [])}
        self.desired = dict(doc.get("desired", {}))
        self.next_index = int(doc.get("next_index", 0))
        self.preemptions = int(doc.get("preemptions", 0))
        self.last_preemption_at = doc.get("last_preemption_at")
        log.info("adopted replicas", extra=fields(
            replicas=[m.name for m in self.instances.values() if pid_alive(m.pid)]))

    def _save(self) -> None:
        write_atomically(self.home / "instances.json", json.dumps({
            "instances": [asdict(m) for m in self.instances.values()],
            "desired": self.desired,
            "next_index": self.next_index,
            "preemptions": self.preemptions,
            "last_preemption_at": self.last_preemption_at,
        }, indent=2))
        ready = sorted(m.address for m in self.instances.values() if m.address and m.warmed
                       and pid_alive(m.pid))
        path = self.dir / "replicas.json"
        current = path.read_text() if path.exists() else ""
        text = json.dumps(ready)
        if text != current:
            write_atomically(path, text)

    def spot_unavailable_until(self) -> float:
        path = self.home / "market.json"
        try:
            return float(json.loads(path.read_text()).get("unavailable_until", 0))
        except (FileNotFoundError, ValueError, TypeError):
            return 0.0

    # --- Actuator -----------------------------------------------------------------------------

    async def observe(self) -> Observation:
        now = self.clock()
        spot_ok = now >= self.spot_unavailable_until()
        self._reap()
        out = []
        for m in list(self.instances.values()):
            notice = (self.home / "notices" / m.name).exists()
            if m.pid == 0:
                if m.pool == "spot" and spot_ok and not m.draining:
                    self._launch(m)  # capacity came back: the open request is filled
                elif m.draining:
                    del self.instances[m.name]
                    continue
                else:
                    out.append(Instance(m.name, m.pool, "pending", created_at=m.created_at))
                    continue
            if notice and not m.reclaimed and not m.draining:
                self._count_loss(m, now, "reclaim notice")
            if not pid_alive(m.pid):
                if not m.draining and not m.reclaimed:
                    # Nobody here asked it to go: reclaimed without notice (or crashed). Either
                    # way the pool lost a replica it did not plan to lose.
                    self._count_loss(m, now, "exited")
                (self.home / "notices" / m.name).unlink(missing_ok=True)
                del self.instances[m.name]
                continue
            if not m.address and m.ready_file and Path(m.ready_file).exists():
                doc = json.loads(Path(m.ready_file).read_text())
                m.address, m.metrics = doc["address"], doc.get("metrics", "")
                log.info("replica ready", extra=fields(replica=m.name, pool=m.pool,
                                                       address=m.address))
            if m.address and not m.warmed:
                self._warm(m)
            state = "draining" if m.draining or notice else (
                "ready" if m.address and m.warmed else "pending")
            out.append(Instance(m.name, m.pool, state, address=m.address,
                                created_at=m.created_at, reclaim_notice=notice))
        self._save()
        return Observation(instances=out, desired=dict(self.desired),
                           preemptions=self.preemptions,
                           last_preemption_at=self.last_preemption_at,
                           spot_available=spot_ok)

    def _count_loss(self, m: Managed, now: float, how: str) -> None:
        m.reclaimed = True
        if m.pool == "spot":
            self.preemptions += 1
            self.last_preemption_at = now
        log.warning("replica lost", extra=fields(replica=m.name, pool=m.pool, how=how))

    async def apply(self, desired: dict[str, int], remove_first: list[str]) -> None:
        self.desired = {p: max(0, int(n)) for p, n in desired.items()}
        for pool, want in self.desired.items():
            live = [m for m in self.instances.values()
                    if m.pool == pool and not m.draining
                    and not (self.home / "notices" / m.name).exists()]
            if len(live) < want:
                for _ in range(want - len(live)):
                    self._start(pool)
            elif len(live) > want:
                order = {name: i for i, name in enumerate(remove_first)}
                # Named first, then launches not yet up, then the newest.
                live.sort(key=lambda m: (order.get(m.name, len(order)), bool(m.address),
                                         -m.created_at))
                for m in live[:len(live) - want]:
                    self._drain(m)
        self._save()

    async def record(self, reason: str, message: str) -> None:
        log.info(message, extra=fields(reason=reason))

    async def close(self) -> None:
        for task in self._warming.values():
            task.cancel()
        self._save()

    # --- processes ----------------------------------------------------------------------------

    def _start(self, pool: str) -> None:
        name = f"{POOL_PREFIX[pool]}-{self.next_index}"
        self.next_index += 1
        m = Managed(name=name, pool=pool, created_at=self.clock())
        self.instances[name] = m
        if pool == "spot" and self.clock() < self.spot_unavailable_until():
            log.info("spot capacity unavailable: launch pending", extra=fields(replica=name))
            return
        self._launch(m)

    def _launch(self, m: Managed) -> None:
        ready = self.dir / "run" / f"{m.name}.json"
        ready.unlink(missing_ok=True)
        logfile = self.dir / "logs" / f"{m.name}.log"
        with open(logfile, "ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "services.inference", "--replica", m.name, "--pool",
                 m.pool, "--port", "0", *self.inference_args, "--ready-file", str(ready)],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self._children[popen.pid] = popen
        m.pid, m.ready_file, m.log = popen.pid, str(ready), str(logfile)
        log.info("replica starting", extra=fields(replica=m.name, pool=m.pool, pid=m.pid))

    def _warm(self, m: Managed) -> None:
        """Replay the hottest prefixes into a new replica before the gateway sees it, so a
        scale-out does not reset the prefix hit rate. Best effort: a failure only logs."""
        if self.warmer is None:
            m.warmed = True
            return
        task = self._warming.get(m.name)
        if task is None:
            self._warming[m.name] = asyncio.create_task(self.warmer(m.name, m.address))
            return
        if not task.done():
            return
        del self._warming[m.name]
        m.warmed = True
        if task.cancelled() or task.exception() is not None:
            log.warning("warming failed; serving cold", extra=fields(
                replica=m.name, error=repr(None if task.cancelled() else task.exception())))
        else:
            log.info("replica warmed", extra=fields(replica=m.name, prefixes=task.result()))

    def _drain(self, m: Managed) -> None:
        """SIGTERM: the replica stops admitting, finishes its streams within its grace period
        and exits; the gateway sees it draining and sends it nothing new. A replica still
        starting has nothing to drain: its whole process group (the engine core included) is
        killed, since a start-up interrupted by SIGTERM could leave the engine orphaned."""
        m.draining = True
        if m.pid and pid_alive(m.pid):
            if m.address:
                os.kill(m.pid, signal.SIGTERM)
            else:
                kill_group(m.pid)
        log.info("replica draining", extra=fields(replica=m.name, pool=m.pool))

    def _reap(self) -> None:
        for pid, popen in list(self._children.items()):
            if popen.poll() is not None:
                del self._children[pid]


def kill_group(pid: int) -> None:
    """SIGKILL a replica and everything it started (its engine-core process): replicas run in
    their own session, so their process group is theirs alone."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_all(directory: Path, grace: float = 30.0) -> None:
    """Stop every replica the autoscaler started (``spotmesh up`` on Ctrl-C, after the
    autoscaler itself has stopped)."""
    path = Path(directory) / "autoscaler" / "instances.json"
    if not path.exists():
        return
    pids = [m["pid"] for m in json.loads(path.read_text()).get("instances", [])
            if pid_alive(m["pid"])]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if pid_alive(pid):
            kill_group(pid)
    path.unlink(missing_ok=True)
