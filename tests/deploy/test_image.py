"""The container image, built for real (scripts/build-image: a Debian base from
mmdebstrap, wheels, podman build --network none) and run by podman the way the kubelet runs
deploy/kubernetes/tokenwire.yaml's container: its args and env, its user, a read-only root
with /tmp as the only writable place, every capability dropped, no privilege escalation,
its Secret and ConfigMap files at their mount paths. Called over gRPC through the published
ports (127.0.0.1 only; the container reaches this machine's loopback through slirp4netns),
probed as the kubelet probes, and stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.deploy.conftest import find
from tests.fakeollama import DEFAULT_TOKENS, FakeOllama
from tests.helpers import ServerProcess, joined, samples, scrape, value
from tests.parts import redis_server
from tests.reliability.pki import make_pki
from tokenwire.v1 import generation_pb2 as pb
from tokenwire.v1.generation_pb2_grpc import GenerationServiceStub

SERVING = health_pb2.HealthCheckResponse.SERVING
TOKEN = "tw-deploy-" + secrets.token_hex(8)
HOST = "10.0.2.2"  # this machine's loopback, seen from a slirp4netns container


async def _podman(*args: str, check: bool = True) -> tuple[int, str, str]:
    """podman ARGS: exit code, stdout (stripped), stderr."""
    proc = await asyncio.create_subprocess_exec(
        "podman", *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    code = proc.returncode if proc.returncode is not None else -1
    assert code == 0 or not check, f"podman {' '.join(args)}: {err.decode()}"
    return code, out.decode().strip(), err.decode()


def _proc_status(pid: str) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _project(directory: Path, files: dict[str, bytes], mode: int, group: int) -> None:
    """Writes a volume's files the way the kubelet does (its atomic writer): into a new
    timestamped directory, then the ``..data`` symlink is renamed over to point at it; each
    file's name is a symlink into ``..data``. Run again, it is an update of the volume."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / f"..{secrets.token_hex(6)}"
    stamp.mkdir()
    for file, content in files.items():
        (stamp / file).write_bytes(content)
        os.chown(stamp / file, 0, group)
        (stamp / file).chmod(mode)
        with contextlib.suppress(FileExistsError):
            (directory / file).symlink_to(f"..data/{file}")
    old = (directory / "..data").resolve() if (directory / "..data").exists() else None
    (directory / "..data_tmp").symlink_to(stamp.name)
    (directory / "..data_tmp").replace(directory / "..data")
    if old is not None:
        shutil.rmtree(old)


def _callers(token: str) -> dict[str, bytes]:
    return {"callers.toml": f'[callers.deploy-test]\ntoken = "{token}"\n'.encode()}


def _files(tmp_path: Path, objects: list[dict[str, Any]], ollama_url: str) -> dict[str, Path]:
    """A directory per volume of the pod, as the kubelet fills it: Secrets group-readable by
    the fsGroup (defaultMode 0440), the ConfigMap's upstreams.toml pointed at the test
    Ollama, emptyDirs left out (podman makes those tmpfs)."""
    pod = find(objects, "Deployment", "tokenwire")["spec"]["template"]["spec"]
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    made: dict[str, Path] = {}
    for volume in pod["volumes"]:
        directory = tmp_path / "volumes" / volume["name"]
        if "secret" in volume:
            name = volume["secret"]["secretName"]
            files = {"tokenwire-tls": {"tls.crt": pki.server.cert_pem,
                                       "tls.key": pki.server.key_pem},
                     "tokenwire-callers": _callers(TOKEN)}[name]
            mode, group = volume["secret"]["defaultMode"], pod["securityContext"]["fsGroup"]
        elif "configMap" in volume:
            data = find(objects, "ConfigMap", volume["configMap"]["name"])["data"]
            files = {k: v.replace("http://ollama:11434", ollama_url).encode()
                     for k, v in data.items()}
            mode, group = 0o444, 0
        else:
            continue
        _project(directory, files, mode, group)
        made[volume["name"]] = directory
    made["ca.pem"] = pki.ca_path
    return made


def _run_args(objects: list[dict[str, Any]], files: dict[str, Path], name: str,
              env: dict[str, str]) -> list[str]:
    """podman run options for the Deployment's one container."""
    pod = find(objects, "Deployment", "tokenwire")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    context, pod_context = container["securityContext"], pod["securityContext"]
    args = ["--rm", "--name", name, "--network", "slirp4netns:allow_host_loopback=true",
            "--user", f"{pod_context['runAsUser']}:{pod_context['runAsGroup']}",
            "--group-add", str(pod_context["fsGroup"])]
    if context["readOnlyRootFilesystem"]:
        args += ["--read-only", "--read-only-tmpfs=false"]
    args += [f"--cap-drop={cap}" for cap in context["capabilities"]["drop"]]
    if not context["allowPrivilegeEscalation"]:
        args += ["--security-opt", "no-new-privileges"]
    args += [f"--publish=127.0.0.1::{p['containerPort']}" for p in container["ports"]]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        if "emptyDir" in volumes[mount["name"]]:
            args += ["--tmpfs", f"{mount['mountPath']}:rw,nosuid,nodev,size=64m"]
        else:
            args += ["--volume", f"{files[mount['name']]}:{mount['mountPath']}:ro"]
    for var in container.get("env", []):
        args += ["--env", f"{var['name']}={env[var['name']]}"]
    return args + [container["image"], *container["args"]]


@contextlib.asynccontextmanager
async def _pod(podman_args: list[str], run_args: list[str]) -> AsyncIterator[ServerProcess]:
    proc = await asyncio.create_subprocess_exec(
        "podman", "run", *podman_args, *run_args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    server = ServerProcess(proc)
    name = run_args[run_args.index("--name") + 1]
    try:
        yield server
    finally:
        if proc.returncode is None:
            await _podman("rm", "--force", "--time", "0", name, check=False)
            await server.exited()


async def _published(name: str, port: int) -> str:
    """127.0.0.1:PORT, where podman published the container's ``port``."""
    return (await _podman("port", name, f"{port}/tcp"))[1].splitlines()[0]


async def _health(target: str, service: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:  # as the kubelet: no TLS, no token
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=30)
        async for answer in watch:
            if answer.status == SERVING:
                watch.cancel()
                return int(answer.status)
    raise AssertionError(f"{service}: the watch ended before SERVING")


async def test_the_deployments_container_serves_as_non_root(
        image: str, podman_args: list[str], objects: list[dict[str, Any]],
        tmp_path: Path) -> None:
    container = find(objects, "Deployment", "tokenwire")["spec"]["template"]["spec"][
        "containers"][0]
    assert container["image"] == image, "the manifest names the image this tree builds"
    config = json.loads((await _podman("image", "inspect", image))[1])[0]["Config"]
    assert config["User"] == "10001:10001"

    name = "tokenwire-test-" + secrets.token_hex(4)
    async with FakeOllama() as fake, redis_server(tmp_path) as redis:
        files = _files(tmp_path, objects, f"http://{HOST}:{fake.port}")
        env = {"TOKENWIRE_REDIS_URL": f"redis://{HOST}:{redis.port}/0"}
        async with _pod(podman_args, _run_args(objects, files, name, env)) as server:
            await server.wait_for("listening on 0.0.0.0:50051")
            await server.wait_for("health checks on 0.0.0.0:8081")
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}

            # The kubelet's probes, on the health port, in plaintext and without a token.
            health = await _published(name, ports["health"])
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                grpc_probe = container[probe]["grpc"]
                assert await _published(name, grpc_probe["port"]) == health
                assert await _health(health, grpc_probe["service"]) == SERVING
            assert await _health(health, "limits") == SERVING  # shared in the real Redis

            # A caller: TLS with the Secret's certificate, the callers file's token.
            credentials = grpc.ssl_channel_credentials(files["ca.pem"].read_bytes())
            token = (("authorization", f"Bearer {TOKEN}"),)
            request = pb.GenerateRequest(model="tiny", prompt="why is the sky blue?")
            async with grpc.aio.secure_channel(await _published(name, ports["grpc"]),
                                               credentials) as channel:
                stub = GenerationServiceStub(channel)
                tokens = [t async for t in stub.Generate(request, metadata=token, timeout=30)]
                assert joined(tokens) == "".join(DEFAULT_TOKENS)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.ListModels(pb.ListModelsRequest(), timeout=30)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

                metrics = await _published(name, ports["metrics"])
                found = samples((await scrape(int(metrics.rsplit(":", 1)[1]))).text)
                assert value(found, "tokenwire_rpcs_total", method="Generate", code="OK") == 1
                assert value(found, "tokenwire_limits_shared") == 1

                # The process: the image's user, no capabilities, no new privileges.
                pid = (await _podman("inspect", "--format", "{{.State.Pid}}", name))[1]
                status = _proc_status(pid)
                assert status["Uid"].split() == ["10001"] * 4
                assert status["CapEff"] == "0" * 16
                assert status["NoNewPrivs"] == "1"
                code, _, err = await _podman("exec", name, "touch", "/opt/tokenwire/x",
                                             check=False)
                assert code != 0 and "Read-only file system" in err

                # The callers Secret updated, as the kubelet updates a mounted Secret: the
                # new token is let in and the old one refused, without a restart.
                new_token = "tw-deploy-" + secrets.token_hex(8)
                pod = find(objects, "Deployment", "tokenwire")["spec"]["template"]["spec"]
                volume = {v["name"]: v for v in pod["volumes"]}["callers"]["secret"]
                _project(files["callers"], _callers(new_token), volume["defaultMode"],
                         pod["securityContext"]["fsGroup"])
                token = (("authorization", f"Bearer {new_token}"),)
                for _ in range(40):  # the server looks at the file at most once a second
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await stub.ListModels(pb.ListModelsRequest(), metadata=token,
                                              timeout=30)
                        break
                    await asyncio.sleep(0.25)
                await server.wait_for("reloaded: 1 caller(s)")
                await stub.ListModels(pb.ListModelsRequest(), metadata=token, timeout=30)
                with pytest.raises(grpc.aio.AioRpcError) as old:
                    await stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=(
                        ("authorization", f"Bearer {TOKEN}"),))
                assert old.value.code() == grpc.StatusCode.UNAUTHENTICATED

                # SIGTERM (the end of preStop) once a slow stream is under way: the stream
                # still ends whole, and the process exits 0 within the pod's grace.
                grace = find(objects, "Deployment", "tokenwire")["spec"]["template"]["spec"][
                    "terminationGracePeriodSeconds"]
                fake.token_delay = 0.2
                received: list[pb.Token] = []
                stop: asyncio.Task[tuple[int, str, str]] | None = None
                async for piece in stub.Generate(request, metadata=token, timeout=60):
                    received.append(piece)
                    if stop is None:
                        stop = asyncio.create_task(
                            _podman("stop", "--time", str(grace), name))
                assert any("shutting down" in line for line in server.lines), \
                    "the stream ended before SIGTERM reached the server"
                assert joined(received) == "".join(DEFAULT_TOKENS)
                assert stop is not None
                await stop
            assert await server.exited() == 0
            await server.wait_for("stopped")


async def test_the_images_defaults_listen_on_every_interface_and_want_tls(
        image: str, podman_args: list[str]) -> None:
    """No flags: 0.0.0.0, so it refuses plaintext until --tls-cert/--tls-key or --insecure."""
    code, _, err = await _podman("run", "--rm", *podman_args, "--network", "none", image,
                                 check=False)
    assert code == 2, err
    assert "refusing to serve plaintext on 0.0.0.0:50051" in err
