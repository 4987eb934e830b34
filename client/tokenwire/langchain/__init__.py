"""LangChain integration: ``ChatTokenwire``, a chat model on tokenwire's client.

Install with ``pip install 'tokenwire[langchain]'`` (it adds ``langchain-core``)::

    from tokenwire.langchain import ChatTokenwire

    model = ChatTokenwire(model="smollm2:135m", target="127.0.0.1:50051", temperature=0)
    async for chunk in model.astream("Why is the sky blue?"):
        print(chunk.content, end="", flush=True)

Only this package imports ``langchain_core``; ``tokenwire.client`` does not need it.
"""

from __future__ import annotations

from tokenwire.langchain._chat import API_KEY_ENV, ChatTokenwire

__all__ = ["API_KEY_ENV", "ChatTokenwire"]
