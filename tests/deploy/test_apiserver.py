"""deploy/kubernetes sent to a real kube-apiserver (1.37.2, on a real etcd 3.7, both built
by scripts/kube-tools from the Go module proxy, on loopback ports) as server-side dry-run
creates with strict field validation, into a namespace that enforces the "restricted" Pod
Security level: the API server's whole create path (decoding, defaulting, admission,
validation, Service IP allocation), minus the write."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.deploy.conftest import MANIFESTS, ROOT
from tests.parts import _free_port

# apiVersion, kind -> the resource's plural (every kind deploy/kubernetes uses)
PLURALS = {"ServiceAccount": "serviceaccounts", "ConfigMap": "configmaps",
           "Secret": "secrets", "Service": "services", "Deployment": "deployments",
           "StatefulSet": "statefulsets", "PodDisruptionBudget": "poddisruptionbudgets",
           "NetworkPolicy": "networkpolicies"}
NAMESPACE = "tokenwire-check"


def _documents(path: Path) -> list[str]:
    """The YAML documents of a manifest file (they are separated by lines of ``---``)."""
    docs = re.split(r"^---\s*$", path.read_text(), flags=re.M)
    return [d for d in docs if re.search(r"^kind:", d, flags=re.M)]


class ApiServer:
    def __init__(self, url: str, token: str, ca: Path) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=30,
                                      verify=ssl.create_default_context(cafile=str(ca)),
                                      headers={"Authorization": f"Bearer {token}"})

    async def dry_run_create(self, doc: str, namespace: str) -> httpx.Response:
        api_version = re.search(r"^apiVersion:\s*(\S+)", doc, flags=re.M)
        kind = re.search(r"^kind:\s*(\S+)", doc, flags=re.M)
        assert api_version and kind
        prefix = "/api/v1" if api_version[1] == "v1" else f"/apis/{api_version[1]}"
        return await self.http.post(
            f"{prefix}/namespaces/{namespace}/{PLURALS[kind[1]]}",
            params={"dryRun": "All", "fieldValidation": "Strict"}, content=doc,
            headers={"Content-Type": "application/yaml"})


def _tails(workdir: Path) -> str:
    return "\n".join(f"--- {log.name}:\n{log.read_text(errors='replace')[-3000:]}"
                     for log in sorted(workdir.glob("*.log")))


async def _wait_ready(http: httpx.AsyncClient, procs: list[asyncio.subprocess.Process],
                      workdir: Path) -> None:
    for _ in range(600):  # up to 2 minutes on a loaded machine
        if any(p.returncode is not None for p in procs):
            raise AssertionError("etcd or kube-apiserver exited while starting\n"
                                 + _tails(workdir))
        with contextlib.suppress(httpx.TransportError):
            if (await http.get("/readyz")).status_code == 200:
                return
        await asyncio.sleep(0.2)
    raise AssertionError("kube-apiserver not ready within 2 minutes\n" + _tails(workdir))


@contextlib.asynccontextmanager
async def _cluster(bin_dir: Path, workdir: Path) -> AsyncIterator[ApiServer]:
    """etcd and kube-apiserver on free loopback ports, authorization AlwaysAllow, one token."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (workdir / "sa.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    (workdir / "sa.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    token = secrets.token_hex(16)
    (workdir / "tokens.csv").write_text(f"{token},admin,admin,system:masters\n")
    client, peer, secure = _free_port(), _free_port(), _free_port()
    logs = (workdir / "etcd.log").open("wb"), (workdir / "apiserver.log").open("wb")
    etcd = await asyncio.create_subprocess_exec(
        str(bin_dir / "etcd"), "--name", "check", "--data-dir", str(workdir / "etcd"),
        "--listen-client-urls", f"http://127.0.0.1:{client}",
        "--advertise-client-urls", f"http://127.0.0.1:{client}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"check=http://127.0.0.1:{peer}", "--unsafe-no-fsync",
        stdout=logs[0], stderr=logs[0])
    apiserver = await asyncio.create_subprocess_exec(
        str(bin_dir / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{client}",
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
        "--endpoint-reconciler-type=none",  # its default refuses a loopback address
        f"--secure-port={secure}", f"--cert-dir={workdir / 'certs'}",
        "--service-account-issuer=https://kubernetes.default.svc",
        f"--service-account-key-file={workdir / 'sa.pub'}",
        f"--service-account-signing-key-file={workdir / 'sa.key'}",
        "--service-cluster-ip-range=10.96.0.0/16", "--authorization-mode=AlwaysAllow",
        f"--token-auth-file={workdir / 'tokens.csv'}", "--enable-priority-and-fairness=false",
        stdout=logs[1], stderr=logs[1])
    try:
        # The self-signed certificate appears once the server starts; until then, wait.
        for _ in range(600):
            if (workdir / "certs" / "apiserver.crt").exists() or apiserver.returncode:
                break
            await asyncio.sleep(0.2)
        server = ApiServer(f"https://127.0.0.1:{secure}", token,
                           workdir / "certs" / "apiserver.crt")
        await _wait_ready(server.http, [etcd, apiserver], workdir)
        yield server
        await server.http.aclose()
    finally:
        for proc in (apiserver, etcd):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        for log in logs:
            log.close()


@pytest.fixture
async def apiserver(kube_bin: Path, tmp_path: Path) -> AsyncIterator[ApiServer]:
    async with _cluster(kube_bin, tmp_path) as server:
        namespace = await server.http.post("/api/v1/namespaces", json={
            "apiVersion": "v1", "kind": "Namespace", "metadata": {
                "name": NAMESPACE, "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/warn": "restricted"}}})
        assert namespace.status_code == 201, namespace.text
        yield server


async def test_the_api_server_accepts_every_manifest(apiserver: ApiServer) -> None:
    created = []
    for path in MANIFESTS:
        for doc in _documents(path):
            answer = await apiserver.dry_run_create(doc, NAMESPACE)
            assert answer.status_code == 201, f"{path.name}: {answer.text}"
            assert "warning" not in answer.headers, answer.headers["warning"]
            body = answer.json()
            created.append(f"{body['kind']}/{body['metadata']['name']}")
            if body["kind"] == "Service" and body["metadata"]["name"] == "tokenwire-redis":
                assert body["spec"]["clusterIP"].startswith("10.96.")  # allocated
    assert {"Deployment/tokenwire", "Service/tokenwire", "PodDisruptionBudget/tokenwire",
            "StatefulSet/tokenwire-redis"} <= set(created)


async def test_the_api_server_refuses_a_broken_manifest(apiserver: ApiServer) -> None:
    """The same path fails where it should: an unknown field, and a pod template the
    namespace's Pod Security level forbids (a warning on a Deployment, as PodSecurity does)."""
    manifest = ROOT / "deploy" / "kubernetes" / "tokenwire.yaml"
    (deployment,) = [d for d in _documents(manifest) if "kind: Deployment" in d]
    unknown = deployment.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem")
    answer = await apiserver.dry_run_create(unknown, NAMESPACE)
    assert answer.status_code == 400
    assert ('unknown field "spec.template.spec.containers[0].securityContext.'
            'readOnlyRootFileSystem"') in answer.json()["message"]
    unconfined = deployment.replace("type: RuntimeDefault", "type: Unconfined")
    answer = await apiserver.dry_run_create(unconfined, NAMESPACE)
    assert answer.status_code == 201
    warning = answer.headers["warning"].replace('\\"', '"')  # RFC 7234 quoting undone
    assert 'violate PodSecurity "restricted:latest": seccompProfile' in warning
