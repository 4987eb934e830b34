"""A real grpcurl against a live server: reflection only, no proto files."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.conftest import MakeRuntime
from tests.fakeollama import FakeOllama
from tokenwire.service import Runtime


async def _grpcurl(tool_bin: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(tool_bin / "grpcurl"), "-plaintext", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _json_stream(text: str) -> list[dict[str, object]]:
    decoder, pos, items = json.JSONDecoder(), 0, []
    text = text.strip()
    while pos < len(text):
        item, end = decoder.raw_decode(text, pos)
        items.append(item)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return items


async def test_list_and_describe(tool_bin: Path, runtime: Runtime) -> None:
    code, out, err = await _grpcurl(tool_bin, runtime.target, "list")
    assert code == 0, err
    assert {"tokenwire.v1.GenerationService", "grpc.health.v1.Health"} <= set(out.split())
    code, out, err = await _grpcurl(tool_bin, runtime.target, "describe",
                                    "tokenwire.v1.GenerationService")
    assert code == 0, err
    rpc = "rpc Generate ( .tokenwire.v1.GenerateRequest ) returns ( stream .tokenwire.v1.Token )"
    assert rpc in out


async def test_streaming_generate_with_json(tool_bin: Path, runtime: Runtime,
                                            fake: FakeOllama) -> None:
    code, out, err = await _grpcurl(
        tool_bin, "-d", '{"model": "tiny", "prompt": "Why is the sky blue?"}',
        runtime.target, "tokenwire.v1.GenerationService/Generate")
    assert code == 0, err
    messages = _json_stream(out)
    assert "".join(str(m.get("text", "")) for m in messages) == "".join(fake.tokens)
    assert messages[-1]["done"] is True
    assert messages[-1]["finish_reason"] == "FINISH_REASON_STOP"
    assert int(str(messages[-1]["usage"]["completion_tokens"])) == len(fake.tokens)  # type: ignore[index]


async def test_chat_and_health(tool_bin: Path, runtime: Runtime, fake: FakeOllama) -> None:
    body = json.dumps({"model": "tiny", "messages": [
        {"role": "ROLE_USER", "content": "hi"}, {"role": "ROLE_ASSISTANT", "content": "hello"},
        {"role": "ROLE_USER", "content": "bye"}]})
    code, out, err = await _grpcurl(tool_bin, "-d", body, runtime.target,
                                    "tokenwire.v1.GenerationService/Chat")
    assert code == 0, err
    assert _json_stream(out)[-1]["done"] is True
    code, out, err = await _grpcurl(tool_bin, "-d", '{"service": ""}', runtime.target,
                                    "grpc.health.v1.Health/Check")
    assert code == 0, err
    assert json.loads(out) == {"status": "SERVING"}


async def test_error_shows_status_and_details(tool_bin: Path, runtime: Runtime) -> None:
    code, out, err = await _grpcurl(tool_bin, "-d", '{"model": "nope", "prompt": "p"}',
                                    runtime.target, "tokenwire.v1.GenerationService/Generate")
    assert code != 0
    assert "Code: NotFound" in err and "ollama pull nope" in err


def _health_protoset(directory: Path) -> Path:
    """grpc.health.v1's descriptor as a protoset: the probe port has no reflection, so
    grpcurl needs the schema from elsewhere (grpc_health_probe and kubelet know it)."""
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2

    files = descriptor_pb2.FileDescriptorSet()
    health_pb2.DESCRIPTOR.CopyToProto(files.file.add())
    path = directory / "health.protoset"
    path.write_bytes(files.SerializeToString())
    return path


async def test_probe_of_the_health_port(tool_bin: Path, make_runtime: MakeRuntime,
                                        fake: FakeOllama, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """What a probe does, with the real grpcurl: plaintext, no credentials, on
    --health-listen, while the main port asks for a token; liveness stays SERVING
    while Ollama is down, readiness does not."""
    monkeypatch.setenv("TOKENWIRE_AUTH_TOKENS", "ops=tw-ops-8a8a")
    runtime = await make_runtime(health_listen="127.0.0.1:0")
    assert runtime.health_target is not None
    protoset = str(_health_protoset(tmp_path))

    async def check(target: str, service: str) -> tuple[int, str, str]:
        return await _grpcurl(tool_bin, "-protoset", protoset, "-d",
                              json.dumps({"service": service}), target,
                              "grpc.health.v1.Health/Check")

    code, out, err = await check(runtime.target, "liveness")
    assert code != 0 and "Unauthenticated" in err, (code, out, err)
    for service in ("liveness", "readiness", ""):
        code, out, err = await check(runtime.health_target, service)
        assert code == 0, err
        assert json.loads(out) == {"status": "SERVING"}, service
    await fake.go_down()
    loop = asyncio.get_running_loop()
    started = loop.time()
    while json.loads((await check(runtime.health_target, "readiness"))[1]) != {
            "status": "NOT_SERVING"}:
        assert loop.time() - started < 10, "readiness never became NOT_SERVING"
        await asyncio.sleep(0.1)
    code, out, err = await check(runtime.health_target, "liveness")
    assert code == 0 and json.loads(out) == {"status": "SERVING"}, (out, err)
    # And the probe port lists nothing: no reflection there.
    code, out, err = await _grpcurl(tool_bin, runtime.health_target, "list")
    assert code != 0 and "reflection" in err.lower(), (code, out, err)
