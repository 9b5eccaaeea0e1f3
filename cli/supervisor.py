"""A whole mesh as local processes: what ``spotmesh up`` runs.

Every process is a real server on a loopback port it picks itself and reports through a ready
file, so meshes never race for ports and several can run side by side, each in its own state
directory (``SPOTMESH_STATE_DIR``; its files are :mod:`spotmesh.statedir`'s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from spotmesh.metrics import metric_sum, read_metrics
from spotmesh.processes import kill_group, pid_alive
from spotmesh.statedir import STATE_ENV, MeshState, ProcessInfo, Ready, StateDir


@dataclass
class Child:
    info: ProcessInfo
    popen: subprocess.Popen
    ready_file: Path
    args: list[str] = field(default_factory=list)


class LocalMesh:
    """Starts, watches and stops the mesh's processes."""

    def __init__(
        self,
        directory: Path,
        *,
        replicas: int,
        spot_replicas: int,
        port: int,
        api_keys: str | None,
        model: str,
        served_model_name: str,
        inference_args: list[str],
        kv_cache_gib: int,
        semantic_cache: bool = True,
        cache_milvus_uri: str = "",
        cache_args: list[str] | None = None,
        routing: str = "prefix",
        prefix_mode: str = "approximate",
        gateway_args: list[str] | None = None,
        autoscale: bool = False,
        autoscale_args: list[str] | None = None,
        log=print,
    ) -> None:
        self.dir = directory
        self.state_dir = StateDir(directory)
        self.n_replicas = replicas
        self.spot_replicas = spot_replicas
        self.port = port
        self.api_keys = api_keys
        self.model = model
        self.served_model_name = served_model_name
        self.inference_args = inference_args
        self.kv_cache_gib = kv_cache_gib
        self.semantic_cache = semantic_cache
        # A Milvus server for the cache; empty: embedded milvus-lite in the state directory.
        self.cache_milvus_uri = cache_milvus_uri
        self.cache_args = list(cache_args or [])  # more flags for the cache process
        if cache_milvus_uri and "--lookup-consistency" not in self.cache_args:
            # On a server, Session lookups wait behind every fresh store (~150 ms a hit under
            # load, measured); a cache can afford a moment's staleness (13 ms hits).
            self.cache_args += ["--lookup-consistency", "Bounded"]
        # Prefix routing: the cache process always serves the shared prefix index; in precise
        # mode the replicas feed it their engines' KV-cache events.
        self.routing = routing
        self.prefix_mode = prefix_mode
        self.gateway_args = list(gateway_args or [])
        # With the autoscaler, replicas are its to start and stop (services.autoscaler.local);
        # `replicas` is then not started statically.
        self.autoscale = autoscale
        self.autoscale_args = list(autoscale_args or [])
        self.log = log
        self.children: list[Child] = []
        self.state: MeshState | None = None
        self.dev_key: str | None = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        # CPU replicas share a few cores: one OpenMP thread each avoids oversubscription.
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
        # On CPU: run vLLM's worker inside its engine-core process (one process and one IPC hop
        # per step fewer); vLLM only allows that with V1 multiprocessing off.
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env["PYTHONUNBUFFERED"] = "1"
        # The cache tier's tokens reach every process through the environment: kept out of
        # `ps`, and safe for values that begin with "-" (which a flag parser would misread).
        service, admin = self.state_dir.cache_tokens()
        env["SPOTMESH_CACHE_TOKEN"] = service
        env["SPOTMESH_CACHE_ADMIN_TOKEN"] = admin
        return env

    def _spawn(self, role: str, name: str, args: list[str], pool: str = "") -> Child:
        ready = self.state_dir.ready_file(name)
        ready.unlink(missing_ok=True)
        logfile = self.state_dir.log_file(name)
        out = open(logfile, "ab")
        module = f"services.{role}"
        popen = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--ready-file", str(ready)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self._env(),
            # Its own process group: Ctrl-C in the terminal reaches the supervisor only, which
            # then stops children in order (gateway first, so no request meets a dead replica).
            start_new_session=True,
        )
        out.close()
        info = ProcessInfo(role=role, replica=name if role == "inference" else "",
                           pid=popen.pid, address="", pool=pool, log=str(logfile))
        return Child(info, popen, ready, list(args))

    def _wait_ready(self, children: list[Child], timeout: float) -> None:
        started = time.monotonic()
        deadline = started + timeout
        next_progress = started + 10
        pending = list(children)
        while pending:
            if time.monotonic() > next_progress:
                names = ", ".join(c.info.replica or c.info.role for c in pending)
                self.log(f"  still starting ({time.monotonic() - started:.0f}s): {names}")
                next_progress += 10
            for c in list(pending):
                ready = Ready.read(c.ready_file)
                if ready is not None:
                    c.info.address, c.info.metrics = ready.address, ready.metrics
                    pending.remove(c)
                    self.log(f"  {c.info.role} {c.info.replica or ''} ready at {c.info.address}")
                elif c.popen.poll() is not None:
                    tail = Path(c.info.log).read_text(errors="replace")[-3000:]
                    raise RuntimeError(
                        f"{c.info.role} {c.info.replica} exited with {c.popen.returncode} "
                        f"during start-up; its log ({c.info.log}) ends:\n{tail}"
                    )
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.info.replica or c.info.role for c in pending)
                raise RuntimeError(f"not ready after {timeout:.0f}s: {names}")
            if pending:
                time.sleep(0.2)

    def start(self, timeout: float = 300.0) -> MeshState:
        self.state_dir.prepare()
        existing = self.state_dir.load_mesh()
        if existing and pid_alive(existing.supervisor_pid):
            raise RuntimeError(
                f"a mesh is already running from {self.dir} (supervisor pid "
                f"{existing.supervisor_pid}); stop it or set {STATE_ENV} to run another"
            )
        keys = Path(self.api_keys) if self.api_keys else self.state_dir.keys_file
        if not self.api_keys:
            self.dev_key = self.state_dir.write_dev_keys()
        self.state = MeshState(supervisor_pid=os.getpid(), api_keys=str(keys))

        self.log(f"starting {self.n_replicas} inference replica(s) "
                 f"({self.spot_replicas} spot) with model {self.served_model_name}"
                 + (", the embedder and the semantic cache" if self.semantic_cache else "")
                 + f"; {self.routing} routing"
                 + (f" ({self.prefix_mode})" if self.routing == "prefix" else ""))
        support = self._spawn_cache_tier()
        cache = support[-1]
        replica_extra: list[str] = []
        if self.routing == "prefix" and self.prefix_mode == "precise":
            # The replicas relay KV events to the index from their first request on: they need
            # its address before they start.
            self._wait_ready([cache], timeout)
            replica_extra = ["--prefix-cache", cache.info.address]
        replicas = []
        for i in range(0 if self.autoscale else self.n_replicas):
            pool = "spot" if i >= self.n_replicas - self.spot_replicas else "on-demand"
            name = f"{'spot' if pool == 'spot' else 'od'}-{i}"
            args = ["--replica", name, "--pool", pool, "--port", "0", "--model", self.model,
                    "--served-model-name", self.served_model_name,
                    "--kv-cache-gib", str(self.kv_cache_gib), *replica_extra,
                    *self.inference_args]
            replicas.append(self._spawn("inference", name, args, pool))
        self.children.extend(replicas)
        self._publish()
        self._wait_ready([c for c in support if not c.info.address] + replicas, timeout)
        replicas_file = self.state_dir.replicas_file
        if not self.autoscale:
            self.state_dir.publish_replicas([c.info.address for c in replicas])

        gw_args = ["--port", str(self.port), "--api-keys", str(keys),
                   "--model", f"{self.served_model_name}={self.model}",
                   "--replicas-file", str(replicas_file),
                   "--routing", self.routing,
                   "--prefix-cache", cache.info.address, "--prefix-mode", self.prefix_mode]
        if self.semantic_cache:
            embedder = support[0]
            gw_args += ["--embedder", embedder.info.address, "--cache", cache.info.address]
        gw_args += self.gateway_args
        gateway = self._spawn("gateway", "gateway", gw_args)
        self.children.insert(0, gateway)
        self._publish()
        self._wait_ready([gateway], timeout)
        self._publish()
        if self.autoscale:
            self._start_autoscaler(gateway, replica_extra, timeout)
        return self.state

    def _start_autoscaler(self, gateway: Child, replica_extra: list[str],
                          timeout: float) -> None:
        replica_args = ["--model", self.model, "--served-model-name", self.served_model_name,
                        "--kv-cache-gib", str(self.kv_cache_gib), *replica_extra,
                        *self.inference_args]
        cache = next(c for c in self.children if c.info.role == "cache")
        args = ["--port", "0", "--platform", "local", "--state-dir", str(self.dir),
                "--gateway-metrics", gateway.info.metrics,
                "--prefix-cache", cache.info.address,
                "--model-name", self.served_model_name,
                *(f"--inference-arg={a}" for a in replica_args), *self.autoscale_args]
        autoscaler = self._spawn("autoscaler", "autoscaler", args)
        self.children.append(autoscaler)
        self._publish()
        self._wait_ready([autoscaler], timeout)
        self._publish()
        # Up means serving: wait for the autoscaler's first replica.
        started = time.monotonic()
        next_progress = started + 10
        while True:
            if self.state_dir.replicas() and _gateway_sees_a_replica(gateway):
                break
            if autoscaler.popen.poll() is not None:
                raise RuntimeError(f"the autoscaler exited with {autoscaler.popen.returncode};"
                                   f" see {autoscaler.info.log}")
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"the autoscaler started no replica in {timeout:.0f}s; see "
                                   f"{autoscaler.info.log} and {self.dir / 'logs'}")
            if time.monotonic() > next_progress:
                self.log(f"  waiting for the autoscaler's first replica "
                         f"({time.monotonic() - started:.0f}s)")
                next_progress += 10
            time.sleep(0.2)
        self.log("  autoscaler ready; first replica serving")

    def _spawn_cache_tier(self) -> list[Child]:
        """[embedder, cache] with the semantic cache, [cache] (the prefix index) without."""
        if not self.semantic_cache:
            tier = [self._spawn("cache", "cache", ["--port", "0", "--no-semantic"])]
            self.children.extend(tier)
            return tier
        embedder = self._spawn("embedder", "embedder", ["--port", "0"])
        # The Milvus data lives in the state directory: a restarted mesh keeps its answers.
        uri = self.cache_milvus_uri or self.state_dir.semantic_cache_uri
        if not self.cache_milvus_uri:
            Path(uri).parent.mkdir(exist_ok=True)
        cache = self._spawn("cache", "cache", [
            "--port", "0",
            "--milvus-uri", uri,
            *self.cache_args])
        tier = [embedder, cache]
        self.children.extend(tier)
        return tier

    def _publish(self) -> None:
        assert self.state is not None
        self.state.processes = [c.info for c in self.children]
        self.state_dir.save_mesh(self.state)

    def watch(self, stop_requested) -> None:
        """Block until ``stop_requested()``; report children that die on their own, and
        restart the gateway on its own port (clients see UNAVAILABLE meanwhile and succeed on
        retry). Other services degrade gracefully when one is down; their restart is left to
        the operator here (Kubernetes restarts every container)."""
        reported: set[int] = set()
        restarts = 0
        while not stop_requested():
            for c in list(self.children):
                if c.popen.poll() is not None and c.popen.pid not in reported:
                    reported.add(c.popen.pid)
                    self.log(f"{c.info.role} {c.info.replica} (pid {c.popen.pid}) exited with "
                             f"{c.popen.returncode}; see {c.info.log}")
                    if c.info.role == "gateway" and c.info.address and restarts < 5:
                        restarts += 1
                        time.sleep(min(8.0, 0.5 * 2 ** (restarts - 1)))
                        self._restart(c)
            time.sleep(0.5)

    def _restart(self, old: Child) -> None:
        port = old.info.address.rsplit(":", 1)[1]
        args = list(old.args)
        args[args.index("--port") + 1] = port
        new = self._spawn(old.info.role, old.info.role, args)
        self.children[self.children.index(old)] = new
        self._publish()
        try:
            self._wait_ready([new], 120)
            self.log(f"{new.info.role} restarted at {new.info.address}")
        except RuntimeError as exc:
            self.log(f"{new.info.role} did not restart: {exc}")
        self._publish()

    def stop(self, grace: float = 30.0) -> None:
        """Gateway first (stops admitting, finishes its streams and pending cache stores), then
        the replicas, then the cache tier."""
        order = {"gateway": 0, "autoscaler": 1, "inference": 2}
        groups: dict[int, list[Child]] = {}
        for c in self.children:
            groups.setdefault(order.get(c.info.role, 2), []).append(c)
        for _, group in sorted(groups.items()):
            for c in group:
                if c.popen.poll() is None:
                    c.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for c in group:
                try:
                    c.popen.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    c.popen.kill()
                    c.popen.wait()
            if group and group[0].info.role == "autoscaler":
                # Its replicas outlive it by design (a restarted autoscaler adopts them); the
                # mesh stopping is what ends them.
                stop_autoscaled_replicas(self.state_dir, grace)
        self.state_dir.clear_mesh()


def _gateway_sees_a_replica(gateway: Child) -> bool:
    """The gateway has polled a replica and may route to it (its replicas gauge)."""
    try:
        samples = read_metrics(gateway.info.metrics, timeout=2)
    except OSError:
        return False
    return metric_sum(samples, "spotmesh_gateway_replicas", state="available") >= 1


def stop_autoscaled_replicas(state: StateDir, grace: float = 30.0) -> None:
    """Stop every replica the autoscaler started (after the autoscaler itself has stopped):
    SIGTERM, the grace period to drain, then their whole process groups."""
    record = state.load_autoscaler()
    if record is None:
        return
    pids = [m.pid for m in record.instances if pid_alive(m.pid)]
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
    state.clear_autoscaler()
