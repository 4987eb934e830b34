"""Request validation: every problem is one field violation."""

from __future__ import annotations

import math

import pytest

from tokenwire.service import Limits, ValidationFailed
from tokenwire.service._validate import validate_chat, validate_embed, validate_generate
from tokenwire.v1 import generation_pb2 as pb

LIMITS = Limits(max_prompt_bytes=100, max_images_bytes=10, max_stop_sequences=2)


def _fields(call, request) -> list[str]:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationFailed) as info:
        call(request, LIMITS)
    return [field for field, _ in info.value.violations]


def test_valid_requests_pass() -> None:
    validate_generate(pb.GenerateRequest(model="m", prompt="hi"), LIMITS)
    validate_generate(pb.GenerateRequest(model="m"), LIMITS)  # load-only is allowed
    validate_chat(pb.ChatRequest(model="m", messages=[pb.Message(role=pb.ROLE_USER)]), LIMITS)
    validate_embed(pb.EmbedRequest(model="m", inputs=["x"]), LIMITS)


def test_all_problems_reported_at_once() -> None:
    request = pb.GenerateRequest(
        model="", prompt="x" * 101, raw=True, system="s",
        options=pb.Options(temperature=-1, top_p=1.5, min_p=math.nan, typical_p=0,
                           top_k=-1, max_tokens=-2, num_ctx=0, stop=["a", "", "c"]),
        images=[b"12345678901"], think=99,  # type: ignore[arg-type]
    )
    fields = _fields(validate_generate, request)
    assert fields == [
        "model", "options.temperature", "options.top_p", "options.min_p", "options.typical_p",
        "options.top_k", "options.max_tokens", "options.num_ctx", "options.stop",
        "options.stop[1]", "think", "prompt", "images", "system",
    ]


def test_descriptions_name_limit_and_value() -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_generate(pb.GenerateRequest(model="m", prompt="x" * 101), LIMITS)
    assert info.value.violations == [("prompt", "101 bytes, over the limit of 100 bytes")]


def test_chat_rules() -> None:
    request = pb.ChatRequest(
        model="m",
        messages=[pb.Message(content="no role"), pb.Message(role=42, content="x" * 100)],  # type: ignore[arg-type]
        tools=[pb.Tool()],
    )
    assert _fields(validate_chat, request) == [
        "messages[0].role", "messages[1].role", "messages", "tools[0].name"]


def test_embed_rules() -> None:
    assert _fields(validate_embed, pb.EmbedRequest(model="m")) == ["inputs"]
    assert _fields(validate_embed, pb.EmbedRequest(model="m", inputs=["a"], dimensions=0)) == [
        "dimensions"]


def test_empty_json_schema_refused() -> None:
    request = pb.GenerateRequest(model="m", format=pb.Format(json_schema={}))
    assert _fields(validate_generate, request) == ["format.json_schema"]


SCHEMA_TEXT = '{"type": "object", "properties": {"b": {"type": "string"}, "a": {}}}'


@pytest.mark.parametrize(("text", "says"), [
    ("", "got no text"),
    ("  \n", "got no text"),
    ('{"type": "object",', "not valid JSON (unexpected end of data"),
    ("type: object", "not valid JSON"),
    # one document only: text after it could otherwise add keys to Ollama's payload
    ('{"type": "object"}, "model": "other"', "not valid JSON (unexpected content after"),
    ('{"a": NaN}', "not valid JSON"),
    ("[1, 2]", "must be a JSON object ({...}), got a JSON array"),
    ('"object"', "got a JSON string"),
    ("null", "got a JSON null"),
    ("{}", "must be a non-empty JSON Schema object"),
    ('{"a": ' * 65 + "1" + "}" * 65, "nest deeper than 64 levels"),
    ("[" * 2000 + "]" * 2000, "nest deeper than 64 levels"),  # beyond orjson's own limit
    ('{"d": "' + "é" * 50 + '"}', "109 bytes, over the limit of 100 bytes (--max-prompt-bytes)"),
])
def test_bad_json_schema_text_refused(text: str, says: str) -> None:
    request = pb.GenerateRequest(model="m", format=pb.Format(json_schema_text=text))
    limits = LIMITS if "over the limit" in says else Limits(max_prompt_bytes=10_000)
    with pytest.raises(ValidationFailed) as info:
        validate_generate(request, limits)
    [(field, description)] = info.value.violations
    assert field == "format.json_schema_text"
    assert says in description


def test_good_json_schema_text_passes() -> None:
    for text in (SCHEMA_TEXT, '{"a": ' * 63 + "{}" + "}" * 63, ' \n{"type":"object"}\n'):
        validate_generate(pb.GenerateRequest(model="m", format=pb.Format(json_schema_text=text)),
                          Limits(max_prompt_bytes=10_000))
    validate_chat(pb.ChatRequest(model="m", format=pb.Format(json_schema_text=SCHEMA_TEXT)),
                  LIMITS)


def test_tool_parameters_text_rules() -> None:
    both = pb.Tool(name="f", parameters={"type": "object"}, parameters_text=SCHEMA_TEXT)
    request = pb.ChatRequest(model="m", tools=[
        pb.Tool(name="ok", parameters_text=SCHEMA_TEXT),
        pb.Tool(name="empty", parameters_text="{}"),  # like an unset Struct: no arguments
        both,
        pb.Tool(name="list", parameters_text="[]"),
        pb.Tool(name="broken", parameters_text="{"),
        pb.Tool(name="big", parameters_text='{"d": "' + "x" * 100 + '"}'),
    ], format=pb.Format(json_schema_text="[]"))
    with pytest.raises(ValidationFailed) as info:
        validate_chat(request, LIMITS)
    found = info.value.violations
    assert [field for field, _ in found] == [
        "format.json_schema_text", "tools[2].parameters_text", "tools[3].parameters_text",
        "tools[4].parameters_text", "tools[5].parameters_text"]
    assert found[1][1].startswith("set only one of tools[2].parameters and "
                                  "tools[2].parameters_text")
    assert "got a JSON array" in found[2][1]
    assert "not valid JSON" in found[3][1]
    assert "over the limit of 100 bytes" in found[4][1]
    # an explicitly set empty Struct counts as set too
    both_empty = pb.Tool(name="f", parameters_text="{}")
    both_empty.parameters.SetInParent()
    assert _fields(validate_chat, pb.ChatRequest(model="m", tools=[both_empty])) == [
        "tools[0].parameters_text"]
