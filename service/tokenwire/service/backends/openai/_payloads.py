"""tokenwire requests as OpenAI-compatible payloads: pure functions, no I/O.

Generate becomes a chat completion (``/chat/completions``): the system prompt, when
given, is a ``system`` message, and the prompt is the ``user`` message (with its
images). A ``raw`` prompt (no template) or one with a ``suffix`` goes to the text
completion endpoint (``/completions``), which takes a prompt as it is. Chat maps
one message to one message; tool results go back with their ``tool_call_id``.

Options the API has no field for are refused, naming the field and the backend,
never dropped: the standard ones (temperature, top_p, max_tokens, stop, seed,
presence_penalty, frequency_penalty) always go; others only to an engine whose
``flavor`` is known to take them (llama.cpp's server and vLLM take top_k and
min_p, and their own names for a repeat penalty).
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from tokenwire.v1 import generation_pb2 as pb

from ..._validate import ValidationFailed
from ..ollama._payloads import struct_to_py

__all__ = ["FLAVORS", "Prepared", "chat_payload", "embed_payload", "generate_payload"]

#: Options every OpenAI-compatible engine takes: our name -> the API's.
_STANDARD = {"temperature": "temperature", "top_p": "top_p", "max_tokens": "max_tokens",
             "seed": "seed", "presence_penalty": "presence_penalty",
             "frequency_penalty": "frequency_penalty"}
#: The extensions each flavour of server takes, our name -> its name.
FLAVORS: dict[str, dict[str, str]] = {
    "openai": {},
    "llama.cpp": {"top_k": "top_k", "min_p": "min_p", "typical_p": "typical_p",
                  "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n"},
    "vllm": {"top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repetition_penalty"},
}
_SCALARS = tuple(f.name for f in pb.Options.DESCRIPTOR.fields if f.name != "stop")
_ROLES = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant",
          pb.ROLE_TOOL: "tool"}
_EFFORT = {pb.THINK_LOW: "low", pb.THINK_MEDIUM: "medium", pb.THINK_HIGH: "high"}
#: What an image's first bytes say it is, for the data: URL the API takes.
_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
          (b"RIFF", "image/webp"))

#: (path, payload, what the stream's chunks are: "chat" or "text")
Prepared = tuple[str, dict[str, Any], str]


class _Refusals:
    """Collects what this engine cannot do, to refuse it all at once."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.found: list[tuple[str, str]] = []

    def no(self, field: str, why: str = "") -> None:
        self.found.append((field, f"not supported by the OpenAI-compatible backend "
                                  f"'{self.backend}'" + (f": {why}" if why else "")))

    def check(self) -> None:
        if self.found:
            raise ValidationFailed(self.found)


def _options(options: pb.Options, flavor: str, refuse: _Refusals) -> dict[str, Any]:
    extra = FLAVORS.get(flavor, {})
    out: dict[str, Any] = {}
    for name in _SCALARS:
        if not options.HasField(name):
            continue
        wire = _STANDARD.get(name) or extra.get(name)
        if wire is None:
            refuse.no(f"options.{name}", f"the {flavor} API has no such option"
                      + ("" if flavor != "openai" else
                         " (set the upstream's flavor if the server takes it)"))
            continue
        value = getattr(options, name)
        if name == "max_tokens" and value < 0:
            continue  # -1: no limit, which is the API's default
        out[wire] = value
    if options.stop:
        out["stop"] = list(options.stop)
    return out


def _common(request: pb.GenerateRequest | pb.ChatRequest, payload: dict[str, Any],
            flavor: str, refuse: _Refusals) -> None:
    payload.update(_options(request.options, flavor, refuse))
    kind = request.format.WhichOneof("kind")
    if kind == "json" and request.format.json:
        payload["response_format"] = {"type": "json_object"}
    elif kind in ("json_schema", "json_schema_text"):
        schema: Any = (orjson.Fragment(request.format.json_schema_text)
                       if kind == "json_schema_text"
                       else struct_to_py(request.format.json_schema))
        payload["response_format"] = {"type": "json_schema",
                                      "json_schema": {"name": "answer", "schema": schema}}
    if request.HasField("keep_alive"):
        refuse.no("keep_alive", "the API does not load or unload models")
    if request.think in _EFFORT:
        payload["reasoning_effort"] = _EFFORT[request.think]
    elif request.think != pb.THINK_UNSPECIFIED:
        refuse.no("think", "use THINK_LOW, THINK_MEDIUM or THINK_HIGH (reasoning_effort)")


def _image(data: bytes) -> dict[str, Any]:
    kind = next((mime for magic, mime in _MAGIC if data.startswith(magic)), "image/png")
    url = f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"
    return {"type": "image_url", "image_url": {"url": url}}


def _content(text: str, images: Any) -> Any:
    if not images:
        return text
    return [{"type": "text", "text": text}, *(_image(i) for i in images)]


def _stream(payload: dict[str, Any]) -> dict[str, Any]:
    payload["stream"] = True
    payload["stream_options"] = {"include_usage": True}
    return payload


def generate_payload(request: pb.GenerateRequest, *, backend: str,
                     flavor: str = "openai") -> Prepared:
    refuse = _Refusals(backend)
    if not request.prompt:
        refuse.no("prompt", "an empty prompt loads or unloads a model in Ollama; this API "
                            "has no such request, so send a prompt")
    if request.raw or request.suffix:
        payload: dict[str, Any] = {"model": request.model, "prompt": request.prompt}
        if request.suffix:
            payload["suffix"] = request.suffix
        if request.system:
            refuse.no("system", "a raw or suffix prompt goes to /completions, which has no "
                                "system prompt")
        if request.images:
            refuse.no("images", "a raw or suffix prompt goes to /completions, which takes no "
                                "images")
        _common(request, payload, flavor, refuse)
        refuse.check()
        return "/completions", _stream(payload), "text"
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.append({"role": "user", "content": _content(request.prompt, request.images)})
    payload = {"model": request.model, "messages": messages}
    _common(request, payload, flavor, refuse)
    refuse.check()
    return "/chat/completions", _stream(payload), "chat"


def _tool_call(call: pb.ToolCall, position: int) -> dict[str, Any]:
    arguments = call.arguments_text or orjson.dumps(struct_to_py(call.arguments)).decode()
    return {"id": call.id or f"call_{position}", "type": "function",
            "function": {"name": call.name, "arguments": arguments}}


def _message(message: pb.Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": _ROLES[message.role],
                           "content": _content(message.content, message.images)}
    if message.tool_calls:
        out["tool_calls"] = [_tool_call(c, i) for i, c in enumerate(message.tool_calls)]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    # Message.thinking has no field in this API: an earlier turn's reasoning is not sent.
    return out


def chat_payload(request: pb.ChatRequest, *, backend: str, flavor: str = "openai") -> Prepared:
    refuse = _Refusals(backend)
    if not request.messages:
        refuse.no("messages", "no messages loads a model in Ollama; this API has no such "
                              "request, so send a conversation")
    payload: dict[str, Any] = {"model": request.model,
                               "messages": [_message(m) for m in request.messages]}
    if request.tools:
        payload["tools"] = [{
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": (orjson.Fragment(tool.parameters_text) if tool.parameters_text
                               else struct_to_py(tool.parameters)),
            },
        } for tool in request.tools]
    _common(request, payload, flavor, refuse)
    refuse.check()
    return "/chat/completions", _stream(payload), "chat"


def embed_payload(request: pb.EmbedRequest, *, backend: str) -> dict[str, Any]:
    refuse = _Refusals(backend)
    payload: dict[str, Any] = {"model": request.model, "input": list(request.inputs),
                               "encoding_format": "float"}
    if request.HasField("dimensions"):
        payload["dimensions"] = request.dimensions
    if request.HasField("truncate"):
        refuse.no("truncate", "the API has no switch for it")
    if request.HasField("keep_alive"):
        refuse.no("keep_alive", "the API does not load or unload models")
    refuse.check()
    return payload
