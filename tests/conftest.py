"""Shared fixtures: an asyncio loop thread (so sync tests can drive async servers and engines),
the tiny model, one real vLLM engine per session, and one real mesh started by `spotmesh up`.

Engine and mesh start-up cost 10-60 s on two cores, so they are shared; tests that change
their state (drain, SIGTERM) start their own.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from pathlib import Path

import pytest

# Every test runs offline; CPU replicas get one OpenMP thread and a small KV cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

REPO = Path(__file__).resolve().parent.parent


class LoopThread:
    """An event loop on its own thread; ``run(coro)`` blocks until the coroutine is done."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine, timeout: float = 300.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from cli.tinymodel import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def vllm_engine(loop_thread, tiny_model):
    """One real vLLM AsyncLLM (vllm-cpu here) for every engine-level test."""
    from services.inference.config import EngineConfig
    from services.inference.vllm_engine import VLLMEngine

    cfg = EngineConfig(served_model_name="spotmesh-tiny", enforce_eager=True, max_num_seqs=64)
    engine = VLLMEngine(cfg, str(tiny_model))
    info = loop_thread.run(engine.start())
    yield engine, info
    loop_thread.run(engine.shutdown())


class Mesh:
    """A mesh started by the real `spotmesh up` command, in its own state directory."""

    def __init__(self, state_dir: Path, *args: str) -> None:
        import subprocess
        import sys

        self.state_dir = state_dir
        self.env = {**os.environ, "SPOTMESH_STATE_DIR": str(state_dir)}
        # Tests that check for hits must not see one turn into a miss because a busy test
        # machine made a lookup slower than the gateway's budget (tests/test_flow_budget.py
        # tests the budget itself).
        self.env.setdefault("SPOTMESH_CACHE_LOOKUP_BUDGET_MS", "30000")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "up", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
            cwd=REPO,
        )
        self.banner: list[str] = []
        for line in self.proc.stdout:
            self.banner.append(line)
            if line.startswith("Ctrl-C"):
                break
        else:
            err = self.proc.stderr.read()
            raise RuntimeError(f"spotmesh up failed:\n{''.join(self.banner)}\n{err}")
        from spotmesh.statedir import StateDir, read_dev_key

        self.state = StateDir(state_dir).load_mesh()
        self.gateway = self.state.gateway().address
        self.api_key = read_dev_key(Path(self.state.api_keys))
        self.replicas = [p for p in self.state.processes if p.role == "inference"]
        self.metadata = [("authorization", f"Bearer {self.api_key}")]

    def stop(self) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(120)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, tiny_model):
    # The serving path alone: the semantic cache would answer the repeated prompts these tests
    # send (tests/test_mesh_cache.py runs the mesh with it).
    m = Mesh(tmp_path_factory.mktemp("mesh"), "--replicas", "2", "--no-cache")
    yield m
    m.stop()
