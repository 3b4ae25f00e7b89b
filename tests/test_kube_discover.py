"""Where the agent finds its API server (control.kube.discover), no server
needed: the environment and a kubeconfig."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pcn_agent.control import kube


def test_kubeconfig_with_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kubeconfig user with a bearer token (what the bench's API server and
    many clusters hand out) gives its token to the agent's own client and to
    kopf's login; insecure-skip-tls-verify carries over."""
    kc = tmp_path / "kubeconfig"
    kc.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443",
                                               "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "s3cret"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    monkeypatch.delenv("PCN_KUBE_URL", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kc))
    ep = kube.discover()
    assert ep.server == "https://127.0.0.1:6443"
    assert ep.token == "s3cret"
    assert ep.insecure


def test_pcn_kube_url_comes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PCN_KUBE_URL", "http://127.0.0.1:8080/")
    monkeypatch.setenv("PCN_KUBE_TOKEN", "t")
    assert kube.discover() == kube.Endpoint("http://127.0.0.1:8080", "t")
