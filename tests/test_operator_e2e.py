"""The operator end to end: kopf's KopfRunner against kmock's Kubernetes emulator, reconciling into a live
`tokenpool serve` (CPU worker, pace-engine model) that the official `openai` client then calls.

What kmock's emulator (0.8) does not do, and how this test deals with it:
- it sets no metadata.uid, generation or resourceVersion: the test's objects carry them (kopf's finalizer
  patch tests resourceVersion), and the test bumps generation with a spec change, as the API server would;
- it applies no CRD defaults or validation: the operator applies the same defaults itself
  (tests/test_manifests.py checks they equal the CRDs'), and the schemas are checked there with jsonschema;
- it has no scale subresource mapping (a PATCH to .../scale would merge {"spec": {"replicas": N}} into the
  object): the test patches spec.replicas.max, the field the CRD maps the scale subresource to;
- it has no garbage collector and no kubelet: the DaemonSet's ownerReference is asserted, not its deletion,
  and the DaemonSet's pods never run (the controller's own CPU worker stands in for the pool's engines);
- a watch replays the objects it listed, so kopf handles a creation twice: the test asserts the controller
  still saw each change once.
tests/test_operator_cluster.py covers the rest on a real cluster (KUBECONFIG).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")
openai = pytest.importorskip("openai")

from kopf.testing import KopfRunner  # noqa: E402

from controller.keys import hash_key, new_key  # noqa: E402
from load_tests.live_server import LiveServer  # noqa: E402
from tests.kmock_util import GV, NS, Cluster, free_port, operator_world  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _obj(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": GV, "kind": kind, "spec": spec,
            "metadata": {"name": name, "namespace": NS, "uid": str(uuid.uuid4()), "generation": 1, "resourceVersion": "1",
                         "creationTimestamp": "2026-01-01T00:00:00Z"}}


def _cond(obj: dict | None, type_: str = "Ready") -> dict:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return {}


async def _until(what: str, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


class Operator:
    """KopfRunner in its thread; entering and leaving off the event loop (the emulator serves on this loop)."""

    def __init__(self) -> None:
        self.runner = KopfRunner(["run", "--standalone", "--verbose", "-n", NS, "-m", "controller.operator.handlers"],
                                 timeout=30)

    async def __aenter__(self) -> KopfRunner:
        await asyncio.to_thread(self.runner.__enter__)
        return self.runner

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.runner.__exit__, None, None, None)
        if exc[0] is not None:  # what kopf did, for the failure's report (pytest shows a failed test's stdout)
            print("\n".join([ln for ln in self.runner.output.splitlines()
                              if "kopf.objects" in ln or "tokenpool.operator" in ln][-300:]))
        if os.environ.get("TOKENPOOL_OPERATOR_E2E_LOG_DIR"):  # every operator's whole log, to study a flaky run
            out = Path(os.environ["TOKENPOOL_OPERATOR_E2E_LOG_DIR"]) / f"operator-{time.time_ns()}.log"
            out.write_text(self.runner.output)


@pytest.mark.asyncio
@pytest.mark.timeout(150)
async def test_operator_end_to_end(tmp_path, monkeypatch):
    admin_token, tenant_key = new_key("tpadmin"), new_key()
    cfg = {"admin_token_hash": hash_key(admin_token), "auth": True,
           "workers": {"local": "cpu", "standby": False, "join_token_hash": hash_key(new_key("tpjoin"))},
           "autoscaler": {"enabled": False}}
    servers: list[LiveServer] = []

    def start_controller(port: int | None = None) -> LiveServer:
        """A fresh `tokenpool serve`; with `port`, on the port of the one before (a restarted controller). Its
        ports (API, workers) are of kmock_util.PORTS, as the machines running the tests ask."""
        s = LiveServer(cfg, tmp_path / f"srv{len(servers)}")
        port = port or free_port()
        workers = free_port(skip=(port,))
        s.port, s.url = port, f"http://127.0.0.1:{port}"
        s.config_path.write_text(yaml.safe_dump(dict(cfg, listen={"host": "127.0.0.1", "port": port}, workers=dict(
            cfg["workers"], listen={"host": "127.0.0.1", "port": workers}))))
        servers.append(s)
        return s.__enter__()

    try:
        await _run(await asyncio.to_thread(start_controller), start_controller, tmp_path, monkeypatch, admin_token,
                   tenant_key)
    finally:
        for s in servers:
            await asyncio.to_thread(s.__exit__, None, None, None)


async def _run(srv, start_controller, tmp_path, monkeypatch, admin_token, tenant_key) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {admin_token}"},
                                 timeout=10) as admin:
        await _scenario(admin, srv, start_controller, tmp_path, monkeypatch, admin_token, tenant_key)


async def _scenario(admin, srv, start_controller, tmp_path, monkeypatch, admin_token, tenant_key) -> None:
    async def controller(path: str) -> dict:
        r = await admin.get(path)
        r.raise_for_status()
        return {x.get("name") or x.get("id"): x for x in r.json()}

    await _until("the controller's CPU engine", lambda: _engine_alive(controller), timeout=60)

    async with operator_world(tmp_path, monkeypatch, kinds=("namespaces", "secrets", "daemonsets"), controller=None,
                              controller_url=srv.url, admin_token=admin_token, skip_ports=(srv.port,)) as w:
        kube, k8s = w.kube, w.k8s

        await kube.create("secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "team-a-keys", "namespace": NS},
                                      "data": {"key-1": base64.b64encode(tenant_key.encode()).decode()}})
        # The workers' join token, as the overlay's secretGenerator makes it (the pool's default joinTokenSecretRef)
        await kube.create("secrets", {"apiVersion": "v1", "kind": "Secret",
                                      "metadata": {"name": "tokenpool-join-token", "namespace": NS},
                                      "data": {"token": base64.b64encode(new_key("tpjoin").encode()).decode()}})
        await kube.create("gpupools", _obj("GPUPool", "default", {"gpusPerNode": 2, "hostCacheGB": 8}))
        await kube.create("pooledmodels", _obj("PooledModel", "pace-m", {
            "engine": {"kind": "pace"}, "slo": {"ttftSeconds": 5, "tpotSeconds": 0.5}, "priority": 3,
            "replicas": {"min": 1, "max": 2}, "drainTimeoutSeconds": 60}))
        await kube.create("tenants", _obj("Tenant", "team-a", {
            "keysSecretRef": {"name": "team-a-keys"}, "models": ["pace-*"], "priority": 1}))

        async with Operator() as first:
            # The controller gets the model and the tenant; every status goes Ready.
            await _until("the model in the controller", lambda: _has(controller, "/admin/models", "pace-m"))
            await _until("the tenant in the controller", lambda: _has(controller, "/admin/tenants", "team-a"))
            model = (await controller("/admin/models"))["pace-m"]
            assert model["replicas"] == {"min": 1, "max": 2} and model["priority"] == 3 and model["slo"]["tpot_s"] == 0.5
            for plural, name in (("pooledmodels", "pace-m"), ("tenants", "team-a"), ("gpupools", "default")):
                obj = await _until(f"{plural}/{name} Ready", lambda p=plural, n=name: _ready(kube, p, n))
                assert _cond(obj)["observedGeneration"] == 1
                assert {c["type"] for c in obj["status"]["conditions"]} == {"Ready", "Progressing", "Degraded"}
            pm = await kube.get("pooledmodels", "pace-m")
            assert pm["status"]["registered"] and pm["status"]["replicas"] >= 1
            assert (await kube.get("tenants", "team-a"))["status"]["keys"] == 1
            assert (await kube.get("gpupools", "default"))["status"]["enginesReady"] >= 1
            ds = await kube.get("daemonsets", "tokenpool-workers-default")
            assert ds is not None and [c["name"] for c in ds["spec"]["template"]["spec"]["containers"]] == ["worker-0", "worker-1"]
            assert ds["metadata"]["ownerReferences"][0]["kind"] == "GPUPool"
            # Only the hash reached the controller: the key works on the API, a wrong one does not.
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key=tenant_key, max_retries=0)
            out = await asyncio.to_thread(client.completions.create, model="pace-m", prompt="hi", max_tokens=3)
            assert out.usage.completion_tokens == 3
            with pytest.raises(openai.AuthenticationError):
                await asyncio.to_thread(openai.OpenAI(base_url=srv.url + "/v1", api_key=new_key(), max_retries=0)
                                        .completions.create, model="pace-m", prompt="hi", max_tokens=1)

            # Scale (what HPA does through the scale subresource: spec.replicas.max), a new generation.
            await kube.patch("pooledmodels", "pace-m", {"metadata": {"generation": 2}, "spec": {"replicas": {"max": 3}}})
            await _until("max replicas 3 in the controller",
                         lambda: _match(controller, "/admin/models", "pace-m", lambda m: m["replicas"]["max"] == 3))
            await _until("observedGeneration 2", lambda: _ready(kube, "pooledmodels", "pace-m", generation=2))

            # A pool change rolls into its DaemonSet (a JSON merge patch: the container list is replaced whole).
            await kube.patch("gpupools", "default", {"metadata": {"generation": 2}, "spec": {"gpusPerNode": 3}})
            await _until("3 workers per node", lambda: _containers(kube, 3))
            await _until("pool observedGeneration 2", lambda: _ready(kube, "gpupools", "default", generation=2))

            # What the controller cannot take is Degraded, with the reason; nothing reaches the controller.
            await kube.create("pooledmodels", _obj("PooledModel", "no-path", {"source": {}}))
            await kube.create("pooledmodels", _obj("PooledModel", "no-pool", {"engine": {"kind": "pace"},
                                                                               "poolRef": "elsewhere"}))
            bad = await _until("InvalidSpec", lambda: _reason(kube, "pooledmodels", "no-path", "InvalidSpec", "Degraded"))
            assert "path is required" in _cond(bad, "Degraded")["message"] and _cond(bad)["status"] == "False"
            await _until("PoolNotFound", lambda: _reason(kube, "pooledmodels", "no-pool", "PoolNotFound", "Degraded"))
            assert set(await controller("/admin/models")) == {"pace-m"}
            for n in ("no-path", "no-pool"):
                await kube.delete("pooledmodels", n)
                await _until(f"{n} gone", lambda n=n: _absent(kube, "pooledmodels", n))

            # A new servedName moves the model: the old name goes, the new one comes; deletion takes the new one.
            await kube.create("pooledmodels", _obj("PooledModel", "ren", {"engine": {"kind": "pace"}}))
            await _until("ren in the controller", lambda: _has(controller, "/admin/models", "ren"))
            await kube.patch("pooledmodels", "ren", {"metadata": {"generation": 2}, "spec": {"servedName": "ren-2"}})
            await _until("ren-2 in the controller", lambda: _has(controller, "/admin/models", "ren-2"))
            assert "ren" not in await controller("/admin/models")
            assert (await _until("ren Ready", lambda: _ready(kube, "pooledmodels", "ren", 2)))["status"]["served"] == "ren-2"
            # Deleted while a timer round runs (a round runs in a thread and cannot be stopped; kopf keeps the
            # finalizer until it has returned): the round is held until the delete handler has run, so the race
            # happens every time, not only on a loaded machine.
            with _timer_round_held(monkeypatch, "ren") as held:
                assert await asyncio.to_thread(held.entered.wait, 15), ("no timer round of ren", first.output[-4000:])
                await kube.delete("pooledmodels", "ren")
                await _until("ren-2 removed", lambda: _gone(controller, "/admin/models", "ren-2"))
            await _until("ren gone", lambda: _absent(kube, "pooledmodels", "ren"))  # finalizer released
            assert "ren-2" not in await controller("/admin/models")  # the held round did not bring it back

            # Restart the operator: nothing changes (no admin-API mutation; statuses and the tenant's usage stay).
            before = {p: (await kube.get(p, n))["status"] for p, n in
                      (("pooledmodels", "pace-m"), ("tenants", "team-a"), ("gpupools", "default"))}
            usage = (await controller("/admin/tenants"))["team-a"]["usage"]["requests"]
            assert usage == 1
        # Each change reached the controller once, however often kopf ran the handlers (kmock replays a watch's
        # initial listing, so creation is handled twice): one POST per tenant and model; a model's scale is a PATCH
        # in place (it stays loaded, its requests run on), never a DELETE and a POST.
        assert first.output.count("admin POST /admin/tenants team-a") == 1 and "admin DELETE /admin/tenants" not in first.output
        assert first.output.count("admin POST /admin/models pace-m") == 1
        assert first.output.count("admin PATCH /admin/models/pace-m") == 1
        assert "admin DELETE /admin/models/pace-m" not in first.output

        tenant_reads = _secret_reads(k8s, "team-a-keys")
        with _rounds_seen(monkeypatch) as rounds:
            async with Operator() as second:  # resume handlers, then timer rounds (every second)
                await _until("resumed, then a timer round of each", lambda: _each_round(rounds, k8s, tenant_reads))
        assert "admin POST" not in second.output and "admin DELETE" not in second.output, second.output[-3000:]
        assert "reconcile_model" in second.output  # the handlers did run
        for p, n in (("pooledmodels", "pace-m"), ("tenants", "team-a"), ("gpupools", "default")):
            after = (await kube.get(p, n))["status"]
            assert after == before[p], (p, before[p], after)
        assert (await controller("/admin/tenants"))["team-a"]["usage"]["requests"] == usage

        async with Operator():
            # Level-triggered: a restarted controller (models and tenants made over its admin API are gone) gets
            # them back from the periodic reconcile, with no change to any resource.
            resync = sys.modules["controller.operator.handlers"].RESYNC_S
            await asyncio.to_thread(srv.__exit__, None, None, None)
            srv = await asyncio.to_thread(start_controller, srv.port)
            # (its config has no models or tenants: whatever it serves now came from the operator)
            await _until("the model back", lambda: _has(controller, "/admin/models", "pace-m"), timeout=2 * resync + 20)
            await _until("the tenant back", lambda: _has(controller, "/admin/tenants", "team-a"), timeout=2 * resync + 20)
            await _until("the model Ready again", lambda: _ready(kube, "pooledmodels", "pace-m", generation=2))
            model = (await controller("/admin/models"))["pace-m"]
            assert model["replicas"] == {"min": 1, "max": 3} and model["priority"] == 3
            out = await asyncio.to_thread(openai.OpenAI(base_url=srv.url + "/v1", api_key=tenant_key, max_retries=0)
                                          .completions.create, model="pace-m", prompt="hi", max_tokens=2)
            assert out.usage.completion_tokens == 2

            # Rotating the key in the Secret reaches the controller with the next reconcile round.
            rotated = new_key()
            secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "team-a-keys", "namespace": NS},
                      "data": {"key-1": base64.b64encode(rotated.encode()).decode()}}
            await kube.patch("secrets", "team-a-keys", {"data": secret["data"]})
            await _until("the rotated key works", lambda: _key_works(srv.url, rotated), timeout=2 * resync + 20)
            assert not await _key_works(srv.url, tenant_key)
            tenant_key = rotated

            # No Secret, no keys: the tenant is revoked (Degraded) until the Secret is back.
            await kube.delete("secrets", "team-a-keys")
            await _until("SecretNotFound", lambda: _reason(kube, "tenants", "team-a", "SecretNotFound", "Degraded"))
            assert not await _key_works(srv.url, tenant_key)
            await kube.create("secrets", secret)
            await _until("the key works again", lambda: _key_works(srv.url, tenant_key), timeout=2 * resync + 20)

            # Delete while a request streams: the finalizer drains it (the stream finishes), then removes the model.
            # The late request below must come while it still streams: at the pace model's 0.02 s a token, 120 tokens
            # (2.4 s) ended first on a loaded 2-core machine, where the drain's status took ~1.5 s to appear and the
            # test as long again to send it (then the model was gone: 404, not 503). So the late request is asked
            # from the delete on, until it is refused (accepted ones before the drain run their 2 tokens), and the
            # status is read after it: the stream need only outlast the operator's delete handler and that status,
            # and 300 tokens (~6 s) do, four times over (500 streamed ~10 s: 4 s of the suite waiting on its end).
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key=tenant_key, max_retries=0)
            stream_done: dict = {}
            first_chunk = threading.Event()

            def consume() -> None:
                n, reason = 0, None
                for ch in client.completions.create(model="pace-m", prompt="hi", max_tokens=300, stream=True):
                    first_chunk.set()
                    n += 1
                    reason = ch.choices[0].finish_reason or reason
                stream_done.update(n=n, reason=reason, t=time.monotonic())

            reader = asyncio.create_task(asyncio.to_thread(consume))
            await asyncio.to_thread(first_chunk.wait, 10)
            await kube.delete("pooledmodels", "pace-m")
            late = await _until("a late request refused", lambda: _refused(srv.url, tenant_key), timeout=15)
            # drained: a new request is refused while its request finishes (a 404 here: the model was gone already)
            assert late.status_code == 503 and late.json()["error"]["code"] == "model_draining", late.text
            assert "pace-m" in await controller("/admin/models")  # still served while its request runs
            draining = await _until("Draining", lambda: _reason(kube, "pooledmodels", "pace-m", "Draining"))
            assert _cond(draining, "Progressing")["status"] == "True"
            await _until("the model leaves the controller",
                         lambda: _gone(controller, "/admin/models", "pace-m"), timeout=30)
            removed_at = time.monotonic()
            await reader
            assert stream_done["reason"] == "length" and stream_done["n"] >= 100  # finished, not aborted
            assert stream_done["t"] <= removed_at
            await _until("the resource is gone (finalizer released)", lambda: _absent(kube, "pooledmodels", "pace-m"))

            # Deleting the tenant revokes its key.
            await kube.delete("tenants", "team-a")
            await _until("tenant removed", lambda: _gone(controller, "/admin/tenants", "team-a"))

        # Every Kubernetes API call the operators made (kopf's and its own) is one the operator's Role allows:
        # in a cluster a missing verb is a 403 at run time.
        _assert_role_allows(_operator_calls(k8s))


VERBS = {("GET", "FETCH"): "get", ("GET", "LIST"): "list", ("GET", "WATCH"): "watch", ("POST", "CREATE"): "create",
         ("PATCH", "UPDATE"): "patch", ("PUT", "UPDATE"): "update", ("DELETE", "DELETE"): "delete"}


def _operator_calls(k8s) -> set[tuple[str, str, str]]:
    """(API group, resource[/subresource], RBAC verb) of each resource request made with the kubeconfig's token:
    the operator's (this test's own requests carry none). Discovery (/api, /apis/...) needs no Role."""
    out = set()
    for r in k8s:
        if r.headers.get("Authorization") != "Bearer kmock" or r.resource is None or not r.resource.plural:
            continue
        verb = VERBS[(r.method.value, r.action.value)]
        out.add((r.resource.group or "", r.resource.plural + (f"/{r.subresource}" if r.subresource else ""), verb))
    return out


def _assert_role_allows(calls: set[tuple[str, str, str]]) -> None:
    rbac = [d for d in yaml.safe_load_all((ROOT / "manifests" / "base" / "rbac.yaml").read_text()) if d]
    rules = next(d for d in rbac if d["kind"] == "Role" and d["metadata"]["name"] == "tokenpool-operator")["rules"]
    assert {c[1] for c in calls} >= {"pooledmodels", "tenants", "gpupools", "daemonsets", "secrets"}, calls
    denied = sorted(c for c in calls if not any(c[0] in r["apiGroups"] and c[1] in r["resources"] and c[2] in r["verbs"]
                                                for r in rules))
    assert not denied, f"the operator's Role does not allow {denied}"


class _Held:
    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()


@contextlib.contextmanager
def _timer_round_held(monkeypatch, name: str):
    """The next timer round of PooledModel `name` waits inside its handler (in kopf's thread) until the block ends."""
    handlers = sys.modules["controller.operator.handlers"]
    original, held = handlers._reconcile_model, _Held()

    def reconcile(*, runtime, **kw):
        if kw["name"] == name and runtime is None and not held.entered.is_set():  # a timer round: runtime None
            held.entered.set()
            held.release.wait(60)
        return original(runtime=runtime, **kw)

    with monkeypatch.context() as m:
        m.setattr(handlers, "_reconcile_model", reconcile)
        try:
            yield held
        finally:
            held.release.set()


@contextlib.contextmanager
def _rounds_seen(monkeypatch):
    """How many PooledModel rounds (`resume`: a change or resume handler's; `timer`) and GPUPool timer rounds ran to
    their end while the block runs."""
    handlers = sys.modules["controller.operator.handlers"]
    model, pool, seen = handlers._reconcile_model, handlers.reconcile_pool, {"resume": 0, "timer": 0, "pool": 0}

    def reconcile(*, runtime, **kw):
        try:
            return model(runtime=runtime, **kw)
        finally:
            seen["timer" if runtime is None else "resume"] += 1

    def pool_round(**kw):  # (resync_pool's call: a pool's resume handler is kopf's own call of the original)
        try:
            return pool(**kw)
        finally:
            seen["pool"] += 1

    with monkeypatch.context() as m:
        m.setattr(handlers, "_reconcile_model", reconcile)
        m.setattr(handlers, "reconcile_pool", pool_round)
        yield seen


def _secret_reads(k8s, name: str) -> int:
    """The operator's reads of Secret `name` (a Tenant's round reads its keys' Secret)."""
    return sum(1 for r in k8s if r.headers.get("Authorization") == "Bearer kmock" and r.method.value == "GET"
               and r.url.path == f"/api/v1/namespaces/{NS}/secrets/{name}")


async def _each_round(rounds: dict, k8s, tenant_reads: int) -> bool:
    """The model's resume handler and a timer round of it and of the pool ran; the tenant's resume and a round."""
    return (rounds["resume"] >= 1 and rounds["timer"] >= 1 and rounds["pool"] >= 1
            and _secret_reads(k8s, "team-a-keys") >= tenant_reads + 2)


async def _engine_alive(controller) -> bool:
    return any(e["alive"] for e in (await controller("/admin/engines")).values())


async def _has(controller, path: str, name: str) -> bool:
    return name in await controller(path)


async def _gone(controller, path: str, name: str) -> bool:
    return name not in await controller(path)


async def _match(controller, path: str, name: str, pred) -> bool:
    x = (await controller(path)).get(name)
    return x is not None and pred(x)


async def _ready(kube: Cluster, plural: str, name: str, generation: int | None = None) -> dict | None:
    obj = await kube.get(plural, name)
    c = _cond(obj)
    if c.get("status") == "True" and (generation is None or c.get("observedGeneration") == generation):
        return obj
    return None


async def _reason(kube: Cluster, plural: str, name: str, reason: str, type_: str = "Progressing") -> dict | None:
    obj = await kube.get(plural, name)
    c = _cond(obj, type_)
    return obj if c.get("reason") == reason and c.get("status") == "True" else None


async def _containers(kube: Cluster, n: int) -> bool:
    ds = await kube.get("daemonsets", "tokenpool-workers-default")
    return ds is not None and len(ds["spec"]["template"]["spec"]["containers"]) == n


async def _key_works(url: str, key: str) -> bool:
    try:
        await asyncio.to_thread(openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).models.list)
        return True
    except openai.AuthenticationError:
        return False


async def _refused(url: str, key: str) -> httpx.Response | None:
    """A completion request's response unless it was served (200): None then."""
    r = await asyncio.to_thread(lambda: httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                                                   json={"model": "pace-m", "prompt": "hi", "max_tokens": 2}, timeout=10))
    return None if r.status_code == 200 else r


async def _absent(kube: Cluster, plural: str, name: str) -> bool:
    return await kube.get(plural, name) is None

