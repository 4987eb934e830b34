"""Request builders: friendly Python values in, contract messages out."""

from __future__ import annotations

import datetime
import json
import math

import pytest
from google.protobuf import duration_pb2, struct_pb2

from tokenwire.client import (
    build_chat_request,
    build_embed_request,
    build_generate_request,
    build_message,
    build_options,
    build_tool,
    build_tool_call,
)
from tokenwire.v1 import generation_pb2 as pb


def test_generate_request_defaults_leave_everything_unset() -> None:
    request = build_generate_request("tiny", "hi")
    assert (request.model, request.prompt, request.system) == ("tiny", "hi", "")
    for name in ("options", "format", "keep_alive"):
        assert not request.HasField(name)
    assert request.think == pb.THINK_UNSPECIFIED


def test_generate_request_with_every_argument() -> None:
    request = build_generate_request(
        "tiny",
        "hi",
        system="be brief",
        options={"temperature": 0.0, "stop": ["\n"], "max_tokens": 5, "seed": None},
        format="json",
        keep_alive=1.5,
        images=[b"\x89PNG"],
        think="low",
        suffix="end",
        raw=True,
    )
    assert request.options.HasField("temperature") and request.options.temperature == 0.0
    assert not request.options.HasField("seed")
    assert list(request.options.stop) == ["\n"]
    assert request.format.json
    assert (request.keep_alive.seconds, request.keep_alive.nanos) == (1, 500_000_000)
    assert list(request.images) == [b"\x89PNG"]
    assert request.think == pb.THINK_LOW
    assert (request.suffix, request.raw) == ("end", True)


def test_options_message_passes_through_and_unknown_keys_fail() -> None:
    options = pb.Options(top_k=3)
    assert build_options(options) is options
    with pytest.raises(ValueError, match="num_predict"):
        build_options({"num_predict": 5})


@pytest.mark.parametrize(
    ("think", "expected"),
    [
        (True, pb.THINK_ENABLED),
        (False, pb.THINK_DISABLED),
        ("high", pb.THINK_HIGH),
        (pb.THINK_MEDIUM, pb.THINK_MEDIUM),
    ],
)
def test_think_values(think: bool | str, expected: int) -> None:
    assert build_generate_request("m", "p", think=think).think == expected  # type: ignore[arg-type]


def test_bad_think_and_format_values_fail() -> None:
    with pytest.raises(ValueError, match="think"):
        build_generate_request("m", "p", think="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="format"):
        build_generate_request("m", "p", format="yaml")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("keep_alive", "seconds"),
    [
        (-1, -1),
        (0, 0),
        (datetime.timedelta(minutes=10), 600),
        (duration_pb2.Duration(seconds=7), 7),
    ],
)
def test_keep_alive_forms(keep_alive: float, seconds: int) -> None:
    request = build_generate_request("m", "p", keep_alive=keep_alive)
    assert request.HasField("keep_alive")
    assert request.keep_alive.seconds == seconds


def test_json_schema_format_dict_is_sent_as_text_in_its_order() -> None:
    schema = {"type": "object", "properties": {"z": {"type": "integer"}, "é": {}, "a": {}},
              "required": ("z",)}
    request = build_chat_request("m", [], format=schema)
    assert request.format.WhichOneof("kind") == "json_schema_text"
    text = request.format.json_schema_text
    assert text == '{"type":"object","properties":{"z":{"type":"integer"},"é":{},"a":{}},' \
                   '"required":["z"]}'
    assert list(json.loads(text)["properties"]) == ["z", "é", "a"]
    struct = struct_pb2.Struct()
    struct.update({"type": "object"})
    nested = {"type": "object", "properties": struct}  # other mappings are written as dicts
    assert json.loads(build_generate_request("m", "p", format=nested).format.json_schema_text) == {
        "type": "object", "properties": {"type": "object"}}


def test_json_schema_format_struct_and_message_pass_as_given() -> None:
    struct = struct_pb2.Struct()
    struct.update({"type": "object"})
    request = build_generate_request("m", "p", format=struct)
    assert request.format.WhichOneof("kind") == "json_schema"
    assert request.format.json_schema == struct
    fmt = pb.Format(json_schema_text='{"type": "object"}')
    assert build_generate_request("m", "p", format=fmt).format == fmt
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        build_generate_request("m", "p", format={"maximum": math.inf})


def test_chat_messages_from_dicts() -> None:
    request = build_chat_request(
        "m",
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u", "images": [b"img"]},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "f", "arguments": '{"x": 1}'}}],
            },
            {"role": "tool", "content": "42", "tool_name": "f", "tool_call_id": "c1"},
            pb.Message(role=pb.ROLE_USER, content="as message"),
        ],
    )
    roles = [m.role for m in request.messages]
    assert roles == [pb.ROLE_SYSTEM, pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_TOOL, pb.ROLE_USER]
    assert request.messages[2].tool_calls[0].arguments["x"] == 1
    assert request.messages[3].tool_call_id == "c1"


def test_bad_messages_fail() -> None:
    with pytest.raises(ValueError, match="role"):
        build_message({"role": "robot", "content": "x"})
    with pytest.raises(ValueError, match="text"):
        build_message({"role": "user", "text": "x"})


def test_tools_plain_and_openai_style() -> None:
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    plain = build_tool({"name": "weather", "description": "d", "parameters": parameters})
    wrapped = build_tool(
        {"type": "function", "function": {"name": "weather", "parameters": parameters}}
    )
    assert plain.name == wrapped.name == "weather"
    assert plain.parameters_text == wrapped.parameters_text == (
        '{"type":"object","properties":{"city":{"type":"string"}}}')
    assert not plain.HasField("parameters")
    call = build_tool_call({"id": "c1", "name": "weather", "arguments": {"city": "Oslo"}})
    assert (call.id, call.arguments["city"]) == ("c1", "Oslo")


def test_tool_parameters_text_struct_or_none() -> None:
    text = '{"type": "object", "properties": {"b": {}, "a": {}}}'
    assert build_tool({"name": "f", "parameters": text}).parameters_text == text  # as written
    struct = struct_pb2.Struct()
    struct.update({"type": "object"})
    tool = build_tool({"name": "f", "parameters": struct})
    assert tool.parameters == struct and not tool.parameters_text
    bare = build_tool({"name": "f"})
    assert not bare.HasField("parameters") and not bare.parameters_text


def test_embed_request() -> None:
    assert list(build_embed_request("e", "one").inputs) == ["one"]
    request = build_embed_request("e", ["a", "b"], truncate=False, dimensions=8)
    assert request.HasField("truncate") and not request.truncate
    assert request.dimensions == 8
