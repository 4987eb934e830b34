"""A user's script, run by tests/wheel/test_wheel.py with the Python of a venv that has the
client alone (``pip install tokenwire``): ``python user_stream.py TARGET MODEL PROMPT``.

Prints the answer three times, streamed by ``Client``, streamed by ``AsyncClient`` and
through the unary ``complete``, then the models the server lists; the sync stream's usage
goes to stderr. Nothing here may need the server's dependencies."""

from __future__ import annotations

import asyncio
import sys

from tokenwire.client import AsyncClient, Client


def stream_sync(target: str, model: str, prompt: str) -> str:
    with Client(target) as client:
        stream = client.generate(model, prompt)
        text = "".join(token.text for token in stream)
        final = stream.final
        assert final is not None
        print(f"{final.usage.completion_tokens} tokens", file=sys.stderr)
        return text


async def stream_async(target: str, model: str, prompt: str) -> str:
    async with AsyncClient(target) as client:
        return "".join([token.text async for token in client.generate(model, prompt)])


def unary_and_models(target: str, model: str, prompt: str) -> tuple[str, list[str]]:
    with Client(target) as client:
        return client.complete(model, prompt).text, [m.name for m in client.list_models()]


if __name__ == "__main__":
    target, model, prompt = sys.argv[1:4]
    print(stream_sync(target, model, prompt))
    print(asyncio.run(stream_async(target, model, prompt)))
    text, models = unary_and_models(target, model, prompt)
    print(text)
    print(" ".join(sorted(models)))
