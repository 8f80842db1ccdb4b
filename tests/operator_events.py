"""The Kubernetes events the operator posts about an object, as its tests see them: the POSTs kmock's emulator got
(`posted`), or, for rounds run outside kopf, the handlers' calls of kopf.event and kopf.warn (`captured`). Shared by
the operator's tests (tests/test_ux62d_operator.py, tests/test_ux63b_dashboard_operator.py, tests/test_k8s52_events.py,
tests/test_k8s52_admin_token.py and tests/test_operator_lifecycle.py each had a copy of `posted`)."""

from __future__ import annotations

from tests.kmock_util import NS


def posted(kube, name: str, type: str | None = None) -> list[dict]:
    """The events the operator posted about object `name` (of `type`, "Normal" or "Warning", or any), in order. The
    requests, not the stored events: kmock keeps one event of a namespace (kopf's events have no generateName)."""
    return [r.data for r in kube.k8s if r.method.value == "POST" and r.url.path == f"/api/v1/namespaces/{NS}/events"
            and (type is None or r.data.get("type") == type)
            and (r.data.get("involvedObject") or {}).get("name") == name]


def captured(monkeypatch) -> list[tuple[str, str, str]]:
    """The events the operator's handlers post from here on, as (type, reason, message), in order: kopf.event and
    kopf.warn replaced (through `monkeypatch`: put back after the test). Outside kopf they would post nothing."""
    from controller.operator import handlers

    out: list[tuple[str, str, str]] = []
    monkeypatch.setattr(handlers.kopf, "event", lambda body, *, type, reason, message: out.append(
        (type, reason, message)))
    monkeypatch.setattr(handlers.kopf, "warn", lambda body, *, reason, message: out.append(
        ("Warning", reason, message)))
    return out
