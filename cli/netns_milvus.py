"""A real Milvus 2.3.5 standalone server that no network can reach, for tests and measurements.

``pip install milvus==2.3.5`` ships a standalone Milvus (embedded etcd, local storage) that
listens on every interface and cannot be told otherwise. So it is never started in the
machine's own network namespace: :class:`NetnsMilvus` runs it under
``unshare --net --pid --fork``, where the only interface is a private loopback, and a small
forwarder inside that namespace exposes it through a unix socket (filesystem unix sockets are
not tied to a network namespace). Clients outside connect with ``uri="unix:<socket>"``; a
client that must not pay the forwarder's hop (latency measurements) runs inside the namespace
via :meth:`NetnsMilvus.nsenter_prefix` and uses ``http://127.0.0.1:<port>``.

The new pid namespace makes cleanup the kernel's job: the helper is its pid 1, so when the
helper dies, however it dies, every Milvus process dies with it. The helper also exits when
its stdin closes, so a parent that is SIGKILLed takes the server with it.

Run directly (inside the namespace; :class:`NetnsMilvus` does this)::

    unshare --net --pid --fork --kill-child python -m cli.netns_milvus \\
        --data DIR --socket PATH
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PROXY_PORT = 19530


class NetnsUnavailable(RuntimeError):
    """This machine does not let us create a private network namespace (not root, no unshare,
    or a sandbox that forbids it)."""


def netns_problem() -> str | None:
    """Why a private network and pid namespace cannot be created here, or None if it can."""
    if shutil.which("unshare") is None:
        return "the unshare command is not installed"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "ip", "link", "set", "lo", "up"],
        capture_output=True, text=True, timeout=30,
    )
    if probe.returncode != 0:
        return f"unshare --net --pid failed: {probe.stderr.strip() or probe.returncode}"
    return None


class NetnsMilvus:
    """Start and stop one Milvus server in its own network namespace (see module docstring)."""

    def __init__(self, data_dir: Path, *, start_timeout: float = 180.0) -> None:
        self.data_dir = Path(data_dir)
        self.socket_path = self.data_dir / "milvus.sock"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.port = PROXY_PORT

    @property
    def uri(self) -> str:
        """The URI a client outside the namespace connects with."""
        return f"unix:{self.socket_path}"

    def start(self) -> NetnsMilvus:
        problem = netns_problem()
        if problem:
            raise NetnsUnavailable(problem)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        log = open(self.data_dir / "netns-helper.log", "ab")  # the child's stderr
        # The repository root, so `-m cli.netns_milvus` resolves however the
        # caller's working directory is set.
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--pid", "--fork", "--kill-child",
             sys.executable, "-m", "cli.netns_milvus",
             "--data", str(self.data_dir), "--socket", str(self.socket_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, cwd=root,
        )
        log.close()
        assert self.proc.stdout is not None
        # A reader thread so that a helper which hangs before printing cannot hang us.
        ready: list[bytes] = []
        reader = threading.Thread(
            target=lambda: ready.append(self.proc.stdout.readline()), daemon=True
        )
        reader.start()
        reader.join(self.start_timeout)
        line = ready[0] if ready else b""
        if not line:
            self.stop()
            tail = (self.data_dir / "netns-helper.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"Milvus in a network namespace did not start:\n{tail}")
        self.port = int(json.loads(line)["port"])
        return self

    def helper_pid(self) -> int:
        """The helper's pid as this (outer) pid namespace sees it: unshare's only child."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return int(children.split()[0])

    def nsenter_prefix(self) -> list[str]:
        """A command prefix that runs a program inside the server's network namespace."""
        return ["nsenter", f"--net=/proc/{self.helper_pid()}/ns/net"]

    def kill(self) -> None:
        """SIGKILL the helper; the kernel then kills every Milvus process in its pid
        namespace. What a crash of the whole machine's Milvus looks like, minus the OS."""
        if self.proc is None:
            return
        try:
            os.kill(self.helper_pid(), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            pass
        self._reap(10)

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM to the helper, which stops Milvus)."""
        if self.proc is None:
            return
        try:
            os.kill(self.helper_pid(), signal.SIGTERM)
        except (OSError, IndexError, ValueError):
            pass
        self._reap(30)

    def _reap(self, timeout: float) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self.proc = None
        self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> NetnsMilvus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- inside the namespace ---------------------------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def _forward(port: int, socket_path: str, stop: asyncio.Event) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_unix_server(handle, path=socket_path)
    os.chmod(socket_path, 0o600)
    print(json.dumps({"socket": socket_path, "port": port}), flush=True)
    await stop.wait()
    server.close()


def _inside(data_dir: str, socket_path: str) -> None:
    from milvus import MilvusServer

    if os.getpid() != 1:
        raise SystemExit("netns_milvus: run me under `unshare --net --pid --fork`")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    server = MilvusServer(data_dir=data_dir, proxy_port=PROXY_PORT)
    server.start()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def watch_stdin() -> None:
        # The parent holds our stdin open for as long as it wants the server.
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    try:
        loop.run_until_complete(_forward(PROXY_PORT, socket_path, stop))
    finally:
        server.stop()
        # As pid 1 our exit kills whatever Milvus left behind; give it a moment to flush.
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cli.netns_milvus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Milvus data directory")
    p.add_argument("--socket", required=True, help="unix socket path to forward from")
    a = p.parse_args(argv)
    _inside(a.data, a.socket)


if __name__ == "__main__":
    main()
