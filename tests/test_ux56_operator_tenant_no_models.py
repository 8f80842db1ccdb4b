"""Tenants and their models and keys, in the operator. A Tenant with `models: []` (an empty list, as a template
that rendered none writes it): its keys may use no model, every request refused, while `kubectl get tenants` showed
it Ready/Applied like one of every model. Now its Ready condition's reason is NoModels, saying so (leaving the field
out is every model, ["*"])."""

from __future__ import annotations

import base64
import threading

import pytest

kopf = pytest.importorskip("kopf")


class _Store:
    def __init__(self, items: dict) -> None:
        self.items = items

    def by_name(self) -> dict:
        return dict(self.items)

    def add(self, body: dict) -> dict:
        self.items[body["name"]] = {**body, "enforced": True}
        return self.items[body["name"]]

    def update(self, name: str, live: dict) -> None:
        self.items[name].update(live)

    def remove(self, name: str) -> bool:
        return self.items.pop(name, None) is not None


class _Admin:  # the controller's admin API as the handlers call it: one model served
    def __init__(self) -> None:
        self.models, self.tenants = _Store({"m": {"name": "m", "aliases": [], "lora_modules": []}}), _Store({})


class _Kube:
    def secret_data(self, namespace, name):
        return {"k": base64.b64encode(b"tp-a-key-of-its-own").decode()}


@pytest.fixture
def reconcile(monkeypatch):
    monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "1")  # (as the other tests importing the handlers set it)
    from controller.operator import handlers

    memo = kopf.Memo(admin=_Admin(), kube=_Kube(), applied={}, served={}, locks={})
    memo.locks_guard = threading.Lock()

    def run(spec: dict, uid: str) -> dict:
        patch = kopf.Patch()
        handlers.reconcile_tenant(name=f"t-{uid}", namespace="tp", spec=spec, status={},
                                  meta={"uid": uid, "generation": 1}, patch=patch, memo=memo)
        return next(c for c in patch.status["conditions"] if c["type"] == "Ready")

    return run


def test_a_tenant_of_no_models_says_so(reconcile):
    ready = reconcile({"keysSecretRef": {"name": "s"}, "models": []}, "a")
    assert ready["status"] == "True" and ready["reason"] == "NoModels", ready
    assert ready["message"] == ("1 key(s); spec.models is empty: its keys may use no model, every request is refused "
                                "(leave spec.models out for every model)")


@pytest.mark.parametrize("models", [None, ["*"], ["m"]])
def test_a_tenant_of_models_is_applied(reconcile, models):
    spec = {"keysSecretRef": {"name": "s"}, **({} if models is None else {"models": models})}
    ready = reconcile(spec, "b")
    assert ready["status"] == "True" and ready["reason"] == "Applied", ready


def test_a_key_three_tenants_hold_is_named_as_the_oldest_ones(monkeypatch):
    """Tenants a (oldest), b and c hold one key: c's KeyConflict names a, whose the key is, whatever order their
    claims were made in (it named whichever older holder had claimed last: b when a had claimed before b, and the
    status went from one to the other between rounds; test_ux55_operator_key_conflict timed out waiting for 'a')."""
    monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "1")
    from controller.operator import handlers

    memo = kopf.Memo(key_claims={})
    memo.locks_guard = threading.Lock()
    meta = {n: {"uid": f"u-{n}", "creationTimestamp": f"2026-0{i}-01T00:00:00Z"} for i, n in enumerate("abc", 1)}
    for n in ("a", "b", "c"):  # (a claims before b: b is later in the claims' order)
        shared = handlers._claim_keys(memo, meta[n], "tp", n, ["tp-the-shared-key"])
    assert [owner[2] for owner in shared.values()] == ["a"]
    assert handlers._claim_keys(memo, meta["b"], "tp", "b", ["tp-the-shared-key"]).popitem()[1][2] == "a"
