"""Token budgets per caller (tokens_per_minute, tokens_per_day in the callers file), in
one process: reserved at admission, refused with QuotaFailure when they do not fit,
settled to the engine's counts when the call ends, however it ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from tests.conftest import MakeRuntime
from tests.fakeollama import FakeOllama
from tests.helpers import detail, reason, samples, scrape, value, violations
from tests.reliability._util import bearer, outcome, retry_delay
from tokenwire.service.guard._budget import (
    DEFAULT_OUTPUT_RESERVATION,
    Budget,
    LocalBudgets,
    Reservation,
    plan_reservation,
)
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

OK, EXHAUSTED = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
ALICE = bearer("tok-alice")


def _request(max_tokens: int | None = 10, prompt: str = "p") -> pb.GenerateRequest:
    request = pb.GenerateRequest(model="tiny", prompt=prompt)
    if max_tokens is not None:
        request.options.max_tokens = max_tokens
    return request


@pytest.fixture
async def stub_with(make_runtime: MakeRuntime, tmp_path: Path
                    ) -> AsyncIterator[Any]:
    channels: list[grpc.aio.Channel] = []

    async def make(callers: str, **settings: Any) -> tuple[GenerationServiceStub, Any]:
        path = tmp_path / "callers.toml"
        path.write_text('[callers.alice]\ntoken = "tok-alice"\n' + callers)
        runtime = await make_runtime(callers_file=str(path), metrics_listen="127.0.0.1:0",
                                     **settings)
        channel = grpc.aio.insecure_channel(runtime.target)
        channels.append(channel)
        return GenerationServiceStub(channel), runtime

    yield make
    for channel in channels:
        await channel.close()


def test_a_reservation_is_the_prompt_estimate_plus_the_output_cap() -> None:
    budget = Budget(per_minute=1000)
    capped = plan_reservation(_request(50, "x" * 300), caller="a", budget=budget,
                              caller_cap=None, server_cap=0)
    assert capped.tokens == capped.prompt_estimate + 50
    assert 100 <= capped.prompt_estimate <= 110  # a third of ~310 encoded bytes
    chat = pb.ChatRequest(model="tiny", messages=[pb.Message(role=pb.ROLE_USER, content="hi"),
                                                 pb.Message(role=pb.ROLE_USER, content="hi",
                                                            images=[b"\0" * 100_000])])
    guessed = plan_reservation(chat, caller="a", budget=budget, caller_cap=None,
                               server_cap=0)
    # The image's bytes are not text: a flat figure per image, and per message.
    assert 1024 + 16 <= guessed.prompt_estimate <= 1024 + 16 + 20
    # Nothing caps the output: the default reservation, given to the request.
    assert guessed.tokens == guessed.prompt_estimate + DEFAULT_OUTPUT_RESERVATION
    assert chat.options.max_tokens == DEFAULT_OUTPUT_RESERVATION
    # The caller's cap comes before the server's.
    uncapped = _request(None)
    by_caller = plan_reservation(uncapped, caller="a", budget=budget, caller_cap=64,
                                 server_cap=512)
    assert by_caller.tokens - by_caller.prompt_estimate == 64 == uncapped.options.max_tokens


def test_local_budgets_refill_per_minute_and_reset_per_day() -> None:
    now = [86_400.0 * 20_000 + 3600]
    budgets = LocalBudgets(clock=lambda: now[0])
    budget = Budget(per_minute=600, per_day=1000)

    def reserve(tokens: int) -> Reservation:
        reservation = Reservation("a", budget, tokens, 0)
        budgets.reserve(reservation)
        return reservation

    first = reserve(400)
    with pytest.raises(Exception, match="has 200 of its 600 tokens per minute left") as caught:
        reserve(400)
    assert caught.value.retry_after == pytest.approx(20.0)  # 200 more at 10 tokens/s
    budgets.settle(first, 100)  # it used 100: 300 come back
    second = reserve(400)
    now[0] += 60
    budgets.settle(second, 400)
    with pytest.raises(Exception, match="has 500 of its 1000 tokens per day left"):
        reserve(600)
    with pytest.raises(Exception, match="more than its whole budget of 600 tokens per minute"):
        reserve(700)
    now[0] += 86_400  # a new UTC day
    reserve(600)


async def test_a_reservation_that_does_not_fit_is_refused_with_quota_failure(
        stub_with: Any, fake: FakeOllama, figures: dict[str, Any]) -> None:
    fake.tokens = ["a ", "b ", "c "]
    stub, runtime = await stub_with("tokens_per_minute = 100\n")
    # Each call reserves its prompt estimate and 30 output tokens, and uses 3 + 2.
    tokens = [t async for t in stub.Generate(_request(30), metadata=ALICE, timeout=10)]
    assert tokens[-1].done and tokens[-1].usage.completion_tokens == 3
    # Settled to what it used: three more such calls fit in 100 (each reserves ~37).
    for _ in range(2):
        assert await outcome(_drain(stub.Generate(_request(30), metadata=ALICE))) == OK
    big = stub.Generate(_request(90), metadata=ALICE, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _drain(big)
    err = caught.value
    assert err.code() == EXHAUSTED and reason(err) == "TOKEN_BUDGET_EXHAUSTED"
    assert "caller 'alice' has" in (err.details() or "")
    assert "of its 100 tokens per minute left, and this call reserves" in (err.details() or "")
    quota = detail(err, error_details_pb2.QuotaFailure)
    assert quota.violations[0].subject == "caller:alice"
    assert "tokens_per_minute" in quota.violations[0].description
    wait = retry_delay(err)
    assert 0 < wait <= 60
    pushback = dict(err.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
    assert pushback is not None and abs(int(pushback) - wait * 1000) <= 1
    # Larger than the whole budget: never retryable, so no RetryInfo, pushback -1.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _drain(stub.Generate(_request(500), metadata=ALICE, timeout=10))
    assert "more than its whole budget of 100 tokens per minute" in (caught.value.details()
                                                                     or "")
    with pytest.raises(AssertionError):
        detail(caught.value, error_details_pb2.RetryInfo)
    assert dict(caught.value.trailing_metadata() or ())["grpc-retry-pushback-ms"] == "-1"
    found = samples((await scrape(runtime.metrics_port)).text)
    assert value(found, "tokenwire_budget_refusals_total", window="minute") == 2
    assert value(found, "tokenwire_budget_tokens_total", kind="settled") == 3 * (3 + 2)
    figures.setdefault("budgets", {})["refusal"] = err.details()


async def test_a_caller_cap_bounds_the_output_and_the_reservation(
        stub_with: Any, fake: FakeOllama) -> None:
    fake.tokens = [f"t{i} " for i in range(50)]
    stub, _ = await stub_with("tokens_per_day = 100000\nmax_output_tokens = 5\n")
    tokens = [t async for t in stub.Generate(_request(None), metadata=ALICE, timeout=10)]
    assert tokens[-1].usage.completion_tokens == 5  # the engine was told num_predict 5
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _drain(stub.Generate(_request(6), metadata=ALICE, timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == [
        ("options.max_tokens", "at most 5 (caller 'alice''s max_output_tokens), got 6")]


async def test_a_call_that_breaks_off_is_charged_what_it_received(
        stub_with: Any, fake: FakeOllama) -> None:
    """Cancelled after two chunks: charged the prompt estimate and those two chunks, not
    its whole reservation; the next call fits again."""
    fake.tokens = [f"t{i} " for i in range(200)]
    fake.token_delay = 0.02
    stub, runtime = await stub_with("tokens_per_minute = 250\n")
    call = stub.Generate(_request(200), metadata=ALICE, timeout=10)
    for _ in range(2):
        await call.read()
    # Its reservation (about 205) is out: another one does not fit now.
    assert await outcome(_drain(stub.Generate(_request(200), metadata=ALICE))) == EXHAUSTED
    call.cancel()
    for _ in range(100):
        if runtime.admission.in_use == 0:
            break
        await asyncio.sleep(0.01)
    found = samples((await scrape(runtime.metrics_port)).text)
    settled = value(found, "tokenwire_budget_tokens_total", kind="settled")
    assert 2 <= settled <= 20, settled  # the prompt estimate plus a few chunks
    assert await outcome(_drain(stub.Generate(_request(200), metadata=ALICE))) == OK


async def test_callers_without_budgets_are_not_counted(stub_with: Any) -> None:
    stub, runtime = await stub_with('tokens_per_minute = 40\n'
                                    '[callers.bob]\ntoken = "tok-bob"\n')
    for _ in range(5):
        assert await outcome(_drain(stub.Generate(_request(30), metadata=bearer("tok-bob")))
                             ) == OK
    found = samples((await scrape(runtime.metrics_port)).text)
    assert value(found, "tokenwire_budget_tokens_total", kind="reserved") == 0


async def _drain(call: Any) -> list[pb.Token]:
    return [t async for t in call]
