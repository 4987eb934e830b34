"""Who may call: TLS, mutual TLS with an allow-list, bearer tokens with per-caller
policy, reloading the callers file, open health, plaintext refusal, no secrets in
logs or the printed configuration. Real certificates (see ``pki.py``)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import FAST, MakeRuntime
from tests.fakeollama import FakeOllama
from tests.helpers import reason
from tests.reliability._util import bearer, generate_all, outcome, tls_channel
from tests.reliability.pki import ALLOWED_CLIENT, Pki
from tokenwire.service import Runtime, Settings, build_server, parse_settings
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
SERVING = health_pb2.HealthCheckResponse.SERVING

TOKEN_FULL = "tw-full-6f1d2c9e8b7a"
TOKEN_TINY = "tw-tiny-0a9b8c7d6e5f"
TOKEN_CHAT = "tw-chat-1234abcd5678"
TOKEN_ENV = "tw-env-9988776655"
TOKEN_THINK = "tw-think-42aa17"
TOKEN_CERTIFIED = "tw-certified-5e6f7a"
TOKEN_LETTER = "tw-letter-e-8c3d"

CALLERS = f"""
[callers.full]
token = "{TOKEN_FULL}"

[callers.tiny-only]
token_sha256 = "{hashlib.sha256(TOKEN_TINY.encode()).hexdigest()}"
models = ["tiny:*"]

[callers.chat-only]
token = "{TOKEN_CHAT}"
methods = ["Chat", "ListModels"]
"""

CHAT = pb.ChatRequest(model="tiny", messages=[pb.Message(role=pb.ROLE_USER, content="hi")])


def _callers_file(tmp_path: Path, text: str = CALLERS) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "callers.toml"
    path.write_text(text)
    return path


async def _tls_server(make_runtime: MakeRuntime, pki: Pki, tmp_path: Path,
                      **overrides: Any) -> Runtime:
    return await make_runtime(tls_cert=str(pki.server.cert_path),
                              tls_key=str(pki.server.key_path),
                              callers_file=str(_callers_file(tmp_path)), **overrides)


async def _mtls_server(make_runtime: MakeRuntime, pki: Pki) -> Runtime:
    return await make_runtime(tls_cert=str(pki.server.cert_path),
                              tls_key=str(pki.server.key_path),
                              tls_client_ca=str(pki.ca_path),
                              tls_allowed_clients="client-allowed.*")


def _print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}\n  {'case':<{width}}  {'expected':<18} got")
    for case, want, got in rows:
        print(f"  {case:<{width}}  {want:<18} {got}{'' if want == got else '   <-- MISMATCH'}")


async def test_auth_matrix(make_runtime: MakeRuntime, pki: Pki, tmp_path: Path,
                           figures: dict[str, Any]) -> None:
    tls = await _tls_server(make_runtime, pki, tmp_path)
    mtls = await _mtls_server(make_runtime, pki)
    # mTLS and tokens together: the allowed certificate names the caller "certified".
    both_file = _callers_file(tmp_path / "both", CALLERS + f"""
[callers.certified]
cert_names = ["{ALLOWED_CLIENT}"]
token = "{TOKEN_CERTIFIED}"
""")
    both = await make_runtime(tls_cert=str(pki.server.cert_path),
                              tls_key=str(pki.server.key_path),
                              tls_client_ca=str(pki.ca_path),
                              tls_allowed_clients="client-allowed.*",
                              callers_file=str(both_file))
    # The same without an allow-list: any certificate of the CA gets in.
    both_any = await make_runtime(tls_cert=str(pki.server.cert_path),
                                  tls_key=str(pki.server.key_path),
                                  tls_client_ca=str(pki.ca_path),
                                  callers_file=str(both_file))

    Call = Callable[[GenerationServiceStub], Awaitable[object]]

    def gen(model: str = "tiny", token: str | None = None) -> Call:
        metadata = bearer(token) if token is not None else ()
        return lambda stub: generate_all(
            stub, pb.GenerateRequest(model=model, prompt="hi"), metadata=metadata, timeout=5)

    cases: list[tuple[str, Runtime, str, Call, grpc.StatusCode]] = [
        # (case, server, client credentials, call, expected)
        ("TLS, no credentials", tls, "tls", gen(), UNAUTHENTICATED),
        ("TLS, unknown bearer token", tls, "tls", gen(token="not-a-token"), UNAUTHENTICATED),
        ("TLS, empty bearer token", tls, "tls", gen(token=""), UNAUTHENTICATED),
        ("TLS, good token", tls, "tls", gen(token=TOKEN_FULL), OK),
        ("TLS, token (sha256) for this model", tls, "tls", gen("tiny:latest", TOKEN_TINY), OK),
        ("TLS, token for another model", tls, "tls", gen("think-model", TOKEN_TINY),
         PERMISSION_DENIED),
        ("TLS, token without the method", tls, "tls", gen(token=TOKEN_CHAT), PERMISSION_DENIED),
        ("TLS, token with the method (Chat)", tls, "tls",
         lambda stub: _drain(stub.Chat(CHAT, metadata=bearer(TOKEN_CHAT), timeout=5)), OK),
        ("plaintext client -> TLS server", tls, "plaintext", gen(token=TOKEN_FULL), UNAVAILABLE),
        ("mTLS, allowed client certificate", mtls, "allowed", gen(), OK),
        ("mTLS, certificate not on allow-list", mtls, "other", gen(), UNAUTHENTICATED),
        ("mTLS, certificate from another CA", mtls, "rogue", gen(), UNAVAILABLE),
        ("mTLS, no client certificate", mtls, "tls", gen(), UNAVAILABLE),
        ("plaintext client -> mTLS server", mtls, "plaintext", gen(), UNAVAILABLE),
        ("mTLS without tokens, allowed certificate + a token", mtls, "allowed",
         gen(token=TOKEN_FULL), UNAUTHENTICATED),
        ("mTLS+tokens, certificate of a caller, no token", both, "allowed", gen(), OK),
        ("mTLS+tokens, certificate + the same caller's token", both, "allowed",
         gen(token=TOKEN_CERTIFIED), OK),
        ("mTLS+tokens, certificate + another caller's token", both, "allowed",
         gen(token=TOKEN_FULL), UNAUTHENTICATED),
        ("mTLS+tokens, certificate not on allow-list + good token", both, "other",
         gen(token=TOKEN_FULL), UNAUTHENTICATED),
        ("mTLS+tokens, no allow-list, unnamed certificate + good token", both_any, "other",
         gen(token=TOKEN_FULL), OK),
        ("mTLS+tokens, no allow-list, certificate + another caller's token", both_any,
         "allowed", gen(token=TOKEN_FULL), UNAUTHENTICATED),
    ]
    rows = []
    for case, server, creds, call, want in cases:
        if creds == "plaintext":
            channel = grpc.aio.insecure_channel(server.target)
        else:
            client = {"tls": None, "allowed": pki.client_allowed, "other": pki.client_other,
                      "rogue": pki.client_rogue}[creds]
            channel = tls_channel(server.target, pki, client)
        async with channel:
            got = await outcome(call(GenerationServiceStub(channel)))
        rows.append((case, want.name, got.name))
    _print_table("auth matrix (Generate unless noted)", rows)
    figures["auth_matrix"] = [{"case": c, "expected": w, "got": g} for c, w, g in rows]
    assert [r[2] for r in rows] == [r[1] for r in rows], rows


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


async def test_unauthenticated_and_denied_carry_reasons(make_runtime: MakeRuntime, pki: Pki,
                                                        tmp_path: Path, fake: FakeOllama) -> None:
    server = await _tls_server(make_runtime, pki, tmp_path)
    async with tls_channel(server.target, pki) as channel:
        stub = GenerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as no_creds:
            await generate_all(stub)
        assert no_creds.value.code() == UNAUTHENTICATED
        assert reason(no_creds.value) == "UNAUTHENTICATED"
        assert "Bearer" in (no_creds.value.details() or "")
        assert "x-request-id" in dict(no_creds.value.trailing_metadata())
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await generate_all(stub, pb.GenerateRequest(model="think-model", prompt="x"),
                               metadata=bearer(TOKEN_TINY))
        assert denied.value.code() == PERMISSION_DENIED
        assert reason(denied.value) == "NOT_ALLOWED"
        assert "think-model" in (denied.value.details() or "")
        # A refused caller cost the model nothing.
        assert not any(r.path == "/api/generate" for r in fake.requests)


async def test_model_policy_treats_untagged_name_as_latest(make_runtime: MakeRuntime, pki: Pki,
                                                           tmp_path: Path) -> None:
    """`models = ["tiny:*"]` allows the model "tiny": Ollama (and our README) read a
    name without a tag as ":latest", so the policy must too."""
    server = await _tls_server(make_runtime, pki, tmp_path)
    async with tls_channel(server.target, pki) as channel:
        got = await outcome(generate_all(GenerationServiceStub(channel),
                                         pb.GenerateRequest(model="tiny", prompt="x"),
                                         metadata=bearer(TOKEN_TINY)))
    assert got == OK


def test_token_check_compares_every_digest_in_constant_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit and no comparison of raw tokens: a presented token is hashed
    and compared (hmac.compare_digest) with the digest of every known caller,
    whether it matches the first, the last or none."""
    from tokenwire.service.guard import _auth

    registry = _auth.CallerRegistry(str(_callers_file(tmp_path)), f"ops={TOKEN_ENV}")
    compared: list[tuple[bytes, bytes]] = []
    real = _auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(_auth.hmac, "compare_digest", spy)
    for token, name in ((TOKEN_ENV, "ops"), (TOKEN_CHAT, "chat-only"), ("nope", None)):
        compared.clear()
        found = registry.by_token(token)
        assert (found.name if found else None) == name
        assert len(compared) == 4  # every caller, every time
        assert all(len(a) == len(b) == 32 for a, b in compared)  # SHA-256 digests
        assert all(token.encode() not in a + b for a, b in compared)


async def test_env_tokens(make_runtime: MakeRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENWIRE_AUTH_TOKENS", f"ops={TOKEN_ENV}, batch=other-secret")
    server = await make_runtime()
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = GenerationServiceStub(channel)
        assert await outcome(generate_all(stub)) == UNAUTHENTICATED
        assert await outcome(generate_all(stub, metadata=bearer(TOKEN_ENV))) == OK
        assert await outcome(generate_all(stub, metadata=bearer(TOKEN_ENV + "x"))) == \
            UNAUTHENTICATED
        # The token must be the whole value: other schemes do not count.
        basic = (("authorization", f"Basic {TOKEN_ENV}"),)
        assert await outcome(generate_all(stub, metadata=basic)) == UNAUTHENTICATED


async def test_callers_file_reloads_without_restart(make_runtime: MakeRuntime,
                                                    tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture,
                                                    figures: dict[str, Any]) -> None:
    path = _callers_file(tmp_path)
    server = await make_runtime(callers_file=str(path))
    new_token = "tw-rotated-55aa66bb"
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = GenerationServiceStub(channel)
        assert await outcome(generate_all(stub, metadata=bearer(TOKEN_FULL))) == OK
        assert await outcome(generate_all(stub, metadata=bearer(new_token))) == UNAUTHENTICATED

        # Rotate: the old token goes, a new one arrives. Force a new mtime even on
        # coarse-grained file systems.
        path.write_text(f'[callers.full]\ntoken = "{new_token}"\n')
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
        loop = asyncio.get_running_loop()
        rotated_at = loop.time()
        while await outcome(generate_all(stub, metadata=bearer(new_token))) != OK:
            assert loop.time() - rotated_at < 3.0, "callers file not reloaded within 3 s"
            await asyncio.sleep(0.05)
        took = loop.time() - rotated_at
        assert await outcome(generate_all(stub, metadata=bearer(TOKEN_FULL))) == UNAUTHENTICATED

        # A broken file is not applied: the previous callers stay.
        caplog.set_level(logging.INFO)
        path.write_text("[callers.full\ntoken = ")
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 4_000_000_000))
        rejected_at = loop.time()
        while not any("not reloaded" in r.getMessage() for r in caplog.records):
            assert loop.time() - rejected_at < 3.0, "broken callers file never looked at"
            assert await outcome(generate_all(stub, metadata=bearer(new_token))) == OK
            await asyncio.sleep(0.05)
        assert await outcome(generate_all(stub, metadata=bearer(new_token))) == OK
    print(f"\ncallers file reload: new token accepted {took:.2f}s after the change "
          "(checked at most once per second)")
    figures["callers_reload_seconds"] = round(took, 3)
    assert took <= 2.0


async def test_callers_file_without_callers_fails_closed(make_runtime: MakeRuntime,
                                                         tmp_path: Path) -> None:
    """--callers-file turns authentication on even while the file lists nobody yet
    (e.g. before the first caller is added): the server must not run open, and a
    caller added later must be picked up by the reload."""
    path = _callers_file(tmp_path, "# no callers yet\n")
    server = await make_runtime(callers_file=str(path))
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = GenerationServiceStub(channel)
        assert await outcome(generate_all(stub)) == UNAUTHENTICATED
        path.write_text(f'[callers.first]\ntoken = "{TOKEN_FULL}"\n')
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
        loop = asyncio.get_running_loop()
        added_at = loop.time()
        while await outcome(generate_all(stub, metadata=bearer(TOKEN_FULL))) != OK:
            assert loop.time() - added_at < 3.0, "the new caller was never picked up"
            await asyncio.sleep(0.05)
        assert await outcome(generate_all(stub)) == UNAUTHENTICATED


async def _health(channel: grpc.aio.Channel, metadata: Any = ()) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=""), metadata=metadata,
                                timeout=5)
    return int(response.status)


async def _watch_first(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
    try:
        async for response in call:
            return int(response.status)
    finally:
        call.cancel()
    raise AssertionError("Watch ended without a message")


async def _reflection_list(channel: grpc.aio.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: set[str] = set()
    async for response in stub.ServerReflectionInfo(requests(), timeout=5):
        names |= {s.name for s in response.list_services_response.service}
    return names


async def test_health_needs_credentials_when_auth_is_on(make_runtime: MakeRuntime,
                                                        tmp_path: Path) -> None:
    server = await make_runtime(callers_file=str(_callers_file(tmp_path)))
    async with grpc.aio.insecure_channel(server.target) as channel:
        assert await outcome(_health(channel)) == UNAUTHENTICATED
        assert await _health(channel, bearer(TOKEN_FULL)) == SERVING


async def test_health_watch_needs_credentials_when_auth_is_on(make_runtime: MakeRuntime,
                                                              tmp_path: Path) -> None:
    """Health/Watch is a streaming method written as an async generator: it must be
    guarded like Check."""
    server = await make_runtime(callers_file=str(_callers_file(tmp_path)))
    async with grpc.aio.insecure_channel(server.target) as channel:
        assert await outcome(_watch_first(channel)) == UNAUTHENTICATED


async def test_reflection_needs_credentials_when_auth_is_on(make_runtime: MakeRuntime,
                                                            tmp_path: Path) -> None:
    """Reflection (a bidirectional stream) is closed to anonymous callers unless
    --open-health."""
    server = await make_runtime(callers_file=str(_callers_file(tmp_path)))
    async with grpc.aio.insecure_channel(server.target) as channel:
        assert await outcome(_reflection_list(channel)) == UNAUTHENTICATED


async def test_open_health_opens_health_and_reflection_only(make_runtime: MakeRuntime,
                                                            tmp_path: Path) -> None:
    server = await make_runtime(callers_file=str(_callers_file(tmp_path)), open_health=True)
    async with grpc.aio.insecure_channel(server.target) as channel:
        assert await _health(channel) == SERVING
        assert await _watch_first(channel) == SERVING
        assert "tokenwire.v1.GenerationService" in await _reflection_list(channel)
        stub = GenerationServiceStub(channel)
        assert await outcome(generate_all(stub)) == UNAUTHENTICATED
        assert await outcome(stub.ListModels(pb.ListModelsRequest(), timeout=5)) == \
            UNAUTHENTICATED


async def test_mtls_policy_from_callers_file(make_runtime: MakeRuntime, pki: Pki,
                                             tmp_path: Path) -> None:
    """A certificate named in the callers file gets that caller's policy."""
    path = _callers_file(tmp_path, f'[callers.certified]\ncert_names = ["{ALLOWED_CLIENT}"]\n'
                                   'methods = ["ListModels"]\n')
    server = await make_runtime(tls_cert=str(pki.server.cert_path),
                                tls_key=str(pki.server.key_path),
                                tls_client_ca=str(pki.ca_path), callers_file=str(path))
    async with tls_channel(server.target, pki, pki.client_allowed) as channel:
        stub = GenerationServiceStub(channel)
        assert await outcome(stub.ListModels(pb.ListModelsRequest(), timeout=5)) == OK
        assert await outcome(generate_all(stub)) == PERMISSION_DENIED
    async with tls_channel(server.target, pki, pki.client_other) as channel:
        # Signed by the CA, no allow-list, not in the file: admitted by the CA alone.
        stub = GenerationServiceStub(channel)
        assert await outcome(generate_all(stub)) == OK


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051",
                                    "example.com:50051"])
def test_plaintext_on_non_loopback_is_refused(listen: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--listen", listen], environ={})
    assert exited.value.code == 2
    assert "refusing to serve plaintext" in capsys.readouterr().err
    assert parse_settings(["--listen", listen, "--insecure"], environ={}).insecure
    assert parse_settings(["--listen", listen, "--tls-cert", "c.pem", "--tls-key", "k.pem"],
                          environ={}).tls_cert == "c.pem"


@pytest.mark.parametrize("listen", ["127.0.0.1:50051", "localhost:50051", "[::1]:50051"])
def test_plaintext_on_loopback_is_allowed(listen: str) -> None:
    assert parse_settings(["--listen", listen], environ={}).listen == listen


async def test_secrets_never_in_logs_or_configuration(make_runtime: MakeRuntime,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TOKENWIRE_AUTH_TOKENS", f"ops={TOKEN_ENV}")
    path = _callers_file(tmp_path)
    server = await make_runtime(callers_file=str(path))
    presented_bad = "tw-wrong-but-still-secret-42"
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = GenerationServiceStub(channel)
        for token in (TOKEN_FULL, TOKEN_ENV, TOKEN_TINY, TOKEN_CHAT, presented_bad):
            await outcome(generate_all(stub, metadata=bearer(token)))
        await outcome(generate_all(stub, pb.GenerateRequest(model="think-model", prompt="x"),
                                   metadata=bearer(TOKEN_TINY)))
    described = server.settings.describe()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (TOKEN_FULL, TOKEN_ENV, TOKEN_TINY, TOKEN_CHAT, presented_bad):
        assert secret not in logged
        assert secret not in described
    assert "callers_file" in described  # the configuration itself is printed


def test_url_credentials_not_in_printed_configuration() -> None:
    """Ollama behind an authenticating proxy: --ollama-url may carry user:password
    (httpx sends it as basic auth). The printed configuration must mask it."""
    settings = Settings(ollama_url="https://gateway:s3cr3t-pw@ollama.internal:443")
    described = settings.describe()
    assert "s3cr3t-pw" not in described
    assert "ollama.internal" in described


async def test_url_credentials_not_sent_to_callers_or_logged(
        fake: FakeOllama, caplog: pytest.LogCaptureFixture) -> None:
    """When Ollama is unreachable the status message names the URL: without the
    password in it."""
    caplog.set_level(logging.DEBUG)
    secret_url = fake.url.replace("http://", "http://gateway:s3cr3t-pw@")
    server = await build_server(replace(FAST, ollama_url=secret_url))
    try:
        await fake.go_down()
        async with grpc.aio.insecure_channel(server.target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await generate_all(GenerationServiceStub(channel))
    finally:
        await server.stop(0)
    assert failed.value.code() == UNAVAILABLE
    assert "s3cr3t-pw" not in (failed.value.details() or "")
    assert "s3cr3t-pw" not in "\n".join(r.getMessage() for r in caplog.records)


async def test_list_models_shows_only_the_models_a_caller_may_use(make_runtime: MakeRuntime,
                                                                 tmp_path: Path,
                                                                 fake: FakeOllama) -> None:
    """A caller allowed only some models sees only those in ListModels, by the same
    rule as Generate (":latest" included); callers without a model policy see all."""
    path = _callers_file(tmp_path, CALLERS + f"""
[callers.think-bare]
token = "{TOKEN_THINK}"
models = ["think-model"]

[callers.letter-e]
token = "{TOKEN_LETTER}"
models = ["e*"]
""")
    server = await make_runtime(callers_file=str(path))
    installed = {"tiny:latest", "think-model:latest", "embedder:latest"}
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = GenerationServiceStub(channel)

        async def names(token: str) -> set[str]:
            answer = await stub.ListModels(pb.ListModelsRequest(), metadata=bearer(token),
                                           timeout=5)
            return {m.name for m in answer.models}

        async def may_generate(token: str, model: str) -> bool:
            got = await outcome(generate_all(stub, pb.GenerateRequest(model=model, prompt="p"),
                                             metadata=bearer(token)))
            assert got in (OK, PERMISSION_DENIED), got
            return got == OK

        assert await names(TOKEN_FULL) == installed
        assert await names(TOKEN_TINY) == {"tiny:latest"}
        assert await names(TOKEN_LETTER) == {"embedder:latest"}
        # A pattern without a tag means ":latest", in both directions, as in Ollama.
        assert await names(TOKEN_THINK) == {"think-model:latest"}
        # What a caller is shown is exactly what it may call.
        for token in (TOKEN_FULL, TOKEN_TINY, TOKEN_LETTER, TOKEN_THINK):
            shown = await names(token)
            for model in installed:
                assert await may_generate(token, model) == (model in shown), (token, model)


#: (case, the `authorization` values sent, expected code); TOKEN_ENV is a known token.
BEARER_FORMS: list[tuple[str, tuple[str, ...], grpc.StatusCode]] = [
    ("exact", (f"Bearer {TOKEN_ENV}",), OK),
    ("scheme in lower case", (f"bearer {TOKEN_ENV}",), OK),
    ("scheme in upper case", (f"BEARER {TOKEN_ENV}",), OK),
    ("two spaces", (f"Bearer  {TOKEN_ENV}",), UNAUTHENTICATED),
    ("space after the token", (f"Bearer {TOKEN_ENV} ",), UNAUTHENTICATED),
    ("space before the scheme", (f" Bearer {TOKEN_ENV}",), UNAUTHENTICATED),
    ("something after the token", (f"Bearer {TOKEN_ENV} extra",), UNAUTHENTICATED),
    ("two tokens in one value", (f"Bearer {TOKEN_ENV},{TOKEN_ENV}",), UNAUTHENTICATED),
    ("a character outside b64token", (f"Bearer {TOKEN_ENV}!",), UNAUTHENTICATED),
    ("the scheme alone", ("Bearer",), UNAUTHENTICATED),
    ("the token alone", (TOKEN_ENV,), UNAUTHENTICATED),
    ("another scheme", (f"Basic {TOKEN_ENV}",), UNAUTHENTICATED),
    ("two entries, the same token", (f"Bearer {TOKEN_ENV}",) * 2, UNAUTHENTICATED),
    ("two entries, a bad one first", ("Bearer nope", f"Bearer {TOKEN_ENV}"), UNAUTHENTICATED),
    ("two entries, a bad one last", (f"Bearer {TOKEN_ENV}", "Bearer nope"), UNAUTHENTICATED),
]


async def test_bearer_credentials_must_be_unambiguous(make_runtime: MakeRuntime,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture,
                                                      figures: dict[str, Any]) -> None:
    """Exactly one `authorization` entry, exactly `Bearer <token>` (RFC 6750: the scheme
    in any case, one space, a b64token, nothing before or after). Anything else is
    refused with UNAUTHENTICATED saying the expected form, rather than guessed at
    (stripped spaces, the first of several entries); the token is never echoed or
    logged."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TOKENWIRE_AUTH_TOKENS", f"ops={TOKEN_ENV}")
    server = await make_runtime()
    rows = []
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = GenerationServiceStub(channel)
        for case, values, want in BEARER_FORMS:
            metadata = tuple(("authorization", v) for v in values)
            try:
                await generate_all(stub, metadata=metadata, timeout=5)
            except grpc.aio.AioRpcError as err:
                got, details = err.code(), err.details() or ""
            else:
                got, details = OK, ""
            rows.append((case, want.name, got.name))
            if got == UNAUTHENTICATED:
                assert "Bearer <token>" in details, (case, details)
                assert TOKEN_ENV not in details, (case, details)
                if len(values) > 1:
                    assert "exactly one" in details, (case, details)
    _print_table("bearer forms", rows)
    figures["bearer_forms"] = [{"case": c, "expected": w, "got": g} for c, w, g in rows]
    assert [r[2] for r in rows] == [r[1] for r in rows], rows
    assert TOKEN_ENV not in "\n".join(r.getMessage() for r in caplog.records)
