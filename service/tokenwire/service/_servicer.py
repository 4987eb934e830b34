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
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration

from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1 import generation_pb2_grpc as pb_grpc

from ._delivery import Grouper, Source, split_message
from ._exceptions import TruncatedStream
from ._metrics import Metrics
from ._relay import Opener, Relay
from ._status import (
    ResponseTooLarge,
    ShuttingDown,
    map_errors,
    send_early_metadata,
    send_initial_metadata,
    status_for,
)
from ._validate import (
    Limits,
    ValidationFailed,
    validate_cancel,
    validate_chat,
    validate_embed,
    validate_generate,
    validate_resume,
)
from .backends._base import Backend, Event, Final, StreamRequest
from .backends._choice import Call
from .backends._router import Router
from .guard._auth import may_use_model, principal_var
from .guard._interceptor import spend_var, take_admission
from .resume import (
    Cursor,
    PositionOutOfRange,
    ResumableStream,
    ResumeUnavailable,
    StreamLog,
    Streams,
)
from .tracing import call_span_var, generation_var

if TYPE_CHECKING:  # redis-py is imported only when --redis-url is set
    from .resume._redis import RemoteStream
    from .tracing._otel import Generation, Tracing  # only when tracing is on

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
        streams: Streams | None = None,
        no_streams: str = "",
        tracing: Tracing | None = None,
    ) -> None:
        #: Spans for model calls (None: tracing is off).
        self._tracing = tracing
        self._router = upstream if isinstance(upstream, Router) else Router.of(upstream)
        #: Resumable streams (None: this server keeps none, and ``no_streams`` says why).
        self._streams = streams
        self._no_streams = no_streams or "this server keeps no resumable streams"
        self._limits = limits or Limits()
        self._stream = stream or StreamSettings()
        self._metrics = metrics
        self._relays: set[Relay] = set()

    @property
    def active_streams(self) -> int:
        """Model calls streaming now, resumable ones still generating included."""
        return len(self._relays) + (self._streams.live if self._streams is not None else 0)

    @property
    def streams(self) -> Streams | None:
        return self._streams

    def interrupt_all(self) -> None:
        """Ends every running model call with UNAVAILABLE (shutdown after grace)."""
        for relay in list(self._relays):
            relay.interrupt(ShuttingDown())
        if self._streams is not None:
            self._streams.stop_all(ShuttingDown())

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
        inner = self._inner(request, "complete")
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

        # Nobody reads between messages here: adaptive grouping packs everything that
        # is waiting, which is the cheapest.
        await self._relay(context, "Complete", inner, collect, _ADAPTIVE)
        response.text = "".join(texts)
        response.thinking = "".join(thoughts)
        return _fits(response, limit, "stream it with Generate or Chat, or ask for fewer "
                                      "tokens (options.max_tokens)")

    def _prepare(self, request: StreamRequest) -> None:
        cap = self._stream.max_output_tokens
        if cap and not request.options.HasField("max_tokens"):
            request.options.max_tokens = cap

    def _opener(self, request: StreamRequest) -> tuple[Opener, Call | None]:
        single = self._router.single
        if single is not None:  # one upstream for every model: no routing
            return (lambda: single.stream(request)), None
        call = self._router.call(request)
        return call, call

    async def _relay(self, context: grpc.aio.ServicerContext, method: str,
                     request: StreamRequest, sink: _Sink, delivery: pb.Delivery) -> None:
        started = time.perf_counter()  # figures: loop.time() is 1 ms coarse under uvloop
        self._prepare(request)
        if request.HasField("resumable"):
            stream = self._start(request, started, method)
            # Its id is its first message, whatever the order: with it, a caller that
            # loses the connection (even while the model loads) resumes the stream.
            await send_initial_metadata(context)
            await sink(pb.Token(stream_id=stream.id))
            await self._read(stream, 0, sink, delivery, method, context)
            return
        first_token_wait = self._stream.first_token_timeout
        remaining = context.time_remaining()
        if remaining is not None:
            # The caller's deadline wins: wait for the first token as long as it allows.
            first_token_wait = remaining
        opener, call = self._opener(request)
        # Before the relay: its reader task takes the span along to the upstream request.
        gen = self._generation(request) if self._tracing is not None else None
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
        next_batch = _batches(relay, delivery)
        spend = spend_var.get()
        if spend is not None:  # what it used is counted from the relay, or reported
            spend.watch(relay)
        self._relays.add(relay)
        failure: BaseException | None = None
        try:
            # Early order: the reader task sends the upstream request while this goes
            # out; first-token order: the pump sends it with the first Token.
            await send_early_metadata(context)
            await self._pump(next_batch, sink, method, request.model, relay, call, started,
                             context)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._relays.discard(relay)
            await relay.aclose()
            if gen is not None:
                gen.end(relay, failure)

    def _generation(self, request: StreamRequest | pb.EmbedRequest,
                    operation: str | None = None, *, resumable: bool = False) -> Generation:
        """Starts the model call's GenAI span, under the call's span, and makes it the
        one whose context the backends send upstream (tracing is on). The operation:
        Chat is ``chat``, Generate (a prompt to continue) ``text_completion``."""
        assert self._tracing is not None
        gen = self._tracing.generation(
            operation or ("chat" if isinstance(request, pb.ChatRequest) else "text_completion"),
            request, call_span_var.get(), resumable=resumable)
        generation_var.set(gen)
        return gen

    async def _pump(self, next_batch: Callable[[], Awaitable[list[Event] | None]], sink: _Sink,
                    method: str, model: str, relay: Relay | None, call: Call | None,
                    started: float, context: grpc.aio.ServicerContext | None, *,
                    figures: Callable[[Final], pb.Token] | None = None,
                    position: int | None = None) -> None:
        """Turns batches of events into Tokens until the final one. For a resumable
        stream, each Token gets its position (``position`` is the first batch's) and
        the final Token's fields are the stream's (``figures``), the same for every
        reader; otherwise the relay's figures make them. The call's initial metadata
        goes out (on ``context``) just before the first Token; a failure before it
        ends the call with its status alone, which a client may retry."""
        first_sent: float | None = None
        carried = 0  # events folded into no message yet (empty pieces)
        budget = self._stream.message_budget
        big_chars = budget // 4  # a UTF-8 character is at most 4 bytes
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
            count = token.chunk_count = len(batch) + carried
            carried = 0
            if context is not None and (has_content or final is None or final.error is None):
                await send_initial_metadata(context)  # once, before the first Token
                context = None
            if position is not None:
                token.position = position
                position += count
            if has_content and first_sent is None:
                first_sent = time.perf_counter()
            if big and token.ByteSize() > budget:
                token = await _send_parts(token, sink, budget)
            if final is not None:
                if final.error is not None:  # its figures cannot be read: text first
                    if has_content:
                        await sink(token)
                    raise final.error
                if figures is None:
                    assert relay is not None
                    self._finish(token, final, relay, started, first_sent, model, call)
                    self._record(method, token.usage)
                    spend = spend_var.get()
                    if spend is not None:
                        spend.report(token.usage)
                else:
                    token.MergeFrom(figures(final))
                await sink(token)
                return
            await sink(token)

    def _record(self, method: str, usage: pb.Usage) -> None:
        if self._metrics is not None:
            ttft = (usage.time_to_first_token.ToNanoseconds() / 1e9
                    if usage.HasField("time_to_first_token") else None)
            self._metrics.stream_finished(method, ttft, usage.tokens_per_second,
                                          usage.prompt_tokens, usage.completion_tokens)

    # -- resumable streams ------------------------------------------------------

    def _require_streams(self) -> Streams:
        if self._streams is None:
            raise ResumeUnavailable(self._no_streams)
        return self._streams

    def _start(self, request: StreamRequest, started: float, method: str) -> ResumableStream:
        """Starts ``request`` as a resumable stream, owned by the current caller; it
        takes over the call's admission slot until the engine is done. With Redis, it is
        mirrored there for the other replicas."""
        streams = self._require_streams()
        if streams.redis is not None:
            streams.redis.require()
        opener, call = self._opener(request)
        grace = (request.resumable.detach_grace.ToNanoseconds() / 1e9
                 if request.resumable.HasField("detach_grace") else None)
        # Before the stream: its reader task takes the span along to the upstream.
        gen = (self._generation(request, resumable=True) if self._tracing is not None
               else None)
        # No caller deadline here: the stream outlives its caller.
        try:
            stream = streams.open(
                opener, owner=principal_var.get(), model=request.model, grace=grace,
                started=started, call=call,
                first_token_timeout=self._stream.first_token_timeout,
                idle_timeout=self._stream.idle_timeout, retries=self._stream.retries,
                retry_backoff=self._stream.retry_backoff, failover=call)
        except BaseException as exc:
            if gen is not None:
                gen.end(None, exc)
            raise
        spend = spend_var.get()
        if spend is not None:  # the final event in the log tells what it used
            spend.watch(stream.log)
        stream.release = take_admission()
        if gen is not None:  # the span ends with the generation, not with this call
            generation_var.set(None)
            stream.release = _ending(gen, stream.log, stream.release)
            stream.trace = gen.traceparent()
        stream.figures_of = lambda final: self._figures(stream, final, method)
        if streams.redis is not None:
            streams.redis.mirror(stream.id, stream.owner, stream.model, stream.log,
                                 stream.figures_of, status_for, stream.trace)
        return stream

    async def _read(self, stream: ResumableStream, after: int, sink: _Sink,
                    delivery: pb.Delivery, method: str,
                    context: grpc.aio.ServicerContext | None) -> None:
        """Streams ``stream`` from chunk ``after`` on to its end, as one of its readers;
        leaving early (the caller went away) detaches, which does not stop it."""
        streams = self._require_streams()
        log = stream.log
        events = log.events
        if (after and after == len(events) and log.finished and log.error is None
                and events[-1][3] is not None):
            # The caller has every chunk: the final Token again, with nothing in it.
            token = pb.Token(position=after)
            token.MergeFrom(stream.figures_of(events[-1][3]))
            if context is not None:
                await send_initial_metadata(context)
            await sink(token)
            return
        cursor = Cursor(log, after, max_items=self._stream.max_pending_chunks,
                        max_bytes=self._stream.max_pending_bytes)
        next_batch = _batches(cursor, delivery)
        streams.attach(stream)
        try:
            await self._pump(next_batch, sink, method, stream.model, log, stream.call,
                             stream.started, context, figures=stream.figures_of,
                             position=after)
        finally:
            streams.detach(stream)

    async def _read_remote(self, remote: RemoteStream, after: int, sink: _Sink,
                           delivery: pb.Delivery, method: str,
                           context: grpc.aio.ServicerContext) -> None:
        """Streams a stream another replica generates (or generated), from Redis."""
        redis = self._require_streams().redis
        assert redis is not None
        cursor = redis.cursor(remote, after, max_items=self._stream.max_pending_chunks,
                              max_bytes=self._stream.max_pending_bytes)
        everything = await cursor.prelude()
        if everything is not None:  # the caller has every chunk: the final Token again
            await send_initial_metadata(context)
            await sink(everything)
            return

        def figures(final: Final) -> pb.Token:
            assert cursor.figures is not None
            return cursor.figures

        next_batch = _batches(cursor, delivery)
        await self._pump(next_batch, sink, method, remote.model, None, None, 0.0, context,
                         figures=figures, position=after)

    def _figures(self, stream: ResumableStream, final: Final, method: str) -> pb.Token:
        """The stream's final fields (done, finish reason, usage, model), built once:
        every reader gets the same. Its time to first token is the first chunk's
        arrival at the gateway (readers each send it at their own time)."""
        if stream.figures is None:
            figures = pb.Token()
            log = stream.log
            sent = any(e[0] or e[1] or e[2] for e in log.events)  # stops at the first
            first = log.first_perf if sent else None
            self._finish(figures, final, log, stream.started, first, stream.model, stream.call)
            stream.figures = figures
            self._record(method, figures.usage)
        return stream.figures

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

    @map_errors
    async def Start(self, request: pb.StartRequest,
                    context: grpc.aio.ServicerContext) -> pb.StartResponse:
        started = time.perf_counter()
        inner = self._inner(request, "start")
        self._require_streams()
        self._prepare(inner)
        stream = self._start(inner, started, "Start")
        self._require_streams().unread(stream)  # its grace runs until a Resume
        return pb.StartResponse(stream_id=stream.id)

    @map_errors
    async def Resume(self, request: pb.ResumeRequest,
                     context: grpc.aio.ServicerContext) -> None:
        validate_resume(request)
        streams = self._require_streams()
        owner = principal_var.get()
        stream = streams.local(request.stream_id, owner)
        if stream is None and streams.redis is not None:  # generated by another replica?
            remote = await streams.redis.find(request.stream_id, owner)
            _link(remote.trace)
            await self._read_remote(remote, request.after, context.write, request.delivery,
                                    "Resume", context)
            return
        stream = stream or streams.get(request.stream_id, owner)
        _link(stream.trace)
        produced = len(stream.log.events)
        if request.after > produced:
            raise PositionOutOfRange(
                f"after is {request.after}, but the stream has produced {produced} chunk(s) "
                "so far; pass the position plus the chunk_count of the last Token received")
        await self._read(stream, request.after, context.write, request.delivery, "Resume",
                         context)

    @map_errors
    async def Cancel(self, request: pb.CancelRequest,
                     context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        validate_cancel(request)
        streams = self._require_streams()
        owner = principal_var.get()
        stream = streams.local(request.stream_id, owner)
        if stream is None and streams.redis is not None:  # generated by another replica?
            remote = await streams.redis.find(request.stream_id, owner)
            return pb.CancelResponse(stopped=await streams.redis.cancel(remote))
        stream = stream or streams.get(request.stream_id, owner)
        stopped = streams.cancel(stream)
        if stopped:
            await stream.log.aclose()  # the engine's connection is closed when this returns
        return pb.CancelResponse(stopped=stopped)

    def _inner(self, request: pb.CompleteRequest | pb.StartRequest, name: str) -> StreamRequest:
        """The Generate or Chat request inside a Complete or Start, validated."""
        kind = request.WhichOneof("request")
        if kind is None:
            raise ValidationFailed([("request", "set exactly one of generate or chat")])
        inner: StreamRequest
        if kind == "generate":
            inner = request.generate
            validate_generate(inner, self._limits)
        else:
            inner = request.chat
            validate_chat(inner, self._limits)
        if name == "complete" and inner.HasField("resumable"):
            raise ValidationFailed([(f"{kind}.resumable", "Complete returns one answer and "
                                     "cannot be resumed: stream it with a resumable Generate "
                                     "or Chat, or use Start")])
        return inner

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
        gen = (self._generation(request, "embeddings") if self._tracing is not None
               else None)
        try:
            response = await self._router.embed(request, deadline=context.time_remaining())
        except BaseException as exc:
            if gen is not None:
                gen.end(None, exc)
            raise
        if gen is not None:
            gen.end(input_tokens=response.prompt_tokens)
        spend = spend_var.get()
        if spend is not None:
            spend.report_tokens(response.prompt_tokens)
        return _fits(response, self._stream.max_message_bytes,
                     "embed fewer inputs per call, or ask for fewer dimensions")


_Response = TypeVar("_Response", pb.CompleteResponse, pb.ListModelsResponse, pb.EmbedResponse)


def _batches(source: Source, delivery: pb.Delivery
             ) -> Callable[[], Awaitable[list[Event] | None]]:
    """How the writer takes chunks from ``source`` in ``delivery``'s mode."""
    if delivery.mode in (pb.DELIVERY_MODE_UNSPECIFIED, pb.DELIVERY_MODE_ADAPTIVE):
        return source.take  # everything pending: no grouping layer per message
    return Grouper(source, delivery).next


def _link(trace: str) -> None:
    """Links the current call's span to the generation it reads (traced ones only)."""
    if trace:
        span = call_span_var.get()
        if span is not None:
            span.link(trace)


def _ending(gen: Generation, log: StreamLog, release: Callable[[], None] | None
            ) -> Callable[[], None]:
    """``release`` (the admission slot), ending the generation's span first: what a
    resumable stream calls once the engine is done with it."""
    def done() -> None:
        gen.end(log, log.error)
        if release is not None:
            release()

    return done


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
