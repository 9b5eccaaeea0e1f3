"""The gateway's semantic-cache decisions, without the services: what is cacheable, what is
stored, how a hit is replayed, and what the fingerprint separates."""

from __future__ import annotations

import pytest

from services.gateway.auth import CachePolicy, Tenant
from services.gateway.semantic import plan_for, replay, storable
from services.gateway.validation import ValidRequest
from spotmesh.sampling import Sampling, fingerprint
from spotmesh.v1 import cache_pb2, common_pb2, gateway_pb2

GREEDY = Sampling(temperature=0.0, max_tokens=32)
SAMPLED = Sampling(temperature=0.8, max_tokens=32, seed=7)


def tenant(**policy) -> Tenant:
    return Tenant("acme", frozenset({"*"}), cache=CachePolicy(**policy))


def request(prompt=None, messages=(), sampling=GREEDY, mode=gateway_pb2.CACHE_MODE_DEFAULT):
    return ValidRequest(model="m", prompt=prompt, messages=tuple(messages), sampling=sampling,
                        cache_mode=mode, request_id="r")


def test_greedy_requests_are_looked_up_and_stored():
    plan = plan_for(tenant(), request("What is my balance?"))
    assert plan.lookup and plan.store and plan.key_text == "What is my balance?"


def test_bypass_keeps_the_cache_out_entirely():
    assert plan_for(tenant(), request("hi", mode=gateway_pb2.CACHE_MODE_BYPASS)) is None


def test_refresh_skips_the_lookup_but_stores_over_the_old_answer():
    plan = plan_for(tenant(), request("hi", mode=gateway_pb2.CACHE_MODE_REFRESH))
    assert not plan.lookup and plan.store


def test_sampled_output_is_cached_only_where_the_tenant_allows_it():
    assert plan_for(tenant(), request("hi", sampling=SAMPLED)) is None
    assert plan_for(tenant(cache_sampled=True), request("hi", sampling=SAMPLED)) is not None


def test_tenant_threshold_and_ttl_travel_with_the_plan():
    plan = plan_for(tenant(threshold=0.93, ttl_seconds=60), request("hi"))
    assert (plan.threshold, plan.ttl_seconds) == (0.93, 60)


def test_chat_embeds_the_last_turn_and_pins_the_conversation_before_it():
    a = plan_for(tenant(), request(messages=[("system", "You are a bank."),
                                             ("user", "Where is my card?")]))
    b = plan_for(tenant(), request(messages=[("system", "You are a pirate."),
                                             ("user", "Where is my card?")]))
    assert a.key_text == b.key_text == "Where is my card?"
    assert a.fingerprint != b.fingerprint


def test_fingerprint_separates_what_changes_the_answer_but_not_max_tokens():
    base = fingerprint(GREEDY)
    assert fingerprint(Sampling(temperature=0.0, max_tokens=500)) == base
    assert fingerprint(Sampling(temperature=0.0, max_tokens=32, stop=("\n",))) != base
    assert fingerprint(Sampling(temperature=0.0, max_tokens=32, top_k=5)) != base
    # A seed changes nothing under greedy decoding, everything under sampling.
    assert fingerprint(Sampling(temperature=0.0, max_tokens=32, seed=1)) == base
    assert fingerprint(Sampling(temperature=0.7, seed=1)) != fingerprint(
        Sampling(temperature=0.7, seed=2))


@pytest.mark.parametrize(("finish", "truncated_ok", "expected"), [
    (common_pb2.FINISH_REASON_STOP, False, True),
    (common_pb2.FINISH_REASON_LENGTH, False, False),
    (common_pb2.FINISH_REASON_LENGTH, True, True),
    (common_pb2.FINISH_REASON_ABORT, True, False),
    (common_pb2.FINISH_REASON_UNSPECIFIED, True, False),
])
def test_only_clean_whole_answers_are_stored(finish, truncated_ok, expected):
    plan = plan_for(tenant(cache_truncated=truncated_ok), request("hi"))
    assert storable(finish, plan) is expected


def test_a_hit_replays_as_a_stream_with_exactly_the_cached_text_and_tokens(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    text = "Spot instances cost less. 東京は日本の首都です 😀 and that is all " * 3
    ids = tok.encode(text, add_special_tokens=False)
    answer = cache_pb2.CachedAnswer(text=tok.decode(ids), token_ids=ids,
                                    finish_reason=common_pb2.FINISH_REASON_STOP, cost_usd=0.5)
    msgs = list(replay(answer, tok, "req-1", prompt_tokens=9))
    assert len(msgs) > 1
    assert "".join(m.text for m in msgs) == answer.text
    assert [t for m in msgs for t in m.token_ids] == ids
    assert all(m.cache_hit for m in msgs)
    assert all("\ufffd" not in m.text for m in msgs)
    assert msgs[0].served_by.replica == "cache" and msgs[0].request_id == "req-1"
    last = msgs[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP and last.cost_usd == 0.0
    assert last.usage.completion_tokens == len(ids) and last.usage.prompt_tokens == 9


def test_replay_falls_back_to_the_cached_text_when_detokenization_differs(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    ids = tok.encode("one two three four five six seven eight nine ten " * 4,
                     add_special_tokens=False)
    answer = cache_pb2.CachedAnswer(text="the engine's own text", token_ids=ids,
                                    finish_reason=common_pb2.FINISH_REASON_LENGTH)
    msgs = list(replay(answer, tok, "r", 1))
    assert "".join(m.text for m in msgs) == "the engine's own text"
    assert [t for m in msgs for t in m.token_ids] == ids
