"""``--workers 2`` in front of the real Ollama: calls on separate connections are served
by both worker processes, each streaming the model's real tokens."""

from __future__ import annotations

from tests.helpers import served_by, server_process
from tests.real.conftest import MODEL, RealOllama
from tokenwire.v1 import generation_pb2 as pb


async def test_two_workers_stream_real_tokens(real_ollama: RealOllama) -> None:
    request = pb.GenerateRequest(model=MODEL, prompt="Name a colour.",
                                 options=pb.Options(temperature=0, seed=7, max_tokens=4))

    def check(tokens: list[pb.Token]) -> None:
        final = tokens[-1]
        assert final.done and final.model == MODEL
        assert "".join(t.text for t in tokens).strip()
        assert final.usage.completion_tokens == sum(t.chunk_count for t in tokens) - 1 <= 4

    async with server_process(real_ollama.url, "--workers", "2") as server:
        assert await served_by(server, 16, request, check) == {0, 1}
