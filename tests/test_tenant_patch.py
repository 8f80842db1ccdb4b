"""PATCH /admin/tenants/{name}: a tenant's limits, models, priority and SLO class changed in place. Through DELETE then
POST (the only way before) its keys answered 401 between the two calls and its usage counters restarted; in place,
its keys keep working, its usage, requests in flight and what is left in its buckets carry over."""

from __future__ import annotations

import yaml
from fastapi.testclient import TestClient

from controller.app import build_app
from controller.config import SLO, ServerConfig, TenantSpec
from controller.keys import hash_key
from controller.tenants import TenantRegistry

ADMIN = "admin-tenant-patch"
H = {"Authorization": f"Bearer {ADMIN}"}
KEY = "key-patch-abcdefghijklmnop"


def make(tmp_path) -> tuple[TestClient, object]:
    cfg = ServerConfig(admin_token_hash=hash_key(ADMIN), models=[], tenants_file=str(tmp_path / "tenants.yaml"),
                       slo_classes={"batch": SLO(ttft_s=60, tpot_s=1)},
                       tenants=[TenantSpec(name="cfg", key_hashes=[hash_key("key-cfg-abcdefghijklmnop")])])
    app = build_app(cfg)  # (no lifespan: no workers start)
    return TestClient(app), app.state.controller


def test_patch_changes_limits_in_place(tmp_path):
    c, ctl = make(tmp_path)
    body = {"name": "team", "key_hashes": [hash_key(KEY)], "models": ["a"], "rate": {"requests_per_s": 1, "burst": 2},
            "max_concurrent": 1}
    assert c.post("/admin/tenants", headers=H, json=body).status_code == 201
    t = ctl.tenants.authenticate(KEY)
    assert TenantRegistry.acquire(t, 10) is None  # one request in flight; one of the burst's two taken
    TenantRegistry.release(t, 10, 4, 6)  # ... and finished: usage counted
    assert TenantRegistry.acquire(t, 10) is None  # another in flight now

    r = c.patch("/admin/tenants/team", headers=H, json={"models": ["a", "b"], "max_concurrent": 3, "priority": 2,
                                                        "slo_class": "batch"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["models"], out["max_concurrent"], out["priority"], out["slo_class"]) == (["a", "b"], 3, 2, "batch")
    assert out["inflight"] == 1 and out["usage"] == {"requests": 1, "prompt_tokens": 4, "completion_tokens": 6}
    assert out["rate"]["requests_per_s"] == 1 and out["source"] == "admin"
    now = ctl.tenants.authenticate(KEY)  # the key still works, on the changed entry
    assert now is not None and now.may_use("b") and now.spec.max_concurrent == 3
    assert now.rps is t.rps  # the rate did not change: the same bucket, nothing refilled
    assert t.latest() is now  # the request that began before the change ends: counted on the tenant
    TenantRegistry.release(t.latest(), 10, 1, 1)
    assert now.inflight == 0 and now.usage["requests"] == 2
    assert c.get("/v1/usage", headers={"Authorization": f"Bearer {KEY}"}).json()["requests"] == 2

    # the bucket is not refilled by a change of rate: what was left is carried over (scaled to the new size)
    assert TenantRegistry.acquire(now, 1, now=now.rps.t) is not None  # the burst of 2 is spent
    r = c.patch("/admin/tenants/team", headers=H, json={"rate": {"requests_per_s": 0.1, "burst": 5}})
    assert r.status_code == 200 and r.json()["rate"]["burst"] == 5
    fresh = ctl.tenants.get("team")
    assert fresh.rps.level < 1 and TenantRegistry.acquire(fresh, 1, now=fresh.rps.t)[0] >= 1

    saved = yaml.safe_load((tmp_path / "tenants.yaml").read_text())  # kept for the next start, hashes only
    team = next(d for d in (saved["tenants"] if isinstance(saved, dict) else saved) if d["name"] == "team")
    assert team["models"] == ["a", "b"] and team["rate"]["requests_per_s"] == 0.1
    assert team["key_hashes"] == body["key_hashes"]
    # null clears the optional limits
    r = c.patch("/admin/tenants/team", headers=H, json={"max_concurrent": None, "slo_class": None, "rate": {}})
    assert r.status_code == 200 and (r.json()["max_concurrent"], r.json()["slo_class"]) == (None, None)
    assert ctl.tenants.get("team").rps is None


def test_patch_refusals(tmp_path):
    c, _ = make(tmp_path)
    assert c.post("/admin/tenants", headers=H, json={"name": "team"}).status_code == 201
    cases = [
        ("nobody", {"priority": 1}, 404, "tenant_not_found"),
        ("team", {"slo_class": "nope"}, 400, None),
        ("team", {"key_hashes": ["not-a-hash"]}, 400, None),  # keys are given as their hashes
        ("team", {"name": "other"}, 400, None),
        ("team", {"max_concurrent": 0}, 400, None),
        ("team", {"priority": None}, 400, None),
        ("cfg", {"priority": 1}, 409, "tenant_from_config"),  # the configuration file owns it
    ]
    for name, body, status, code in cases:
        r = c.patch(f"/admin/tenants/{name}", headers=H, json=body)
        assert r.status_code == status, (name, body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and (code is None or err["code"] == code), err
    assert c.patch("/admin/tenants/team", json={"priority": 1}).status_code == 401


def test_patch_rotates_keys_in_place(tmp_path):
    """PATCH key_hashes: a rotation with no gap (DELETE then POST answered the kept keys 401 between the two calls).
    A kept key works throughout; a dropped one is a 401 at once and its requests in flight are ended (the same
    revocation a DELETE schedules, limited to the dropped keys); the usage carries over; bad hashes are a 400."""
    c, ctl = make(tmp_path)
    k2, k3 = "key-patch-second-abcdefghij", "key-patch-third-abcdefghijk"
    h1, h2 = hash_key(KEY), hash_key(k2)  # (a kept key is the same hash: salted, a new hash of it is another)
    body = {"name": "team", "key_hashes": [h1, h2]}
    assert c.post("/admin/tenants", headers=H, json=body).status_code == 201
    t = ctl.tenants.authenticate(KEY)
    TenantRegistry.release(t, 1, 4, 6) if TenantRegistry.acquire(t, 1) is None else None
    revoked = []
    ctl.tenant_deleted = revoked.append  # (the live revocation is tests/test_tenant_key_removal_live.py's)
    r = c.patch("/admin/tenants/team", headers=H, json={"key_hashes": [h2, hash_key(k3)]})
    assert r.status_code == 200 and r.json()["usage"]["requests"] == 1, r.text
    assert ctl.tenants.authenticate(KEY) is None
    assert ctl.tenants.authenticate(k2) is ctl.tenants.authenticate(k3) is ctl.tenants.get("team")
    assert revoked == [t] and t.latest() is ctl.tenants.get("team")  # the old entry, succeeded: dropped keys only
    assert c.get("/v1/usage", headers={"Authorization": f"Bearer {k3}"}).json()["requests"] == 1
    for bad in ({"key_hashes": ["plain-key"]}, {"key_hashes": None}):
        r = c.patch("/admin/tenants/team", headers=H, json=bad)
        assert r.status_code == 400 and "key_hashes" in (r.json()["error"]["param"] or r.json()["error"]["message"])
    assert c.patch("/admin/tenants/team", headers=H, json={"priority": 1}).status_code == 200 and len(revoked) == 1
