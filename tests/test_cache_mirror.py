"""The semantic cache's memory index (services.cache.mirror): exact, isolated per scope, kept
in step with Milvus, reloaded after a restart, and bounded."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.cache.answers import Answer
from services.cache.mirror import MirrorFull, VectorMirror
from services.cache.options import CacheOptions
from services.cache.semantic import SemanticCache

DIM = 384
MODEL = "spotmesh-tiny"
FP = "0123456789abcdef0123456789abcdef"
T0 = 1_800_000_000.0


def unit(seed: int, dim: int = DIM) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(dim)
    return (v / np.linalg.norm(v)).tolist()


def answer(text: str) -> Answer:
    return Answer(prompt="p", text=text, token_ids=(1, 2), finish_reason=1, prompt_tokens=3,
                  cached_prompt_tokens=0, completion_tokens=2, cost_usd=0.001,
                  replica_seconds=0.1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "remove"]), st.integers(0, 40),
                          st.integers(0, 2)), max_size=120))
def test_the_mirror_always_finds_what_a_brute_force_search_finds(ops):
    dim = 8
    mirror = VectorMirror(dim, max_entries=1000)
    live: dict[str, tuple[tuple[str, str, str], list[float]]] = {}
    for op, n, s in ops:
        entry, scope = f"e{n}", (f"t{s}", MODEL, FP)
        if op == "add" and entry not in live:
            live[entry] = (scope, unit(n, dim))
            mirror.add(entry, scope, live[entry][1], expires_at=T0 + n)
        elif op == "remove":
            mirror.remove([entry])
            live.pop(entry, None)
    assert len(mirror) == len(live)
    for s in range(3):
        scope = (f"t{s}", MODEL, FP)
        q = unit(1000 + s, dim)
        mine = {e: v for e, (sc, v) in live.items() if sc == scope}
        found = mirror.search(scope, q, now=T0 - 1)
        if not mine:
            assert found is None
            continue
        best = max(mine, key=lambda e: float(np.dot(mine[e], q)))
        assert found[0] == best
        assert found[1] == pytest.approx(float(np.dot(mine[best], q)), abs=1e-5)


def test_expired_rows_are_invisible_and_scopes_never_mix():
    mirror = VectorMirror(DIM, max_entries=10)
    v = unit(1)
    mirror.add("a-old", ("a", MODEL, FP), v, expires_at=T0)
    mirror.add("b", ("b", MODEL, FP), v, expires_at=T0 + 100)
    assert mirror.search(("a", MODEL, FP), v, now=T0 - 1)[0] == "a-old"
    assert mirror.search(("a", MODEL, FP), v, now=T0) is None  # expired at T0 exactly
    assert mirror.search(("b", MODEL, FP), v, now=T0)[0] == "b"
    assert mirror.search(("a", MODEL, "f" * 32), v, now=T0 - 1) is None


def test_the_mirror_refuses_to_grow_past_its_bound():
    mirror = VectorMirror(DIM, max_entries=2)
    mirror.add("1", ("a", MODEL, FP), unit(1), T0)
    mirror.add("2", ("a", MODEL, FP), unit(2), T0)
    with pytest.raises(MirrorFull):
        mirror.add("3", ("a", MODEL, FP), unit(3), T0)
    mirror.remove(["1"])
    mirror.add("3", ("a", MODEL, FP), unit(3), T0)
    assert len(mirror) == 2


@pytest.fixture
def make(tmp_path):
    opened = []

    def make(**kw) -> SemanticCache:
        cache = SemanticCache(CacheOptions(uri=str(tmp_path / "cache.db"), dim=DIM, **kw))
        opened.append(cache)
        return cache

    yield make
    for c in opened:
        c.close()


def test_lookups_match_an_exact_search_over_what_was_stored(make):
    cache = make()
    assert cache._mirror is not None  # milvus-lite searches the memory index by default
    stored = {}
    for i in range(300):
        tenant = f"t{i % 3}"
        e = cache.store(tenant, MODEL, FP, unit(i), answer(f"a{i}"), 600, now=T0)
        stored[e.entry_id] = (tenant, np.array(unit(i)))
    for q in range(40):
        tenant = f"t{q % 3}"
        v = np.array(unit(10_000 + q))
        mine = {k: vec for k, (t, vec) in stored.items() if t == tenant}
        best = max(mine, key=lambda k: float(mine[k] @ v))
        hit = cache.lookup(tenant, MODEL, FP, v.tolist(), 0.0, now=T0)
        assert hit.entry_id == best
        assert hit.similarity == pytest.approx(float(mine[best] @ v), abs=1e-5)


def test_a_restarted_cache_reloads_every_entry_into_its_index(make, tmp_path):
    first = make()
    ids = [first.store("t1", MODEL, FP, unit(i), answer(f"a{i}"), 600, now=T0).entry_id
           for i in range(50)]
    first.invalidate(tenant="t1", prompt="nothing stored has this prompt")
    first.close()
    second = make()
    assert len(second._mirror) == 50
    for i, entry in enumerate(ids):
        hit = second.lookup("t1", MODEL, FP, unit(i), 0.99, now=T0)
        assert hit.entry_id == entry and hit.answer.text == f"a{i}"


def test_past_its_bound_the_cache_searches_milvus_and_loses_nothing(make):
    cache = make(memory_index_max_entries=3)
    for i in range(6):
        cache.store("t1", MODEL, FP, unit(i), answer(f"a{i}"), 600, now=T0)
    assert cache._mirror is None
    for i in range(6):
        assert cache.lookup("t1", MODEL, FP, unit(i), 0.99, now=T0).answer.text == f"a{i}"


def test_invalidated_and_swept_entries_leave_the_index(make):
    cache = make()
    cache.store("t1", MODEL, FP, unit(1), answer("gone"), 600, now=T0)
    cache.store("t1", MODEL, FP, unit(2), answer("expires"), 10, now=T0)
    cache.store("t2", MODEL, FP, unit(1), answer("kept"), 600, now=T0)
    assert cache.invalidate(tenant="t1", prompt="p") == 2
    assert len(cache._mirror) == 1
    cache.store("t1", MODEL, FP, unit(2), answer("expires"), 10, now=T0)
    assert cache.sweep_expired(now=T0 + 11) == 1
    assert len(cache._mirror) == 1
    assert cache.lookup("t1", MODEL, FP, unit(1), 0.5, now=T0) is None
    assert cache.lookup("t2", MODEL, FP, unit(1), 0.99, now=T0).answer.text == "kept"


def test_concurrent_lookups_of_two_tenants_identical_prompts_each_get_their_own(make):
    """The same prompt (the same vector) from two tenants, looked up at once from many threads,
    as the cache server's worker pool runs them: each gets its own tenant's answer."""
    cache = make()
    v = unit(7)
    cache.store("tenant-a", MODEL, FP, v, answer("answer for a"), 600, now=T0)
    cache.store("tenant-b", MODEL, FP, v, answer("answer for b"), 600, now=T0)

    def look(i: int) -> tuple[str, str]:
        tenant = "tenant-a" if i % 2 else "tenant-b"
        return tenant, cache.lookup(tenant, MODEL, FP, v, 0.99, now=T0).answer.text

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(look, range(200)))
    assert all(text == f"answer for {tenant[-1]}" for tenant, text in results)
