"""The local Ray cluster of the sweep backend, checked at the socket level (issue 13, security)."""
from __future__ import annotations

import pytest

from splitveil.experiments.sweep.backends import ray_security
from splitveil.params import ConfigError


def test_loopback_classification():
    assert ray_security.is_loopback("127.0.0.1") and ray_security.is_loopback("::1")
    assert not ray_security.is_loopback("::") and not ray_security.is_loopback("0.0.0.0")
    assert not ray_security.is_loopback("192.0.2.2")


def test_disabled_token_auth_is_refused_before_anything_listens(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from test_sweep import tiny_sweep
    from splitveil.experiments.sweep import load_sweep, run_sweep

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init must not run without token auth"))
    sweep = load_sweep(tiny_sweep(tmp_path, "ray", points=[{"defense.name": "none"}]), out=tmp_path / "out")
    with pytest.raises(ConfigError, match="RAY_AUTH_MODE=disabled"):
        run_sweep(sweep, backend="ray", num_cpus=1, cpus_per_run=1, progress=False)


def test_exposed_sockets_without_token_auth_stop_the_sweep(monkeypatch):
    monkeypatch.setattr(ray_security, "listening_addresses", lambda pid=None: [("gcs_server", "::", 4000),
                                                                              ("raylet", "127.0.0.1", 4001)])
    monkeypatch.setattr(ray_security, "token_auth_enabled", lambda: False)
    with pytest.raises(ConfigError, match="gcs_server on :::4000"):
        ray_security.check_started_cluster()
    monkeypatch.setattr(ray_security, "token_auth_enabled", lambda: True)
    assert len(ray_security.check_started_cluster()) == 2
    monkeypatch.setattr(ray_security, "listening_addresses", lambda pid=None: [("raylet", "127.0.0.1", 4001)])
    monkeypatch.setattr(ray_security, "token_auth_enabled", lambda: False)
    assert ray_security.check_started_cluster() == [("raylet", "127.0.0.1", 4001)]   # loopback only: fine


def test_local_cluster_sockets_are_loopback_or_token_authenticated(tmp_path, monkeypatch):
    """Start the backend's local cluster, read the listening sockets of its processes, and check that any
    socket beyond the loopback belongs to a cluster with token authentication on."""
    ray = pytest.importorskip("ray")
    from test_sweep import tiny_sweep
    from splitveil.experiments.sweep import load_sweep, run_sweep

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    seen = {}
    shutdown = ray.shutdown

    def spy(*a, **k):
        if ray.is_initialized():
            seen["sockets"] = ray_security.listening_addresses()
            seen["auth"] = ray_security.token_auth_enabled()
        return shutdown(*a, **k)

    monkeypatch.setattr(ray, "shutdown", spy)
    sweep = load_sweep(tiny_sweep(tmp_path, "ray", points=[{"defense.name": "none"}]), out=tmp_path / "out")
    res = run_sweep(sweep, backend="ray", num_cpus=1, cpus_per_run=1, progress=False)
    assert res.complete
    sockets = seen["sockets"]
    assert sockets, "the Ray processes were not found"
    exposed = [s for s in sockets if not ray_security.is_loopback(s[1])]
    assert not exposed or seen["auth"] is True, (exposed, seen["auth"])
