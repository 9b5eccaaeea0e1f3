"""The public contract: generated code matches the .proto files, every element of the protos users
and operators read is documented, and the names and types clients depend on stay put."""

from __future__ import annotations

from pathlib import Path

import grpc_tools
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor
from grpc_tools import protoc

from cli import protogen
from spotmesh.v1 import common_pb2, gateway_pb2

COMMITTED = protogen.REPO / protogen.PACKAGE_DIR
DOCUMENTED_PROTOS = ("common.proto", "gateway.proto", "inference.proto")

# FileDescriptorProto / DescriptorProto / EnumDescriptorProto / ServiceDescriptorProto field
# numbers, which make up SourceCodeInfo.Location.path.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM = 2, 3, 4
ENUM_VALUE = 2
SERVICE_METHOD = 2


def _committed_files() -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(COMMITTED.iterdir())
        if p.is_file() and p.suffix in (".py", ".pyi")
    }


def test_stale_generated_code_fails(tmp_path: Path) -> None:
    written = protogen.generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in written}
    committed = _committed_files()
    hint = "spotmesh/v1 is stale: run `spotmesh proto gen` and commit the result"
    assert sorted(committed) == sorted(fresh), f"{hint} (file sets differ)"
    differing = [name for name in fresh if committed[name] != fresh[name]]
    assert not differing, f"{hint}; differing files: {', '.join(differing)}"


def _descriptor_set(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    include = Path(grpc_tools.__file__).parent / "_proto"
    out = tmp_path / "descriptors.pb"
    files = [f"{protogen.PACKAGE_DIR}/{name}" for name in DOCUMENTED_PROTOS]
    args = [
        "grpc_tools.protoc",
        f"-I{protogen.PROTO_ROOT}",
        f"-I{include}",
        "--include_source_info",
        f"--descriptor_set_out={out}",
        *files,
    ]
    assert protoc.main(args) == 0, f"protoc failed: {' '.join(args)}"
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _elements(fdp: descriptor_pb2.FileDescriptorProto):
    """(full name, SourceCodeInfo path) of every message, field, enum, enum value, service and
    rpc declared in the file."""
    pkg = fdp.package

    def enum(e, path, scope):
        name = f"{scope}.{e.name}"
        yield name, path
        for j, v in enumerate(e.value):
            yield f"{name}.{v.name}", (*path, ENUM_VALUE, j)

    def message(m, path, scope):
        name = f"{scope}.{m.name}"
        yield name, path
        for j, f in enumerate(m.field):
            yield f"{name}.{f.name}", (*path, MESSAGE_FIELD, j)
        for j, nested in enumerate(m.nested_type):
            if not nested.options.map_entry:  # synthesised for map<K, V>; nothing to document
                yield from message(nested, (*path, MESSAGE_NESTED, j), name)
        for j, e in enumerate(m.enum_type):
            yield from enum(e, (*path, MESSAGE_ENUM, j), name)

    for i, m in enumerate(fdp.message_type):
        yield from message(m, (FILE_MESSAGE, i), pkg)
    for i, e in enumerate(fdp.enum_type):
        yield from enum(e, (FILE_ENUM, i), pkg)
    for i, s in enumerate(fdp.service):
        yield f"{pkg}.{s.name}", (FILE_SERVICE, i)
        for j, rpc in enumerate(s.method):
            yield f"{pkg}.{s.name}.{rpc.name}", (FILE_SERVICE, i, SERVICE_METHOD, j)


def test_every_public_proto_element_is_documented(tmp_path: Path) -> None:
    fds = _descriptor_set(tmp_path)
    assert sorted(Path(f.name).name for f in fds.file) == sorted(DOCUMENTED_PROTOS)
    checked: list[str] = []
    undocumented: list[str] = []
    for fdp in fds.file:
        comments = {
            tuple(loc.path): (loc.leading_comments + loc.trailing_comments).strip()
            for loc in fdp.source_code_info.location
        }
        for name, path in _elements(fdp):
            checked.append(name)
            if not comments.get(path):
                undocumented.append(f"{name} ({fdp.name})")
    # Guard against a walk that silently checks nothing.
    for known in (
        "spotmesh.v1.SamplingParams.temperature",
        "spotmesh.v1.FinishReason.FINISH_REASON_STOP",
        "spotmesh.v1.Gateway.Generate",
        "spotmesh.v1.LoadReport.kv_cache_usage",
    ):
        assert known in checked
    assert not undocumented, (
        "add a comment above each of these in protos/, then run `spotmesh proto gen`:\n  "
        + "\n  ".join(undocumented)
    )


def _field(msg_descriptor, name: str) -> FieldDescriptor:
    assert name in msg_descriptor.fields_by_name, f"{msg_descriptor.full_name} lost field {name}"
    return msg_descriptor.fields_by_name[name]


def _assert_fields(msg_descriptor, expected: dict[str, tuple]) -> None:
    """expected: name -> (number, type, repeated, has presence, message/enum full name or None).
    Numbers are part of the contract: renumbering breaks every deployed client on the wire."""
    for name, (number, ftype, repeated, presence, type_name) in expected.items():
        f = _field(msg_descriptor, name)
        where = f"{msg_descriptor.full_name}.{name}"
        assert f.number == number, where
        assert f.type == ftype, where
        assert f.is_repeated == repeated, where
        if not repeated:
            assert f.has_presence == presence, where
        if ftype == FieldDescriptor.TYPE_MESSAGE:
            assert f.message_type.full_name == type_name, where
        elif ftype == FieldDescriptor.TYPE_ENUM:
            assert f.enum_type.full_name == type_name, where


T = FieldDescriptor


def test_generate_request_field_names_are_stable() -> None:
    req = gateway_pb2.GenerateRequest.DESCRIPTOR
    _assert_fields(req, {
        "model": (1, T.TYPE_STRING, False, False, None),
        "prompt": (2, T.TYPE_STRING, False, False, None),
        "messages": (3, T.TYPE_MESSAGE, True, False, "spotmesh.v1.ChatMessage"),
        "sampling": (4, T.TYPE_MESSAGE, False, True, "spotmesh.v1.SamplingParams"),
        "cache": (5, T.TYPE_MESSAGE, False, True, "spotmesh.v1.CacheControl"),
        "request_id": (6, T.TYPE_STRING, False, False, None),
    })
    _assert_fields(req.fields_by_name["messages"].message_type, {
        "role": (1, T.TYPE_STRING, False, False, None),
        "content": (2, T.TYPE_STRING, False, False, None),
    })
    # Every sampling knob is `optional` so "unset" (take the default) differs from 0.
    _assert_fields(common_pb2.SamplingParams.DESCRIPTOR, {
        "temperature": (1, T.TYPE_FLOAT, False, True, None),
        "top_p": (2, T.TYPE_FLOAT, False, True, None),
        "top_k": (3, T.TYPE_INT32, False, True, None),
        "max_tokens": (4, T.TYPE_INT32, False, True, None),
        "stop": (5, T.TYPE_STRING, True, False, None),
        "seed": (6, T.TYPE_INT64, False, True, None),
    })
    _assert_fields(gateway_pb2.CacheControl.DESCRIPTOR, {
        "mode": (1, T.TYPE_ENUM, False, False, "spotmesh.v1.CacheMode"),
    })


def test_cache_mode_values_are_stable() -> None:
    values = {v.name: v.number for v in gateway_pb2.CacheMode.DESCRIPTOR.values}
    assert values == {"CACHE_MODE_DEFAULT": 0, "CACHE_MODE_BYPASS": 1, "CACHE_MODE_REFRESH": 2}
    assert gateway_pb2.CACHE_MODE_DEFAULT == 0
    assert gateway_pb2.CACHE_MODE_BYPASS == 1
    assert gateway_pb2.CACHE_MODE_REFRESH == 2


def test_generate_response_field_names_are_stable() -> None:
    _assert_fields(gateway_pb2.GenerateResponse.DESCRIPTOR, {
        "text": (1, T.TYPE_STRING, False, False, None),
        "token_ids": (2, T.TYPE_INT32, True, False, None),
        "finish_reason": (3, T.TYPE_ENUM, False, False, "spotmesh.v1.FinishReason"),
        "usage": (4, T.TYPE_MESSAGE, False, True, "spotmesh.v1.Usage"),
        "served_by": (5, T.TYPE_MESSAGE, False, True, "spotmesh.v1.ServedBy"),
        "cache_hit": (6, T.TYPE_BOOL, False, False, None),
        "cost_usd": (7, T.TYPE_DOUBLE, False, False, None),
        "request_id": (8, T.TYPE_STRING, False, False, None),
    })
    _assert_fields(common_pb2.Usage.DESCRIPTOR, {
        "prompt_tokens": (1, T.TYPE_INT32, False, False, None),
        "cached_prompt_tokens": (2, T.TYPE_INT32, False, False, None),
        "completion_tokens": (3, T.TYPE_INT32, False, False, None),
    })
    _assert_fields(common_pb2.ServedBy.DESCRIPTOR, {
        "replica": (1, T.TYPE_STRING, False, False, None),
        "pool": (2, T.TYPE_ENUM, False, False, "spotmesh.v1.Pool"),
    })


@pytest.mark.parametrize(("rpc", "server_streaming"), [("Generate", True), ("Complete", False)])
def test_gateway_rpcs_are_stable(rpc: str, server_streaming: bool) -> None:
    service = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
    assert service.full_name == "spotmesh.v1.Gateway"
    method = service.methods_by_name.get(rpc)
    assert method is not None, f"Gateway lost rpc {rpc}"
    assert method.input_type.full_name == "spotmesh.v1.GenerateRequest"
    assert method.output_type.full_name == "spotmesh.v1.GenerateResponse"
    assert method.server_streaming is server_streaming
    assert method.client_streaming is False
