"""SemanticCache against real Milvus: embedded milvus-lite (a temporary data directory per
test) and a real Milvus 2.3.5 standalone server, started once for this module in its own
network namespace (cli.netns_milvus) and reached through a unix socket, so it never
listens on a real interface. Every test runs on both backends; the server variant is skipped,
with the reason, only where this machine forbids creating a network namespace.

Time is passed in explicitly (``now=``), so TTL tests are exact and never sleep.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.netns_milvus import NetnsMilvus, netns_problem
from services.cache.answers import Answer
from services.cache.bounds import MAX_TEXT_BYTES, MAX_TOKEN_IDS, literal
from services.cache.milvus import CacheSchemaError, CacheUnavailable
from services.cache.options import CacheOptions
from services.cache.rows import split_utf8
from services.cache.semantic import SemanticCache
from spotmesh.validation import InvalidField

DIM = 384
MODEL = "spotmesh-tiny"
FP = "0123456789abcdef0123456789abcdef"
T0 = 1_800_000_000.0  # a fixed "now": TTL arithmetic in tests never depends on the clock

# Tenant ids crafted to break out of a double-quoted filter literal, or to smuggle operators.
HOSTILE_TENANTS = [
    'a" or tenant != "x',
    'a" || tenant != "',
    "a' or tenant != 'x",
    'a\\" or true or \\"',
    "a\\",
    'a"',
    "a\nor tenant != 'x'",
    "a or 1 == 1",
    "",
    "x" * 65,
    "tenant-a ",
    "ténant",
    "a;b",
    "a/b",
    "a)",
]
# Prompts (free text) crafted the same way; these are legitimate prompts and must round-trip.
HOSTILE_PROMPTS = [
    'x" or tenant != "evil',
    'x" || prompt_sha256 != "',
    "x' or tenant != 'evil",
    '\\" or true or \\"',
    "ends with a backslash \\",
    '"',
    "line one\nor tenant != 'evil'\n",
    "\x00 nul and \u2028 separators",
    "x\" or 1 == 1 or tenant == \"",
]


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    problem = netns_problem()
    if problem:
        pytest.skip(f"Milvus server tests need a private network namespace: {problem}")
    server = NetnsMilvus(tmp_path_factory.mktemp("milvus-server")).start()
    yield server
    server.stop()


@pytest.fixture(params=["lite", "lite-milvus-search", "server"])
def backend(request, tmp_path):
    """(uri, label) of a fresh, empty store: a lite data dir, or a new collection on the
    module's server. "lite" searches the cache's memory index (its default); "lite-milvus-search"
    the same store searched by Milvus, as on a server."""
    if request.param.startswith("lite"):
        return str(tmp_path / "cache.db"), request.param
    server = request.getfixturevalue("milvus_server")
    return server.uri, "server"


@pytest.fixture
def make_cache(backend):
    """Opens caches on the test's store. On the server all tests share one collection (creating
    and loading one costs ~3 s on Milvus 2.3.5), emptied after each test."""
    uri, kind = backend
    collection = "shared_test_cache" if kind == "server" else "spotmesh_semantic_cache"
    opened: list[SemanticCache] = []

    def make(**kw) -> SemanticCache:
        opts = dict(uri=uri, collection=collection, dim=DIM, timeout_seconds=30.0,
                    index="milvus" if kind == "lite-milvus-search" else "auto")
        opts.update(kw)
        cache = SemanticCache(CacheOptions(**opts))
        opened.append(cache)
        return cache

    yield make
    live = [c for c in opened if not c.closed]
    try:
        if kind == "server":
            cleaner = live[0] if live else make()
            with cleaner._write_lock:
                cleaner._delete_where('id != ""')
            live = [c for c in opened if not c.closed]
    finally:
        for c in live:
            c.close()


@pytest.fixture
def cache(make_cache) -> SemanticCache:
    return make_cache()


def unit(seed: int) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(DIM)
    return (v / np.linalg.norm(v)).tolist()


def at_similarity(v: list[float], cos: float, seed: int = 99) -> list[float]:
    """A unit vector whose cosine similarity to unit vector ``v`` is exactly ``cos``."""
    a = np.array(v)
    w = np.array(unit(seed))
    w -= w.dot(a) * a
    w /= np.linalg.norm(w)
    return (cos * a + math.sqrt(1 - cos * cos) * w).tolist()


def answer(text: str, prompt: str = "What is the capital of France?") -> Answer:
    return Answer(prompt=prompt, text=text, token_ids=(5, 6, 7), finish_reason=1,
                  prompt_tokens=9, cached_prompt_tokens=2, completion_tokens=3, cost_usd=0.002,
                  replica_seconds=0.25)


def test_same_prompt_for_two_tenants_each_sees_only_its_own(cache):
    v = unit(1)
    a = cache.store("tenant-a", MODEL, FP, v, answer("Paris (for a)"), 600, now=T0)
    b = cache.store("tenant-b", MODEL, FP, v, answer("Paris (for b)"), 600, now=T0)
    hit_a = cache.lookup("tenant-a", MODEL, FP, v, 0.9, now=T0 + 1)
    hit_b = cache.lookup("tenant-b", MODEL, FP, v, 0.9, now=T0 + 1)
    assert (hit_a.entry_id, hit_a.answer.text) == (a.entry_id, "Paris (for a)")
    assert (hit_b.entry_id, hit_b.answer.text) == (b.entry_id, "Paris (for b)")
    # A prefix of a tenant id is another tenant, not a wildcard.
    assert cache.lookup("tenant", MODEL, FP, v, 0.0, now=T0 + 1) is None
    assert cache.lookup("tenant-c", MODEL, FP, v, 0.0, now=T0 + 1) is None
    assert cache.count("tenant-a", now=T0 + 1) == 1
    assert cache.count(now=T0 + 1) == 2


def test_a_hit_returns_the_whole_entry(cache):
    v = unit(2)
    stored = cache.store("t1", MODEL, FP, v, answer("Paris."), 600, now=T0)
    hit = cache.lookup("t1", MODEL, FP, v, 0.5, now=T0 + 3)
    assert hit.entry_id == stored.entry_id
    assert hit.answer == answer("Paris.")
    assert hit.created_at == pytest.approx(T0)
    assert hit.expires_at == pytest.approx(T0 + 600)
    assert hit.similarity == pytest.approx(1.0, abs=1e-5)


def test_model_and_fingerprint_are_part_of_the_key(cache):
    v = unit(3)
    cache.store("t1", MODEL, FP, v, answer("greedy"), 600, now=T0)
    assert cache.lookup("t1", "other-model", FP, v, 0.0, now=T0) is None
    assert cache.lookup("t1", MODEL, "f" * 32, v, 0.0, now=T0) is None
    assert cache.lookup("t1", MODEL, FP, v, 0.0, now=T0).answer.text == "greedy"


@pytest.mark.parametrize("tenant", HOSTILE_TENANTS)
def test_tenant_ids_that_could_break_out_of_a_filter_are_rejected(cache, tenant):
    v = unit(4)
    cache.store("victim", MODEL, FP, v, answer("secret"), 600, now=T0)
    calls = [
        lambda: cache.lookup(tenant, MODEL, FP, v, 0.0, now=T0),
        lambda: cache.store(tenant, MODEL, FP, v, answer("x"), 600, now=T0),
        lambda: cache.store(tenant, MODEL, FP, v, answer("x"), 600, replace=True, now=T0),
        lambda: cache.count(tenant or "\\", now=T0),
        lambda: cache.invalidate(tenant=tenant or '"'),
    ]
    for call in calls:
        with pytest.raises(InvalidField) as err:
            call()
        assert err.value.field == "tenant"
    assert cache.count("victim", now=T0) == 1


@pytest.mark.parametrize("field,value", [
    ("model", 'm" or model != "'), ("model", "m\\"), ("model", "m m"), ("model", ""),
    ("sampling_fingerprint", 'f" or true or "'), ("sampling_fingerprint", "f\n"),
    ("sampling_fingerprint", ""),
])
def test_model_names_and_fingerprints_are_held_to_a_strict_alphabet(cache, field, value):
    v = unit(5)
    model, fp = (value, FP) if field == "model" else (MODEL, value)
    with pytest.raises(InvalidField) as err:
        cache.lookup("t1", model, fp, v, 0.0, now=T0)
    assert err.value.field == field
    with pytest.raises(InvalidField):
        cache.store("t1", model, fp, v, answer("x"), 600, now=T0)


def test_crafted_prompts_round_trip_and_cannot_reach_other_entries(cache):
    victim = {}
    for i, p in enumerate(HOSTILE_PROMPTS):
        victim[p] = cache.store("victim", MODEL, FP, unit(100 + i), answer("v", prompt=p), 600,
                                now=T0).entry_id
    for i, p in enumerate(HOSTILE_PROMPTS):
        stored = cache.store("evil", MODEL, FP, unit(200 + i), answer("e", prompt=p), 600,
                             now=T0)
        # replace by a crafted prompt deletes only the attacker's own earlier entries.
        again = cache.store("evil", MODEL, FP, unit(200 + i), answer("e2", prompt=p), 600,
                            replace=True, now=T0)
        assert again.replaced == 1, p
        hit = cache.lookup("evil", MODEL, FP, unit(200 + i), 0.99, now=T0)
        assert hit.answer.prompt == p and hit.answer.text == "e2"
        assert hit.entry_id not in (stored.entry_id, victim[p])
    assert cache.count("victim", now=T0) == len(HOSTILE_PROMPTS)
    for p in HOSTILE_PROMPTS:
        assert cache.invalidate(tenant="evil", prompt=p) == 1, p
    assert cache.count("evil", now=T0) == 0
    assert cache.count("victim", now=T0) == len(HOSTILE_PROMPTS)
    for i, p in enumerate(HOSTILE_PROMPTS):
        hit = cache.lookup("victim", MODEL, FP, unit(100 + i), 0.99, now=T0)
        assert (hit.entry_id, hit.answer.prompt) == (victim[p], p)
    # Invalidating by exact prompt across tenants removes exactly that prompt's entries.
    assert cache.invalidate(prompt=HOSTILE_PROMPTS[0]) == 1
    assert cache.count("victim", now=T0) == len(HOSTILE_PROMPTS) - 1


def test_literal_escapes_quotes_and_backslashes():
    assert literal('a"b') == '"a\\"b"'
    assert literal("a\\") == '"a\\\\"'
    assert literal('\\"') == '"\\\\\\""'


def test_expired_entries_are_never_returned_even_before_the_sweeper_runs(cache):
    v = unit(6)
    cache.store("t1", MODEL, FP, v, answer("short-lived"), 10, now=T0)
    assert cache.lookup("t1", MODEL, FP, v, 0.5, now=T0 + 9.5) is not None
    assert cache.lookup("t1", MODEL, FP, v, 0.5, now=T0 + 10) is None
    assert cache.lookup("t1", MODEL, FP, v, 0.5, now=T0 + 3600) is None
    assert cache.count("t1", now=T0 + 11) == 0
    # The row is still there (nothing swept it); only the filter hides it.
    assert cache.sweep_expired(now=T0 + 11) == 1
    assert cache.sweep_expired(now=T0 + 11) == 0


def test_an_expired_entry_does_not_shadow_a_live_one(cache):
    v = unit(7)
    cache.store("t1", MODEL, FP, v, answer("old"), 10, now=T0)
    cache.store("t1", MODEL, FP, at_similarity(v, 0.95), answer("live"), 1000, now=T0)
    assert cache.lookup("t1", MODEL, FP, v, 0.9, now=T0 + 20).answer.text == "live"


def test_hits_do_not_extend_the_ttl(cache):
    v = unit(8)
    cache.store("t1", MODEL, FP, v, answer("a"), 100, now=T0)
    for t in (1, 50, 99):
        hit = cache.lookup("t1", MODEL, FP, v, 0.5, now=T0 + t)
        assert hit.expires_at == pytest.approx(T0 + 100)
    assert cache.lookup("t1", MODEL, FP, v, 0.5, now=T0 + 100.5) is None


def test_threshold_is_respected(cache):
    v = unit(9)
    cache.store("t1", MODEL, FP, v, answer("a"), 600, now=T0)
    q = at_similarity(v, 0.80)
    hit = cache.lookup("t1", MODEL, FP, q, 0.79, now=T0)
    assert hit is not None and hit.similarity == pytest.approx(0.80, abs=1e-3)
    assert cache.lookup("t1", MODEL, FP, q, 0.81, now=T0) is None
    assert cache.lookup("t1", MODEL, FP, at_similarity(v, -0.5), 0.0, now=T0) is None
    assert cache.lookup("t1", MODEL, FP, at_similarity(v, 0.05), 0.0, now=T0) is not None


def test_lookup_returns_the_most_similar_entry(cache):
    v = unit(10)
    cache.store("t1", MODEL, FP, at_similarity(v, 0.85, seed=1), answer("far"), 600, now=T0)
    cache.store("t1", MODEL, FP, at_similarity(v, 0.97, seed=2), answer("near"), 600, now=T0)
    cache.store("t2", MODEL, FP, v, answer("other tenant, exact"), 600, now=T0)
    hit = cache.lookup("t1", MODEL, FP, v, 0.5, now=T0)
    assert hit.answer.text == "near" and hit.similarity == pytest.approx(0.97, abs=1e-3)


def test_replace_deletes_only_the_same_prompt_of_the_same_scope(cache):
    v = unit(11)
    p = "Summarize the report."
    cache.store("t1", MODEL, FP, v, answer("v1", prompt=p), 600, now=T0)
    cache.store("t1", MODEL, FP, v, answer("v2", prompt=p), 600, now=T0)
    cache.store("t1", MODEL, FP, v, answer("other prompt", prompt=p + " "), 600, now=T0)
    cache.store("t2", MODEL, FP, v, answer("t2's", prompt=p), 600, now=T0)
    cache.store("t1", MODEL, "f" * 32, v, answer("sampled", prompt=p), 600, now=T0)
    cache.store("t1", "other-model", FP, v, answer("other model", prompt=p), 600, now=T0)
    new = cache.store("t1", MODEL, FP, v, answer("v3", prompt=p), 600, replace=True, now=T0)
    assert new.replaced == 2
    assert cache.count("t1", now=T0) == 4  # v3, "other prompt", sampled, other model
    assert cache.count("t2", now=T0) == 1
    again = cache.store("t1", MODEL, FP, v, answer("v4", prompt=p), 600, replace=True, now=T0)
    assert again.replaced == 1
    nothing = cache.store("t1", MODEL, FP, v, answer("new", prompt="fresh"), 600, replace=True,
                          now=T0)
    assert nothing.replaced == 0


def test_invalidate_by_tenant_model_prompt_and_combinations(cache):
    rows = [("t1", "m1", "p1"), ("t1", "m1", "p2"), ("t1", "m2", "p1"), ("t2", "m1", "p1"),
            ("t2", "m2", "p2"), ("t3", "m1", "p3")]
    for i, (t, m, p) in enumerate(rows):
        cache.store(t, m, FP, unit(300 + i), answer(f"a{i}", prompt=p), 600, now=T0)
    assert cache.invalidate(tenant="t1", model="m1", prompt="p1") == 1
    assert cache.invalidate(tenant="t1", prompt="p1") == 1  # the m2 one
    assert cache.invalidate(model="m2") == 1  # t2/m2/p2
    assert cache.invalidate(prompt="p1") == 1  # t2/m1/p1
    assert cache.invalidate(tenant="nobody") == 0
    assert cache.invalidate(tenant="t1") == 1  # t1/m1/p2
    assert cache.count(now=T0) == 1
    assert cache.count("t3", now=T0) == 1
    with pytest.raises(InvalidField) as err:
        cache.invalidate()
    assert err.value.field == "tenant" and "at least one filter" in str(err.value)


def test_invalidated_entries_are_not_returned_by_the_next_lookup(cache):
    v = unit(12)
    cache.store("t1", MODEL, FP, v, answer("stale"), 600, now=T0)
    assert cache.lookup("t1", MODEL, FP, v, 0.5, now=T0) is not None
    assert cache.invalidate(tenant="t1") == 1
    assert cache.lookup("t1", MODEL, FP, v, 0.5, now=T0) is None


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=4, unique=True))
def test_invalidate_by_prompt_matches_exactly_any_text(tmp_path_factory, prompts):
    uri = str(tmp_path_factory.mktemp("hypo") / "cache.db")
    cache = SemanticCache(CacheOptions(uri=uri, dim=8))
    try:
        for i, p in enumerate(prompts):
            v = [0.0] * 8
            v[i] = 1.0
            cache.store("t1", MODEL, FP, v, Answer(prompt=p, text="x"), 600, now=T0)
        assert cache.invalidate(tenant="t1", prompt=prompts[0]) == 1
        assert cache.count("t1", now=T0) == len(prompts) - 1
    finally:
        cache.close()


def test_wrong_dimension_vector_names_both_dimensions(cache):
    for bad in (unit(13)[:-1], [*unit(13), 0.0], []):
        for call in (lambda b=bad: cache.lookup("t1", MODEL, FP, b, 0.5),
                     lambda b=bad: cache.store("t1", MODEL, FP, b, answer("x"), 60)):
            with pytest.raises(InvalidField) as err:
                call()
            assert err.value.field == "vector"
            assert str(len(bad)) in str(err.value) and str(DIM) in str(err.value)


@pytest.mark.parametrize("kw,field", [
    (dict(answer=Answer(prompt="", text="x")), "prompt"),
    (dict(answer=Answer(prompt="p", text="")), "text"),
    (dict(answer=Answer(prompt="p" * (MAX_TEXT_BYTES + 1), text="x")), "prompt"),
    (dict(answer=Answer(prompt="p", text="é" * (MAX_TEXT_BYTES // 2) + "x")), "text"),
    (dict(answer=Answer(prompt="p", text="x", token_ids=(1,) * (MAX_TOKEN_IDS + 1))),
     "token_ids"),
    (dict(answer=Answer(prompt="p", text="x", token_ids=(1, -1))), "token_ids[1]"),
    (dict(answer=Answer(prompt="p", text="x", cost_usd=float("nan"))), "cost_usd"),
    (dict(answer=Answer(prompt="p", text="x", prompt_tokens=-1)), "usage.prompt_tokens"),
    (dict(ttl=0.0), "ttl_seconds"),
    (dict(ttl=-5.0), "ttl_seconds"),
    (dict(ttl=30 * 86400 + 1.0), "ttl_seconds"),
    (dict(ttl=float("nan")), "ttl_seconds"),
    (dict(vector=[float("nan")] + [0.0] * (DIM - 1)), "vector"),
    (dict(vector=[0.0] * DIM), "vector"),
])
def test_store_rejects_bad_input_naming_the_field(cache, kw, field):
    args = dict(vector=unit(14), answer=answer("x"), ttl=60.0)
    args.update(kw)
    with pytest.raises(InvalidField) as err:
        cache.store("t1", MODEL, FP, args["vector"], args["answer"], args["ttl"])
    assert err.value.field == field
    assert cache.count("t1") == 0


@pytest.mark.parametrize("threshold", [-0.01, 1.01, float("nan")])
def test_lookup_rejects_thresholds_outside_0_1(cache, threshold):
    with pytest.raises(InvalidField) as err:
        cache.lookup("t1", MODEL, FP, unit(15), threshold)
    assert err.value.field == "threshold"


def test_the_largest_entry_the_contract_allows_round_trips_exactly(cache):
    # 4-byte characters: the split between a field and its tail must fall between characters.
    prompt = "😀" * (MAX_TEXT_BYTES // 4)
    text = "a" + "é" * ((MAX_TEXT_BYTES - 1) // 2)  # 65535 bytes
    ids = tuple(range(100_000, 100_000 + MAX_TOKEN_IDS))
    v = unit(16)
    cache.store("t1", MODEL, FP, v, Answer(prompt=prompt, text=text, token_ids=ids), 60, now=T0)
    hit = cache.lookup("t1", MODEL, FP, v, 0.5, now=T0)
    assert len(hit.answer.prompt.encode()) == MAX_TEXT_BYTES
    assert hit.answer.prompt == prompt and hit.answer.text == text
    assert hit.answer.token_ids == ids
    assert cache.invalidate(prompt=prompt) == 1


@given(st.text(min_size=1, max_size=50))
def test_split_utf8_cuts_between_characters(s):
    whole = s * (70_000 // len(s.encode()) + 1)
    head, tail = split_utf8(whole)
    assert head + tail == whole
    assert 65535 - 3 <= len(head.encode()) <= 65535


def test_stats_count_per_tenant_and_in_total(cache):
    v = unit(17)
    cache.store("t1", MODEL, FP, v, answer("a"), 10, now=T0)
    cache.store("t2", MODEL, FP, v, answer("b"), 1000, now=T0)
    cache.lookup("t1", MODEL, FP, v, 0.5, now=T0)
    cache.lookup("t1", MODEL, FP, v, 0.5, now=T0 + 20)
    cache.lookup("t2", MODEL, FP, v, 0.5, now=T0)
    assert cache.sweep_expired(now=T0 + 20) == 1
    s1, s2, total = cache.stats("t1", now=T0 + 20), cache.stats("t2", now=T0 + 20), \
        cache.stats(now=T0 + 20)
    assert (s1.entries, s1.lookups, s1.hits, s1.stores, s1.expired_swept) == (0, 2, 1, 1, 1)
    assert (s2.entries, s2.lookups, s2.hits, s2.stores, s2.expired_swept) == (1, 1, 1, 1, 0)
    assert (total.entries, total.lookups, total.hits, total.stores, total.expired_swept) == \
        (1, 3, 2, 2, 1)


def test_per_tenant_stats_are_bounded_and_totals_stay_exact(make_cache):
    # A service-token holder can name any tenant: counters are kept for the 2 most recently
    # counted tenants; older ones fold into the totals instead of growing memory.
    cache = make_cache(max_tenant_stats=2)
    v = unit(19)
    for tenant in ("t1", "t2", "t1", "t3", "t4"):
        cache.lookup(tenant, MODEL, FP, v, 0.5, now=T0)
    assert list(cache._counters) == ["t3", "t4"]
    assert cache.stats("t1", now=T0).lookups == 0  # folded: its own figures start again
    assert cache.stats("t4", now=T0).lookups == 1
    assert cache.stats(now=T0).lookups == 5


def test_maintain_sweeps_and_flushes_on_schedule(make_cache):
    cache = make_cache(sweep_seconds=1e-9, flush_seconds=1e-9, flush_every=0)
    v = unit(18)
    cache.store("t1", MODEL, FP, v, answer("gone"), 0.001, now=time.time() - 10)
    cache.store("t1", MODEL, FP, v, answer("kept"), 600)
    flushed, swept = cache.maintain()
    assert swept == 1
    assert flushed == (cache.options.uri.endswith(".db"))  # only milvus-lite needs flushing
    assert cache.count("t1") == 1


def test_a_store_batch_is_written_whole(cache):
    entries = [("t1", MODEL, FP, unit(400 + i), answer(f"b{i}", prompt=f"q{i}"), 600)
               for i in range(5)]
    ids = cache.store_batch(entries, now=T0)
    assert len(set(ids)) == 5 and cache.count("t1", now=T0) == 5
    bad = [*entries[:2], ("t1", MODEL, FP, unit(1)[:3], answer("short"), 600)]
    with pytest.raises(InvalidField):
        cache.store_batch(bad, now=T0)
    assert cache.count("t1", now=T0) == 5


def test_reopening_with_another_dimension_is_refused(make_cache, backend):
    cache = make_cache()
    cache.store("t1", MODEL, FP, unit(19), answer("a"), 600)
    if backend[1].startswith("lite"):
        cache.close()  # milvus-lite: one open instance per data directory
    with pytest.raises(CacheSchemaError, match="384"):
        make_cache(dim=128).count()


def test_entries_survive_close_and_reopen(make_cache, backend):
    first = make_cache()
    v = unit(20)
    stored = first.store("t1", MODEL, FP, v, answer("kept"), 600, now=T0)
    first.close()
    second = make_cache()
    assert second.lookup("t1", MODEL, FP, v, 0.5, now=T0).entry_id == stored.entry_id


def test_unreachable_milvus_is_cache_unavailable_and_fails_fast():
    cache = SemanticCache(CacheOptions(uri="http://127.0.0.1:1", dim=DIM, timeout_seconds=2.0,
                                       reconnect_seconds=60.0))
    with pytest.raises(CacheUnavailable, match=r"127\.0\.0\.1:1"):
        cache.lookup("t1", MODEL, FP, unit(21), 0.5)
    # Within the reconnect back-off, calls fail at once with the same message.
    with pytest.raises(CacheUnavailable, match="cannot reach Milvus"):
        cache.store("t1", MODEL, FP, unit(21), answer("x"), 60)
    # Bad input is still bad input, Milvus or not.
    with pytest.raises(InvalidField):
        cache.lookup('a" or "1', MODEL, FP, unit(21), 0.5)
    cache.close()


def test_credentials_in_the_uri_never_reach_error_messages():
    cache = SemanticCache(CacheOptions(uri="http://root:s3cret@127.0.0.1:1", dim=DIM,
                                       timeout_seconds=2.0))
    with pytest.raises(CacheUnavailable) as err:
        cache.count()
    assert "s3cret" not in str(err.value) and "root" not in str(err.value)
    assert "http://127.0.0.1:1" in str(err.value)
    cache.close()
