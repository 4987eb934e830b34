"""``ChatTokenwire``: a LangChain chat model on tokenwire's Python client (the Chat RPC)."""

# ASYNC109: `timeout` here is the gRPC deadline sent to the server (see the client).
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, Self

import grpc
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils import secret_from_env
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field, PrivateAttr, SecretStr

from tokenwire.client import (
    DEFAULT_SERVICE_CONFIG,
    AsyncClient,
    AsyncTokenStream,
    ChatParams,
    Client,
    TokenStream,
    build_options,
)
from tokenwire.langchain._messages import PROVIDER, ai_message, chunk_message, to_messages
from tokenwire.langchain._structured import Method, structured
from tokenwire.v1 import generation_pb2

__all__ = ["ChatTokenwire"]

#: Environment variable read for ``api_key`` when none is given.
API_KEY_ENV = "TOKENWIRE_API_KEY"
#: Options fields set through the model's own fields (the rest go in ``options``).
_OWN_OPTIONS = ("temperature", "max_tokens", "top_p", "top_k", "seed", "stop")
_OPTION_NAMES = frozenset(generation_pb2.Options.DESCRIPTOR.fields_by_name)
#: Per-call keyword arguments (from ``invoke(..., **kw)`` or ``.bind(**kw)``) besides the
#: Options fields.
_CALL_KEYS = frozenset({"model", "tools", "options", "format", "think", "keep_alive",
                        "timeout"})
#: Keyword arguments LangChain itself passes down that are not for the request.
_LANGCHAIN_KEYS = ("stream", "ls_structured_output_format")


class ChatTokenwire(BaseChatModel):
    """A LangChain chat model served by a tokenwire gateway (its Chat RPC).

    ```python
    from tokenwire.langchain import ChatTokenwire

    model = ChatTokenwire(model="smollm2:135m", target="127.0.0.1:50051", temperature=0)
    for chunk in model.stream("Why is the sky blue?"):
        print(chunk.content, end="", flush=True)
    ```

    Streaming (``stream``/``astream``) hands each Token on as an ``AIMessageChunk`` as it
    arrives; the last chunk carries ``usage_metadata`` and ``response_metadata``
    (``finish_reason``, ``model_name``). ``invoke``/``ainvoke`` use the unary Complete RPC
    (or streaming when ``streaming=True``). A consumer that stops iterating cancels the
    gRPC call, and the gateway stops the engine. Failures raise the client's
    ``TokenwireError`` subclasses (``tokenwire.client``): retry them with
    ``.with_retry(retry_if_exception_type=(Unavailable, ResourceExhausted))``.
    """

    #: Model name as the gateway knows it, e.g. "smollm2:135m".
    model: str
    #: The gateway: ``host:port``, a gRPC target URI, or several addresses separated by
    #: commas; default ``$TOKENWIRE_TARGET``, else ``127.0.0.1:50051``.
    target: str | None = None
    #: Deadline of each call in seconds (sent to the server, which stops the engine when
    #: it passes); ``None``: none.
    timeout: float | None = None
    #: TLS with the system's roots (or ``root_certificates``).
    tls: bool = False
    #: PEM bundle to verify the gateway with; implies ``tls``.
    root_certificates: bytes | None = None
    #: Channel credentials (mTLS...); overrides ``tls``/``root_certificates``.
    credentials: grpc.ChannelCredentials | None = Field(default=None, exclude=True)
    #: Bearer token sent as ``authorization: Bearer ...``; default ``$TOKENWIRE_API_KEY``.
    api_key: SecretStr | None = Field(
        default_factory=secret_from_env(API_KEY_ENV, default=None), exclude=True)
    #: Metadata sent with every call (e.g. ``{"x-request-id": ...}``).
    grpc_metadata: dict[str, str] = Field(default_factory=dict)
    #: gRPC-level retries of a call that failed UNAVAILABLE before its first token (the
    #: channel's retry policy, safe: nothing was delivered). ``None``: the client's
    #: default (2 retries); 0: none (then only ``.with_retry`` retries). gRPC caps
    #: attempts at 5.
    max_retries: int | None = None
    #: Use streaming for ``invoke`` too (callbacks then see each token).
    streaming: bool = False

    #: Sampling temperature (0: greedy). ``None`` keeps the model's default.
    temperature: float | None = None
    #: Most tokens to generate (Options.max_tokens).
    max_tokens: int | None = None
    #: Nucleus sampling.
    top_p: float | None = None
    #: Top-k sampling.
    top_k: int | None = None
    #: Random seed, for reproducible sampling.
    seed: int | None = None
    #: Stop sequences (a call's ``stop`` replaces them).
    stop: list[str] | None = None
    #: Other ``Options`` fields by name (``repeat_penalty``, ``num_ctx``...).
    options: dict[str, Any] | None = None
    #: Output format: ``"json"`` or a JSON Schema dict (see ChatRequest.format).
    format: Literal["json"] | dict[str, Any] | None = None
    #: Thinking: True/False or "low"/"medium"/"high"; ``None``: the model's default.
    think: bool | Literal["low", "medium", "high"] | None = None
    #: How long the engine keeps the model loaded after the call, in seconds.
    keep_alive: float | None = None

    _client: Client | None = PrivateAttr(default=None)
    #: One async client per event loop (a grpc.aio channel belongs to its loop, and holds
    #: it, so a weak mapping would never let go of either).
    _aclients: dict[asyncio.AbstractEventLoop, AsyncClient] = PrivateAttr(default_factory=dict)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    # -- LangChain's descriptors -------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "tokenwire-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "target": self.target, **self._option_values()}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider=PROVIDER, ls_model_type="chat",
                                 ls_model_name=str(kwargs.get("model") or self.model))
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # -- clients ------------------------------------------------------------------------

    def __copy__(self) -> Self:
        """A copy (``model_copy``) opens channels of its own: it may get another target."""
        return type(self).model_construct(self.model_fields_set, **self.__dict__)

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Self:
        memo = {} if memo is None else memo
        if self.credentials is not None:  # a gRPC object: shared, it cannot be copied
            memo[id(self.credentials)] = self.credentials
        return type(self).model_construct(self.model_fields_set,
                                          **copy.deepcopy(self.__dict__, memo))

    def _client_args(self) -> dict[str, Any]:
        metadata = dict(self.grpc_metadata)
        if self.api_key is not None:
            metadata["authorization"] = f"Bearer {self.api_key.get_secret_value()}"
        return {"credentials": self.credentials, "tls": self.tls,
                "root_certificates": self.root_certificates, "metadata": metadata,
                "timeout": self.timeout, "service_config": _service_config(self.max_retries)}

    def _sync_client(self) -> Client:
        with self._lock:
            if self._client is None:
                self._client = Client(self.target, **self._client_args())
            return self._client

    def _async_client(self) -> AsyncClient:
        """The async client of the running loop (a grpc.aio channel belongs to one loop)."""
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:
            # The channels of loops that have ended (each asyncio.run) cannot be closed any
            # more: let them go, so neither they nor their loops pile up.
            for ended in [other for other in self._aclients if other.is_closed()]:
                del self._aclients[ended]
            client = self._aclients[loop] = AsyncClient(self.target, **self._client_args())
        return client

    def close(self) -> None:
        """Close the blocking client's channel (a later call opens a new one)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close the running loop's async channel (a later call opens a new one)."""
        client = self._aclients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    # -- requests -----------------------------------------------------------------------

    def _option_values(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in _OWN_OPTIONS}
        return {**(self.options or {}), **{k: v for k, v in values.items() if v is not None}}

    def _request(self, messages: list[BaseMessage], stop: list[str] | None,
                 kwargs: Mapping[str, Any]) -> tuple[str, list[generation_pb2.Message],
                                                     dict[str, Any]]:
        """The model, messages and the client's keyword arguments of one call."""
        call = {k: v for k, v in kwargs.items() if k not in _LANGCHAIN_KEYS}
        unknown = sorted(set(call) - _CALL_KEYS - _OPTION_NAMES)
        if unknown:
            raise TypeError(f"ChatTokenwire got unknown keyword argument(s) {unknown}; it "
                            f"takes {sorted(_CALL_KEYS)} and Options fields "
                            f"{sorted(_OPTION_NAMES)}")
        options = {**self._option_values(), **(call.pop("options", None) or {})}
        options.update({k: call.pop(k) for k in list(call) if k in _OPTION_NAMES})
        if stop is not None:
            options["stop"] = stop
        params: ChatParams = {
            "options": build_options(options),
            "tools": call.pop("tools", ()),
            "format": call.pop("format", self.format),
            "think": call.pop("think", self.think),
            "keep_alive": call.pop("keep_alive", self.keep_alive),
        }
        model = str(call.pop("model", None) or self.model)
        extra = {k: v for k, v in call.items() if v is not None}  # timeout
        return model, to_messages(messages), {**params, **extra}

    # -- the four entry points ------------------------------------------------------------

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,
                  **kwargs: Any) -> ChatResult:
        model, history, params = self._request(messages, stop, kwargs)
        completion = self._sync_client().complete_chat(model, history, **params)
        return _result(ai_message(completion))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        model, history, params = self._request(messages, stop, kwargs)
        completion = await self._async_client().complete_chat(model, history, **params)
        return _result(ai_message(completion))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        model, history, params = self._request(messages, stop, kwargs)
        stream: TokenStream = self._sync_client().chat(model, history, **params)
        try:
            while (token := next(stream, None)) is not None:
                chunk = ChatGenerationChunk(message=chunk_message(token, stream.request_id))
                if run_manager is not None:
                    run_manager.on_llm_new_token(token.text, chunk=chunk)
                yield chunk
        finally:  # the consumer stopped early, or a failure: the call is cancelled
            stream.close()

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        model, history, params = self._request(messages, stop, kwargs)
        stream: AsyncTokenStream = self._async_client().chat(model, history, **params)
        try:
            while True:
                try:
                    token = await stream.__anext__()
                except StopAsyncIteration:
                    break
                chunk = ChatGenerationChunk(message=chunk_message(token, stream.request_id))
                if run_manager is not None:
                    await run_manager.on_llm_new_token(token.text, chunk=chunk)
                yield chunk
        finally:
            await stream.aclose()

    # -- tools ----------------------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer ``tools`` to the model (any form LangChain converts to an OpenAI tool).

        ``tool_choice``: ``None`` or ``"auto"`` (the model decides: the only behaviour
        the Chat RPC has), or ``"none"`` (the tools are not sent). Forcing a call
        (``"any"``, ``"required"``, a tool's name) raises ValueError: the contract has no
        tool_choice field and Ollama no such control, so it could not be honoured.
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        if tool_choice == "none":
            formatted = []
        elif tool_choice not in (None, "auto"):
            raise ValueError(f"tool_choice={tool_choice!r} cannot be honoured: tokenwire's "
                             "Chat RPC has no tool_choice (the model decides whether to "
                             "call a tool); use None, 'auto' or 'none'")
        return super().bind(tools=formatted, **kwargs)


    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        method: Method = "json_schema",
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Answers as ``schema`` (a Pydantic class, a TypedDict, a JSON Schema dict).

        ``method="json_schema"`` (default) sends the schema as the request's ``format``:
        the engine constrains decoding to it, so the answer always parses (``strict`` is
        accepted and changes nothing). ``"json_mode"`` asks for any JSON. Tool-based
        ``"function_calling"`` works when the model calls the tool; it cannot be forced
        (see ``bind_tools``), so the result is None when it answers in text.
        """
        if kwargs:
            raise TypeError(f"unexpected keyword argument(s) {sorted(kwargs)}")
        return structured(self, schema, method, include_raw)


def _result(message: AIMessage) -> ChatResult:
    return ChatResult(generations=[ChatGeneration(message=message)])


def _service_config(max_retries: int | None) -> Any:
    """The client's service config with ``max_retries`` retries (None: unchanged)."""
    if max_retries is None:
        return DEFAULT_SERVICE_CONFIG
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, not {max_retries}")
    config = json.loads(json.dumps(dict(DEFAULT_SERVICE_CONFIG),
                                    default=lambda value: dict(value)))
    for method in config.get("methodConfig", ()):
        if max_retries == 0:
            method.pop("retryPolicy", None)
        elif "retryPolicy" in method:
            method["retryPolicy"]["maxAttempts"] = max_retries + 1
    return config
