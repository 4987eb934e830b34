"""The Python client resumes by itself: connections cut mid-stream (a TCP proxy in
between), a client process killed with SIGKILL and a new one taking over, and the CLI's
``--resumable``, ``resume`` and ``cancel``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from tests.fakeollama import FakeOllama
from tests.tcpproxy import tcp_proxy
from tokenwire.client import AsyncClient, Client, NotFound
from tokenwire.service import Runtime

WORDS = [f"w{i} " for i in range(60)]
WHOLE = "".join(WORDS)


async def test_async_client_resumes_across_cuts(runtime: Runtime, fake: FakeOllama) -> None:
    fake.tokens = WORDS
    fake.token_delay = 0.01
    async with tcp_proxy(runtime.target) as proxy:
        async with AsyncClient(proxy.target) as client:
            stream = client.generate("tiny", "p", resumable=True)
            seen: list[str] = []
            async for token in stream:
                seen.append(token.text)
                if len(seen) in (5, 25):
                    proxy.cut()  # the connection dies under the stream
            assert stream.resumes == 2
            assert "".join(seen) == stream.text == WHOLE  # each token once
            completion = stream.completion
            assert completion.usage is not None
            assert completion.usage.completion_tokens == len(WORDS)
            assert stream.position == len(WORDS) + 1
    assert len(fake.streams) == 1  # one generation: the model was never asked twice


async def test_sync_client_resumes_too(runtime: Runtime, fake: FakeOllama) -> None:
    fake.tokens = WORDS
    fake.token_delay = 0.01
    async with tcp_proxy(runtime.target) as proxy:
        loop = asyncio.get_running_loop()

        def read() -> tuple[str, int]:
            with Client(proxy.target) as client:
                stream = client.generate("tiny", "p", resumable=True)
                texts = []
                for token in stream:
                    texts.append(token.text)
                    if len(texts) == 10:
                        loop.call_soon_threadsafe(proxy.cut)
                return "".join(texts), stream.resumes

        text, resumes = await asyncio.to_thread(read)
    assert text == WHOLE
    assert resumes >= 1


async def test_not_resumable_stays_as_it_was(runtime: Runtime, fake: FakeOllama) -> None:
    from tokenwire.client import Unavailable
    fake.tokens = WORDS
    fake.token_delay = 0.01
    async with tcp_proxy(runtime.target) as proxy, AsyncClient(proxy.target) as client:
        stream = client.generate("tiny", "p")
        with pytest.raises(Unavailable) as caught:
            async for token in stream:
                if token.text == "w4 ":
                    proxy.cut()
        assert caught.value.partial_text == "".join(WORDS[:5])
    await fake.wait_for_disconnect(timeout=2)  # drop = cancel, as before


async def test_client_cancel_stops_the_server_side(runtime: Runtime, fake: FakeOllama) -> None:
    fake.tokens = WORDS
    fake.token_delay = 0.05
    async with AsyncClient(runtime.target) as client:
        stream = client.generate("tiny", "p", resumable=True)
        async for token in stream:
            if token.text:
                break  # leaving the loop cancels the call
        # Leaving a loop only detaches; cancel() stops the generation.
        assert stream.stream_id is not None
        assert await client.cancel(stream.stream_id)
        await fake.wait_for_disconnect(timeout=2)
        other = client.generate("tiny", "p", resumable=True)
        await other.__anext__()
        other.cancel()
        await fake.wait_for_disconnect(timeout=2)
        streams = runtime.servicer.streams
        assert streams is not None
        for _ in range(100):
            if streams.live == 0:
                break
            await asyncio.sleep(0.01)
        assert streams.live == 0


async def test_start_resume_and_unknown_ids(runtime: Runtime, fake: FakeOllama) -> None:
    fake.tokens = WORDS
    async with AsyncClient(runtime.target) as client:
        stream_id = await client.start_chat("tiny", [{"role": "user", "content": "hi"}])
        answer = await client.resume(stream_id).collect()
        assert answer.text == WHOLE
        tail = await client.resume(stream_id, after=len(WORDS) - 2).collect()
        assert tail.text == "".join(WORDS[-2:])
        assert tail.usage == answer.usage
        with pytest.raises(NotFound):
            await client.resume("B" * 24).collect()


_READER = textwrap.dedent('''
    import json, sys
    from tokenwire.client import Client
    target, log = sys.argv[1], sys.argv[2]
    with Client(target) as client, open(log, "a") as out:
        stream = (client.generate("tiny", "p", resumable=True) if len(sys.argv) == 3
                  else client.resume(sys.argv[3], int(sys.argv[4])))
        for token in stream:
            out.write(json.dumps({"id": stream.stream_id, "at": stream.position,
                                  "text": token.text, "done": token.done}) + "\\n")
            out.flush()
''')


async def _reader(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", _READER, *args, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)


def _lines(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


async def test_killed_client_process_is_resumed_by_a_new_one(
        runtime: Runtime, fake: FakeOllama, tmp_path: Path) -> None:
    fake.tokens = WORDS
    fake.token_delay = 0.03
    log = tmp_path / "tokens.jsonl"
    first = await _reader(runtime.target, str(log))
    for _ in range(500):
        if log.exists() and len(_lines(log)) >= 10:
            break
        await asyncio.sleep(0.02)
    first.send_signal(signal.SIGKILL)  # no goodbye: the connection just goes
    await first.wait()
    before = _lines(log)
    last = before[-1]
    second = await _reader(runtime.target, str(log), str(last["id"]), str(last["at"]))
    _, err = await second.communicate()
    assert second.returncode == 0, err.decode()
    lines = _lines(log)
    assert "".join(str(line["text"]) for line in lines) == WHOLE  # every chunk exactly once
    assert lines[-1]["done"] is True
    assert len(fake.streams) == 1


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenwire.client._cli", *args]


async def test_cli_resumable_resume_and_cancel(runtime: Runtime, fake: FakeOllama) -> None:
    fake.tokens = WORDS
    env = dict(os.environ, TOKENWIRE_TARGET=runtime.target)
    gen = await asyncio.create_subprocess_exec(
        *_cli("generate", "--resumable", "tiny", "p"), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await gen.communicate()
    assert gen.returncode == 0, err.decode()
    assert out.decode().startswith(WHOLE)
    stream_id = next(line.split()[-1] for line in err.decode().splitlines()
                     if "stream id" in line)
    again = await asyncio.create_subprocess_exec(
        *_cli("resume", stream_id), env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out2, err2 = await again.communicate()
    assert again.returncode == 0, err2.decode()
    assert out2.decode().startswith(WHOLE)  # a replay from the start
    fake.token_delay = 0.2
    async with AsyncClient(runtime.target) as client:
        live = await client.start("tiny", "p")
    stop = await asyncio.create_subprocess_exec(
        *_cli("cancel", live), env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out3, err3 = await stop.communicate()
    assert stop.returncode == 0, err3.decode()
    assert "stopped" in out3.decode()
    await fake.wait_for_disconnect(timeout=2)
    missing = await asyncio.create_subprocess_exec(
        *_cli("resume", "C" * 24), env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    _, err4 = await missing.communicate()
    assert missing.returncode != 0
    assert "NOT_FOUND" in err4.decode() or "no resumable stream" in err4.decode()


async def test_sync_cancel_stops_the_server_side(runtime: Runtime, fake: FakeOllama) -> None:
    fake.tokens = WORDS
    fake.token_delay = 0.05

    def read_one_then_cancel() -> bool:
        with Client(runtime.target) as client:
            stream = client.generate("tiny", "p", resumable=True)
            next(stream)
            stopped = stream.cancel()
            assert stream._cancel_call is not None
            stream._cancel_call.result(timeout=5)  # the Cancel call went out and was answered
            return stopped

    assert await asyncio.to_thread(read_one_then_cancel)
    await fake.wait_for_disconnect(timeout=2)
    assert not fake.streams[-1].completed
