"""Pure conversions: requests to Ollama payloads, chunks to messages."""

from __future__ import annotations

import base64

import orjson
from google.protobuf import struct_pb2
from google.protobuf.duration_pb2 import Duration

from tokenwire.service.backends.ollama._answers import (
    finish_reason,
    model_from_tag,
    tool_calls_from,
    usage_from,
)
from tokenwire.service.backends.ollama._payloads import (
    chat_payload,
    embed_payload,
    generate_payload,
)
from tokenwire.v1 import generation_pb2 as pb


def test_unset_options_are_not_sent_and_zero_is_kept() -> None:
    request = pb.GenerateRequest(model="m", prompt="p", options=pb.Options(temperature=0.0))
    payload = generate_payload(request)
    assert payload["options"] == {"temperature": 0.0}
    assert generate_payload(pb.GenerateRequest(model="m", prompt="p")).keys() == {
        "model", "prompt", "stream"}


def test_all_options_map_to_ollama_names() -> None:
    options = pb.Options(
        temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, typical_p=1.0, max_tokens=64,
        stop=["\n\n", "END"], seed=7, repeat_penalty=1.1, repeat_last_n=64,
        presence_penalty=0.2, frequency_penalty=0.3, num_ctx=2048, num_keep=4,
    )
    got = generate_payload(pb.GenerateRequest(model="m", options=options))["options"]
    assert got == {
        "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "typical_p": 1.0,
        "num_predict": 64, "stop": ["\n\n", "END"], "seed": 7, "repeat_penalty": 1.1,
        "repeat_last_n": 64, "presence_penalty": 0.2, "frequency_penalty": 0.3, "num_ctx": 2048,
        "num_keep": 4,
    }


def test_generate_fields() -> None:
    schema = struct_pb2.Struct()
    schema.update({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}})
    request = pb.GenerateRequest(
        model="m", prompt="p", system="s", suffix="x", images=[b"\x89PNG"],
        format=pb.Format(json_schema=schema), keep_alive=Duration(seconds=-1),
        think=pb.THINK_HIGH,
    )
    payload = generate_payload(request)
    assert payload["system"] == "s" and payload["suffix"] == "x"
    assert payload["images"] == [base64.b64encode(b"\x89PNG").decode()]
    # integral numbers stay integers for JSON Schema keywords
    assert payload["format"]["properties"]["n"]["minimum"] == 1
    assert isinstance(payload["format"]["properties"]["n"]["minimum"], int)
    assert payload["keep_alive"] == -1
    assert payload["think"] == "high"
    assert generate_payload(pb.GenerateRequest(model="m", format=pb.Format(json=True)))[
        "format"] == "json"
    assert "think" not in generate_payload(pb.GenerateRequest(model="m"))
    assert generate_payload(pb.GenerateRequest(model="m", think=pb.THINK_DISABLED))[
        "think"] is False


def test_chat_payload_messages_tools_and_tool_calls() -> None:
    call = pb.ToolCall(id="call_1", name="weather", index=0)
    call.arguments.update({"city": "Paris"})
    params = struct_pb2.Struct()
    params.update({"type": "object", "properties": {"city": {"type": "string"}}})
    request = pb.ChatRequest(
        model="m",
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, content="be brief"),
            pb.Message(role=pb.ROLE_USER, content="weather?"),
            pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
            pb.Message(role=pb.ROLE_TOOL, content="sunny", tool_name="weather",
                       tool_call_id="call_1"),
        ],
        tools=[pb.Tool(name="weather", description="look up", parameters=params)],
    )
    payload = chat_payload(request)
    assert [m["role"] for m in payload["messages"]] == ["system", "user", "assistant", "tool"]
    assert payload["messages"][2]["tool_calls"] == [
        {"id": "call_1", "function": {"index": 0, "name": "weather",
                                      "arguments": {"city": "Paris"}}}]
    assert payload["messages"][3]["tool_name"] == "weather"
    assert payload["tools"][0]["function"]["name"] == "weather"
    assert payload["tools"][0]["type"] == "function"


def test_tool_calls_from_ollama() -> None:
    calls = tool_calls_from([
        {"id": "call_x", "function": {"index": 1, "name": "f", "arguments": {"a": 1, "b": [2]}}},
        {"function": {"name": "g", "arguments": {}}},
    ])
    assert [(c.id, c.name, c.index) for c in calls] == [("call_x", "f", 1), ("", "g", 1)]
    assert dict(calls[0].arguments)["a"] == 1


def test_tool_call_arguments_keep_their_order_as_text() -> None:
    """A Struct is a map and loses the order the model wrote; arguments_text keeps it, both
    from the engine and back to it in the history."""
    [call] = tool_calls_from([{"function": {"name": "f", "arguments": {"z": 1, "a": 2}}}])
    assert call.arguments_text == '{"z":1,"a":2}'
    sent = pb.ToolCall(name="f", arguments_text='{"z":1,"a":2}')
    history = pb.ChatRequest(model="m", messages=[
        pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[sent])])
    body = orjson.dumps(chat_payload(history))
    assert b'"arguments":{"z":1,"a":2}' in body


def test_usage_and_finish_reason() -> None:
    usage = usage_from({"done_reason": "length", "prompt_eval_count": 5, "eval_count": 10,
                        "eval_duration": 500_000_000, "total_duration": 2_000_000_000,
                        "load_duration": 1_000_000, "prompt_eval_duration": 3})
    assert (usage.prompt_tokens, usage.completion_tokens) == (5, 10)
    assert usage.eval_tokens_per_second == 20.0
    assert usage.total_duration.ToNanoseconds() == 2_000_000_000
    assert usage.engine_finish_reason == "length"
    assert finish_reason("length") == pb.FINISH_REASON_LENGTH
    assert finish_reason("load") == pb.FINISH_REASON_LOAD
    assert finish_reason("unload") == pb.FINISH_REASON_UNLOAD
    assert finish_reason("stop") == pb.FINISH_REASON_STOP
    assert finish_reason("weird") == pb.FINISH_REASON_OTHER


def test_model_from_tag_and_embed_payload() -> None:
    model = model_from_tag({
        "name": "smollm2:135m", "size": 98_000_000, "digest": "ab12",
        "modified_at": "2026-11-22T02:00:00.123456789+02:00",
        "details": {"format": "gguf", "family": "llama", "parameter_size": "134.52M",
                    "quantization_level": "Q4_1"},
    })
    assert (model.name, model.size_bytes, model.family) == ("smollm2:135m", 98_000_000, "llama")
    assert model.modified_at.seconds > 0
    payload = embed_payload(pb.EmbedRequest(model="e", inputs=["a", "b"], truncate=False,
                                            dimensions=4))
    assert payload == {"model": "e", "input": ["a", "b"], "truncate": False, "dimensions": 4}
