"""``with_structured_output`` for ``ChatTokenwire``: the schema goes to the engine as the Chat
request's ``format`` (constrained decoding), so the answer is JSON that matches it."""

from __future__ import annotations

from operator import itemgetter
from typing import Any, Literal

from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

__all__ = ["Method", "structured"]

Method = Literal["json_schema", "json_mode", "function_calling"]


def structured(model: BaseChatModel, schema: dict[str, Any] | type, method: Method,
               include_raw: bool) -> Runnable[LanguageModelInput, Any]:
    """The model bound to produce ``schema``, piped into the matching parser.

    ``json_schema``: the schema is the request's ``format`` (the engine's grammar makes
    the answer match it). ``json_mode``: ``format="json"`` (any JSON; say the shape in the
    prompt). ``function_calling``: the schema is offered as a tool; the Chat RPC cannot
    force the call, so the result is None when the model answers in text.
    """
    is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
    traced: dict[str, Any] = {"ls_structured_output_format": {"kwargs": {"method": method},
                                              "schema": convert_to_json_schema(schema)}}
    parser: Runnable[Any, Any]
    if method == "function_calling":
        tool = convert_to_openai_tool(schema)
        bound = model.bind_tools([schema], **traced)
        parser = (PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
                  if is_pydantic
                  else JsonOutputKeyToolsParser(key_name=tool["function"]["name"],
                                                first_tool_only=True))
    elif method in ("json_schema", "json_mode"):
        fmt: Any = convert_to_json_schema(schema) if method == "json_schema" else "json"
        bound = model.bind(format=fmt, **traced)
        parser = (PydanticOutputParser(pydantic_object=schema) if is_pydantic  # type: ignore[arg-type]
                  else JsonOutputParser())
    else:
        raise ValueError(f"method must be 'json_schema', 'json_mode' or 'function_calling', "
                         f"not {method!r}")
    if not include_raw:
        return bound | parser
    parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser,
                                        parsing_error=lambda _: None)
    failed = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=bound) | parsed.with_fallbacks([failed],
                                                          exception_key="parsing_error")
