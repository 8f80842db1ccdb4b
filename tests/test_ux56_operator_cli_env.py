"""`tokenpool operator` where it cannot run: each said in one line before kopf starts, exit 2. Without Kubernetes
access (not in a pod, no kubeconfig) kopf's start-up failed and retried every minute, a traceback each time, never
ending; an unreadable TOKENPOOL_ADMIN_TOKEN_FILE was a traceback; a TOKENPOOL_CONTROLLER_URL that is no URL was
taken (every call to the controller then failed); a --liveness kopf cannot serve stopped the operator after its
start with kopf's "Unsupported scheme" traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

pytest.importorskip("kopf")

from controller.cli import app  # noqa: E402

GOOD = {"TOKENPOOL_ADMIN_TOKEN": "t", "TOKENPOOL_CONTROLLER_URL": "http://127.0.0.1:18399", "COLUMNS": "200"}


@pytest.fixture
def no_kopf_run(monkeypatch, tmp_path):
    import kopf

    monkeypatch.setattr(kopf, "run", lambda **kw: pytest.fail("kopf started"))
    monkeypatch.setenv("HOME", str(tmp_path))  # (no ~/.kube/config)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # (not in a pod)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    # (the client library fixed its default from KUBECONFIG when first imported)
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", "~/.kube/config")
    monkeypatch.delenv("TOKENPOOL_ADMIN_TOKEN_FILE", raising=False)


def _run(env: dict, *args: str):
    r = CliRunner().invoke(app, ["operator", "-n", "tp", *args], env=env)
    return r.exit_code, " ".join(r.output.split())


@pytest.mark.parametrize("env,says", [
    ({}, "tokenpool operator: no Kubernetes API to use: not in a pod (no service account) and no kubeconfig "
         "(KUBECONFIG, else ~/.kube/config): "),
    ({"KUBECONFIG": "/nonexistent/kubeconfig"}, "no kubeconfig (KUBECONFIG /nonexistent/kubeconfig): "),
    ({"TOKENPOOL_ADMIN_TOKEN": "", "TOKENPOOL_ADMIN_TOKEN_FILE": "/nonexistent/token"},
     "tokenpool operator: cannot read TOKENPOOL_ADMIN_TOKEN_FILE /nonexistent/token: No such file or directory"),
    ({"TOKENPOOL_CONTROLLER_URL": "tokenpool-controller"},
     "tokenpool operator: TOKENPOOL_CONTROLLER_URL 'tokenpool-controller' is not an http(s) URL of the controller's "
     "API (e.g. http://tokenpool-controller:8000)"),
], ids=["no-kubernetes", "kubeconfig-missing", "token-file-missing", "controller-url"])
def test_what_keeps_the_operator_from_running_is_one_line(no_kopf_run, env, says):
    code, out = _run({**GOOD, **env})
    assert code == 2 and says in out and "Traceback" not in out, out


@pytest.mark.parametrize("value", ["healthz", "https://0.0.0.0:8080/healthz", "http://0.0.0.0:port/healthz"])
def test_a_liveness_endpoint_kopf_cannot_serve_is_a_usage_error(no_kopf_run, value):
    code, out = _run(GOOD, "--liveness", value)
    assert code == 2 and "Invalid value for '--liveness'" in out and value in out, out


def test_a_liveness_endpoint_kopf_serves_is_taken(no_kopf_run):
    code, out = _run(GOOD, "--liveness", "http://0.0.0.0:8080/healthz")
    assert code == 2 and "no Kubernetes API to use" in out, out  # (past the option: then no cluster here)
