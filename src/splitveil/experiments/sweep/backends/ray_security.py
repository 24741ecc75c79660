"""Security checks for the local Ray cluster that ``splitveil sweep --backend ray`` starts.

A Ray cluster runs arbitrary code for whoever can talk to it. Ray (checked with 2.60) does not let a local
cluster listen on the loopback only: ``ray.init(_node_ip_address="127.0.0.1")`` is resolved back to the
node's routable address, and the GCS server and raylet listen on all interfaces (``::``), the runtime-env agent
on the node's address (see ``tests/test_ray_security.py``, which reads the sockets). What protects such a
cluster is Ray's token authentication (on by default for local clusters from Ray 2.59). So splitveil:

- refuses to start a local cluster with ``RAY_AUTH_MODE=disabled`` (before anything listens), and
- after starting one, checks that token authentication is on whenever any Ray process listens beyond the
  loopback; otherwise it shuts the cluster down and stops with an error.
"""
from __future__ import annotations

import ipaddress
import os

from ....params import ConfigError

LOOPBACK_ONLY_HINT = ("splitveil does not start an unauthenticated local Ray cluster: its ports are reachable from "
                      "the network")


def check_auth_not_disabled() -> None:
    """Before ``ray.init`` of a local cluster: token authentication must not be switched off."""
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        raise ConfigError(f"RAY_AUTH_MODE=disabled: {LOOPBACK_ONLY_HINT}; unset RAY_AUTH_MODE (token "
                          f"authentication) or use --backend local")


def listening_addresses(pid: int | None = None) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of process ``pid`` (default: this one)
    and its descendants: the local Ray cluster's GCS, raylet and agents are children of the driver."""
    import psutil

    root = psutil.Process(pid)
    out = []
    for p in [root, *root.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except psutil.Error:
            continue
        out += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return address == "localhost"


def token_auth_enabled() -> bool | None:
    """Whether the running Ray cluster enforces token authentication (None: this Ray cannot tell)."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:
        return None
    return bool(is_token_auth_enabled())


def check_started_cluster() -> list[tuple[str, str, int]]:
    """After ``ray.init`` of a local cluster: if any Ray process listens beyond the loopback, token
    authentication must be on. Returns the listening sockets; raises ConfigError otherwise (the caller shuts
    the cluster down)."""
    sockets = listening_addresses()
    exposed = [s for s in sockets if not is_loopback(s[1])]
    if exposed and token_auth_enabled() is not True:
        shown = ", ".join(f"{n} on {a}:{p}" for n, a, p in exposed[:4])
        raise ConfigError(f"the local Ray cluster listens beyond the loopback ({shown}) without token "
                          f"authentication: {LOOPBACK_ONLY_HINT}; use Ray >= 2.59 with RAY_AUTH_MODE unset")
    return sockets
