"""Hostile input: property-based tests (Hypothesis) over every request message,
and raw bytes in place of a serialized request.

Every well-formed request must end with a clean status: OK, or an error that is
not UNKNOWN, not RESOURCE_EXHAUSTED (no limit here is small enough) and not our
catch-all INTERNAL (an INTERNAL is allowed only with an ``UPSTREAM_*`` reason from
the status table), never a deadline (a wedged handler). Raw bytes may also get
INVALID_ARGUMENT (UNDECODABLE_REQUEST) when they decode as no request, never UNKNOWN;
every method the server serves, health and reflection included, is checked with
such bytes in test_every_served_method_answers_garbage_with_invalid_argument.
Afterwards the server still serves a normal Generate quickly.

How the examples run: pytest-asyncio runs an ``async`` test decorated with
``@given`` by driving each example to completion on the test's own event loop, the
loop that also runs the in-process server and the test Ollama (built once per test
by the ``target`` fixture, deliberately shared by all examples). No threads and no
subprocess: one loop, as in the other tiers.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import MakeRuntime
from tests.fakeollama import FakeOllama
from tests.helpers import reason, rich_status
from tokenwire.service import Runtime
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

EXAMPLES = 200
RAW_EXAMPLES = 300
LIMIT = 4096  # the server's prompt and image limits in these tests (cheap to exceed)

HOSTILE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the work tree
    derandomize=True,  # the same examples on every run and machine
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.large_base_example],
)

# -- strategies -----------------------------------------------------------------------------
#
# Each field has a benign strategy (a valid value, still random) and a hostile one.
# A request is drawn in one of three modes: all fields benign (reaches Ollama and
# back), exactly one field hostile (each bad value on its own, so it is not masked by
# other problems found first), or every field possibly hostile.

HUGE = "h" * 2_000_000  # past every text limit; still under --max-message-bytes

int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
any_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                      st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, -1e308,
                                       5e-324, -1.0]))

json_leaves = st.one_of(st.none(), st.booleans(), any_float, st.text(max_size=10))
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"type": "object"}
    for _ in range(depth):
        value = {"type": "object", "properties": {"p": value}}
    return value


# Up to depth 15 (each level here is two Struct levels, each of those three protobuf
# levels) a schema still parses; deeper ones exceed protobuf's recursion limit in the
# server's deserializer: see test_undecodable_request_is_invalid_argument.
json_objects = st.one_of(st.dictionaries(st.text(max_size=8), json_values, max_size=5),
                         st.integers(0, 15).map(_nested))
benign_schema = st.fixed_dictionaries({
    "type": st.just("object"),
    "properties": st.dictionaries(st.text(min_size=1, max_size=8),
                                  st.sampled_from([{"type": "string"}, {"type": "number"}]),
                                  max_size=3)})

FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    # name: (benign, hostile)
    "model": (st.sampled_from(["tiny", "tiny:latest", "think-model"]),
              st.one_of(st.sampled_from(["TINY", "nope", "", " ", "a" * 600,
                                         "../../../etc/passwd", "tiny\nlatest", "tiny:",
                                         ":latest", "registry.ollama.ai/library/tiny:latest"]),
                        st.text(max_size=20))),
    "text": (st.text(max_size=40),
             st.sampled_from(["\0", "\u202e", "\ud7ff\ue000", "x" * (LIMIT + 1), HUGE])),
    "float": (st.floats(0.0, 1.0), any_float),
    "int": (st.integers(1, 50), st.one_of(st.integers(-3, 0), int32)),
    "enum": (st.integers(0, 4), st.one_of(st.integers(-2, 7), int32)),
    "images": (st.lists(st.binary(min_size=1, max_size=32), max_size=2),
               st.one_of(st.lists(st.binary(max_size=4), min_size=1, max_size=3),
                         st.just([b"\x89PNG" + b"\xff" * LIMIT]))),
    "stop": (st.lists(st.text(min_size=1, max_size=6), max_size=4),
             st.one_of(st.lists(st.text(max_size=3), max_size=20),
                       st.just(["stop"] * 10_000))),
    "schema": (benign_schema, json_objects),
    "count": (st.integers(0, 3), st.sampled_from([0, 40, 600])),
    "duration": (st.integers(0, 3600), st.integers(-(2**62), 2**62)),
}


class Drawer:
    """Draws each field benign or hostile according to the request's mode."""

    def __init__(self, draw: st.DrawFn) -> None:
        self._draw = draw
        self.mode = draw(st.sampled_from(["benign", "one", "hostile"]))
        self._target = draw(st.integers(0, 24)) if self.mode == "one" else -1
        self._seen = 0
        self._big_text = False

    def __call__(self, kind: str) -> Any:
        benign, hostile = FIELDS[kind]
        hit = self.mode == "hostile" or self._seen == self._target
        if kind == "text" and self._big_text:
            hit = False  # one oversized text per request: 600 x 2 MB would be 1.2 GB
        self._seen += 1
        value = self._draw(st.one_of(benign, hostile) if hit else benign)
        if kind == "text" and len(value) > LIMIT:
            self._big_text = True
        return value

    def maybe(self) -> bool:
        return bool(self._draw(st.booleans()))


# Messages are filled in place (``.add()``, ``.update()``): copying a deep Struct
# would re-parse it on the client side.


def _fill_options(d: Drawer, o: pb.Options) -> None:
    for name in ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
                 "presence_penalty", "frequency_penalty"):
        if d.maybe():
            setattr(o, name, d("float"))
    for name in ("top_k", "max_tokens", "repeat_last_n", "num_ctx", "num_keep"):
        if d.maybe():
            setattr(o, name, d("int"))
    if d.maybe():
        o.seed = d._draw(int64)
    o.stop.extend(d("stop"))


def _fill_common(d: Drawer, r: pb.GenerateRequest | pb.ChatRequest) -> None:
    r.model = d("model")
    r.think = d("enum") if d.maybe() else 0  # type: ignore[assignment]
    if d.maybe():
        _fill_options(d, r.options)
    kind = d._draw(st.sampled_from(["none", "json", "schema"]))
    if kind == "json":
        r.format.json = d.maybe()
    elif kind == "schema":
        r.format.json_schema.update(d("schema"))
    if d.maybe():
        # Out of google.protobuf.Duration's valid range too.
        r.keep_alive.seconds = d("duration")
        r.keep_alive.nanos = d._draw(st.integers(0, 999_999_999) | int32)


def _fill_generate(d: Drawer, r: pb.GenerateRequest) -> None:
    _fill_common(d, r)
    r.prompt, r.system = d("text"), d("text") if d.maybe() else ""
    r.suffix = d._draw(st.sampled_from(["", "tail"]))
    r.raw = d.maybe() and not r.system
    r.images.extend(d("images") if d.maybe() else [])


def _fill_chat(d: Drawer, r: pb.ChatRequest) -> None:
    _fill_common(d, r)
    for _ in range(d("count") + 1):
        m = r.messages.add()
        m.role = d("enum") or pb.ROLE_USER  # type: ignore[assignment]
        m.content = d("text")
        m.tool_name, m.thinking, m.tool_call_id = (d._draw(st.text(max_size=8))
                                                   for _ in "abc")
        m.images.extend(d("images") if d.maybe() else [])
        for _ in range(d._draw(st.integers(0, 2))):
            call = m.tool_calls.add()
            call.id, call.name = d._draw(st.text(max_size=8)), d._draw(st.text(max_size=12))
            call.index = d._draw(st.integers(0, 2**32 - 1))
            call.arguments.update(d("schema"))
    for _ in range(d._draw(st.integers(0, 3))):
        tool = r.tools.add()
        tool.name = d._draw(st.text(min_size=1, max_size=10) | st.just(""))
        tool.description = d._draw(st.text(max_size=10))
        tool.parameters.update(d("schema"))


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    r = pb.GenerateRequest()
    _fill_generate(Drawer(draw), r)
    return r


@st.composite
def chat_requests(draw: st.DrawFn) -> pb.ChatRequest:
    r = pb.ChatRequest()
    _fill_chat(Drawer(draw), r)
    return r


@st.composite
def complete_requests(draw: st.DrawFn) -> pb.CompleteRequest:
    r = pb.CompleteRequest()
    kind = draw(st.sampled_from(["generate", "chat", "none"]))
    if kind == "generate":
        _fill_generate(Drawer(draw), r.generate)
    elif kind == "chat":
        _fill_chat(Drawer(draw), r.chat)
    return r


@st.composite
def embed_requests(draw: st.DrawFn) -> pb.EmbedRequest:
    d = Drawer(draw)
    r = pb.EmbedRequest(model=d("model") if d.maybe() else "embedder")
    r.inputs.extend(d("text") for _ in range(d("count") + 1))
    if d.maybe():
        r.truncate = d.maybe()
    if d.maybe():
        r.dimensions = d("int")
    if d.maybe():
        r.keep_alive.seconds = d("duration")
    return r


# -- the server and the checks ----------------------------------------------------------


class Target:
    def __init__(self, runtime: Runtime, channel: grpc.aio.Channel, fake: FakeOllama) -> None:
        self.runtime = runtime
        self.channel = channel
        self.stub = GenerationServiceStub(channel)
        self.fake = fake
        self.codes: collections.Counter[str] = collections.Counter()
        self.examples = 0


@pytest.fixture
async def target(make_runtime: MakeRuntime, fake: FakeOllama,
                 figures: dict[str, Any], request: pytest.FixtureRequest,
                 ) -> AsyncIterator[Target]:
    runtime = await make_runtime(max_prompt_bytes=LIMIT, max_images_bytes=LIMIT,
                                 max_messages=16)
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        t = Target(runtime, channel, fake)
        yield t
        # Not wedged: a normal call still works, at once, and nothing is left running.
        started = time.perf_counter()
        tokens = [x async for x in t.stub.Generate(pb.GenerateRequest(model="tiny", prompt="ok"),
                                                   timeout=5)]
        after = time.perf_counter() - started
        assert tokens[-1].done and after < 1.0
        assert runtime.servicer.active_streams == 0 and fake.active_streams == 0
        assert not fake.errors
    name = request.node.name.removeprefix("test_")
    print(f"\n{name}: {t.examples} examples, outcomes {dict(sorted(t.codes.items()))}; "
          f"a normal Generate afterwards took {after * 1000:.1f} ms")
    figures.setdefault("hostile", {})[name] = {"examples": t.examples,
                                               "outcomes": dict(t.codes),
                                               "generate_after_ms": round(after * 1000, 2)}


def _reason(err: grpc.aio.AioRpcError) -> str | None:
    try:
        status = rich_status(err)
    except AssertionError:
        return None
    for packed in status.details:
        info = error_details_pb2.ErrorInfo()
        if packed.Unpack(info):
            return str(info.reason)
    return None


async def _call(t: Target, method: str, request: Any) -> None:
    t.examples += 1
    try:
        rpc = getattr(t.stub, method)
        if method in ("Generate", "Chat"):
            async for _ in rpc(request, timeout=5):
                pass
        else:
            await rpc(request, timeout=5)
    except grpc.aio.AioRpcError as err:
        _check(t, err, raw=False)
    else:
        t.codes["OK"] += 1


def _check(t: Target, err: grpc.aio.AioRpcError, *, raw: bool) -> None:
    code, why = err.code(), _reason(err)
    t.codes[f"{code.name}/{why}" if why else code.name] += 1
    assert code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED), \
        (code, err.details())  # a wedged handler
    # No limit here is small enough to be hit (no rate, messages under 32 MiB): an
    # invalid request must come back as INVALID_ARGUMENT, whatever it holds.
    assert code != grpc.StatusCode.RESOURCE_EXHAUSTED or raw, (code, err.details())
    # UNKNOWN is a handler that crashed, or bytes the guard failed to decode itself
    # (grpc.aio's own answer to them).
    assert code != grpc.StatusCode.UNKNOWN, (code, err.details())
    if raw and code == grpc.StatusCode.INVALID_ARGUMENT and why == "UNDECODABLE_REQUEST":
        assert "could not be decoded" in (err.details() or "")
    if code == grpc.StatusCode.INTERNAL:
        assert why is not None and why.startswith("UPSTREAM_"), (why, err.details())
    if code == grpc.StatusCode.INVALID_ARGUMENT and why == "INVALID_REQUEST":
        assert err.details()  # says what is wrong


@HOSTILE
@given(request=generate_requests())
async def test_generate_survives_hostile_requests(target: Target,
                                                  request: pb.GenerateRequest) -> None:
    await _call(target, "Generate", request)


@HOSTILE
@given(request=chat_requests())
async def test_chat_survives_hostile_requests(target: Target, request: pb.ChatRequest) -> None:
    await _call(target, "Chat", request)


@HOSTILE
@given(request=complete_requests())
async def test_complete_survives_hostile_requests(target: Target,
                                                  request: pb.CompleteRequest) -> None:
    await _call(target, "Complete", request)


@HOSTILE
@given(request=embed_requests())
async def test_embed_survives_hostile_requests(target: Target, request: pb.EmbedRequest) -> None:
    await _call(target, "Embed", request)


async def test_list_models_request(target: Target) -> None:
    """ListModelsRequest has no fields: the hostile part is in the raw-bytes test
    (unknown fields); here, the plain call."""
    await _call(target, "ListModels", pb.ListModelsRequest())
    assert target.codes == {"OK": 1}


# -- raw bytes ------------------------------------------------------------------------------

METHODS = {"Generate": "unary_stream", "Chat": "unary_stream", "Complete": "unary_unary",
           "Embed": "unary_unary", "ListModels": "unary_unary"}
VALID = {
    "Generate": pb.GenerateRequest(model="tiny", prompt="hello").SerializeToString(),
    "Chat": pb.ChatRequest(model="tiny", messages=[
        pb.Message(role=pb.ROLE_USER, content="hello")]).SerializeToString(),
    "Complete": pb.CompleteRequest(generate=pb.GenerateRequest(
        model="tiny", prompt="hello")).SerializeToString(),
    "Embed": pb.EmbedRequest(model="embedder", inputs=["hello"]).SerializeToString(),
    "ListModels": b"",
}
SPECIAL = [
    b"\x0a\x02\xff\xfe",  # field 1 (a string everywhere): invalid UTF-8
    b"\x12\x03\xc3\x28\x41",  # field 2: invalid UTF-8 (a string or a message)
    b"\x0a\xff\xff\xff\xff\x0f",  # a length far past the end
    b"\x08" + b"\xff" * 10 + b"\x01",  # an over-long varint
    b"\xfa\xff\xff\xff\x0f\x00",  # the largest field number, empty
    b"\x0b\x0c",  # an empty group (deprecated wire type)
    b"\x07",  # wire type 7 does not exist
    b"\x2a" + b"\x80" * 4 + b"\x00",  # non-minimal varint length
    b"\x2a\x01" * 50_000,  # field 5 repeated 50 000 times
]


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.sampled_from(sorted(METHODS)))
    kind = draw(st.sampled_from(["random", "mutated", "special", "valid+garbage"]))
    if kind == "random":
        data = draw(st.binary(max_size=256))
    elif kind == "special":
        data = draw(st.sampled_from(SPECIAL))
    elif kind == "valid+garbage":
        data = VALID[method] + draw(st.binary(max_size=32))
    else:
        data = bytearray(VALID[method])
        for _ in range(draw(st.integers(1, 4))):
            if not data:
                break
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.integers(0, 255))
        data = bytes(data)
    return method, data


@settings(HOSTILE, max_examples=RAW_EXAMPLES)
@given(case=raw_requests())
async def test_raw_bytes_never_break_the_server(target: Target, case: tuple[str, bytes]) -> None:
    method, data = case
    path = f"/tokenwire.v1.GenerationService/{method}"
    target.examples += 1
    try:
        if METHODS[method] == "unary_stream":
            async for _ in target.channel.unary_stream(path)(data, timeout=5):
                pass
        else:
            await target.channel.unary_unary(path)(data, timeout=5)
    except grpc.aio.AioRpcError as err:
        _check(target, err, raw=True)
    else:
        target.codes["OK"] += 1


def _too_deep() -> bytes:
    request = pb.GenerateRequest(model="tiny", prompt="p")
    request.format.json_schema.update(_nested(40))
    return request.SerializeToString()


UNDECODABLE = {
    "invalid UTF-8 in GenerateRequest.model": ("Generate", b"\x0a\x02\xff\xfe"),
    "invalid UTF-8 in EmbedRequest.inputs": ("Embed", b"\x12\x02\xc3\x28"),
    "JSON schema nested 40 deep": ("Generate", _too_deep()),
    "truncated ChatRequest": ("Chat", VALID["Chat"][:-3]),
    "ListModelsRequest with a broken field": ("ListModels", b"\x0a\xff"),
}


@pytest.mark.parametrize("case", sorted(UNDECODABLE))
async def test_undecodable_request_is_invalid_argument(target: Target, case: str) -> None:
    """Bytes that are not a valid request are the caller's mistake: INVALID_ARGUMENT
    saying so, not UNKNOWN "Unexpected <class DecodeError>" (grpc.aio's default,
    with a traceback logged at ERROR for every such call)."""
    method, data = UNDECODABLE[case]
    path = f"/tokenwire.v1.GenerationService/{method}"
    target.examples += 1
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        if METHODS[method] == "unary_stream":
            async for _ in target.channel.unary_stream(path)(data, timeout=5):
                pass
        else:
            await target.channel.unary_unary(path)(data, timeout=5)
    target.codes[failed.value.code().name] += 1
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value.details()
    assert _reason(failed.value) == "UNDECODABLE_REQUEST"
    assert "x-request-id" in dict(failed.value.trailing_metadata())


def _many_violations(kind: str) -> tuple[str, Any]:
    if kind == "1000 empty stop sequences":
        return "Generate", pb.GenerateRequest(model="tiny", prompt="p",
                                              options=pb.Options(stop=[""] * 1000))
    if kind == "200 empty images":
        return "Generate", pb.GenerateRequest(model="tiny", prompt="p", images=[b""] * 200)
    if kind == "500 messages without a role":
        return "Chat", pb.ChatRequest(model="tiny", messages=[pb.Message(content="x")] * 500)
    return "Chat", pb.ChatRequest(model="tiny", messages=[
        pb.Message(role=pb.ROLE_USER, content="x")], tools=[pb.Tool()] * 300)


@pytest.mark.parametrize("kind", ["1000 empty stop sequences", "200 empty images",
                                  "500 messages without a role", "300 tools without a name"])
async def test_many_violations_still_arrive_as_invalid_argument(target: Target,
                                                                kind: str) -> None:
    """Validation lists every problem, one BadRequest violation each: with hundreds
    of them the status no longer fits gRPC's metadata limits (8 KiB soft, 16 KiB
    hard, by default) and the caller gets RESOURCE_EXHAUSTED "Stream removed"
    instead of the INVALID_ARGUMENT that explains the request. The list (and the
    message) must be capped."""
    method, request = _many_violations(kind)
    target.examples += 1
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        if method == "Generate":
            async for _ in target.stub.Generate(request, timeout=5):
                pass
        else:
            async for _ in target.stub.Chat(request, timeout=5):
                pass
    target.codes[failed.value.code().name] += 1
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value.details()
    assert _reason(failed.value) == "INVALID_REQUEST"
    assert len(failed.value.details() or "") < 4096


def test_float_strategy_covers_nan_and_infinity() -> None:
    """The strategies above really produce the adversarial values they promise."""
    seen = {"nan": False, "inf": False}

    @settings(max_examples=300, database=None, derandomize=True)
    @given(value=any_float)
    def probe(value: float) -> None:
        seen["nan"] |= math.isnan(value)
        seen["inf"] |= math.isinf(value)

    probe()
    assert all(seen.values()), seen


# -- every served method --------------------------------------------------------------------

#: Bytes that are no message of any type: a length past the end, a wire type that does
#: not exist, a varint longer than ten bytes.
GARBAGE = (b"\x0a\xff\xff\xff\xff\x0f", b"\x07", b"\x08" + b"\xff" * 10 + b"\x01")
SERVED_TOKEN = "tw-hostile-7c1e"


async def served_methods(channel: grpc.aio.Channel,
                         metadata: Any = ()) -> list[tuple[str, bool, bool]]:
    """(path, client streaming, server streaming) of every method of every service
    the server lists over reflection, read from the descriptors it sends: what a
    client can call, not a list kept by hand."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask(request: reflection_pb2.ServerReflectionRequest,
                  ) -> reflection_pb2.ServerReflectionResponse:
        async def one():  # type: ignore[no-untyped-def]
            yield request
        responses = [r async for r in stub.ServerReflectionInfo(one(), metadata=metadata,
                                                                timeout=5)]
        assert len(responses) == 1
        return responses[0]

    listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
    methods = []
    for service in listed.list_services_response.service:
        found = await ask(reflection_pb2.ServerReflectionRequest(
            file_containing_symbol=service.name))
        for raw in found.file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            for s in fd.service:
                if f"{fd.package}.{s.name}".lstrip(".") == service.name:
                    methods += [(f"/{service.name}/{m.name}", m.client_streaming,
                                 m.server_streaming) for m in s.method]
    return methods


async def call_with_bytes(channel: grpc.aio.Channel, path: str, client_streaming: bool,
                          server_streaming: bool, data: bytes,
                          metadata: Any = ()) -> grpc.aio.AioRpcError | None:
    """Sends ``data`` as the request (no serializer: the bytes go out as they are)."""
    try:
        if client_streaming:
            call = (channel.stream_stream if server_streaming
                    else channel.stream_unary)(path)(iter([data]), metadata=metadata,
                                                     timeout=5)
        else:
            call = (channel.unary_stream if server_streaming
                    else channel.unary_unary)(path)(data, metadata=metadata, timeout=5)
        if server_streaming:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as err:
        return err
    return None


@pytest.mark.parametrize("auth", ["no auth", "bearer tokens"])
async def test_every_served_method_answers_garbage_with_invalid_argument(
        make_runtime: MakeRuntime, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, auth: str, figures: dict[str, Any]) -> None:
    """Bytes that decode as no request are the caller's mistake, on every method the
    server serves (tokenwire's, health's, reflection's bidirectional stream), with or
    without authentication: INVALID_ARGUMENT saying the request could not be decoded,
    never UNKNOWN, no traceback in the log, and the server keeps serving."""
    metadata: tuple[tuple[str, str], ...] = ()
    if auth == "bearer tokens":
        monkeypatch.setenv("TOKENWIRE_AUTH_TOKENS", f"prober={SERVED_TOKEN}")
        metadata = (("authorization", f"Bearer {SERVED_TOKEN}"),)
    runtime = await make_runtime(health_listen="127.0.0.1:0")
    caplog.set_level(logging.DEBUG)
    assert runtime.health_target is not None
    async with grpc.aio.insecure_channel(runtime.health_target) as probe:
        # The probe port serves health alone (no reflection to ask): its descriptor.
        described = health_pb2.DESCRIPTOR.services_by_name["Health"]
        for m in described.methods:
            for data in GARBAGE:
                err = await call_with_bytes(probe, f"/{described.full_name}/{m.name}",
                                            m.client_streaming, m.server_streaming, data)
                assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, \
                    (m.name, err)
                assert reason(err) == "UNDECODABLE_REQUEST"
    async with grpc.aio.insecure_channel(runtime.target) as channel:
        methods = await served_methods(channel, metadata)
        services = {path.split("/")[1] for path, _, _ in methods}
        assert {"tokenwire.v1.GenerationService", "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"} <= services
        got: dict[str, set[str]] = collections.defaultdict(set)
        for path, client_streaming, server_streaming in methods:
            for data in GARBAGE:
                err = await call_with_bytes(channel, path, client_streaming, server_streaming,
                                            data, metadata)
                assert err is not None, (path, data)
                got[path].add(err.code().name)
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, \
                    (path, data, err.code(), err.details())
                assert "could not be decoded" in (err.details() or ""), (path, err.details())
                assert reason(err) == "UNDECODABLE_REQUEST", path
                assert "x-request-id" in dict(err.trailing_metadata()), path
                if metadata:  # and without credentials: refused before anything is read
                    err = await call_with_bytes(channel, path, client_streaming,
                                                server_streaming, data)
                    assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED, \
                        (path, err)
        # Still serving: health, reflection and a model call answer normally.
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(), metadata=metadata,
                                    timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert len(await served_methods(channel, metadata)) == len(methods)
        tokens = [t async for t in GenerationServiceStub(channel).Generate(
            pb.GenerateRequest(model="tiny", prompt="ok"), metadata=metadata, timeout=5)]
        assert tokens[-1].done
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
    print(f"\ngarbage to every served method ({auth}): "
          f"{ {p: sorted(c) for p, c in got.items()} }")
    figures.setdefault("hostile", {})[f"garbage_every_method_{auth.replace(' ', '_')}"] = {
        p: sorted(c) for p, c in got.items()}
