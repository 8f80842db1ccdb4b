"""The operator's admin-API client against a live controller, and the admin API's `key_hashes` on tenant
creation (a tenant whose keys the caller holds: only their hashes reach the controller)."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
import yaml

from controller.keys import hash_key, new_key
from controller.operator import builders as b
from controller.operator.admin import AdminClient, AdminError, AdminUnauthorized, AdminUnavailable
from load_tests.live_server import LiveServer
from tests import kmock_util

ADMIN = new_key("tpadmin")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN), "auth": True, "workers": {"local": "cpu", "standby": False},
           "autoscaler": {"enabled": False}, "models": [{"name": "from-config", "engine": {"kind": "pace"}}],
           "tenants": [{"name": "from-config-t", "key_hashes": [hash_key(new_key())]}]}
    srv = LiveServer(cfg, tmp_path_factory.mktemp("opadmin"))
    api = kmock_util.free_port()  # ports of kmock_util.PORTS, as the machines running the tests ask
    srv.port, srv.url = api, f"http://127.0.0.1:{api}"
    srv.config_path.write_text(yaml.safe_dump(dict(cfg, listen={"host": "127.0.0.1", "port": api}, workers=dict(
        cfg["workers"], listen={"host": "127.0.0.1", "port": kmock_util.free_port(skip=(api,))}))))
    with srv:
        yield srv


@pytest.fixture()
def admin(server) -> AdminClient:
    return AdminClient(server.url, ADMIN)


def test_tenant_with_given_key_hashes(server, admin):
    key = new_key()
    body = b.build_tenant_create("hashes-only", {"models": ["*"]}, b.tenant_key_hashes("hashes-only", [key]))
    made = admin.tenants.add(body)
    assert made["api_key"] is None  # no key made server side: the caller holds its keys
    assert "hashes-only" in admin.tenants.by_name()
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    c.models.list()
    with pytest.raises(AdminError, match="exists"):
        admin.tenants.add(body)
    assert admin.tenants.remove("hashes-only") and not admin.tenants.remove("hashes-only")
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_key_hashes_must_be_hashes(server):
    r = httpx.post(server.url + "/admin/tenants", headers={"Authorization": f"Bearer {ADMIN}"},
                   json={"name": "plain", "key_hashes": ["tp-a-plain-key"]})
    assert r.status_code in (400, 422) and "key_hashes" in r.text
    assert "tp-a-plain-key" not in str(httpx.get(server.url + "/admin/tenants",
                                                 headers={"Authorization": f"Bearer {ADMIN}"}).json())


def test_tenant_without_key_hashes_still_gets_a_key(admin):
    made = admin.tenants.add(b.build_tenant_create("fresh", {}, []))
    assert made["api_key"] and made["api_key"].startswith("tp-")
    admin.tenants.remove("fresh")


def test_models_inflight_and_removal(server, admin):
    body = b.build_model_spec("pace-a", {"engine": {"kind": "pace"}, "replicas": {"min": 1, "max": 1}})
    admin.models.add(body)
    assert b.model_matches(body, admin.models.by_name()["pace-a"])
    with pytest.raises(AdminError, match="already registered"):
        admin.models.add(body)
    key = new_key()
    admin.tenants.add(b.build_tenant_create("reader", {}, b.tenant_key_hashes("reader", [key])))
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    started, counts = threading.Event(), []

    def stream() -> None:
        for _ in c.completions.create(model="pace-a", prompt="x", max_tokens=60, stream=True):
            started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(30)
    counts.append(admin.inflight("pace-a"))
    t.join(30)
    counts.append(admin.inflight("pace-a"))
    assert counts == [1, 0]
    assert admin.models.remove("pace-a") and not admin.models.remove("pace-a")
    assert "pace-a" not in admin.models.by_name()
    admin.tenants.remove("reader")


def test_errors_are_told_apart(server):
    with pytest.raises(AdminUnauthorized, match="incorrect admin token.*TOKENPOOL_ADMIN_TOKEN"):
        AdminClient(server.url, "wrong").models.by_name()
    with pytest.raises(AdminUnavailable):
        AdminClient(f"http://127.0.0.1:{kmock_util.free_port()}", ADMIN, timeout_s=2).models.by_name()


def test_operator_command_says_what_it_needs(monkeypatch):
    """`tokenpool operator` without its admin token, or with both --namespace and --all-namespaces: exit 2, saying
    so (through CliRunner, as tests/test_ux56_operator_cli_env.py: kopf never starts)."""
    import os

    import kopf
    from typer.testing import CliRunner

    from controller.cli import app

    monkeypatch.setattr(kopf, "run", lambda **kw: pytest.fail("kopf started"))
    for k in [k for k in os.environ if k.startswith("TOKENPOOL_")]:
        monkeypatch.delenv(k)
    r = CliRunner().invoke(app, ["operator", "-n", "x"])
    assert r.exit_code == 2 and "TOKENPOOL_ADMIN_TOKEN" in r.output, r.output
    r = CliRunner().invoke(app, ["operator", "-n", "x", "-A"], env={"TOKENPOOL_ADMIN_TOKEN": "t"})
    assert r.exit_code == 2 and "not both" in r.output, r.output


def test_a_rename_before_the_status_landed_still_removes_the_old_name(admin, monkeypatch):
    """servedName changed while the object's status did not yet say what it was served as (the create's status
    patch still in flight: the update event carries the old status): the old name goes all the same."""
    import kopf

    # Importing the handlers registers them with kopf, timers included, at the resync interval read at import:
    # the one test_operator_e2e's operator (the same process, the same registry) runs with, or its timer-driven
    # steps wait the default interval (the e2e took 110 s and timed out after this test had imported them).
    monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "1")
    from controller.operator import handlers

    class Kube:  # the pool the model points at exists
        def pool(self, namespace, name):
            return {"metadata": {"name": name}}

    memo = kopf.Memo(admin=admin, kube=Kube(), applied={}, served={}, locks={})
    memo.locks_guard = threading.Lock()
    spec = {"engine": {"kind": "pace"}, "replicas": {"min": 0, "max": 1}}
    meta = {"uid": "u-ren", "generation": 1}
    handlers._reconcile_model(name="ren-a", namespace="tp", spec=spec, status={}, meta=meta, patch=kopf.Patch(),
                              memo=memo, runtime=None)
    assert "ren-a" in admin.models.by_name()
    renamed = dict(spec, servedName="ren-b")
    handlers._reconcile_model(name="ren-a", namespace="tp", spec=renamed, status={}, meta={**meta, "generation": 2},
                              patch=kopf.Patch(), memo=memo, runtime=None)
    names = admin.models.by_name()
    assert "ren-b" in names and "ren-a" not in names
    handlers.delete_model(name="ren-a", spec=renamed, status={}, meta={**meta, "generation": 2}, patch=kopf.Patch(),
                          memo=memo, runtime=None)
    assert not {"ren-a", "ren-b"} & set(admin.models.by_name())


def test_two_pooled_models_asking_for_one_served_name(admin, monkeypatch):
    """Two PooledModels with one servedName: the older one has it; the newer is Degraded (NameConflict) and
    neither replaces the older one's model in the controller nor removes it when deleted. (Before, the newer
    one's reconcile replaced the model with its own spec, the older one's timer put its own back, and so on,
    each time draining; and deleting either removed the model of both.)"""
    import kopf

    monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "1")  # see the test above
    from controller.operator import handlers

    class Kube:
        def pool(self, namespace, name):
            return {"metadata": {"name": name}}

    memo = kopf.Memo(admin=admin, kube=Kube(), applied={}, served={}, locks={})
    memo.locks_guard = threading.Lock()
    old = {"servedName": "shared-m", "engine": {"kind": "pace"}, "priority": 1, "replicas": {"min": 0, "max": 1}}
    new = dict(old, priority=9)
    meta_a = {"uid": "u-a", "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z"}
    meta_b = {"uid": "u-b", "generation": 1, "creationTimestamp": "2026-01-02T00:00:00Z"}
    objs = {"a": (old, meta_a), "b": (new, meta_b)}
    index = {}  # what kopf's index holds once both exist
    for n, (spec, meta) in objs.items():
        for key, value in handlers.served_names(name=n, namespace="tp", spec=spec, meta=meta).items():
            index.setdefault(key, []).append(value)

    def reconcile(n: str) -> kopf.Patch:
        spec, meta = objs[n]
        patch = kopf.Patch()
        handlers._reconcile_model(name=n, namespace="tp", spec=spec, status={}, meta=meta, patch=patch, memo=memo,
                                  runtime=None, served_names=index)
        return patch

    try:
        reconcile("a")
        assert admin.models.by_name()["shared-m"]["priority"] == 1
        patch = reconcile("b")
        assert admin.models.by_name()["shared-m"]["priority"] == 1  # the older one's model, untouched
        degraded = next(c for c in patch.status["conditions"] if c["type"] == "Degraded")
        assert degraded["status"] == "True" and degraded["reason"] == "NameConflict" and "tp/a" in degraded["message"]
        assert "served" not in patch.status
        reconcile("a")  # the older one's next round: nothing to put back
        handlers.delete_model(name="b", spec=new, status={}, meta=meta_b, patch=kopf.Patch(), memo=memo,
                              runtime=None, served_names=index)
        assert admin.models.by_name()["shared-m"]["priority"] == 1  # deleting the newer one left it
        index["shared-m"] = [v for v in index["shared-m"] if v[3] != "u-b"]
        handlers.delete_model(name="a", spec=old, status={"served": "shared-m"}, meta=meta_a, patch=kopf.Patch(),
                              memo=memo, runtime=None, served_names=index)
        assert "shared-m" not in admin.models.by_name()
    finally:
        admin.models.remove("shared-m")


def test_a_model_of_the_controllers_configuration_is_not_a_pooled_models(admin, monkeypatch):
    """A PooledModel whose served name a model of the controller's own configuration has: Degraded NameConflict;
    the configured model is neither replaced nor, when the PooledModel is deleted, removed. (Before, the operator
    re-registered it with the PooledModel's spec, and its deletion took the configured model away.)"""
    import kopf

    monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "1")
    from controller.operator import handlers

    class Kube:
        def pool(self, namespace, name):
            return {"metadata": {"name": name}}

    memo = kopf.Memo(admin=admin, kube=Kube(), applied={}, served={}, locks={})
    memo.locks_guard = threading.Lock()
    listed = admin.models.by_name()["from-config"]
    assert listed["source"] == "config"
    spec = {"servedName": "from-config", "engine": {"kind": "pace"}, "priority": 7}
    meta = {"uid": "u-c", "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z"}
    patch = kopf.Patch()
    handlers._reconcile_model(name="c", namespace="tp", spec=spec, status={}, meta=meta, patch=patch, memo=memo,
                              runtime=None)
    degraded = next(c for c in patch.status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "NameConflict"
    assert "configuration" in degraded["message"]
    handlers.delete_model(name="c", spec=spec, status={}, meta=meta, patch=kopf.Patch(), memo=memo, runtime=None)
    assert admin.models.by_name()["from-config"] == listed  # untouched, still served
    added = admin.models.add(b.build_model_spec("over-admin", {"engine": {"kind": "pace"}}))
    assert added["source"] == "admin"
    admin.models.remove("over-admin")


def test_a_tenant_whose_secret_lost_its_key_loses_it_too(server, admin, monkeypatch):
    """keysSecretRef.keys names the Secret's data keys to use: one removed from the Secret (a key revoked) is
    revoked in the controller too, as a deleted Secret is; and a Secret with no key leaves no tenant behind (the
    controller would have made a key of its own, shown to nobody). Before, the old key kept working under
    'Degraded InvalidSpec', and an empty Secret made the tenant Ready with 0 keys."""
    import base64

    import kopf

    monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "1")  # see the tests above
    from controller.operator import handlers

    key = new_key()
    secret = {"key-1": base64.b64encode(key.encode()).decode()}

    class Kube:
        def secret_data(self, namespace, name):
            return dict(secret)

    memo = kopf.Memo(admin=admin, kube=Kube(), applied={}, served={}, locks={})
    memo.locks_guard = threading.Lock()
    spec = {"keysSecretRef": {"name": "t-keys", "keys": ["key-1"]}}
    meta = {"uid": "u-t", "generation": 1}
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)

    def reconcile() -> dict:
        patch = kopf.Patch()
        handlers.reconcile_tenant(name="t-revoke", namespace="tp", spec=spec, status={}, meta=meta, patch=patch,
                                  memo=memo)
        return {c["type"]: c for c in patch.status["conditions"]} | {"keys": patch.status.get("keys")}

    try:
        assert reconcile()["Ready"]["status"] == "True"
        client.models.list()  # the key works
        secret.pop("key-1")
        secret["key-2"] = base64.b64encode(new_key().encode()).decode()
        st = reconcile()
        assert st["Degraded"]["status"] == "True" and st["Degraded"]["reason"] == "InvalidSecret" and st["keys"] == 0
        assert "key-1" in st["Degraded"]["message"]
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        assert "t-revoke" not in admin.tenants.by_name()
        spec["keysSecretRef"] = {"name": "t-keys"}  # every data key of the Secret: blank ones are no keys
        secret.clear()
        secret["blank"] = base64.b64encode(b"  \n").decode()
        st = reconcile()
        assert st["Degraded"]["reason"] == "NoKeys" and "t-revoke" not in admin.tenants.by_name()
    finally:
        admin.tenants.remove("t-revoke")


def test_one_tenant_name_one_tenant_resource_and_never_the_configurations(server, admin, monkeypatch):
    """Tenants of one name in two watched namespaces: the older has it; the newer is Degraded NameConflict and
    neither replaces nor revokes it (not when its own Secret is missing, not when it is deleted). A Tenant named as
    one of the controller's configuration is NameConflict too, and its deletion leaves that tenant. (Before, the
    newer replaced the older's keys with its own, and deleting either revoked the name.)"""
    import base64

    import kopf

    monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "1")
    from controller.operator import handlers

    key = new_key()
    secrets_by_ns = {"a": {"k": base64.b64encode(key.encode()).decode()}, "b": None}

    class Kube:
        def secret_data(self, namespace, name):
            return secrets_by_ns.get(namespace)

    memo = kopf.Memo(admin=admin, kube=Kube(), applied={}, served={}, locks={})
    memo.locks_guard = threading.Lock()
    spec = {"keysSecretRef": {"name": "keys"}}
    metas = {"a": {"uid": "u-a", "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z"},
             "b": {"uid": "u-b", "generation": 1, "creationTimestamp": "2026-01-02T00:00:00Z"}}
    index: dict = {}
    for ns, meta in metas.items():
        for k, v in handlers.tenant_names(name="dup", namespace=ns, meta=meta).items():
            index.setdefault(k, []).append(v)

    def reconcile(ns: str, name: str = "dup", meta: dict | None = None) -> dict:
        patch = kopf.Patch()
        handlers.reconcile_tenant(name=name, namespace=ns, spec=spec, status={}, meta=meta or metas[ns], patch=patch,
                                  memo=memo, tenant_names=index)
        return {c["type"]: c for c in patch.status["conditions"]}

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    try:
        assert reconcile("a")["Ready"]["status"] == "True"
        client.models.list()
        st = reconcile("b")  # its Secret is missing: it would revoke the name's keys if it acted
        assert st["Degraded"]["reason"] == "NameConflict" and "a/dup" in st["Degraded"]["message"]
        client.models.list()  # the older one's key still works
        handlers.delete_tenant(name="dup", status={}, meta=metas["b"], patch=kopf.Patch(), memo=memo, tenant_names=index)
        client.models.list()
        assert admin.tenants.by_name()["from-config-t"]["source"] == "config"
        cfg_meta = {"uid": "u-c", "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z"}
        st = reconcile("a", "from-config-t", cfg_meta)
        assert st["Degraded"]["reason"] == "NameConflict" and "configuration" in st["Degraded"]["message"]
        handlers.delete_tenant(name="from-config-t", status={}, meta=cfg_meta, patch=kopf.Patch(), memo=memo,
                               tenant_names=index)
        assert "from-config-t" in admin.tenants.by_name()
    finally:
        admin.tenants.remove("dup")


def test_a_pinned_model_shows_pinned(admin):
    """What the operator registers for a PooledModel with pin: true, the controller shows back as it was sent, so
    a converged reconcile re-registers nothing."""
    body = b.build_model_spec("pace-pinned", {"engine": {"kind": "pace"}, "pin": True})
    admin.models.add(body)
    try:
        actual = admin.models.by_name()["pace-pinned"]
        assert actual["pin"] is True and not b.model_reloads(body, actual) and b.model_matches(body, actual)
    finally:
        admin.models.remove("pace-pinned")


def test_a_pin_change_is_made_in_place(admin, server, monkeypatch):
    """A PooledModel's pin changed: the operator pins or unpins the live controller's model in place (it removed and
    registered it again: a drain, and a reload); the listing shows the pin of now, so a model unpinned through the
    admin API behind the operator's back is pinned again."""
    import time

    import kopf

    monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", "1")  # (see the rename test)
    from controller.operator import handlers

    class Kube:  # the pool the model points at exists
        def pool(self, namespace, name):
            return {"metadata": {"name": name}}

    memo = kopf.Memo(admin=admin, kube=Kube(), applied={}, served={}, locks={})
    memo.locks_guard = threading.Lock()
    meta, status = {"uid": "u-pin", "generation": 1}, {}

    def round_(spec: dict) -> dict:
        patch = kopf.Patch()
        handlers._reconcile_model(name="pin-m", namespace="tp", spec=spec, status=status, meta=meta, patch=patch,
                                  memo=memo, runtime=None)
        status.update(patch.status)
        return admin.models.by_name()["pin-m"]

    key = new_key()
    admin.tenants.add(b.build_tenant_create("pin-reader", {}, b.tenant_key_hashes("pin-reader", [key])))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)

    def created() -> int:  # when the controller registered the model (whole seconds)
        return next(m.created for m in client.models.list() if m.id == "pin-m")

    pinned = {"engine": {"kind": "pace"}, "pin": True, "replicas": {"min": 0, "max": 1}}
    try:
        assert round_(pinned)["pin"] is True
        first = created()
        time.sleep(1.1)
        meta["generation"] = 2
        unpinned = dict(pinned, pin=False)
        actual = round_(unpinned)
        assert actual["pin"] is False and actual["replicas"] == {"min": 0, "max": 1}
        assert b.model_matches(b.build_model_spec("pin-m", unpinned), actual)
        assert created() == first  # the same registration: not removed and registered again
        meta["generation"] = 3
        assert round_(pinned)["pin"] is True and created() == first
        r = httpx.post(server.url + "/admin/models/pin-m/unpin", headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200 and admin.models.by_name()["pin-m"]["pin"] is False
        assert round_(pinned)["pin"] is True and created() == first  # (a timer's round: pinned again)
    finally:
        admin.models.remove("pin-m")
        admin.tenants.remove("pin-reader")


def test_the_live_controller_takes_scale_to_zero_and_the_model_fields(admin):
    """What the operator sends for keepAlive, aliases, toolCallParser, preload and replicas.max 0 (scaled to zero),
    the controller takes, changes in place (PATCH) and shows back, so a converged round changes nothing."""
    spec = {"engine": {"kind": "pace"}, "keepAlive": "5m", "aliases": ["pace-zero-alias"], "toolCallParser": "hermes",
            "preload": True, "replicas": {"min": 0, "max": 2}}
    body = b.build_model_spec("pace-zero", spec)
    admin.models.add(body)
    try:
        actual = admin.models.by_name()["pace-zero"]
        assert actual["keep_alive"] == 300 and actual["aliases"] == ["pace-zero-alias"]
        assert b.model_matches(body, actual)
        for changed in (dict(spec, replicas={"min": 0, "max": 0}),  # kubectl scale --replicas 0
                        dict(spec, keepAlive=None, replicas={"min": 0, "max": 3})):
            want = b.build_model_spec("pace-zero", changed)
            assert b.same_registration(want, b.reload_digest(body))  # in place
            admin.models.update("pace-zero", b.live_fields(want))
            assert b.model_matches(want, admin.models.by_name()["pace-zero"]), changed
    finally:
        admin.models.remove("pace-zero")
