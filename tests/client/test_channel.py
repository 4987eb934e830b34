"""Targets and the default service config of the client (no server needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenwire.client import DEFAULT_SERVICE_CONFIG, AsyncClient, Client, channel_target
from tokenwire.client._cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("target", "expected"), [
    ("127.0.0.1:50051", "127.0.0.1:50051"),
    ("localhost:50051", "localhost:50051"),
    ("dns:///tokenwire.default.svc:50051", "dns:///tokenwire.default.svc:50051"),
    ("ipv4:10.0.0.1:1,10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2"),
    ("unix:///run/tokenwire.sock", "unix:///run/tokenwire.sock"),
    ("10.0.0.1:50051, 10.0.0.2:50051", "ipv4:10.0.0.1:50051,10.0.0.2:50051"),
    (["10.0.0.1:50051", "10.0.0.2:50052"], "ipv4:10.0.0.1:50051,10.0.0.2:50052"),
    (("[::1]:50051", "[fd00::2]:50051"), "ipv6:[::1]:50051,[fd00::2]:50051"),
    (["tokenwire:50051"], "tokenwire:50051"),
])
def test_targets(target: str | list[str], expected: str) -> None:
    assert channel_target(target) == expected


@pytest.mark.parametrize(("target", "says"), [
    ("gw-a:50051,gw-b:50051", "dns:///name:port"),
    (["10.0.0.1", "10.0.0.2:50051"], "has no port"),
    (["10.0.0.1:50051", "[::1]:50051"], "mixes IPv4 and IPv6"),
    (["::1:50051", "::2:50051"], "in brackets, [::1]:50051"),
    ("10.0.0.1:50051,,10.0.0.2:50051", "empty address"),
    ([], "empty address"),
])
def test_lists_grpc_cannot_resolve_are_refused_with_advice(target: str | list[str],
                                                           says: str) -> None:
    with pytest.raises(ValueError, match=r".*" + says.replace("[", r"\[").replace("]", r"\]")):
        channel_target(target)


def _option(client: Client | AsyncClient, key: str) -> object:
    return dict(client.options).get(key)


async def test_the_default_service_config_is_on_both_twins_and_can_be_replaced() -> None:
    config = json.loads((ROOT / "client/tokenwire/client/service_config.json").read_text())
    assert config == DEFAULT_SERVICE_CONFIG
    policy = config["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    with Client(["10.0.0.1:1", "10.0.0.2:1"]) as client:
        assert client.target == "ipv4:10.0.0.1:1,10.0.0.2:1"
        assert json.loads(str(_option(client, "grpc.service_config"))) == config
    async with AsyncClient("10.0.0.1:1,10.0.0.2:1") as aclient:
        assert json.loads(str(_option(aclient, "grpc.service_config"))) == config
    with Client(service_config=None) as client:
        assert _option(client, "grpc.service_config") is None
    mine = {"loadBalancingConfig": [{"pick_first": {}}]}
    with Client(service_config=mine) as client:
        assert json.loads(str(_option(client, "grpc.service_config"))) == mine
    with Client(options=[("grpc.service_config", "{}")]) as client:  # the option wins
        assert _option(client, "grpc.service_config") == "{}"
    with pytest.raises(ValueError):
        Client(service_config="{not json")


def test_cli_target_list_and_service_config(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    """The CLI passes --target and --service-config to the library as they are: a bad
    list is the library's ValueError, reported as a usage error."""
    code = main(["--target", "gw-a:1,gw-b:1", "health"])
    assert code == 2
    assert "dns:///name:port" in capsys.readouterr().err
    config = tmp_path / "sc.json"
    config.write_text("{not json")
    assert main(["--target", "127.0.0.1:1", "--service-config", str(config), "health"]) == 2
    assert "--service-config" in capsys.readouterr().err
