"""The result types read as Python values and mirror the protobuf they come from."""

from __future__ import annotations

import json

import pytest
from google.protobuf import duration_pb2

from tokenwire.client import AsyncClient, Client, Completion, FinishReason, Role, Usage
from tokenwire.v1 import generation_pb2


def test_every_finish_reason_has_a_member_and_back() -> None:
    numbers = generation_pb2.FinishReason.values()
    members = [FinishReason.from_proto(number) for number in numbers]
    assert [member.proto for member in members] == numbers
    assert len(set(members)) == len(FinishReason) == len(numbers)
    assert FinishReason.from_proto(generation_pb2.FINISH_REASON_TOOL_CALLS) == "tool_calls"
    # a number from a newer server is OTHER, not a crash
    assert FinishReason.from_proto(max(numbers) + 1) is FinishReason.OTHER


def test_every_role_has_a_member_and_back() -> None:
    numbers = [n for n in generation_pb2.Role.values() if n != generation_pb2.ROLE_UNSPECIFIED]
    assert [Role.from_proto(number).proto for number in numbers] == numbers
    assert len(Role) == len(numbers)
    assert Role.from_proto(generation_pb2.ROLE_ASSISTANT) == "assistant"
    with pytest.raises(ValueError, match="no role"):
        Role.from_proto(generation_pb2.ROLE_UNSPECIFIED)


def test_usage_has_every_proto_field_and_durations_in_seconds() -> None:
    names = [f.name for f in generation_pb2.Usage.DESCRIPTOR.fields]
    assert set(names) <= set(Usage.__dataclass_fields__)
    proto = generation_pb2.Usage(
        prompt_tokens=3, completion_tokens=2, upstream="gpu2", attempts=1,
        total_duration=duration_pb2.Duration(seconds=2, nanos=500_000_000),
        time_to_first_token=duration_pb2.Duration(nanos=12_000_000),
    )
    usage = Usage.from_proto(proto)
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 2)
    assert (usage.total_duration, usage.time_to_first_token) == (2.5, 0.012)
    assert isinstance(usage.load_duration, float) and usage.load_duration == 0.0
    assert usage.proto is proto
    assert Usage() == Usage(proto=proto) != usage  # compared by values, not by message


def test_completion_from_a_response_without_usage_has_zeros() -> None:
    response = generation_pb2.CompleteResponse(
        text="hi", finish_reason=generation_pb2.FINISH_REASON_LENGTH)
    done = Completion.from_response(response, None)
    assert done.finish_reason is FinishReason.LENGTH and done.finish_reason_name == "LENGTH"
    assert done.usage == Usage() and (done.upstream, done.attempts) == ("", 0)


async def test_async_results_read_as_python(aclient: AsyncClient) -> None:
    done = await aclient.generate_text("tiny", "hi")
    assert done.finish_reason == "stop" and done.finish_reason is FinishReason.STOP
    assert json.dumps({"finish": done.finish_reason}) == '{"finish": "stop"}'
    assert done.usage.time_to_first_token == pytest.approx(0.012)
    assert done.usage.proto.time_to_first_token.ToMilliseconds() == 12
    assert done.finish_reason.proto == generation_pb2.FINISH_REASON_STOP
    unary = await aclient.complete("tiny", "hi")
    assert unary.finish_reason is FinishReason.STOP and unary.usage.completion_tokens == 2


def test_sync_results_read_as_python_and_roles_go_in(client: Client) -> None:
    history = [{"role": Role.SYSTEM, "content": "be brief"}, {"role": Role.USER, "content": "hi"}]
    with client.chat("tiny", history) as stream:
        text = "".join(token.text for token in stream)
    done = stream.completion
    assert text == done.text and done.finish_reason == "stop"
    assert done.usage.time_to_first_token == pytest.approx(0.012)
    assert Role.from_proto(done.to_message().role) is Role.ASSISTANT
