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
