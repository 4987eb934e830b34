"""deploy/kubernetes against Kubernetes' own rules (kubecheck: strict decoding, defaulting,
the create validation of the API server's registry, the "restricted" Pod Security level)
and against tokenwire's facts: flags, environment, ports, health names, the shutdown
timeline, the Redis wiring."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import MANIFESTS, ROOT, find
from tokenwire.service._config import Settings, parse_settings
from tokenwire.service._health import LIVENESS, READINESS
from tokenwire.service.backends._upstreams import parse_upstreams

MANIFEST = ROOT / "deploy" / "kubernetes" / "tokenwire.yaml"


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = find(objects, "Deployment", "tokenwire")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return dict(container)


def _image_env() -> dict[str, str]:
    """The TOKENWIRE_* (and other) variables deploy/Containerfile's ENV sets."""
    text = (ROOT / "deploy" / "Containerfile").read_text()
    block = re.search(r"^ENV (.*?)(?<!\\)$", text, re.M | re.S)
    assert block is not None
    pairs = re.findall(r"(\w+)=(\S+)", block.group(1).replace("\\\n", " "))
    return dict(pairs)


def _settings(objects: list[dict[str, Any]]) -> Settings:
    """The server's settings in the pod: image ENV, then the container's env (with every
    optional Secret present), then its args, parsed by tokenwire-server's own parser."""
    container = _container(objects)
    env = _image_env()
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "redis://tokenwire-redis:6379/0")
    return parse_settings(container["args"], env)


def test_manifests_pass_kubernetes_create_validation(kubecheck: Path) -> None:
    done = subprocess.run([str(kubecheck), *map(str, MANIFESTS)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    checked = re.findall(r": ok (\S+)", done.stderr)
    assert {"Deployment/tokenwire", "Service/tokenwire", "PodDisruptionBudget/tokenwire",
            "ConfigMap/tokenwire-upstreams", "StatefulSet/tokenwire-redis",
            "Secret/tokenwire-redis", "NetworkPolicy/tokenwire-redis"} <= set(checked)
    assert "warning" not in done.stderr


@pytest.mark.parametrize(("change", "error"), [
    (("readOnlyRootFilesystem", "readOnlyRootFileSystem"), 'unknown field "spec.template.spec'),
    (("port: 8081", "port: health"), "cannot unmarshal string into Go struct field GRPCAction"),
    (("maxUnavailable: 1\n", "maxUnavailable: 1\n  minAvailable: 2\n"),
     "minAvailable and maxUnavailable cannot be both set"),
    (("seconds: 10", "seconds: 400"), "must be non-negative and less than "
                                      "terminationGracePeriodSeconds"),
    (("drop: [ALL]", "drop: [ALL]\n              add: [NET_ADMIN]\n"
                     "            privileged: true"),
     "cannot set `allowPrivilegeEscalation` to false and `privileged` to true"),
    (("clusterIP: None", "clusterIP: none"), "spec.clusterIPs[0]: Invalid value"),
    (("type: RuntimeDefault", "type: Unconfined"),
     'violates PodSecurity "restricted": seccompProfile'),
])
def test_kubecheck_refuses_what_the_api_server_refuses(kubecheck: Path, tmp_path: Path,
                                                        change: tuple[str, str],
                                                        error: str) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(MANIFEST.read_text().replace(*change))
    assert broken.read_text() != MANIFEST.read_text()
    done = subprocess.run([str(kubecheck), str(broken)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1
    assert error in done.stderr, done.stderr


def test_every_flag_and_variable_is_the_servers(objects: list[dict[str, Any]]) -> None:
    help_text = subprocess.run([str(ROOT / ".venv" / "bin" / "tokenwire-server"), "--help"],
                               capture_output=True, text=True, timeout=60, check=True).stdout
    known_flags = set(re.findall(r"(--[a-z][a-z-]+)", help_text))
    known_env = set(re.findall(r"env\s+(TOKENWIRE_[A-Z_]+)", help_text))
    container = _container(objects)
    flags = [arg.split("=", 1)[0] for arg in container["args"] if arg.startswith("--")]
    assert flags and set(flags) <= known_flags, set(flags) - known_flags
    names = [v["name"] for v in container.get("env", [])] + [
        k for k in _image_env() if k.startswith("TOKENWIRE_")]
    assert set(names) <= known_env, set(names) - known_env
    _settings(objects)  # values and combinations the server accepts (it exits 2 otherwise)


def test_ports_and_probes_match_the_server(objects: list[dict[str, Any]]) -> None:
    settings = _settings(objects)
    container = _container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    port_of = {"grpc": settings.listen, "health": settings.health_listen,
               "metrics": settings.metrics_listen}
    for name, hostport in port_of.items():
        host, port = hostport.rsplit(":", 1)
        assert host == "0.0.0.0", f"{name} listens on {hostport}: kubelet and peers need the pod IP"
        assert ports[name] == int(port), name
    probes = {kind: container[kind]["grpc"] for kind in
              ("startupProbe", "livenessProbe", "readinessProbe")}
    assert all(p["port"] == ports["health"] for p in probes.values()), probes
    assert probes["livenessProbe"]["service"] == LIVENESS
    assert probes["startupProbe"]["service"] == LIVENESS
    assert probes["readinessProbe"]["service"] == READINESS
    annotations = find(objects, "Deployment", "tokenwire")["spec"]["template"]["metadata"][
        "annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])

    service = find(objects, "Service", "tokenwire")
    assert service["spec"]["clusterIP"] == "None"  # headless: clients see every pod
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    labels = find(objects, "Deployment", "tokenwire")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    pdb = find(objects, "PodDisruptionBudget", "tokenwire")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_a_stream_running_at_sigterm_may_finish(objects: list[dict[str, Any]]) -> None:
    """preStop, then SIGTERM and --shutdown-grace, all inside terminationGracePeriodSeconds;
    a drain gives a stream at least the grace an aged connection gives it."""
    settings = _settings(objects)
    pod = find(objects, "Deployment", "tokenwire")["spec"]["template"]["spec"]
    pre_stop = _container(objects)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.shutdown_grace
    assert settings.shutdown_grace >= settings.max_connection_age_grace > 0
    assert settings.max_connection_age > settings.max_connection_age_grace


def test_runs_as_the_images_user_without_privileges(objects: list[dict[str, Any]]) -> None:
    text = (ROOT / "deploy" / "Containerfile").read_text()
    user = re.findall(r"^USER (\d+):(\d+)$", text, re.M)
    assert user == [("10001", "10001")]
    pod = find(objects, "Deployment", "tokenwire")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user[0][0]
    assert pod["automountServiceAccountToken"] is False
    context = _container(objects)["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in _container(objects)["volumeMounts"]}
    assert "/tmp" in mounts  # the only writable place (Python's tempfile)


def test_keys_only_in_secrets_and_redis_optional(objects: list[dict[str, Any]]) -> None:
    settings = _settings(objects)
    volumes = {v["name"]: v for v in
               find(objects, "Deployment", "tokenwire")["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in _container(objects)["volumeMounts"]}
    for path in (settings.callers_file, settings.tls_key, settings.tls_cert):
        assert "secret" in mounts[str(Path(path).parent)], path
    upstreams = mounts[str(Path(settings.upstreams_file).parent)]["configMap"]
    config = find(objects, "ConfigMap", upstreams["name"])["data"]
    # The server's own parser, which refuses a key written in the file (api_key, token...);
    # and no password in a URL either.
    parsed = parse_upstreams(config[Path(settings.upstreams_file).name], "upstreams.toml")
    assert parsed.upstreams and all("@" not in u.url for u in parsed.upstreams)

    (redis_env,) = [v for v in _container(objects)["env"] if v["name"] == "TOKENWIRE_REDIS_URL"]
    ref = redis_env["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True  # no Secret: each replica counts on its own
    secret = find(objects, "Secret", ref["name"])
    url = secret["stringData"][ref["key"]]
    service = find(objects, "Service", url.split("//")[1].split(":")[0])
    assert int(url.rsplit(":", 1)[1].split("/")[0]) in {p["port"] for p in
                                                         service["spec"]["ports"]}
    parse_settings(["--redis-url", url, "--insecure"], {})
