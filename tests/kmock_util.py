"""What the operator's tests against kmock (a Kubernetes API emulator) share."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from tests import ports

ROOT = Path(__file__).resolve().parent.parent
NS = "tp"  # the namespace the operator's tests work in
GV = "tokenpool.dev/v1alpha1"


def write_kubeconfig(k8s, path: Path, namespace: str) -> Path:
    """A kubeconfig at `path` whose current context is the emulator `k8s`, in `namespace`."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(k8s.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "kmock"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": namespace}}]}))
    return path


PORTS = range(18300, 18400)  # the TCP ports these tests keep to (a machine shared with other test runs)


def free_port(skip: tuple[int, ...] = ()) -> int:
    """A free port of PORTS (not one of `skip`) for a kmock.Server or a live server."""
    return ports.free_port(PORTS, skip)


class FakeController:
    """The controller's admin API as the operator uses it, on a kmock.RawHandler: models and tenants kept in
    dicts, so a test sees what the operator changed and counts the requests it made (`handler['get /admin/models']`)."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.models: dict[str, dict] = {}
        self.tenants: dict[str, dict] = {}
        self.engines: list[dict] = []
        self.down = False  # True: every request is a 503 (the controller's Service has no endpoint)
        h = handler
        up = self._up
        h["get /admin/models"] << up(lambda req: list(self.models.values()))
        h["post /admin/models"] << up(lambda req: {"dry_run": True, "name": req.data["name"]}  # (taken as it is)
                                      if req.url.query.get("dry_run") == "true" else
                                      self._add(self.models, req.data, self._model))
        h["get /admin/tenants"] << up(lambda req: list(self.tenants.values()))
        h["post /admin/tenants"] << up(lambda req: self._add(self.tenants, req.data, self._tenant))
        h["get /admin/engines"] << up(lambda req: self.engines)
        for kind, store in (("models", self.models), ("tenants", self.tenants)):
            one = re.compile(rf"/admin/{kind}/.+")
            h["delete", one] << up(lambda req, s=store: self._remove(s, req))
            h["post", re.compile(rf"/admin/{kind}/.+/drain")] << up(lambda req, s=store: self._remove(s, req, True))
            h["patch", one] << up(lambda req, s=store: self._patch(s, req))

    def _up(self, fn):
        def answer(req):
            from kmock import Response

            if self.down:
                return Response(status=503, payload="no endpoints available")
            out = fn(req)  # (a status once answered sticks to the reaction: always give one)
            return out if isinstance(out, Response) else Response(status=200, payload=out)

        return answer

    @staticmethod
    def _name(req, drain: bool = False) -> str:
        from urllib.parse import unquote

        path = req.url.path.split("/admin/", 1)[1].split("/", 1)[1]
        return unquote(path[: -len("/drain")] if drain else path)

    @staticmethod
    def _model(body: dict) -> dict:
        return {"name": body["name"], "path": body.get("path"), "lora_modules": body.get("lora_modules") or [],
                "slo": body["slo"], "priority": body["priority"], "replicas": body["replicas"], "engines": ["e0"],
                "slo_attainment": None, "pin": body.get("pin", False), "source": "admin"}

    @staticmethod
    def _tenant(body: dict) -> dict:
        return {k: body[k] for k in ("name", "models", "rate", "max_concurrent", "priority", "slo_class")} | {
            "inflight": 0, "usage": {}, "source": "admin"}

    def _add(self, store: dict, body: dict, out):
        from kmock import Response

        if body["name"] in store:
            return Response(status=409, payload={"error": {"message": f"{body['name']} already registered"}})
        store[body["name"]] = out(body)
        return Response(status=201, payload=store[body["name"]])

    def _remove(self, store: dict, req, drain: bool = False):
        from kmock import Response

        name = self._name(req, drain)
        if name not in store:
            return Response(status=404, payload={"error": {"message": f"no {name}"}})
        if not drain:
            del store[name]
        return {}

    def _patch(self, store: dict, req):
        from kmock import Response

        name = self._name(req)
        if name not in store:
            return Response(status=404, payload={"error": {"message": f"no {name}"}})
        store[name].update({k: v for k, v in req.data.items() if k != "key_hashes"})  # (never shown back)
        return store[name]

    def count(self, method: str, path: str) -> int:
        """Requests made so far of `method` on exactly `path`."""
        return sum(1 for r in self.handler if r.method.value == method and r.url.path == path)


def forget_requests(handler, keep: int = 50) -> int:
    """Drop all but the last `keep` requests that the kmock handler `handler` (a KubernetesEmulator, a RawHandler)
    remembers; how many it dropped. kmock keeps every request, and matches each new one against its reactions by
    going through that whole log once per reaction it tries (a KubernetesEmulator has a dozen): a request costs time
    in proportion to the requests before it (a PATCH took ~15 ms with 40 remembered, ~90 ms with 290, here). For a
    long test, between its steps; never where the test still counts requests from before (FakeController.count, the
    RBAC test's log). The last `keep` stay: a request being matched now is one of them. kmock's private list
    (kmock 0.8; tests/test_ux58c_kmock_request_log.py fails where a release moved it)."""
    log = handler._requests
    n = max(0, len(log) - keep)
    del log[:n]
    return n


def declare_crds(k8s) -> None:
    """Discovery info for kopf, taken from the CRDs in manifests/ (so kopf sees what a cluster would serve)."""
    import kmock

    for f in sorted((ROOT / "manifests" / "crds").glob("*.yaml")):
        crd = yaml.safe_load(f.read_text())
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        n, v = crd["spec"]["names"], crd["spec"]["versions"][0]
        k8s.resources[f"{crd['spec']['group']}/{v['name']}/{n['plural']}"] = kmock.ResourceInfo(
            kind=n["kind"], singular=n["singular"], shortnames=set(n.get("shortNames", [])), namespaced=True,
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            subresources=set(v.get("subresources", {})))


class Cluster:
    """Plain HTTP against the emulator, the way kubectl would talk to an API server."""

    def __init__(self, k8s) -> None:
        self.k8s = k8s

    def _path(self, plural: str, name: str | None = None) -> str:
        base = f"/api/v1/namespaces/{NS}/{plural}" if plural in ("secrets",) else (
            f"/apis/apps/v1/namespaces/{NS}/{plural}" if plural == "daemonsets" else f"/apis/{GV}/namespaces/{NS}/{plural}")
        return base if name is None else f"{base}/{name}"

    async def create(self, plural: str, body: dict) -> None:
        r = await self.k8s.post(self._path(plural), json=body)
        assert r.status < 300, await r.text()

    async def get(self, plural: str, name: str) -> dict | None:
        r = await self.k8s.get(self._path(plural, name))
        return await r.json() if r.status == 200 else None

    async def patch(self, plural: str, name: str, body: dict) -> None:
        r = await self.k8s.patch(self._path(plural, name), json=body,
                                 headers={"Content-Type": "application/merge-patch+json"})
        assert r.status < 300, await r.text()

    async def delete(self, plural: str, name: str) -> None:
        r = await self.k8s.delete(self._path(plural, name))
        assert r.status < 300, await r.text()


# The built-in kinds an operator test may declare in the emulator (kmock serves only what it is told of): the path
# kopf and the Kubernetes client use, the kind, whether namespaced.
KINDS = {"namespaces": ("v1/namespaces", "Namespace", False), "secrets": ("v1/secrets", "Secret", True),
         "daemonsets": ("apps/v1/daemonsets", "DaemonSet", True), "events": ("v1/events", "Event", True),
         "pods": ("v1/pods", "Pod", True)}
OPERATOR_KINDS = ("namespaces", "secrets", "daemonsets", "events")  # what the operator itself reads and writes
# A Tenant's keys (Secret `keys`, key `k`) and the workers' join token (the GPUPools' default joinTokenSecretRef)
SECRETS = {"keys": ("k", b"tp-some-key"), "tokenpool-join-token": ("token", b"tp-some-key")}


@dataclasses.dataclass
class World:
    """What `operator_world` made: the emulator (`k8s`), kubectl's view of it (`kube`, a Cluster),
    the fake controller (`fake`: None where the test runs a live one) and its URL, the kubeconfig."""

    k8s: Any
    kube: Any
    fake: FakeController | None
    controller_url: str
    kubeconfig: Path


@contextlib.asynccontextmanager
async def operator_world(tmp_path: Path, monkeypatch=None, *, port_range: range = PORTS,
                         kinds: tuple[str, ...] = OPERATOR_KINDS, controller: type | None = FakeController,
                         controller_url: str | None = None, admin_token: str = "t", engine: bool = True,
                         resync_s: str | None = "1", secrets: dict[str, tuple[str, bytes]] | None = None,
                         skip_ports: tuple[int, ...] = ()):
    """kmock's Kubernetes emulator (on a port of `port_range`) with the CRDs of manifests/crds and the built-in
    `kinds` declared, a kubeconfig for it, and the controller the operator talks to: a FakeController (`controller`,
    the class; on a port of `port_range` too), with one live engine unless not `engine`, or, `controller` None, the
    one at `controller_url` (a live `tokenpool serve`). With `monkeypatch`, the operator's environment: KUBECONFIG,
    the controller's URL and `admin_token`, and TOKENPOOL_OPERATOR_RESYNC_S `resync_s` unless None (the handlers
    read it when first imported: a file that leaves it out keeps whatever an earlier import fixed). `secrets`: name
    -> (key, value) of the Secrets made in the namespace first. `skip_ports`: the live controller's, say. The
    operator tests' one setup (each file had its copy)."""
    import kmock

    async with contextlib.AsyncExitStack() as stack:
        k8s = await stack.enter_async_context(kmock.KubernetesEmulator())
        port = ports.free_port(port_range, skip_ports)
        await stack.enter_async_context(kmock.Server(k8s, port=port))
        declare_crds(k8s)
        for kind in kinds:
            path, name, namespaced = KINDS[kind]
            k8s.resources[path] = kmock.ResourceInfo(kind=name, namespaced=namespaced)
        fake = None
        if controller is not None:
            ctl = await stack.enter_async_context(kmock.RawHandler())
            srv = await stack.enter_async_context(kmock.Server(ctl, port=ports.free_port(port_range, (*skip_ports, port))))
            fake, controller_url = controller(ctl), str(srv.url)
            if engine:
                fake.engines.append({"id": "e0", "alive": True, "draining": False, "models": []})
        assert controller_url, "a FakeController class or the URL of a live controller"
        kubeconfig = write_kubeconfig(k8s, tmp_path / "kubeconfig", NS)
        if monkeypatch is not None:
            monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
            monkeypatch.setenv("TOKENPOOL_CONTROLLER_URL", controller_url)
            monkeypatch.setenv("TOKENPOOL_ADMIN_TOKEN", admin_token)
            if resync_s is not None:
                monkeypatch.setenv("TOKENPOOL_OPERATOR_RESYNC_S", resync_s)
        kube = Cluster(k8s)
        for name, (key, value) in (secrets or {}).items():
            await kube.create("secrets", {"apiVersion": "v1", "kind": "Secret",
                                          "metadata": {"name": name, "namespace": NS},
                                          "data": {key: base64.b64encode(value).decode()}})
        yield World(k8s, kube, fake, controller_url, kubeconfig)


async def pace_model_serving(kube, name: str = "m") -> None:
    """The default GPUPool and a PooledModel `name` of the pace engine made through `kube`, waited for until Serving
    (the running operator's rounds against the FakeController)."""
    from tests.test_operator_e2e import _obj, _until
    from tests.test_operator_lifecycle import _reason

    await kube.create("gpupools", _obj("GPUPool", "default", {}))
    await kube.create("pooledmodels", _obj("PooledModel", name, {"engine": {"kind": "pace"}}))
    await _until(f"{name} Serving", lambda: _reason(kube, "pooledmodels", name, "Serving"))
