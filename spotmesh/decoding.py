"""Request decoding that turns a malformed message into INVALID_ARGUMENT naming the field.

grpcio answers a request its deserializer cannot parse with INTERNAL ("Exception deserializing
request!"), which tells a client nothing and reads as a server bug. The most common cause is a
string field holding bytes that are not UTF-8 (proto3 requires UTF-8; clients in languages
without checked strings send such bytes easily). Here a failed parse becomes an
:class:`Undecodable` request that the servicer rejects precisely.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message


class Undecodable:
    """Stands in for a request that could not be parsed."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _varint(data: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def find_invalid_utf8(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The path of the first string field (recursing into sub-messages) whose bytes are not
    UTF-8, or None if there is none or the bytes are not a message at all."""
    i = 0
    seen: dict[int, int] = {}  # occurrences per field number: the index of a repeated field
    try:
        while i < len(data):
            key, i = _varint(data, i)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, i = _varint(data, i)
            elif wire_type == 1:
                i += 8
            elif wire_type == 5:
                i += 4
            elif wire_type == 2:
                length, i = _varint(data, i)
                if i + length > len(data):  # truncated: a cut-off character is not bad UTF-8
                    return None
                payload = data[i : i + length]
                i += length
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                index = seen[number] = seen.get(number, -1) + 1
                repeated = field.is_repeated
                path = f"{prefix}{field.name}" + (f"[{index}]" if repeated else "")
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        payload.decode("utf-8")
                    except UnicodeDecodeError:
                        return path
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    found = find_invalid_utf8(field.message_type, payload, f"{path}.")
                    if found:
                        return found
            else:
                return None
    except ValueError:
        return None
    return None


def tolerant_deserializer(cls: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def deserialize(data: bytes) -> Message | Undecodable:
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            path = find_invalid_utf8(cls.DESCRIPTOR, data)
            if path:
                return Undecodable(f"{path} is not valid UTF-8")
            return Undecodable(f"request is not a valid {cls.DESCRIPTOR.full_name}: {exc}")

    return deserialize


def rejecting_undecodable(behaviour, server_streaming: bool):
    """``behaviour`` (a servicer method) answering an :class:`Undecodable` request with
    INVALID_ARGUMENT naming its problem before the method sees it."""
    if server_streaming:

        async def stream(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
            async for response in behaviour(request, context):
                yield response

        return stream

    async def unary(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
        return await behaviour(request, context)

    return unary
