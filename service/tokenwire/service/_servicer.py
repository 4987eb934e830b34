"""GenerationService: validate, read the backend's neutral events, turn them into Tokens.

The servicer holds no HTTP, JSON or retry logic, and knows no engine: the upstreams
(a ``backends.Router``) and the relay are passed in, and what it reads are
``backends.Event``s. With one upstream asked for every model (``--ollama-url``) it calls
that backend directly; otherwise the router gives each call its attempts (``Call``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration

from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

from ._delivery import Grouper, split_message
from ._exceptions import TruncatedStream
from ._metrics import Metrics
from ._relay import Opener, Relay
from ._status import ResponseTooLarge, ShuttingDown, map_errors, send_initial_metadata
from ._validate import Limits, ValidationFailed, validate_chat, validate_embed, validate_generate
from .backends._base import Backend, Event, Final, StreamRequest
from .backends._choice import Call
from .backends._router import Router
from .guard._auth import may_use_model

__all__ = ["GenerationServicer", "StreamSettings"]

_Sink = Callable[[pb.Token], Awaitable[None]]
_ADAPTIVE = pb.Delivery(mode=pb.DELIVERY_MODE_ADAPTIVE)


def _merge(batch: list[Event], big_chars: int) -> tuple[pb.Token, bool]:
    """Folds the events that piled up into one Token (order kept). The flag says the
    Token may be over the message size limit (tool calls, or more than ``big_chars``
    characters): only then is its encoded size measured."""
    if len(batch) == 1:  # the common case: the caller keeps up
        text, thinking, calls, _ = batch[0]
        token = pb.Token(text=text, thinking=thinking)
        if calls:
            token.tool_calls.extend(calls)
        return token, bool(calls) or len(text) + len(thinking) > big_chars
    texts, thoughts = [], []
    token = pb.Token()
    for text, thinking, calls, _ in batch:
        texts.append(text)
        thoughts.append(thinking)
        if calls:
            token.tool_calls.extend(calls)
    joined, thought = "".join(texts), "".join(thoughts)
    token.text = joined
    token.thinking = thought
    return token, bool(token.tool_calls) or len(joined) + len(thought) > big_chars


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


@dataclass(frozen=True)
class StreamSettings:
    first_token_timeout: float = 120.0
    idle_timeout: float = 60.0
    max_pending_chunks: int = 1024
    #: Retries of an upstream outage before the first token, and the first delay.
    retries: int = 0
    retry_backoff: float = 0.2
    #: num_predict applied when a request sets no max_tokens (0 = none).
    max_output_tokens: int = 0
    #: Bytes of upstream lines held for a slow caller, at most (besides max_pending_chunks).
    max_pending_bytes: int = 4 << 20
    #: Largest message sent (--max-message-bytes): larger Tokens are cut into several.
    max_message_bytes: int = 32 << 20

    @property
    def message_budget(self) -> int:
        """Bytes a Token may take, leaving room for the final one's usage and model."""
        return max(self.max_message_bytes - 8192, self.max_message_bytes // 2)


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(
        self,
        upstream: Backend | Router,
        *,
        limits: Limits | None = None,
        stream: StreamSettings | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._router = upstream if isinstance(upstream, Router) else Router.of(upstream)
        self._limits = limits or Limits()
        self._stream = stream or StreamSettings()
        self._metrics = metrics
        self._relays: set[Relay] = set()

    @property
    def active_streams(self) -> int:
        return len(self._relays)

    def interrupt_all(self) -> None:
        """Ends every running model call with UNAVAILABLE (shutdown after grace)."""
        for relay in list(self._relays):
            relay.interrupt(ShuttingDown())

    # -- streaming RPCs ---------------------------------------------------------

    @map_errors
    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> None:
        validate_generate(request, self._limits)
        await self._relay(context, "Generate", request, context.write, request.delivery)

    @map_errors
    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> None:
        validate_chat(request, self._limits)
        await self._relay(context, "Chat", request, context.write, request.delivery)

    @map_errors
    async def Complete(self, request: pb.CompleteRequest,
                       context: grpc.aio.ServicerContext) -> pb.CompleteResponse:
        kind = request.WhichOneof("request")
        if kind is None:
            raise ValidationFailed([("request", "set exactly one of generate or chat")])
        texts: list[str] = []
        thoughts: list[str] = []
        response = pb.CompleteResponse()
        limit = self._stream.max_message_bytes
        held = 0  # characters so far: a lower bound of their bytes

        async def collect(token: pb.Token) -> None:
            nonlocal held
            text, thinking = token.text, token.thinking
            held += len(text) + len(thinking)
            if held > limit:  # stop the model now rather than hold more
                raise ResponseTooLarge(f"the answer is over --max-message-bytes ({limit}); "
                                       "stream it with Generate or Chat, or ask for fewer "
                                       "tokens (options.max_tokens)")
            texts.append(text)
            thoughts.append(thinking)
            response.tool_calls.extend(token.tool_calls)
            if token.done:
                response.finish_reason = token.finish_reason
                response.usage.CopyFrom(token.usage)
                response.model = token.model

        inner: StreamRequest
        if kind == "generate":
            inner = request.generate
            validate_generate(inner, self._limits)
        else:
            inner = request.chat
            validate_chat(inner, self._limits)
        # Nobody reads between messages here: adaptive grouping packs everything that
        # is waiting, which is the cheapest.
        await self._relay(context, "Complete", inner, collect, _ADAPTIVE)
        response.text = "".join(texts)
        response.thinking = "".join(thoughts)
        return _fits(response, limit, "stream it with Generate or Chat, or ask for fewer "
                                      "tokens (options.max_tokens)")

    async def _relay(self, context: grpc.aio.ServicerContext, method: str,
                     request: StreamRequest, sink: _Sink, delivery: pb.Delivery) -> None:
        started = time.perf_counter()  # figures: loop.time() is 1 ms coarse under uvloop
        cap = self._stream.max_output_tokens
        if cap and not request.options.HasField("max_tokens"):
            request.options.max_tokens = cap
        first_token_wait = self._stream.first_token_timeout
        remaining = context.time_remaining()
        if remaining is not None:
            # The caller's deadline wins: wait for the first token as long as it allows.
            first_token_wait = remaining
        single = self._router.single
        call: Call | None = None
        if single is not None:  # one upstream for every model: no routing
            opener: Opener = lambda: single.stream(request)  # noqa: E731
        else:
            opener = call = self._router.call(request)
        relay = Relay(
            opener,
            first_token_timeout=first_token_wait,
            idle_timeout=self._stream.idle_timeout,
            max_pending=self._stream.max_pending_chunks,
            max_pending_bytes=self._stream.max_pending_bytes,
            retries=self._stream.retries,
            retry_backoff=self._stream.retry_backoff,
            failover=call,
        )
        next_batch: Callable[[], Awaitable[list[Event] | None]]
        if delivery.mode in (pb.DELIVERY_MODE_UNSPECIFIED, pb.DELIVERY_MODE_ADAPTIVE):
            next_batch = relay.take  # everything pending: no grouping layer per message
        else:
            next_batch = Grouper(relay, delivery).next
        self._relays.add(relay)
        first_sent: float | None = None
        carried = 0  # events folded into no message yet (empty pieces)
        budget = self._stream.message_budget
        big_chars = budget // 4  # a UTF-8 character is at most 4 bytes
        try:
            # The reader task sends the upstream request while this goes out.
            await send_initial_metadata(context)
            while True:
                batch = await next_batch()
                if not batch:
                    raise TruncatedStream("the engine's stream ended without a final message")
                token, big = _merge(batch, big_chars)
                final = batch[-1][3]
                has_content = bool(token.text or token.thinking or token.tool_calls)
                if final is None and not has_content:
                    carried += len(batch)
                    continue
                token.chunk_count = len(batch) + carried
                carried = 0
                if has_content and first_sent is None:
                    first_sent = time.perf_counter()
                if big and token.ByteSize() > budget:
                    token = await _send_parts(token, sink, budget)
                if final is not None:
                    if final.error is not None:  # its figures cannot be read: text first
                        if has_content:
                            await sink(token)
                        raise final.error
                    self._finish(token, final, relay, started, first_sent, request.model, call)
                    await sink(token)
                    if self._metrics is not None:
                        usage = token.usage
                        ttft = (usage.time_to_first_token.ToNanoseconds() / 1e9
                                if usage.HasField("time_to_first_token") else None)
                        self._metrics.stream_finished(
                            method, ttft, usage.tokens_per_second, usage.prompt_tokens,
                            usage.completion_tokens)
                    return
                await sink(token)
        finally:
            self._relays.discard(relay)
            await relay.aclose()

    def _finish(self, token: pb.Token, final: Final, relay: Relay, started: float,
                first_sent: float | None, model: str, call: Call | None) -> None:
        """Makes ``token`` the final one, with the engine's and the gateway's figures, and
        which upstream served it in how many attempts."""
        now = time.perf_counter()
        token.done = True
        token.finish_reason = final.finish_reason  # type: ignore[assignment]
        usage = final.usage
        if first_sent is None and (token.text or token.thinking or token.tool_calls):
            first_sent = now
        if first_sent is not None:
            usage.time_to_first_token.CopyFrom(_duration(first_sent - started))
        if relay.count >= 2:
            span = relay.last_perf - relay.first_perf
            if span > 0:
                usage.tokens_per_second = (relay.count - 1) / span
        usage.gateway_duration.CopyFrom(_duration(now - started))
        usage.attempts = relay.attempts
        if call is None:
            usage.upstream = self._router.single_name
            token.model = final.model or model
        else:
            usage.upstream = call.upstream_name
            # An alias: the model as the request named it, not the upstream's own name.
            token.model = model if call.rewritten else (final.model or model)
        token.usage.CopyFrom(usage)

    # -- unary RPCs -------------------------------------------------------------

    @map_errors
    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        found = await self._router.models(deadline=context.time_remaining())
        # A caller sees only the models its policy lets it use (the guard knows who it is).
        models = [m for m in found if may_use_model(m.name)]
        return _fits(pb.ListModelsResponse(models=models), self._stream.max_message_bytes, "")

    @map_errors
    async def Embed(self, request: pb.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        validate_embed(request, self._limits)
        response = await self._router.embed(request, deadline=context.time_remaining())
        return _fits(response, self._stream.max_message_bytes,
                     "embed fewer inputs per call, or ask for fewer dimensions")


_Response = TypeVar("_Response", pb.CompleteResponse, pb.ListModelsResponse, pb.EmbedResponse)


def _fits(response: _Response, limit: int, advice: str) -> _Response:
    """``response``, unless it is over the message size limit."""
    size = response.ByteSize()
    if size > limit:
        raise ResponseTooLarge(f"the answer is {size} bytes, over --max-message-bytes "
                               f"({limit})" + (f"; {advice}" if advice else ""))
    return response


async def _send_parts(token: pb.Token, sink: _Sink, budget: int) -> pb.Token:
    """Sends all but the last part of an oversized Token; returns the last."""
    parts = split_message(token, budget)
    for part in parts[:-1]:
        await sink(part)
    return parts[-1]
