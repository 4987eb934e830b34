"""LangChain messages to tokenwire ``Message``s, and tokenwire answers back to LangChain.

Pure functions, no I/O: the chat model calls them once per call (messages in) and once per
Token (chunks out).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import ToolCall, ToolCallChunk, invalid_tool_call, tool_call

from tokenwire.client import Completion, FinishReason
from tokenwire.v1 import generation_pb2

__all__ = ["PROVIDER", "ai_message", "chunk_message", "response_metadata", "to_messages",
           "usage_metadata"]

#: ``ls_provider`` and ``response_metadata["model_provider"]``.
PROVIDER = "tokenwire"

_ROLES = {"system": generation_pb2.ROLE_SYSTEM, "user": generation_pb2.ROLE_USER,
          "human": generation_pb2.ROLE_USER, "assistant": generation_pb2.ROLE_ASSISTANT,
          "ai": generation_pb2.ROLE_ASSISTANT, "tool": generation_pb2.ROLE_TOOL}
#: Content blocks of an assistant turn whose data tokenwire gets elsewhere (its tool
#: calls) or does not send back (its reasoning).
_SKIPPED_AI_BLOCKS = frozenset({"tool_call", "tool_use", "tool_call_chunk", "reasoning",
                                "thinking", "invalid_tool_call"})


def to_messages(messages: Sequence[BaseMessage]) -> list[generation_pb2.Message]:
    """The Chat request's ``messages`` for a LangChain conversation.

    Raises ValueError for what the contract cannot carry (an image given by URL, a
    content block of a kind it has no field for), naming it.
    """
    names: dict[str, str] = {}  # tool call id -> tool name, for ToolMessages without a name
    out = []
    for message in messages:
        if isinstance(message, AIMessage):
            for call in message.tool_calls:
                if call.get("id"):
                    names[str(call["id"])] = call["name"]
        out.append(_message(message, names))
    return out


def _message(message: BaseMessage, names: dict[str, str]) -> generation_pb2.Message:
    role = _role(message)
    text, images = _content(message.content, assistant=role == generation_pb2.ROLE_ASSISTANT)
    result = generation_pb2.Message(role=role, content=text, images=images)
    if isinstance(message, AIMessage):
        for index, call in enumerate(message.tool_calls):
            result.tool_calls.append(generation_pb2.ToolCall(
                id=call.get("id") or "", name=call["name"], index=index,
                arguments_text=json.dumps(call["args"], ensure_ascii=False)))
    elif isinstance(message, ToolMessage):
        result.tool_call_id = message.tool_call_id
        result.tool_name = message.name or names.get(message.tool_call_id, "")
    return result


def _role(message: BaseMessage) -> generation_pb2.Role:
    if isinstance(message, SystemMessage):
        return generation_pb2.ROLE_SYSTEM
    if isinstance(message, HumanMessage):
        return generation_pb2.ROLE_USER
    if isinstance(message, AIMessage):
        return generation_pb2.ROLE_ASSISTANT
    if isinstance(message, ToolMessage):
        return generation_pb2.ROLE_TOOL
    if isinstance(message, ChatMessage) and message.role.lower() in _ROLES:
        return _ROLES[message.role.lower()]
    raise ValueError(f"a {type(message).__name__} (role {getattr(message, 'role', '?')!r}) "
                     f"has no tokenwire role; use one of {sorted(_ROLES)}")


def _content(content: str | list[str | dict[str, Any]], *, assistant: bool
             ) -> tuple[str, list[bytes]]:
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[bytes] = []
    for block in content:
        if isinstance(block, str):
            texts.append(block)
            continue
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind in ("image", "image_url"):
            images.append(_image(block))
        elif not (assistant and kind in _SKIPPED_AI_BLOCKS):
            raise ValueError(f"tokenwire cannot send a {kind!r} content block: a message "
                             "carries text and images (as bytes) only")
    return "".join(texts), images


def _image(block: dict[str, Any]) -> bytes:
    """The bytes of an image block given inline (base64 or a data: URL)."""
    data = block.get("base64") or (block.get("data") if block.get("source_type") == "base64"
                                   else None)
    url = block.get("url")
    if isinstance(block.get("image_url"), dict):
        url = block["image_url"].get("url")
    elif isinstance(block.get("image_url"), str):
        url = block["image_url"]
    if data is None and isinstance(url, str) and url.startswith("data:") and "," in url:
        data = url.split(",", 1)[1]
    if not isinstance(data, str):
        raise ValueError("tokenwire sends images as bytes: give the image inline (base64 or "
                         "a data: URL); fetch an http(s) URL yourself first")
    return base64.b64decode(data, validate=True)


def usage_metadata(usage: generation_pb2.Usage) -> UsageMetadata:
    """LangChain's token counts from the final Token's ``Usage``."""
    return UsageMetadata(input_tokens=usage.prompt_tokens,
                         output_tokens=usage.completion_tokens,
                         total_tokens=usage.prompt_tokens + usage.completion_tokens)


def response_metadata(model: str, finish_reason: generation_pb2.FinishReason,
                      usage: generation_pb2.Usage | None, request_id: str | None
                      ) -> dict[str, Any]:
    """``response_metadata`` of the answer: finish reason as a lower-case name ("stop",
    "length", "tool_calls"...), the model, and where tokenwire served it."""
    metadata: dict[str, Any] = {
        "model_name": model,
        "model_provider": PROVIDER,
        # A number newer than this client is "other", as in the client's own results.
        "finish_reason": FinishReason.from_proto(finish_reason).value,
    }
    if usage is not None:
        metadata["engine_finish_reason"] = usage.engine_finish_reason
        metadata["upstream"] = usage.upstream
    if request_id:
        metadata["request_id"] = request_id
    return metadata


def _arguments_text(call: generation_pb2.ToolCall) -> str:
    if call.arguments_text:
        return call.arguments_text
    return json.dumps(json_format.MessageToDict(call.arguments), ensure_ascii=False)


def _call_id(call: generation_pb2.ToolCall) -> str:
    """The engine's call id, or one made here (Ollama gives none) so that a ToolMessage
    can answer the call."""
    return call.id or f"call_{uuid.uuid4().hex[:24]}"


def chunk_message(token: generation_pb2.Token, request_id: str | None) -> AIMessageChunk:
    """One streamed Token as a LangChain chunk; the final Token (``done``) also carries
    the usage, the response metadata and ``chunk_position="last"``."""
    extra: dict[str, Any] = {}
    if token.thinking:
        extra["reasoning_content"] = token.thinking
    chunks = [ToolCallChunk(name=c.name, args=_arguments_text(c), id=_call_id(c),
                            index=c.index, type="tool_call_chunk")
              for c in token.tool_calls]
    if not token.done:
        return AIMessageChunk(content=token.text, additional_kwargs=extra,
                              tool_call_chunks=chunks)
    usage = token.usage if token.HasField("usage") else None
    return AIMessageChunk(
        content=token.text,
        additional_kwargs=extra,
        tool_call_chunks=chunks,
        usage_metadata=usage_metadata(usage) if usage is not None else None,
        response_metadata=response_metadata(token.model, token.finish_reason, usage,
                                            request_id),
        chunk_position="last",
    )


def ai_message(completion: Completion) -> AIMessage:
    """The whole answer of a Complete call as an ``AIMessage``."""
    calls: list[ToolCall] = []
    invalid = []
    for call in completion.tool_calls:
        text = _arguments_text(call)
        error: str | None = None
        try:
            args = json.loads(text)
        except ValueError as exc:
            args, error = None, f"arguments are not JSON: {exc}"
        if error is None and not isinstance(args, dict):
            error = "arguments are not a JSON object"
        if error is None:
            calls.append(tool_call(name=call.name, args=args, id=_call_id(call)))
        else:
            invalid.append(invalid_tool_call(name=call.name, args=text, id=_call_id(call),
                                             error=error))
    extra: dict[str, Any] = {}
    if completion.thinking:
        extra["reasoning_content"] = completion.thinking
    usage = completion.usage.proto
    return AIMessage(
        content=completion.text,
        additional_kwargs=extra,
        tool_calls=calls,
        invalid_tool_calls=invalid,
        usage_metadata=usage_metadata(usage),
        response_metadata=response_metadata(completion.model, completion.finish_reason.proto,
                                            usage, completion.request_id),
    )
