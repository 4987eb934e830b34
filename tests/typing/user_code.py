"""User code that ``mypy --strict`` checks against the installed wheel, outside the
repository (tests/wheel/test_wheel.py): the README's streaming snippet with the sync and the
async client, a unary call and an error. Type-checked only, never run."""

from __future__ import annotations

import sys

from tokenwire.client import AsyncClient, Client, Completion, TokenwireError
from tokenwire.v1 import generation_pb2


def stream_sync(target: str, model: str, prompt: str) -> str:
    with Client(target) as client:
        stream = client.generate(model, prompt, options={"temperature": 0.2, "max_tokens": 200})
        parts: list[str] = []
        for token in stream:
            text: str = token.text
            parts.append(text)
        final = stream.final
        assert final is not None  # set once the stream has ended without an error
        usage: generation_pb2.Usage = final.usage
        print(f"{usage.completion_tokens} tokens, first one after "
              f"{usage.time_to_first_token.ToMilliseconds()} ms", file=sys.stderr)
        return "".join(parts)


async def stream_async(target: str, model: str, prompt: str) -> str:
    async with AsyncClient(target) as client:
        parts: list[str] = []
        async for token in client.generate(model, prompt):
            parts.append(token.text)
        models: list[generation_pb2.Model] = await client.list_models()
        names = [m.name for m in models]
        assert model in names, names
        return "".join(parts)


def whole_answer(target: str, model: str, prompt: str) -> Completion:
    try:
        with Client(target) as client:
            return client.complete(model, prompt)
    except TokenwireError as exc:
        print(f"failed: {exc.code.name}, partial: {exc.partial_text!r}", file=sys.stderr)
        raise

