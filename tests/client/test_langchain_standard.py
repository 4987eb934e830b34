"""LangChain's standard unit tests for chat models (``langchain-tests``), no server needed:
construction from the standard parameters and the environment, tracing parameters, tool
binding. The integration half runs against the real Ollama (tests/real)."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.unit_tests import ChatModelUnitTests

from tokenwire.langchain import ChatTokenwire


class TestChatTokenwireUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatTokenwire

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": "smollm2:135m", "target": "127.0.0.1:50051"}

    @property
    def has_tool_choice(self) -> bool:
        return False  # the Chat RPC has no tool_choice: the model decides

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return ({"TOKENWIRE_API_KEY": "from-env"}, {"model": "smollm2:135m"},
                {"api_key": "from-env"})

    @pytest.mark.xfail(reason="the suite binds tools with tool_choice='any', which the Chat "
                              "RPC cannot honour (no tool_choice field; Ollama has none): "
                              "bind_tools refuses it instead of ignoring it", strict=True)
    def test_bind_tool_pydantic(self, *args: Any) -> None:
        super().test_bind_tool_pydantic(*args)
