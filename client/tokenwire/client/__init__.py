"""Typed Python client for tokenwire, a gRPC gateway that streams LLM tokens.

    from tokenwire.client import Client

    with Client("127.0.0.1:50051") as client:
        for token in client.generate("smollm2:135m", "Why is the sky blue?"):
            print(token.text, end="", flush=True)

``AsyncClient`` is the asyncio twin with the same methods (``async with``/``async for``).
A whole answer is a ``Completion``: ``finish_reason`` a ``FinishReason`` (a ``str`` enum,
``"stop"``), ``usage`` a ``Usage`` (durations in ``float`` seconds); ``stream.completion``
gives it once a stream has ended. Failures raise ``TokenwireError`` subclasses (the tree is
drawn in ``tokenwire.client._errors``).
"""

from __future__ import annotations

from tokenwire.client._async import AsyncClient, AsyncTokenStream
from tokenwire.client._base import DEFAULT_CHANNEL_OPTIONS, DEFAULT_TARGET, TARGET_ENV, OnToken
from tokenwire.client._channel import (
    DEFAULT_SERVICE_CONFIG,
    ServiceConfigLike,
    TargetLike,
    channel_target,
)
from tokenwire.client._errors import (
    CallbackError,
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    OtherError,
    PermissionDenied,
    ResourceExhausted,
    TokenwireError,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from tokenwire.client._requests import (
    build_chat_request,
    build_embed_request,
    build_generate_request,
    build_message,
    build_options,
    build_tool,
    build_tool_call,
)
from tokenwire.client._sync import Client, TokenStream
from tokenwire.client._types import (
    USE_DEFAULT,
    ChatParams,
    Completion,
    FinishReason,
    FormatLike,
    GenerateParams,
    KeepAliveLike,
    MessageLike,
    MetadataLike,
    OptionsLike,
    Role,
    ThinkLike,
    TimeoutLike,
    ToolLike,
    Usage,
    UseDefault,
)

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "DEFAULT_SERVICE_CONFIG",
    "DEFAULT_TARGET",
    "TARGET_ENV",
    "USE_DEFAULT",
    "AsyncClient",
    "AsyncTokenStream",
    "CallbackError",
    "Cancelled",
    "ChatParams",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "FinishReason",
    "FormatLike",
    "GenerateParams",
    "Internal",
    "InvalidArgument",
    "KeepAliveLike",
    "MessageLike",
    "MetadataLike",
    "NotFound",
    "OnToken",
    "OptionsLike",
    "OtherError",
    "PermissionDenied",
    "ResourceExhausted",
    "Role",
    "ServiceConfigLike",
    "ThinkLike",
    "TimeoutLike",
    "TokenStream",
    "TargetLike",
    "TokenwireError",
    "ToolLike",
    "Unauthenticated",
    "Unavailable",
    "Usage",
    "UseDefault",
    "build_chat_request",
    "build_embed_request",
    "build_generate_request",
    "build_message",
    "build_options",
    "build_tool",
    "build_tool_call",
    "channel_target",
    "from_rpc_error",
]
