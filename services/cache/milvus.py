"""The Milvus end of the semantic cache: one collection, connected lazily, created and indexed
on first use, every call's failure turned into :class:`CacheUnavailable` with the reason (and
never the credentials in the URI).

Embedded milvus-lite when the URI is a ``*.db`` path (it runs in-process and locks its data
directory to one process), a Milvus server otherwise. pymilvus' async client cannot create
collections or indexes on milvus-lite, and milvus-lite runs as Python threads anyway, so this is
the sync client, called from the servicer's thread pool.
"""

from __future__ import annotations

import fcntl
import math
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from services.cache.options import CacheOptions, is_local
from services.cache.rows import TOKEN_ID_FIELDS, build_schema

HNSW_PARAMS = {"M": 16, "efConstruction": 200}
LOAD_TIMEOUT_SECONDS = 120.0


class CacheUnavailable(RuntimeError):
    """Milvus could not be reached or failed; the request may be retried later."""


class CacheSchemaError(RuntimeError):
    """The collection exists with a shape this cache cannot use (e.g. another dimension)."""


class MilvusCollection:
    """One collection on one Milvus (see the module docstring); thread-safe."""

    def __init__(self, options: CacheOptions) -> None:
        self.options = options
        self.name = options.collection
        self.local = is_local(options.uri)
        self._client: MilvusClient | None = None
        self._lock = threading.Lock()
        self._last_failed_connect = -math.inf
        self._last_error = ""
        self.closed = False

    @property
    def connected(self) -> bool:
        return self._client is not None

    def client(self) -> MilvusClient:
        """The connected client; :class:`CacheUnavailable` while Milvus cannot be reached (for a
        moment after a failed attempt, at once)."""
        client = self._client
        if client is not None:
            return client
        if self.closed:
            raise CacheUnavailable("the semantic cache is closed")
        with self._lock:
            if self._client is not None:
                return self._client
            if time.monotonic() - self._last_failed_connect < self.options.reconnect_seconds:
                raise CacheUnavailable(self._last_error)
            try:
                # Dedicated: pymilvus otherwise shares one connection per URI across clients
                # and keeps a broken one after the server restarts.
                client = MilvusClient(uri=self.options.uri, token=self.options.token,
                                      timeout=self.options.timeout_seconds, dedicated=True)
            except (MilvusException, grpc.RpcError, OSError) as exc:
                raise self._unreachable(exc, lite_problem(self.options.uri)) from None
            try:
                self._ensure_collection(client)
            except CacheSchemaError:
                client.close()
                raise
            except (MilvusException, grpc.RpcError, OSError) as exc:
                client.close()
                raise self._unreachable(exc) from None
            self._client = client
            return client

    def _unreachable(self, exc: BaseException, why: str | None = None) -> CacheUnavailable:
        self._last_failed_connect = time.monotonic()
        what = ("cannot open milvus-lite data at" if self.local
                else "cannot reach Milvus at")
        self._last_error = f"{what} {self.where()}: {why or reason(exc)}"
        return CacheUnavailable(self._last_error)

    def where(self) -> str:
        """The URI without credentials (``https://user:password@host`` is a valid URI, and
        these messages reach callers)."""
        parts = urlsplit(self.options.uri)
        if parts.username is None and parts.password is None:
            return self.options.uri
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))

    def _ensure_collection(self, client: MilvusClient) -> None:
        name = self.name
        t = self.options.timeout_seconds
        # Loading after a server restart waits for segments and indexes (measured ~10-40 s on
        # Milvus 2.3.5 standalone); that is start-up, not a request, so it gets its own bound.
        load_t = max(t, LOAD_TIMEOUT_SECONDS)
        if not client.has_collection(name, timeout=t):
            try:
                # Session: a process reads its own writes at once; Bounded would hide fresh
                # entries for a while, Strong costs ~200 ms a read on a server.
                client.create_collection(name, schema=build_schema(self.options.dim),
                                         consistency_level="Session", timeout=t)
            except MilvusException:
                # Another process sharing the server may have created it first.
                if not client.has_collection(name, timeout=t):
                    raise
        if not client.list_indexes(name, timeout=t):
            index = client.prepare_index_params()
            index.add_index("vector", index_type="HNSW", metric_type="COSINE",
                            params=HNSW_PARAMS)
            # Not waiting: the server builds per segment in the background, and milvus-lite
            # lacks the timestamp call pymilvus waits with.
            client.create_index(name, index, timeout=t, sync=False)
        desc = client.describe_collection(name, timeout=t)
        fields = {f["name"]: f for f in desc["fields"]}
        missing = [f for f in ("vector", "tenant", "prompt_sha256", "expires_at",
                               *TOKEN_ID_FIELDS) if f not in fields]
        if missing:
            raise CacheSchemaError(f"collection {name!r} exists without the field(s) "
                                   f"{', '.join(missing)}; use another --collection")
        dim = int(fields["vector"]["params"]["dim"])
        if dim != self.options.dim:
            raise CacheSchemaError(f"collection {name!r} holds {dim}-dimensional vectors; this "
                                   f"cache is configured for {self.options.dim}")
        client.load_collection(name, timeout=load_t)

    def call(self, fn, *args, **kwargs):
        """One Milvus call, with backend failures turned into :class:`CacheUnavailable`."""
        client = self.client()
        try:
            return getattr(client, fn)(self.name, *args,
                                       timeout=self.options.timeout_seconds, **kwargs)
        except (MilvusException, grpc.RpcError, OSError) as exc:
            raise CacheUnavailable(f"Milvus at {self.where()} failed ({fn}): "
                                   f"{reason(exc)}") from None

    def drop(self) -> None:
        """Delete the collection and everything in it."""
        client = self.client()
        try:
            client.drop_collection(self.name, timeout=self.options.timeout_seconds)
        except (MilvusException, grpc.RpcError, OSError) as exc:
            raise CacheUnavailable(f"Milvus at {self.where()} failed (drop_collection): "
                                   f"{reason(exc)}") from None

    def close(self) -> None:
        """Disconnect; for milvus-lite also release the data directory. Calls fail after."""
        self.closed = True
        client, self._client = self._client, None
        if client is not None:
            client.close()
        if self.local:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.options.uri)


def reason(exc: BaseException) -> str:
    if isinstance(exc, MilvusException):
        return exc.message or repr(exc)
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "details"):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__


def lite_problem(uri: str) -> str | None:
    """Why milvus-lite could not open ``uri``, where pymilvus only says it failed: most often
    another process holds the data directory (milvus-lite allows one)."""
    if not is_local(uri):
        return None
    lock = Path(uri) / "LOCK"
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        return (f"another process holds {uri} (milvus-lite allows one process per data "
                "directory; to share it, run `milvus-lite server` and connect by URI)")
    finally:
        os.close(fd)
    return None
