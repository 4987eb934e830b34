"""Code written as a user of tokenwire writes it, for ``mypy --strict``.

It calls every public method of ``Client`` and ``AsyncClient``, of their token streams and
of the CLI-free API (request builders, errors, result types), and holds the README's Python
snippets verbatim (the ``readme_*`` functions). ``typing.assert_type`` pins the types that
matter to a user: a Token's fields, ``list_models()``'s elements, an awaited
``generate_text``. It imports nothing from the tests, so the same file checks an installed
wheel as well as the source tree (tests/typing/test_user_code.py).

Run as a script (``python user_code.py HOST:PORT``) it also makes every call against a
tokenwire server whose engine has ``smollm2:135m`` (a fake one does).
"""

from __future__ import annotations

import asyncio
import datetime
import sys
from collections.abc import Mapping, Sequence
from typing import Any, assert_type

from tokenwire.client import (
    DEFAULT_CHANNEL_OPTIONS,
    DEFAULT_SERVICE_CONFIG,
    DEFAULT_TARGET,
    TARGET_ENV,
    USE_DEFAULT,
    AsyncClient,
    AsyncTokenStream,
    CallbackError,
    Cancelled,
    ChatParams,
    Client,
    Completion,
    DeadlineExceeded,
    FinishReason,
    FormatLike,
    GenerateParams,
    Internal,
    InvalidArgument,
    KeepAliveLike,
    MessageLike,
    MetadataLike,
    NotFound,
    OnToken,
    OptionsLike,
    OtherError,
    PermissionDenied,
    ResourceExhausted,
    Role,
    ServiceConfigLike,
    TargetLike,
    ThinkLike,
    TimeoutLike,
    TokenStream,
    TokenwireError,
    ToolLike,
    Unauthenticated,
    Unavailable,
    Usage,
    UseDefault,
    build_chat_request,
    build_embed_request,
    build_generate_request,
    build_message,
    build_options,
    build_tool,
    build_tool_call,
    channel_target,
    from_rpc_error,
)
from tokenwire.v1 import generation_pb2

MODEL = "smollm2:135m"
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def check_token(token: generation_pb2.Token) -> None:
    assert_type(token.text, str)
    assert_type(token.thinking, str)
    assert_type(token.done, bool)
    assert_type(token.finish_reason, generation_pb2.FinishReason)
    assert_type(token.usage, generation_pb2.Usage)
    assert_type(token.usage.completion_tokens, int)
    assert_type(token.model, str)
    assert_type(token.position, int)
    for call in token.tool_calls:
        assert_type(call, generation_pb2.ToolCall)


def check_completion(done: Completion) -> str:
    assert_type(done.text, str)
    assert_type(done.thinking, str)
    assert_type(done.tool_calls, tuple[generation_pb2.ToolCall, ...])
    assert_type(done.finish_reason, FinishReason)
    assert_type(done.finish_reason.proto, generation_pb2.FinishReason)
    assert_type(done.finish_reason_name, str)
    assert_type(done.usage, Usage)
    assert_type(done.usage.prompt_tokens, int)
    assert_type(done.usage.time_to_first_token, float)
    assert_type(done.usage.gateway_duration, float)
    assert_type(done.usage.proto, generation_pb2.Usage)
    assert_type(done.upstream, str)
    assert_type(done.attempts, int)
    assert_type(done.model, str)
    assert_type(done.request_id, str | None)
    assert_type(done.to_message(), generation_pb2.Message)
    if done.finish_reason == "length" or done.finish_reason is FinishReason.LENGTH:
        return "cut short"
    usage = done.usage
    return f"{done.finish_reason}: {usage.completion_tokens} tokens, {describe_usage(usage)}"


def describe_usage(usage: Usage) -> str:
    seconds: list[float] = [
        usage.total_duration, usage.load_duration, usage.prompt_eval_duration,
        usage.eval_duration, usage.time_to_first_token, usage.gateway_duration]
    rates: list[float] = [usage.eval_tokens_per_second, usage.tokens_per_second]
    return f"{sum(seconds):.3f} s, {max(rates):.1f} tokens/s, {usage.engine_finish_reason}"


def connect(target: TargetLike, config: ServiceConfigLike = DEFAULT_SERVICE_CONFIG) -> Client:
    return Client(target, service_config=config)


def ask(
    client: Client,
    prompt: str,
    *,
    options: OptionsLike | None = None,
    format: FormatLike | None = None,
    think: ThinkLike | None = None,
    keep_alive: KeepAliveLike | None = None,
    timeout: TimeoutLike = USE_DEFAULT,
    metadata: MetadataLike | None = None,
    on_token: OnToken | None = None,
) -> Completion:
    """A user's own wrapper, typed with the client's aliases."""
    if isinstance(timeout, UseDefault):
        timeout = client.timeout
    return client.generate_text(MODEL, prompt, options=options, format=format, think=think,
                                keep_alive=keep_alive, timeout=timeout, metadata=metadata,
                                on_token=on_token)


def ask_with_tools(client: Client, messages: Sequence[MessageLike],
                   tools: Sequence[ToolLike]) -> Completion:
    return client.chat_text(MODEL, messages, tools=tools)


def check_stream_state(stream: TokenStream | AsyncTokenStream) -> None:
    assert_type(stream.text, str)
    assert_type(stream.thinking, str)
    assert_type(stream.tool_calls, list[generation_pb2.ToolCall])
    assert_type(stream.final, generation_pb2.Token | None)
    assert_type(stream.request_id, str | None)
    assert_type(stream.stream_id, str | None)
    assert_type(stream.position, int)
    assert_type(stream.resumes, int)


def check_error(exc: TokenwireError) -> None:
    assert_type(exc.message, str)
    assert_type(exc.partial_text, str)
    assert_type(exc.request_id, str | None)
    assert_type(exc.retryable, bool)
    assert_type(exc.retry_after, float | None)
    assert_type(exc.field_violations, list[tuple[str, str]])
    assert_type(exc.reason, str)
    if exc.error_info is not None:  # google.rpc's message: typed where its stubs are installed
        print(exc.error_info)
    if exc.reason == "MODEL_NOT_FOUND" and exc.resource_info is not None:
        print(f"pull {exc.resource_info.resource_name} first")


def translate(err: Any) -> TokenwireError:
    """What code that calls grpc itself does with a ``grpc.RpcError`` it caught."""
    return from_rpc_error(err)


def print_token(token: generation_pb2.Token) -> None:
    print(token.text, end="", flush=True)


def stop_early(token: generation_pb2.Token) -> None:
    raise RuntimeError(f"enough after {token.text!r}")


def sync_api(target: str) -> None:
    """Every method of ``Client`` and ``TokenStream``."""
    with Client(target, metadata={"x-team": "docs"}, timeout=30.0,
                options=[("grpc.enable_retries", 1)], service_config=DEFAULT_SERVICE_CONFIG
                ) as client:
        assert_type(client.target, str)
        with client.generate(MODEL, "Why is the sky blue?", timeout=10.0,
                             options={"temperature": 0.0, "max_tokens": 20}) as stream:
            assert_type(stream, TokenStream)
            for token in stream:
                check_token(token)
            check_stream_state(stream)
        check_completion(stream.completion)

        stepped = client.generate(MODEL, "hi", system="Be brief.", keep_alive=30.0,
                                  format="json", timeout=USE_DEFAULT)
        check_token(next(stepped))
        stepped.close()

        messages: list[MessageLike] = [
            {"role": Role.SYSTEM, "content": "Answer in one word."},
            generation_pb2.Message(role=Role.USER.proto, content="Capital of France?"),
        ]
        chat = client.chat(MODEL, messages, tools=[WEATHER_TOOL], metadata=[("x-a", "b")])
        chat_done = chat.collect(on_token=print_token)
        messages.append(chat_done.to_message())
        check_completion(chat_done)
        assert_type(chat.cancel(), bool)

        params: GenerateParams = {"options": {"max_tokens": 5}}
        check_completion(client.generate_text(MODEL, "hi", on_token=print_token, **params))
        chat_params: ChatParams = {"keep_alive": datetime.timedelta(minutes=5)}
        check_completion(client.chat_text(MODEL, messages, **chat_params))
        check_completion(client.complete(MODEL, "hi", timeout=None))
        check_completion(client.complete_chat(MODEL, messages))

        models = client.list_models()
        assert_type(models, list[generation_pb2.Model])
        assert_type(models[0].name, str)
        vectors = client.embed(MODEL, ["a", "b"], dimensions=None)
        assert_type(vectors, list[list[float]])
        assert_type(client.health(), str)

        stream_id = client.start(MODEL, "hi", detach_grace=60.0)
        assert_type(stream_id, str)
        resumed = client.resume(stream_id, after=0)
        assert_type(resumed, TokenStream)
        check_completion(resumed.collect())
        assert_type(client.start_chat(MODEL, messages), str)
        assert_type(client.cancel(stream_id), bool)
        live = client.generate(MODEL, "hi", resumable=True)
        for token in live:
            check_token(token)
        if live.stream_id is not None:
            client.resume(live.stream_id, live.position).close()
        try:
            client.complete("no-such-model", "hi")
        except NotFound as exc:
            check_error(exc)
        try:
            client.generate_text(MODEL, "hi", on_token=stop_early)
        except CallbackError as exc:
            assert_type(exc.partial_text, str)
            assert_type(exc.request_id, str | None)
            assert isinstance(exc.__cause__, RuntimeError)
        check_completion(ask(client, "hi", options={"max_tokens": 5}, keep_alive=60.0))
        check_completion(ask_with_tools(client, [{"role": "user", "content": "Oslo?"}],
                                        [WEATHER_TOOL]))
    spare = connect([target], None)
    assert_type(repr(spare), str)
    spare.close()


async def async_api(target: str) -> None:
    """Every method of ``AsyncClient`` and ``AsyncTokenStream``."""
    async with AsyncClient(target, timeout=30.0) as client:
        async with client.generate(MODEL, "Why is the sky blue?") as stream:
            assert_type(stream, AsyncTokenStream)
            async for token in stream:
                check_token(token)
            check_stream_state(stream)
        check_completion(stream.completion)

        stepped = client.generate(MODEL, "hi")
        check_token(await anext(stepped))
        await stepped.aclose()

        history: list[Mapping[str, Any]] = [{"role": "user", "content": "hi"}]
        chat = client.chat(MODEL, history)
        check_completion(await chat.collect())
        assert_type(chat.cancel(), bool)

        done = await client.generate_text(MODEL, "hi", on_token=print_token)
        assert_type(done, Completion)
        check_completion(done)
        assert_type(await client.chat_text(MODEL, history), Completion)
        assert_type(await client.complete(MODEL, "hi"), Completion)
        assert_type(await client.complete_chat(MODEL, history), Completion)
        models = await client.list_models()
        assert_type(models, list[generation_pb2.Model])
        assert_type(await client.embed(MODEL, "a"), list[list[float]])
        assert_type(await client.health(""), str)

        stream_id = await client.start(MODEL, "hi")
        assert_type(stream_id, str)
        check_completion(await client.resume(stream_id).collect())
        assert_type(await client.start_chat(MODEL, history), str)
        assert_type(await client.cancel(stream_id), bool)
        try:
            async with asyncio.timeout(30):
                await client.generate_text("no-such-model", "hi")
        except TokenwireError as exc:
            check_error(exc)
    await client.aclose()


def plain_api() -> None:
    """The request builders, result types and errors, without a server."""
    assert_type(DEFAULT_TARGET, str)
    assert_type(TARGET_ENV, str)
    assert_type(DEFAULT_CHANNEL_OPTIONS, tuple[tuple[str, Any], ...])
    assert_type(channel_target(["10.0.0.1:50051", "10.0.0.2:50051"]), str)
    request = build_generate_request(
        MODEL, "hi", options={"temperature": 0.2}, format={"type": "object"},
        keep_alive=datetime.timedelta(seconds=60), think="low")
    assert_type(request, generation_pb2.GenerateRequest)
    assert_type(build_chat_request(MODEL, [{"role": "user", "content": "hi"}]),
                generation_pb2.ChatRequest)
    assert_type(build_embed_request(MODEL, ["a"]), generation_pb2.EmbedRequest)
    assert_type(build_options({"max_tokens": 5}), generation_pb2.Options | None)
    assert_type(build_message({"role": Role.TOOL, "content": "21 C"}), generation_pb2.Message)
    assert_type(build_tool(WEATHER_TOOL), generation_pb2.Tool)
    assert_type(build_tool_call({"name": "get_weather", "arguments": {"city": "Oslo"}}),
                generation_pb2.ToolCall)
    assert_type(FinishReason.from_proto(generation_pb2.FINISH_REASON_STOP), FinishReason)
    assert_type(Role.from_proto(generation_pb2.ROLE_USER), Role)
    assert_type(Role.USER.proto, generation_pb2.Role)
    assert_type(Usage.from_proto(generation_pb2.Usage()), Usage)
    response = generation_pb2.CompleteResponse(text="hi")
    check_completion(Completion.from_response(response, request_id=None))
    final = generation_pb2.Token(done=True, finish_reason=generation_pb2.FINISH_REASON_STOP)
    check_completion(Completion.from_final(final, text="hi", thinking="", tool_calls=(),
                                           request_id="req-1"))
    errors: Sequence[type[TokenwireError]] = (
        InvalidArgument, NotFound, Unavailable, DeadlineExceeded, Cancelled,
        ResourceExhausted, Unauthenticated, PermissionDenied, Internal, OtherError)
    assert all(issubclass(kind, TokenwireError) for kind in errors)
    assert issubclass(CallbackError, Exception)


# --- The README's snippets, verbatim (tests/typing/test_readme.py compares and runs them) ---


def readme_python_client() -> None:
    from tokenwire.client import Client

    with Client("127.0.0.1:50051") as client:
        stream = client.generate("smollm2:135m", "Why is the sky blue?",
                                 options={"temperature": 0.2, "max_tokens": 200})
        for token in stream:
            print(token.text, end="", flush=True)
        answer = stream.completion  # the whole answer, once the loop has ended
        print(f"\n{answer.usage.completion_tokens} tokens, finish {answer.finish_reason}, "
              f"first one after {answer.usage.time_to_first_token:.3f} s")


def readme_stream_a_completion() -> None:
    from tokenwire.client import Client

    with Client() as client:
        for token in client.generate("smollm2:135m", "Why is the sky blue?"):
            print(token.text, end="", flush=True)


def readme_chat_with_history() -> None:
    from tokenwire.client import Client

    with Client() as client:
        history = [{"role": "system", "content": "Answer in one sentence."}]
        for question in ("What is the capital of France?", "And of Italy?"):
            history.append({"role": "user", "content": question})
            reply = client.chat_text("smollm2:135m", history)
            history.append({"role": "assistant", "content": reply.text})
            print(reply.text)


def readme_one_answer() -> None:
    from tokenwire.client import Client

    with Client() as client:
        result = client.complete("smollm2:135m", "Name three primary colours.",
                                 options={"max_tokens": 50})
        print(result.text, result.finish_reason, result.usage.completion_tokens,
              result.usage.total_duration)


def readme_deadlines_and_failures() -> None:
    from tokenwire.client import Client, DeadlineExceeded, TokenwireError

    with Client(timeout=60.0) as client:  # every call's deadline, in seconds
        try:
            for token in client.generate("smollm2:135m", "Tell a long story.", timeout=5.0):
                print(token.text, end="", flush=True)
        except DeadlineExceeded as exc:
            print(f"\n[5 s passed; {len(exc.partial_text)} characters had arrived]")
        except TokenwireError as exc:
            print(f"\n[{exc.code.name}: {exc.message}; kept: {exc.partial_text!r}]")


def readme_cancellation() -> None:
    from tokenwire.client import Client

    with Client() as client, client.generate("smollm2:135m", "Count to a thousand.") as stream:
        for token in stream:
            print(token.text, end="", flush=True)
            if len(stream.text) >= 20:
                break  # the call is cancelled: the engine stops generating


def readme_asyncio() -> None:
    import asyncio

    from tokenwire.client import AsyncClient


    async def main() -> None:
        async with AsyncClient() as client:
            answer = await client.generate_text(
                "smollm2:135m", "Why is the sky blue?",
                on_token=lambda token: print(token.text, end="", flush=True))
            print(f"\n{answer.usage.completion_tokens} tokens, finish {answer.finish_reason}")


    asyncio.run(main())


if __name__ == "__main__":
    plain_api()
    sync_api(sys.argv[1])
    asyncio.run(async_api(sys.argv[1]))
