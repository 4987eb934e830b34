"""The google.api.field_behavior marks of protos/ say what the server does.

- Every field has one behavior: REQUIRED, OPTIONAL or OUTPUT_ONLY; fields a caller sends
  are never OUTPUT_ONLY, fields of messages only the server sends always are.
- REQUIRED is what the server enforces: for each method a smallest request that sets only
  its REQUIRED fields passes validation, and clearing any one of them is INVALID_ARGUMENT
  with a field violation naming that field. Every REQUIRED field of the API is covered.
- The googleapis file the marks are compiled against agrees with the googleapis-common-protos
  module that the generated code imports at run time.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.api import field_behavior_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from tests.helpers import violations
from tests.tools.conftest import ROOT
from tokenwire.service import Runtime
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

FB = field_behavior_pb2
SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"]
STREAM_ID = "tw-field-behavior-0000"  # well formed, never started: NOT_FOUND


def behaviors(field: FieldDescriptor) -> list[int]:
    return list(field.GetOptions().Extensions[FB.field_behavior])


def reachable(roots: list[Descriptor]) -> set[str]:
    """Full names of the messages of this package reachable from ``roots``."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        message = todo.pop()
        if message.full_name in seen or message.file is not pb.DESCRIPTOR:
            continue
        seen.add(message.full_name)
        todo += [f.message_type for f in message.fields if f.message_type is not None]
    return seen


def test_every_field_has_one_behavior() -> None:
    sent = reachable([m.input_type for m in SERVICE.methods])
    answered = reachable([m.output_type for m in SERVICE.methods])
    assert "tokenwire.v1.ToolCall" in sent & answered  # the one message used both ways
    wrong = []
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        for field in message.fields:
            marks = behaviors(field)
            if message.full_name in sent:
                allowed = [FB.REQUIRED, FB.OPTIONAL]
            else:
                assert message.full_name in answered, message.full_name
                allowed = [FB.OUTPUT_ONLY]
            if len(marks) != 1 or marks[0] not in allowed:
                wrong.append(f"{field.full_name}: {[FB.FieldBehavior.Name(b) for b in marks]}, "
                             f"want one of {[FB.FieldBehavior.Name(b) for b in allowed]}")
    assert not wrong, "\n".join(wrong)


def test_the_googleapis_file_agrees_with_the_runtime(tmp_path: Path) -> None:
    """third_party's copy (what protoc, buf and the linter compile against) declares the
    extension as the googleapis-common-protos module the generated code imports at run time,
    with each behavior at the same number. The comparison is by descriptor, so a newer wheel
    with new comments or behaviors does not fail it."""
    vendored = ROOT / "third_party" / "googleapis"
    out = tmp_path / "field_behavior.pb"
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{vendored}",
         f"--descriptor_set_out={out}", "google/api/field_behavior.proto"],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    (copy,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    runtime = descriptor_pb2.FileDescriptorProto()
    FB.DESCRIPTOR.CopyToProto(runtime)
    assert (copy.name, copy.package) == (runtime.name, runtime.package)
    for extension in copy.extension:
        extension.ClearField("json_name")  # protoc fills it in, the runtime's copy leaves it
    assert list(copy.extension) == list(runtime.extension)
    (enum,), (runtime_enum,) = copy.enum_type, runtime.enum_type
    assert {(v.name, v.number) for v in enum.value} <= {
        (v.name, v.number) for v in runtime_enum.value}, (
        f"googleapis-common-protos changed {copy.name}: copy its file into {vendored}")


Call = Callable[[GenerationServiceStub, Any], Awaitable[object]]


async def _unary(method: str, stub: GenerationServiceStub, request: Any) -> object:
    return await getattr(stub, method)(request, timeout=10)


async def _streaming(method: str, stub: GenerationServiceStub, request: Any) -> object:
    return [t async for t in getattr(stub, method)(request, timeout=10)]


def _call(method: str) -> Call:
    streaming = SERVICE.methods_by_name[method].server_streaming

    async def call(stub: GenerationServiceStub, request: Any) -> object:
        return await (_streaming if streaming else _unary)(method, stub, request)
    return call


# The smallest request of each method that sets its REQUIRED fields, and REQUIRED fields of
# the messages inside (a chat message's role, a tool's name) where a request can hold them.
SMALLEST: dict[str, Message] = {
    "Generate": pb.GenerateRequest(model="tiny"),
    "Chat": pb.ChatRequest(model="tiny", messages=[pb.Message(role=pb.ROLE_USER)],
                           tools=[pb.Tool(name="lookup")]),
    "Complete": pb.CompleteRequest(generate=pb.GenerateRequest(model="tiny")),
    "Start": pb.StartRequest(chat=pb.ChatRequest(model="tiny")),
    "Resume": pb.ResumeRequest(stream_id=STREAM_ID),
    "Cancel": pb.CancelRequest(stream_id=STREAM_ID),
    "ListModels": pb.ListModelsRequest(),
    "Embed": pb.EmbedRequest(model="embedder", inputs=["a"]),
}


def required_paths(message: Message, prefix: str = "") -> Iterator[tuple[str, str, Message]]:
    """(violation field path, field full name, the message without it) for every REQUIRED
    field set in ``message``, at any depth."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if FB.REQUIRED in behaviors(field):
            without = type(message)()
            without.CopyFrom(message)
            without.ClearField(field.name)
            yield path, field.full_name, without
        if field.message_type is None:
            continue
        items = list(value) if field.is_repeated else [value]
        for i, item in enumerate(items):
            inner = f"{path}[{i}]." if field.is_repeated else f"{path}."
            for sub_path, name, sub_without in required_paths(item, inner):
                without = type(message)()
                without.CopyFrom(message)
                target = getattr(without, field.name)
                (target[i] if field.is_repeated else target).CopyFrom(sub_without)
                yield sub_path, name, without


@pytest.fixture
async def stub(runtime: Runtime) -> AsyncIterator[GenerationServiceStub]:
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        yield GenerationServiceStub(channel)


@pytest.mark.parametrize("method", list(SMALLEST))
async def test_required_is_what_the_server_enforces(method: str,
                                                    stub: GenerationServiceStub) -> None:
    call, request = _call(method), SMALLEST[method]
    try:
        await call(stub, request)
    except grpc.aio.AioRpcError as err:  # Resume and Cancel: NOT_FOUND, past validation
        assert err.code() != grpc.StatusCode.INVALID_ARGUMENT, (method, violations(err))
    for path, _, without in required_paths(request):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(stub, without)
        err = caught.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, path, err.code())
        named = [field for field, _ in violations(err)]
        # Start and Complete name the fields of their inner request from its top ("model",
        # not "chat.model").
        inner = path.split(".", 1)[-1] if method in ("Start", "Complete") else path
        assert inner in named, (method, path, named)


def test_every_required_field_is_covered() -> None:
    marked = {field.full_name for message in pb.DESCRIPTOR.message_types_by_name.values()
              for field in message.fields if FB.REQUIRED in behaviors(field)}
    covered = {name for request in SMALLEST.values() for _, name, _ in required_paths(request)}
    assert covered == marked
    assert set(SMALLEST) == set(SERVICE.methods_by_name)
