"""A Tenant applied to a controller that runs without authentication (its configuration says `auth: false`, or has
neither `auth` nor a tenant at start): every caller is the controller's anonymous tenant, so the Tenant's keys,
model list and limits protect nothing. The admin API said so only in a warning of POST /admin/tenants, which the
operator dropped: the Tenant showed Ready/Applied. Now the admin API's tenants carry `enforced`, and the operator
marks such a Tenant Degraded (AuthenticationOff) with what to change.

The operator (kopf's KopfRunner) on kmock's Kubernetes emulator, reconciling into a live `tokenpool serve` (a pace
model on a CPU worker) without authentication.
"""

from __future__ import annotations

import asyncio
import base64

import pytest
from fastapi.testclient import TestClient

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from controller.app import build_app  # noqa: E402
from controller.config import ServerConfig  # noqa: E402
from controller.keys import hash_key, new_key  # noqa: E402
from load_tests.live_server import LiveServer  # noqa: E402
from tests.kmock_util import operator_world  # noqa: E402
from tests.test_operator_e2e import NS, Operator, _cond, _obj, _until  # noqa: E402

ADMIN = "admin-ux55-auth-off"


@pytest.mark.parametrize("auth", [False, True])
def test_the_admin_api_says_whether_a_tenant_is_enforced(auth):
    tenants = [{"name": "cfg", "key_hashes": [hash_key("tp-ux55-cfg")]}] if auth else []
    c = TestClient(build_app(ServerConfig(admin_token_hash=hash_key(ADMIN), models=[], tenants=tenants, auth=auth)))
    h = {"Authorization": f"Bearer {ADMIN}"}
    made = c.post("/admin/tenants", headers=h, json={"name": "team", "key_hashes": [hash_key("tp-ux55-team")]})
    assert made.status_code == 201 and made.json()["enforced"] is auth, made.text
    assert all(t["enforced"] is auth for t in c.get("/admin/tenants", headers=h).json())
    assert c.get("/admin/tenants/team", headers=h).json()["enforced"] is auth
    assert c.patch("/admin/tenants/team", headers=h, json={"priority": 2}).json()["enforced"] is auth


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_tenant_on_a_controller_without_authentication_is_degraded(tmp_path, monkeypatch):
    cfg = {"admin_token_hash": hash_key(ADMIN), "auth": False, "workers": {"local": "cpu", "standby": False},
           "models": [{"name": "pace-m", "path": None, "engine": {"kind": "pace"}}]}
    srv = await asyncio.to_thread(LiveServer(cfg, tmp_path / "srv").__enter__)
    try:
        async with operator_world(tmp_path, monkeypatch, kinds=("namespaces", "secrets", "events"), controller=None,
                                  controller_url=srv.url, admin_token=ADMIN, skip_ports=(srv.port,)) as w:
            kube = w.kube
            await kube.create("secrets", {"apiVersion": "v1", "kind": "Secret",
                                          "metadata": {"name": "keys", "namespace": NS},
                                          "data": {"k": base64.b64encode(new_key().encode()).decode()}})
            await kube.create("tenants", _obj("Tenant", "team-a", {"keysSecretRef": {"name": "keys"},
                                                                   "maxConcurrent": 2}))

            async def degraded():
                obj = await kube.get("tenants", "team-a")
                return obj if _cond(obj, "Degraded").get("status") == "True" else None

            async with Operator():
                obj = await _until("team-a Degraded", degraded, timeout=30)
                d = _cond(obj, "Degraded")
                assert d["reason"] == "AuthenticationOff" and "set auth: true" in d["message"], d
                assert _cond(obj, "Ready")["status"] == "False" and obj["status"]["keys"] == 1
                # (applied all the same: it takes effect once the controller runs with authentication)
                import httpx

                r = await asyncio.to_thread(httpx.get, srv.url + "/admin/tenants/team-a",
                                            headers={"Authorization": f"Bearer {ADMIN}"})
                assert r.status_code == 200 and r.json()["max_concurrent"] == 2 and r.json()["enforced"] is False
    finally:
        await asyncio.to_thread(srv.__exit__, None, None, None)
