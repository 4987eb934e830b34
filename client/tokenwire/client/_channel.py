"""Where a client connects, and how calls spread and retry there.

A target is one address (``host:port``), any gRPC target URI (``dns:///name:port``,
``ipv4:``, ``ipv6:``, ``unix:``, ``xds:`` ...) or several addresses (a list, or one string
with commas), which becomes the ``ipv4:``/``ipv6:`` URI gRPC core resolves to all of them.

``DEFAULT_SERVICE_CONFIG`` (``service_config.json`` beside this module, the same file the
Go, Node.js and Java examples load) spreads calls over every address of the target with
``round_robin`` and lets gRPC retry a call that ended UNAVAILABLE before any response
header arrived: against tokenwire (``--initial-metadata first-token``) that is a call that
failed before its first token, so nothing was delivered and nothing is delivered twice.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from types import MappingProxyType
from typing import Any, TypeAlias

__all__ = ["DEFAULT_SERVICE_CONFIG", "SERVICE_CONFIG_OPTION", "ServiceConfigLike",
           "TargetLike", "channel_target", "service_config_option"]

#: One address, a gRPC target URI, or several addresses.
TargetLike: TypeAlias = str | Sequence[str]
#: A service config as a mapping or JSON text; None: gRPC's defaults (pick_first, no
#: retry policy).
ServiceConfigLike: TypeAlias = Mapping[str, Any] | str | None

SERVICE_CONFIG_OPTION = "grpc.service_config"
DEFAULT_SERVICE_CONFIG: Mapping[str, Any] = MappingProxyType(json.loads(
    resources.files("tokenwire.client").joinpath("service_config.json").read_text("utf-8")))

#: URI schemes gRPC core resolves itself; anything else (``localhost:50051``) is a
#: ``host:port`` its default resolver (DNS) looks up.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:",
            "google-c2p:")
_LIST_ADVICE = ("give each address as IP:port (10.0.0.1:50051, [fd00::1]:50051); for a "
                "host name that resolves to several addresses, use dns:///name:port")


def channel_target(target: TargetLike) -> str:
    """The gRPC target string for ``target`` (see the module docstring). Raises
    ValueError, saying what to write instead, for a list gRPC cannot resolve."""
    if isinstance(target, str):
        text = target.strip()
        if "," not in text or text.startswith(_SCHEMES):
            return text
        addresses = [part.strip() for part in text.split(",")]
    else:
        addresses = [str(part).strip() for part in target]
    if not addresses or not all(addresses):
        raise ValueError(f"empty address in the target {target!r}; {_LIST_ADVICE}")
    if len(addresses) == 1:
        return addresses[0]
    families = {_family(address) for address in addresses}
    if len(families) > 1:
        raise ValueError(f"the target {target!r} mixes IPv4 and IPv6 addresses, which gRPC "
                         "resolves in separate lists; give one family, or a dns:/// name "
                         "with both")
    return f"{families.pop()}:" + ",".join(addresses)


def _family(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} in a list of addresses has no port; {_LIST_ADVICE}")
    try:
        ip = ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
    except ValueError:
        raise ValueError(f"{address!r} in a list of addresses is not an IP address; "
                         f"{_LIST_ADVICE}") from None
    if ip.version == 6 and not host.startswith("["):
        raise ValueError(f"{address!r}: write an IPv6 address in brackets, [{host}]:{port}")
    return f"ipv{ip.version}"


def service_config_option(config: ServiceConfigLike) -> tuple[tuple[str, str], ...]:
    """The channel option that applies ``config`` (none for None)."""
    if config is None:
        return ()
    text = config if isinstance(config, str) else json.dumps(_plain(config))
    json.loads(text)  # malformed JSON: a ValueError here, not a channel that ignores it
    return ((SERVICE_CONFIG_OPTION, text),)


def _plain(value: Any) -> Any:
    """``value`` with mappings (MappingProxyType included) as dicts, for json.dumps."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value
