"""The local-process actuator: inference replicas as processes on this machine, labelled spot or
on-demand, for ``spotmesh up --autoscale`` (and for trying the autoscaler without a cloud).

Everything it knows lives in the state directory (:mod:`spotmesh.statedir`: the replicas it
started, the local "spot market", reclaim notices that `spotmesh preempt` posts, and the ready
replicas it publishes to the gateway), so it is level-triggered and restart-safe: a restarted
autoscaler re-reads its record and adopts the processes still alive. A
spot launch while the market says spot is unavailable stays *pending* (no process), as a cloud
request does, until capacity returns or the policy gives up on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.autoscaler.actuator import Actuator, Instance, Observation
from spotmesh.processes import kill_group, pid_alive
from spotmesh.runtime import fields
from spotmesh.statedir import AutoscalerRecord, ManagedReplica, Ready, StateDir

log = logging.getLogger("spotmesh.autoscaler")

POOL_PREFIX = {"spot": "spot", "on-demand": "od"}


class LocalActuator(Actuator):
    def __init__(self, directory: Path, inference_args: list[str],
                 env: dict[str, str] | None = None, clock=time.time, warmer=None) -> None:
        self.state = StateDir(directory)
        self.state.autoscaler_dir.mkdir(parents=True, exist_ok=True)
        self.state.prepare()
        self.inference_args = list(inference_args)
        self.env = dict(env if env is not None else os.environ)
        self.clock = clock
        # async (name, address) -> prefixes replayed; None: replicas serve as soon as ready.
        self.warmer = warmer
        self._warming: dict[str, asyncio.Task] = {}
        self._children: dict[int, subprocess.Popen] = {}  # reaped by us when ours
        self.instances: dict[str, ManagedReplica] = {}
        self.desired: dict[str, int] = {}
        self.next_index = 0
        self.preemptions = 0
        self.last_preemption_at: float | None = None
        self._load()

    # --- state --------------------------------------------------------------------------------

    def _load(self) -> None:
        record = self.state.load_autoscaler()
        if record is None:
            return
        self.instances = {m.name: m for m in record.instances}
        self.desired = dict(record.desired)
        self.next_index = record.next_index
        self.preemptions = record.preemptions
        self.last_preemption_at = record.last_preemption_at
        log.info("adopted replicas", extra=fields(
            replicas=[m.name for m in self.instances.values() if pid_alive(m.pid)]))

    def _save(self) -> None:
        self.state.save_autoscaler(AutoscalerRecord(
            instances=list(self.instances.values()), desired=self.desired,
            next_index=self.next_index, preemptions=self.preemptions,
            last_preemption_at=self.last_preemption_at))
        self.state.publish_replicas(sorted(
            m.address for m in self.instances.values()
            if m.address and m.warmed and pid_alive(m.pid)))

    # --- Actuator -----------------------------------------------------------------------------

    async def observe(self) -> Observation:
        now = self.clock()
        spot_ok = now >= self.state.spot_unavailable_until()
        self._reap()
        out = []
        for m in list(self.instances.values()):
            notice = self.state.has_notice(m.name)
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
                self.state.clear_notice(m.name)
                del self.instances[m.name]
                continue
            ready = Ready.read(Path(m.ready_file)) if not m.address and m.ready_file else None
            if ready is not None:
                m.address, m.metrics = ready.address, ready.metrics
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

    def _count_loss(self, m: ManagedReplica, now: float, how: str) -> None:
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
                    and not self.state.has_notice(m.name)]
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
        m = ManagedReplica(name=name, pool=pool, created_at=self.clock())
        self.instances[name] = m
        if pool == "spot" and self.clock() < self.state.spot_unavailable_until():
            log.info("spot capacity unavailable: launch pending", extra=fields(replica=name))
            return
        self._launch(m)

    def _launch(self, m: ManagedReplica) -> None:
        ready = self.state.ready_file(m.name)
        ready.unlink(missing_ok=True)
        logfile = self.state.log_file(m.name)
        with open(logfile, "ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "services.inference", "--replica", m.name, "--pool",
                 m.pool, "--port", "0", *self.inference_args, "--ready-file", str(ready)],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self._children[popen.pid] = popen
        m.pid, m.ready_file, m.log = popen.pid, str(ready), str(logfile)
        log.info("replica starting", extra=fields(replica=m.name, pool=m.pool, pid=m.pid))

    def _warm(self, m: ManagedReplica) -> None:
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

    def _drain(self, m: ManagedReplica) -> None:
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
