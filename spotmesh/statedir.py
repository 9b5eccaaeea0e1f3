"""The local state directory: where a mesh on one machine keeps its files, and what each holds.

This module is the format. ``spotmesh up`` (the supervisor), the autoscaler's local actuator,
``spotmesh preempt`` and ``spotmesh status`` all read and write through it, and a server started
with ``--ready-file`` reports where it listens in a :class:`Ready` file. Layout::

    mesh.json                   the running processes (MeshState); `spotmesh status` reads it
    keys.toml                   the development API key (unless --api-keys names another file)
    cache-tokens.json           the cache tier's service and admin tokens (mode 0600)
    replicas.json               ready replicas' addresses, a JSON list; the gateway re-reads it
    cache/milvus.db             the semantic cache's milvus-lite data under `spotmesh up`
    semantic-cache/cache.db     the same for a cache service started on its own
    run/NAME.json               each process's ready file
    logs/NAME.log               each process's output
    autoscaler/instances.json   the replicas the autoscaler started (AutoscalerRecord)
    autoscaler/market.json      the local "spot market": {"unavailable_until": unix seconds}
    autoscaler/notices/NAME     a reclaim notice for replica NAME: {"at": unix seconds}

Every file is replaced atomically, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import secrets
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spotmesh.files import write_atomically

STATE_ENV = "SPOTMESH_STATE_DIR"


def state_dir(explicit: str | None = None) -> Path:
    """``explicit``, else ``$SPOTMESH_STATE_DIR``, else ``$XDG_STATE_HOME/spotmesh/default``
    (``~/.local/state/spotmesh/default``)."""
    if explicit:
        return Path(explicit)
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "spotmesh" / "default"


# --- ready files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """What a server writes to its ``--ready-file`` once it serves, so a supervisor learns the
    ports it picked without racing for them."""

    address: str
    metrics: str = ""  # its Prometheus host:port; "" when off
    pid: int = 0
    started_at: float = 0.0  # unix seconds

    def write(self, path: Path) -> None:
        write_atomically(path, json.dumps(asdict(self)))

    @classmethod
    def read(cls, path: Path) -> Ready | None:
        """The ready file's contents, or None while there is none."""
        try:
            doc = json.loads(Path(path).read_text())
        except FileNotFoundError:
            return None
        return cls(address=doc["address"], metrics=doc.get("metrics", ""),
                   pid=int(doc.get("pid", 0)), started_at=float(doc.get("started_at", 0.0)))


# --- mesh.json --------------------------------------------------------------------------------


@dataclass
class ProcessInfo:
    role: str  # "gateway" | "inference" | "embedder" | "cache" | "autoscaler"
    replica: str  # the id in served_by.replica, for inference; "" otherwise
    pid: int
    address: str
    pool: str  # "spot" | "on-demand" for inference; "" otherwise
    metrics: str = ""
    log: str = ""


@dataclass
class MeshState:
    supervisor_pid: int
    api_keys: str
    processes: list[ProcessInfo] = field(default_factory=list)

    def gateway(self) -> ProcessInfo | None:
        return next((p for p in self.processes if p.role == "gateway"), None)


# --- autoscaler/instances.json ----------------------------------------------------------------


@dataclass
class ManagedReplica:
    """One replica the local actuator started (or asked for, while spot is unavailable)."""

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


@dataclass
class AutoscalerRecord:
    """Everything the local actuator needs to resume after a restart."""

    instances: list[ManagedReplica] = field(default_factory=list)
    desired: dict[str, int] = field(default_factory=dict)
    next_index: int = 0
    preemptions: int = 0
    last_preemption_at: float | None = None


# --- keys.toml --------------------------------------------------------------------------------


def read_dev_key(path: Path) -> str | None:
    """The first plain ``key`` in a keys file (the development key), or None."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    for entry in doc.get("keys", []):
        if "key" in entry:
            return str(entry["key"])
    return None


class StateDir:
    """One mesh's state directory (see the module docstring for what each file holds)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.mesh_file = self.root / "mesh.json"
        self.keys_file = self.root / "keys.toml"
        self.cache_tokens_file = self.root / "cache-tokens.json"
        self.replicas_file = self.root / "replicas.json"
        self.semantic_cache_uri = str(self.root / "cache" / "milvus.db")
        self.standalone_semantic_cache_uri = str(self.root / "semantic-cache" / "cache.db")
        self.run_dir = self.root / "run"
        self.logs_dir = self.root / "logs"
        self.autoscaler_dir = self.root / "autoscaler"
        self.instances_file = self.autoscaler_dir / "instances.json"
        self.market_file = self.autoscaler_dir / "market.json"
        self.notices_dir = self.autoscaler_dir / "notices"

    def prepare(self) -> None:
        """Create the directories processes write into."""
        for d in (self.run_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)

    def ready_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def log_file(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    # mesh.json

    def load_mesh(self) -> MeshState | None:
        try:
            doc = json.loads(self.mesh_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        procs = [ProcessInfo(**p) for p in doc.pop("processes", [])]
        return MeshState(processes=procs, **doc)

    def save_mesh(self, state: MeshState) -> None:
        write_atomically(self.mesh_file, json.dumps(asdict(state), indent=2))

    def clear_mesh(self) -> None:
        """The mesh stopped: nothing it published is true any more."""
        self.mesh_file.unlink(missing_ok=True)
        self.replicas_file.unlink(missing_ok=True)

    # replicas.json

    def publish_replicas(self, addresses: list[str]) -> bool:
        """Write the addresses the gateway may route to; False when they did not change (the
        gateway re-reads the file when its modification time does)."""
        text = json.dumps(addresses)
        try:
            if self.replicas_file.read_text() == text:
                return False
        except FileNotFoundError:
            pass
        write_atomically(self.replicas_file, text)
        return True

    def replicas(self) -> list[str]:
        try:
            return list(json.loads(self.replicas_file.read_text()))
        except (FileNotFoundError, ValueError):
            return []

    # keys.toml and cache-tokens.json

    def write_dev_keys(self) -> str:
        """A fresh development key in keys.toml, readable only by this user."""
        key = "sk-dev-" + secrets.token_urlsafe(18)
        self.keys_file.write_text(
            "# Written by `spotmesh up` for local development; pass --api-keys for real keys.\n"
            f'[[keys]]\ntenant = "dev"\nkey = "{key}"\nmodels = ["*"]\nadmin = true\n\n'
            "[tenants.dev]\n"
            "# The tiny model never emits end-of-sequence under greedy decoding, so every "
            "answer\n"
            "# ends at max_tokens; caching those is what lets the development mesh show hits.\n"
            "cache_truncated = true\n"
        )
        self.keys_file.chmod(0o600)
        return key

    def cache_tokens(self) -> tuple[str, str]:
        """The cache tier's (service, admin) tokens, made on first use and kept, so a restarted
        mesh (and `spotmesh` tools) reuse them."""
        if not self.cache_tokens_file.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            self.cache_tokens_file.write_text(json.dumps(
                {"service": secrets.token_urlsafe(24), "admin": secrets.token_urlsafe(24)}))
            self.cache_tokens_file.chmod(0o600)
        doc = json.loads(self.cache_tokens_file.read_text())
        return doc["service"], doc["admin"]

    # autoscaler/instances.json

    def load_autoscaler(self) -> AutoscalerRecord | None:
        try:
            doc = json.loads(self.instances_file.read_text())
        except FileNotFoundError:
            return None
        return AutoscalerRecord(
            instances=[ManagedReplica(**m) for m in doc.get("instances", [])],
            desired=dict(doc.get("desired", {})), next_index=int(doc.get("next_index", 0)),
            preemptions=int(doc.get("preemptions", 0)),
            last_preemption_at=doc.get("last_preemption_at"))

    def save_autoscaler(self, record: AutoscalerRecord) -> None:
        write_atomically(self.instances_file, json.dumps(asdict(record), indent=2))

    def clear_autoscaler(self) -> None:
        self.instances_file.unlink(missing_ok=True)

    # autoscaler/market.json

    def spot_unavailable_until(self) -> float:
        """Unix seconds until which the local market has no spot capacity (0: it has)."""
        try:
            return float(json.loads(self.market_file.read_text()).get("unavailable_until", 0))
        except (FileNotFoundError, ValueError, TypeError, AttributeError):
            return 0.0

    def make_spot_unavailable(self, until: float) -> None:
        write_atomically(self.market_file, json.dumps({"unavailable_until": until}))

    # autoscaler/notices/

    def post_notice(self, replica: str, at: float) -> None:
        """Announce the reclaim of ``replica``, as a cloud does."""
        write_atomically(self.notices_dir / replica, json.dumps({"at": at}))

    def has_notice(self, replica: str) -> bool:
        return (self.notices_dir / replica).exists()

    def clear_notice(self, replica: str) -> None:
        (self.notices_dir / replica).unlink(missing_ok=True)
