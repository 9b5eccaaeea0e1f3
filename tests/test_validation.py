"""Request validation: every bound is enforced and named, defaults are applied, and no input makes
validate() fail with anything but InvalidField (which the gateway turns into INVALID_ARGUMENT)."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from services.gateway.config import Limits
from services.gateway.validation import (
    MAX_MODEL_NAME,
    MAX_REQUEST_ID,
    ROLES,
    ValidRequest,
    validate,
)
from spotmesh.sampling import (
    MAX_STOP,
    MAX_STOP_BYTES,
    InvalidField,
    Sampling,
    sampling_from_proto,
)
from spotmesh.v1 import common_pb2, gateway_pb2

# Small limits, each default distinct from the built-in ones so a test sees which one applied.
LIMITS = Limits(max_prompt_bytes=64, max_messages=3, max_tokens_limit=100, default_max_tokens=17)


def req(**kwargs) -> gateway_pb2.GenerateRequest:
    kwargs.setdefault("prompt", "hello")
    return gateway_pb2.GenerateRequest(**kwargs)


def msgs(*pairs: tuple[str, str]) -> list[gateway_pb2.ChatMessage]:
    return [gateway_pb2.ChatMessage(role=r, content=c) for r, c in pairs]


def sp(**kwargs) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**kwargs)


def assert_invalid(request: gateway_pb2.GenerateRequest, field: str, *fragments: str) -> None:
    with pytest.raises(InvalidField) as info:
        validate(request, LIMITS)
    assert info.value.field == field
    message = str(info.value)
    assert message.startswith(f"{field} "), message
    for fragment in fragments:
        assert fragment in message, message


REJECTED = {
    "model too long": (req(model="m" * (MAX_MODEL_NAME + 1)), "model", f"{MAX_MODEL_NAME}"),
    "request_id too long": (req(request_id="r" * (MAX_REQUEST_ID + 1)), "request_id", "128"),
    "request_id with a space": (req(request_id="a b"), "request_id", "printable ASCII"),
    "request_id with a tab": (req(request_id="a\tb"), "request_id", "printable ASCII"),
    "request_id not ASCII": (req(request_id="café"), "request_id", "printable ASCII"),
    "request_id with DEL": (req(request_id="a\x7f"), "request_id", "printable ASCII"),
    "neither prompt nor messages": (req(prompt=""), "prompt", "is empty", "messages"),
    "both prompt and messages": (
        req(prompt="hi", messages=msgs(("user", "hi"))), "prompt", "not both"),
    "whitespace-only prompt": (req(prompt=" \n\t "), "prompt", "only whitespace"),
    "prompt over the byte limit": (req(prompt="é" * 33), "prompt", "66 bytes", "64"),
    "too many messages": (
        req(prompt="", messages=msgs(*[("user", "x")] * 4)), "messages", "more than 3"),
    "unknown role": (
        req(prompt="", messages=msgs(("user", "a"), ("tool", "b"))),
        "messages[1].role", "system, user, assistant"),
    "role in the wrong case": (req(prompt="", messages=msgs(("User", "a"))), "messages[0].role"),
    "empty message content": (
        req(prompt="", messages=msgs(("system", "s"), ("user", ""))),
        "messages[1].content", "empty"),
    "messages over the byte limit": (
        req(prompt="", messages=msgs(("system", "a" * 40), ("user", "b" * 25))),
        "messages", "65 bytes", "64"),
    "temperature below 0": (req(sampling=sp(temperature=-0.5)), "sampling.temperature", "[0, 2]"),
    "temperature above 2": (req(sampling=sp(temperature=2.5)), "sampling.temperature", "2.5"),
    "temperature NaN": (req(sampling=sp(temperature=math.nan)), "sampling.temperature", "nan"),
    "temperature infinite": (req(sampling=sp(temperature=math.inf)), "sampling.temperature"),
    "top_p zero": (req(sampling=sp(top_p=0.0)), "sampling.top_p", "(0, 1]"),
    "top_p above 1": (req(sampling=sp(top_p=1.5)), "sampling.top_p", "1.5"),
    "top_p negative": (req(sampling=sp(top_p=-0.5)), "sampling.top_p"),
    "top_p NaN": (req(sampling=sp(top_p=math.nan)), "sampling.top_p"),
    "top_k negative": (req(sampling=sp(top_k=-1)), "sampling.top_k", ">= 0", "-1"),
    "max_tokens zero": (req(sampling=sp(max_tokens=0)), "sampling.max_tokens", ">= 1", "0"),
    "max_tokens negative": (req(sampling=sp(max_tokens=-3)), "sampling.max_tokens", ">= 1"),
    "max_tokens over the limit": (
        req(sampling=sp(max_tokens=101)), "sampling.max_tokens", "<= 100", "101"),
    "too many stop sequences": (
        req(sampling=sp(stop=["s"] * (MAX_STOP + 1))), "sampling.stop", "9 entries", "8"),
    "empty stop sequence": (req(sampling=sp(stop=["a", "b", ""])), "sampling.stop[2]", "1-256"),
    "stop sequence over the byte limit": (
        req(sampling=sp(stop=["é" * 129])), "sampling.stop[0]", "bytes"),
    "unknown cache mode": (
        req(cache=gateway_pb2.CacheControl(mode=7)), "cache.mode", "unknown value 7"),
    "negative cache mode": (req(cache=gateway_pb2.CacheControl(mode=-1)), "cache.mode"),
}


@pytest.mark.parametrize(("request_", "field", "fragments"), [
    pytest.param(r, f, frags, id=name) for name, (r, f, *frags) in REJECTED.items()
])
def test_out_of_bounds_field_is_rejected_by_name(request_, field, fragments) -> None:
    assert_invalid(request_, field, *fragments)


ACCEPTED = {
    "longest model name": req(model="m" * MAX_MODEL_NAME),
    "longest request_id": req(request_id="~" * MAX_REQUEST_ID),
    "prompt exactly at the byte limit": req(prompt="é" * 32),
    "messages exactly at the limits": req(
        prompt="", messages=msgs(("system", "a" * 20), ("user", "b" * 22), ("assistant", "c"))),
    "temperature 0": req(sampling=sp(temperature=0.0)),
    "temperature 2": req(sampling=sp(temperature=2.0)),
    "top_p 1": req(sampling=sp(top_p=1.0)),
    "tiny top_p": req(sampling=sp(top_p=1e-6)),
    "top_k 0": req(sampling=sp(top_k=0)),
    "max_tokens 1": req(sampling=sp(max_tokens=1)),
    "max_tokens at the limit": req(sampling=sp(max_tokens=100)),
    "most stop sequences, longest each": req(
        sampling=sp(stop=["s" * MAX_STOP_BYTES] * MAX_STOP)),
    "every cache mode": req(cache=gateway_pb2.CacheControl(mode=gateway_pb2.CACHE_MODE_REFRESH)),
}


@pytest.mark.parametrize("request_", [pytest.param(r, id=n) for n, r in ACCEPTED.items()])
def test_values_on_the_bounds_are_accepted(request_) -> None:
    assert isinstance(validate(request_, LIMITS), ValidRequest)


def test_unset_sampling_takes_the_documented_defaults() -> None:
    v = validate(req(), LIMITS)
    assert v.sampling == Sampling(
        temperature=1.0, top_p=1.0, top_k=0, max_tokens=LIMITS.default_max_tokens, stop=(),
        seed=None,
    )
    assert not v.sampling.greedy
    assert v.cache_mode == gateway_pb2.CACHE_MODE_DEFAULT
    assert v.model == ""


def test_built_in_default_max_tokens_is_the_documented_256() -> None:
    assert validate(req(), Limits()).sampling.max_tokens == 256


def test_explicit_zero_is_not_mistaken_for_unset() -> None:
    s = validate(req(sampling=sp(temperature=0.0, top_k=0, seed=0)), LIMITS).sampling
    assert s.temperature == 0.0
    assert s.greedy
    assert s.seed == 0


def test_set_values_are_kept() -> None:
    v = validate(
        req(
            model="m1",
            prompt="",
            messages=msgs(("system", "be brief"), ("user", "hi")),
            sampling=sp(temperature=0.5, top_p=0.25, top_k=40, max_tokens=9, stop=["\n", "."],
                        seed=-7),
            cache=gateway_pb2.CacheControl(mode=gateway_pb2.CACHE_MODE_BYPASS),
            request_id="abc-123",
        ),
        LIMITS,
    )
    assert v.model == "m1"
    assert v.prompt is None
    assert v.messages == (("system", "be brief"), ("user", "hi"))
    assert v.sampling == Sampling(0.5, 0.25, 40, 9, ("\n", "."), -7)
    assert v.cache_mode == gateway_pb2.CACHE_MODE_BYPASS
    assert v.request_id == "abc-123"


def test_empty_request_id_is_generated() -> None:
    first = validate(req(), LIMITS).request_id
    second = validate(req(), LIMITS).request_id
    assert first != second
    for rid in (first, second):
        assert 0 < len(rid) <= MAX_REQUEST_ID
        assert all(" " < c <= "~" for c in rid)
        # A generated id is itself a valid request_id.
        assert validate(req(request_id=rid), LIMITS).request_id == rid


def test_sampling_from_proto_prefixes_errors_with_the_given_field() -> None:
    with pytest.raises(InvalidField) as info:
        sampling_from_proto(sp(top_k=-2), default_max_tokens=1, max_tokens_limit=1, field="s")
    assert info.value.field == "s.top_k"
    assert str(info.value).startswith("s.top_k ")


def test_sampling_from_proto_default_max_tokens_is_checked_against_the_limit() -> None:
    # The replica passes default_max_tokens=min(256, room left); a default over the limit is
    # still an error that names the field rather than a silent overrun.
    with pytest.raises(InvalidField) as info:
        sampling_from_proto(sp(), default_max_tokens=10, max_tokens_limit=5)
    assert info.value.field == "sampling.max_tokens"
    assert sampling_from_proto(sp(), default_max_tokens=5, max_tokens_limit=5).max_tokens == 5


def test_sampling_round_trips_through_the_proto() -> None:
    s = Sampling(temperature=0.5, top_p=0.75, top_k=3, max_tokens=12, stop=("x",), seed=42)
    assert sampling_from_proto(s.to_proto(), default_max_tokens=1, max_tokens_limit=100) == s
    unseeded = Sampling(max_tokens=4)
    assert not unseeded.to_proto().HasField("seed")
    assert sampling_from_proto(
        unseeded.to_proto(), default_max_tokens=1, max_tokens_limit=100) == unseeded


# -- property: validate() either returns an in-bounds ValidRequest or raises InvalidField ------

f32 = st.floats(width=32)
texts = st.text(max_size=40)
roles = st.sampled_from((*ROLES, "", "tool", "User"))


@st.composite
def sampling_params(draw) -> common_pb2.SamplingParams:
    s = common_pb2.SamplingParams()
    temperature = draw(st.none() | st.floats(0, 2, width=32) | f32)
    top_p = draw(st.none() | st.floats(0, 1, width=32) | f32)
    top_k = draw(st.none() | st.integers(0, 100) | st.integers(-(2**31), 2**31 - 1))
    max_tokens = draw(st.none() | st.integers(-2, 120) | st.integers(-(2**31), 2**31 - 1))
    seed = draw(st.none() | st.integers(-(2**63), 2**63 - 1))
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k),
                        ("max_tokens", max_tokens), ("seed", seed)):
        if value is not None:
            setattr(s, name, value)
    s.stop.extend(draw(st.lists(st.text(min_size=1, max_size=8), max_size=MAX_STOP)
                       | st.lists(st.text(max_size=300), max_size=MAX_STOP + 2)))
    return s


printable = st.characters(min_codepoint=0x21, max_codepoint=0x7E)


@st.composite
def generate_requests(draw) -> gateway_pb2.GenerateRequest:
    """Each field is drawn half the time from values that pass and half from anything, so both
    the error paths and the deep checks (sampling, cache mode) are reached often."""
    r = gateway_pb2.GenerateRequest(
        model=draw(st.text(max_size=10) | st.text(max_size=MAX_MODEL_NAME + 2)),
        request_id=draw(
            st.just("")
            | st.text(alphabet=printable, min_size=1, max_size=MAX_REQUEST_ID)
            | st.text(max_size=MAX_REQUEST_ID + 2)
        ),
    )
    shape = draw(st.sampled_from(("prompt", "messages", "prompt", "messages", "both", "none")))
    if shape in ("prompt", "both"):
        r.prompt = draw(st.text(alphabet=printable, min_size=1, max_size=20) | texts
                        | st.text(min_size=60, max_size=70))
    if shape in ("messages", "both"):
        valid_turn = st.tuples(st.sampled_from(ROLES), st.text(min_size=1, max_size=15))
        turns = draw(st.lists(valid_turn, min_size=1, max_size=LIMITS.max_messages)
                     | st.lists(st.tuples(roles, texts), max_size=LIMITS.max_messages + 1))
        for role, content in turns:
            r.messages.add(role=role, content=content)
    if draw(st.booleans()):
        r.sampling.CopyFrom(draw(sampling_params()))
    if draw(st.booleans()):
        r.cache.mode = draw(st.sampled_from((0, 1, 2)) | st.integers(-(2**31), 2**31 - 1))
    return r


def _assert_within_bounds(r: gateway_pb2.GenerateRequest, v: ValidRequest) -> None:
    assert v.model == r.model and len(v.model) <= MAX_MODEL_NAME
    assert 0 < len(v.request_id) <= MAX_REQUEST_ID
    assert all(" " < c <= "~" for c in v.request_id)
    assert v.request_id == (r.request_id or v.request_id)
    assert (v.prompt is None) != (not v.messages)  # exactly one of them
    if v.prompt is not None:
        assert v.prompt == r.prompt and v.prompt.strip()
        size = len(v.prompt.encode())
    else:
        assert 0 < len(v.messages) <= LIMITS.max_messages
        assert all(role in ROLES and content for role, content in v.messages)
        size = sum(len(content.encode()) for _, content in v.messages)
    assert size <= LIMITS.max_prompt_bytes
    s = v.sampling
    assert 0.0 <= s.temperature <= 2.0
    assert 0.0 < s.top_p <= 1.0
    assert s.top_k >= 0
    assert 1 <= s.max_tokens <= LIMITS.max_tokens_limit
    assert len(s.stop) <= MAX_STOP
    assert all(0 < len(stop.encode()) <= MAX_STOP_BYTES for stop in s.stop)
    assert v.cache_mode in gateway_pb2.CacheMode.values()


@settings(max_examples=300, deadline=None)
@given(generate_requests())
@example(req()).via("the plainest valid request")
@example(req(prompt="", messages=msgs(("user", "x")), request_id="id")).via("a valid chat")
def test_validate_returns_in_bounds_values_or_raises_invalid_field(r) -> None:
    try:
        v = validate(r, LIMITS)
    except InvalidField as exc:
        assert str(exc).startswith(f"{exc.field} ")
        return
    _assert_within_bounds(r, v)
