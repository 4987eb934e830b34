"""LangChain's standard integration tests for chat models (``langchain-tests``) on
``ChatTokenwire``, against a ``tokenwire-server`` process in front of the real Ollama and
SmolLM2-135M.

The gateway runs as its own process (as users run it): the suite's blocking tests
(``invoke``, ``stream``, ``batch``) would otherwise block the event loop of an in-process
server. Feature flags say what this model and contract can do:

- tool calling: off. The contract carries tools (tests/client/test_langchain.py covers
  them against the test Ollama), but SmolLM2-135M has no tools capability and Ollama
  refuses tools for it (400 "does not support tools"), so every tool test would fail on
  the model, not on the integration;
- tool_choice: off (the Chat RPC has no such field);
- structured output: on, through the request's ``format`` (json_schema); JSON mode on,
  and its test marked xfail: the model writes JSON, not the keys the prompt asks for;
- images, PDF, audio: off (a text-only model; PDF and audio have no field in the contract);
- model override: the gateway serves one model here, so the suite skips those tests
  (tests/client covers ``model=`` overrides);
- usage metadata: on, from the final Token's Usage.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests

from tests.real.conftest import MODEL, ROOT, RealOllama
from tokenwire.langchain import ChatTokenwire

pytestmark = pytest.mark.real

#: Seconds the gateway process gets to say it listens.
_START = 60.0


@pytest.fixture(scope="module")
def gateway(real_ollama: RealOllama) -> Iterator[str]:
    """``tokenwire-server`` on 127.0.0.1:0 in front of the real Ollama; yields its target.
    Its stderr is read to the end by a thread, so that its log never blocks it."""
    env = dict(os.environ, TOKENWIRE_OLLAMA_URL=real_ollama.url,
               TOKENWIRE_LISTEN="127.0.0.1:0")
    with subprocess.Popen([sys.executable, "-m", "tokenwire.service._main"], env=env,
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True) as proc:
        lines: queue.Queue[str | None] = queue.Queue()

        def drain() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        seen: list[str] = []
        try:
            while (line := lines.get(timeout=_START)) is not None:
                seen.append(line)
                if "listening on " in line:
                    break
            else:
                raise AssertionError("tokenwire-server exited:\n" + "".join(seen))
            yield line.split("listening on ")[1].split()[0]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            reader.join(timeout=5)


# Several generations per test (structured output: up to 80 tokens, three calls): on a
# loaded machine one took 78 s, near the default 120 s limit.
@pytest.mark.timeout(300)
class TestChatTokenwireIntegration(ChatModelIntegrationTests):
    target = ""
    max_tokens = 0

    @pytest.fixture(autouse=True)
    def _params(self, gateway: str, request: pytest.FixtureRequest) -> None:
        """Runs before the suite's ``model`` fixture: the gateway's address, and answers
        kept short, except where a whole JSON object must fit."""
        type(self).target = gateway
        type(self).max_tokens = 80 if "structured" in request.node.name else 24

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatTokenwire

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Greedy and short, so that the suite runs in a few minutes on 2 cores.
        return {"model": MODEL, "target": self.target, "temperature": 0, "seed": 7,
                "max_tokens": self.max_tokens, "timeout": 300}

    @property
    def has_tool_calling(self) -> bool:
        return False  # SmolLM2-135M has no tools capability (see the module docstring)

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @pytest.mark.xfail(reason="the model, not the integration: JSON mode (format 'json') "
                              "makes SmolLM2-135M write valid JSON, but not the keys the "
                              "prompt asks for ({'title': ..., 'genre': ...} for a Joke); "
                              "tests/client checks that format 'json' is sent", strict=True)
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)
