"""Request validation: every problem found becomes one field violation.

Checks run before anything is sent upstream, so a bad request costs nothing
and the caller learns every problem at once (google.rpc.BadRequest).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from tokenwire.v1 import generation_pb2 as pb

__all__ = ["Limits", "ValidationFailed", "validate_cancel", "validate_chat", "validate_embed",
           "validate_generate", "validate_resume"]

#: A stream id as the server makes them (URL-safe base64), with room to change the size.
_STREAM_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")


@dataclass(frozen=True)
class Limits:
    """Input limits; each refusal names the limit and the value."""

    max_prompt_bytes: int = 1 << 20
    max_messages: int = 1000
    max_stop_sequences: int = 16
    max_images_bytes: int = 16 << 20
    max_embed_inputs: int = 512
    max_model_name_bytes: int = 512
    #: Largest options.max_tokens accepted (0 = no cap).
    max_output_tokens: int = 0
    #: Deepest nesting of objects and arrays in a JSON Schema given as text
    #: (``{}`` is 1). A Struct cannot be nested much deeper (protobuf's recursion
    #: limit of 100 messages is about 50 JSON levels), and the engine's schema to
    #: grammar conversion recurses once per level.
    max_schema_depth: int = 64


class ValidationFailed(Exception):
    """The request is invalid; ``violations`` holds (field, description) pairs."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        self.violations = violations
        fields = ", ".join(field for field, _ in violations)
        super().__init__(f"invalid request ({len(violations)} problem(s): {fields})")


_Violations = list[tuple[str, str]]

# (field, lowest, highest, lowest inclusive) for float options; None = unbounded.
_FLOAT_RANGES: tuple[tuple[str, float | None, float | None, bool], ...] = (
    ("temperature", 0.0, None, True),
    ("top_p", 0.0, 1.0, True),
    ("min_p", 0.0, 1.0, True),
    ("typical_p", 0.0, 1.0, False),
    ("repeat_penalty", 0.0, None, True),
    ("presence_penalty", None, None, True),
    ("frequency_penalty", None, None, True),
)
# (field, lowest) for integer options.
_INT_FLOORS: tuple[tuple[str, int], ...] = (
    ("top_k", 0),
    ("max_tokens", -1),
    ("repeat_last_n", -1),
    ("num_ctx", 1),
    ("num_keep", -1),
)


def _check_model(model: str, limits: Limits, out: _Violations) -> None:
    if not model.strip():
        out.append(("model", "required: name an installed model, e.g. \"llama3.2\" "
                              "(ListModels shows what is installed)"))
    elif len(model.encode()) > limits.max_model_name_bytes:
        out.append(("model", f"longer than {limits.max_model_name_bytes} bytes"))


def _check_options(options: pb.Options, limits: Limits, out: _Violations) -> None:
    for name, low, high, low_inclusive in _FLOAT_RANGES:
        if not options.HasField(name):
            continue
        value = getattr(options, name)
        field = f"options.{name}"
        if not math.isfinite(value):
            out.append((field, f"must be a finite number, got {value}"))
        elif low is not None and (value < low or (value == low and not low_inclusive)):
            bound = "at least" if low_inclusive else "greater than"
            out.append((field, f"must be {bound} {low:g}, got {value:g}"))
        elif high is not None and value > high:
            out.append((field, f"must be at most {high:g}, got {value:g}"))
    for name, floor in _INT_FLOORS:
        value = getattr(options, name)
        if options.HasField(name) and value < floor:
            out.append((f"options.{name}", f"must be at least {floor}, got {value}"))
    cap = limits.max_output_tokens
    if cap and options.HasField("max_tokens") and not 0 <= options.max_tokens <= cap:
        out.append(("options.max_tokens", f"at most {cap} (this server's --max-output-tokens), "
                                          f"got {options.max_tokens}"))
    if len(options.stop) > limits.max_stop_sequences:
        out.append(("options.stop", f"at most {limits.max_stop_sequences} stop sequences are "
                                    f"allowed, got {len(options.stop)}"))
    for i, stop in enumerate(options.stop):
        if not stop:
            out.append((f"options.stop[{i}]", "stop sequences must not be empty"))


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    return "null" if value is None else "number"


def _depth_over(value: Any, limit: int) -> bool:
    """Whether objects and arrays nest deeper than ``limit``: level by level, containers
    only, no recursion (about 20 ms for a 1 MB schema, less than parsing it)."""
    level = [value] if isinstance(value, dict | list) else []
    depth = 1
    while level:
        if depth > limit:
            return True
        below = []
        for item in level:
            for child in item.values() if isinstance(item, dict) else item:
                if isinstance(child, dict | list):
                    below.append(child)
        level = below
        depth += 1
    return False


def _check_schema_text(text: str, field: str, limits: Limits, out: _Violations, *,
                       allow_empty: bool, what: str = "JSON Schema") -> None:
    """A JSON Schema (or ``what`` else) given as JSON text: one JSON object, within the
    size and depth limits.

    This is the only parse of the text: the payload builders forward it as written
    (``orjson.Fragment``), which keeps its key order, so they rely on this check having
    passed. orjson refuses anything after the document, so a valid text cannot carry
    extra keys into the payload around it.
    """
    size = len(text.encode())
    if size > limits.max_prompt_bytes:
        out.append((field, f"{size} bytes, over the limit of {limits.max_prompt_bytes} bytes "
                           f"(--max-prompt-bytes)"))
        return
    if not text.strip():
        out.append((field, f"must be a {what} object as JSON text, e.g. "
                           "{\"type\": \"object\", \"properties\": {...}}; got no text"))
        return
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in exc.msg:  # deeper than orjson's own limit (1024 levels)
            out.append((field, _too_deep(limits)))
        else:
            out.append((field, f"not valid JSON ({exc}); give a {what} object as JSON "
                               f"text"))
        return
    if not isinstance(value, dict):
        out.append((field, f"must be a JSON object ({{...}}), got a JSON {_json_type(value)}"))
    elif not value and not allow_empty:
        out.append((field, f"must be a non-empty {what} object"))
    elif _depth_over(value, limits.max_schema_depth):
        out.append((field, _too_deep(limits)))


def _too_deep(limits: Limits) -> str:
    return f"objects and arrays nest deeper than {limits.max_schema_depth} levels"


def _check_format(fmt: pb.Format, limits: Limits, out: _Violations) -> None:
    kind = fmt.WhichOneof("kind")
    if kind == "json_schema" and not fmt.json_schema.fields:
        out.append(("format.json_schema", "must be a non-empty JSON Schema object"))
    elif kind == "json_schema_text":
        _check_schema_text(fmt.json_schema_text, "format.json_schema_text", limits, out,
                           allow_empty=False)


def _check_tool(tool: pb.Tool, field: str, limits: Limits, out: _Violations) -> None:
    if not tool.name:
        out.append((f"{field}.name", "required"))
    if not tool.parameters_text:
        return
    if tool.HasField("parameters"):
        out.append((f"{field}.parameters_text", f"set only one of {field}.parameters and "
                                                f"{field}.parameters_text (prefer "
                                                f"parameters_text: it keeps key order)"))
        return
    _check_schema_text(tool.parameters_text, f"{field}.parameters_text", limits, out,
                       allow_empty=True)


def _check_enum(value: int, enum: type, field: str, out: _Violations) -> None:
    if value not in enum.values():  # type: ignore[attr-defined]
        out.append((field, f"unknown value {value}"))


def _check_images(images: Iterable[bytes], field: str, out: _Violations) -> int:
    """Flags empty images; returns their total size."""
    total = 0
    for i, image in enumerate(images):
        if not image:
            out.append((f"{field}[{i}]", "image must not be empty"))
        total += len(image)
    return total


def _check_images_total(total: int, field: str, limits: Limits, out: _Violations) -> None:
    if total > limits.max_images_bytes:
        out.append((field, f"images total {total} bytes, over the limit of "
                           f"{limits.max_images_bytes} bytes"))


def _check_size(text: str, field: str, limits: Limits, out: _Violations) -> None:
    size = len(text.encode())
    if size > limits.max_prompt_bytes:
        out.append((field, f"{size} bytes, over the limit of {limits.max_prompt_bytes} bytes"))


def _check_delivery(delivery: pb.Delivery, out: _Violations) -> None:
    _check_enum(delivery.mode, pb.DeliveryMode, "delivery.mode", out)
    delay = delivery.max_delay.ToNanoseconds() / 1e9 if delivery.HasField("max_delay") else 0.0
    if delay < 0 or delay > 60:
        out.append(("delivery.max_delay", f"must be between 0 and 60 seconds, got {delay:g}"))
    if delivery.mode == pb.DELIVERY_MODE_BATCH and not (
            delivery.max_tokens or delay > 0 or delivery.at_sentence_end):
        out.append(("delivery", "DELIVERY_MODE_BATCH needs max_tokens, max_delay or "
                                "at_sentence_end"))


def _check_common(request: pb.GenerateRequest | pb.ChatRequest, limits: Limits,
                  out: _Violations) -> None:
    _check_model(request.model, limits, out)
    _check_options(request.options, limits, out)
    _check_format(request.format, limits, out)
    _check_enum(request.think, pb.Think, "think", out)
    _check_delivery(request.delivery, out)
    if request.HasField("resumable"):
        grace = request.resumable.detach_grace
        if grace.ToNanoseconds() < 0:
            out.append(("resumable.detach_grace", "must not be negative (unset or 0: the "
                                                  "server's --detach-grace)"))


def _check_stream_id(stream_id: str, out: _Violations) -> None:
    if not _STREAM_ID.fullmatch(stream_id):
        out.append(("stream_id", "required: the id from StartResponse or from the first "
                                 "Token of a resumable stream (16 to 64 characters of "
                                 "A-Z a-z 0-9 _ -)"))


def validate_resume(request: pb.ResumeRequest) -> None:
    out: _Violations = []
    _check_stream_id(request.stream_id, out)
    _check_delivery(request.delivery, out)
    if out:
        raise ValidationFailed(out)


def validate_cancel(request: pb.CancelRequest) -> None:
    out: _Violations = []
    _check_stream_id(request.stream_id, out)
    if out:
        raise ValidationFailed(out)


def validate_generate(request: pb.GenerateRequest, limits: Limits) -> None:
    out: _Violations = []
    _check_common(request, limits, out)
    _check_size(request.prompt, "prompt", limits, out)
    _check_size(request.system, "system", limits, out)
    _check_size(request.suffix, "suffix", limits, out)
    _check_images_total(_check_images(request.images, "images", out), "images", limits, out)
    if request.raw and request.system:
        out.append(("system", "must be empty when raw is true (raw prompts skip the template)"))
    if out:
        raise ValidationFailed(out)


def validate_chat(request: pb.ChatRequest, limits: Limits) -> None:
    out: _Violations = []
    _check_common(request, limits, out)
    if len(request.messages) > limits.max_messages:
        out.append(("messages", f"{len(request.messages)} messages, over the limit of "
                                f"{limits.max_messages}"))
    total = images = 0
    for i, message in enumerate(request.messages):
        field = f"messages[{i}]"
        if message.role == pb.ROLE_UNSPECIFIED:
            out.append((f"{field}.role", "required: ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT "
                                         "or ROLE_TOOL"))
        else:
            _check_enum(message.role, pb.Role, f"{field}.role", out)
        total += len(message.content.encode())
        images += _check_images(message.images, f"{field}.images", out)
        for j, call in enumerate(message.tool_calls):
            if call.arguments_text:  # sent back to the engine: it must be a JSON object
                _check_schema_text(call.arguments_text, f"{field}.tool_calls[{j}].arguments_text",
                                   limits, out, allow_empty=True, what="tool-call arguments")
    _check_images_total(images, "messages", limits, out)
    if total > limits.max_prompt_bytes:
        out.append(("messages", f"message text totals {total} bytes, over the limit of "
                                f"{limits.max_prompt_bytes} bytes"))
    for i, tool in enumerate(request.tools):
        _check_tool(tool, f"tools[{i}]", limits, out)
    if out:
        raise ValidationFailed(out)


def validate_embed(request: pb.EmbedRequest, limits: Limits) -> None:
    out: _Violations = []
    _check_model(request.model, limits, out)
    if not request.inputs:
        out.append(("inputs", "give at least one text to embed"))
    elif len(request.inputs) > limits.max_embed_inputs:
        out.append(("inputs", f"{len(request.inputs)} inputs, over the limit of "
                              f"{limits.max_embed_inputs}"))
    total = sum(len(text.encode()) for text in request.inputs)
    if total > limits.max_prompt_bytes:
        out.append(("inputs", f"inputs total {total} bytes, over the limit of "
                              f"{limits.max_prompt_bytes} bytes"))
    if request.HasField("dimensions") and request.dimensions < 1:
        out.append(("dimensions", f"must be at least 1, got {request.dimensions}"))
    if out:
        raise ValidationFailed(out)
