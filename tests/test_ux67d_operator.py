"""A PooledModel changed to a spec the controller refuses (ux67d): `kubectl apply` of a wrong `source.path` (a typo,
a model not yet copied to the volume) on a model that serves. The operator drained the model, removed it from the
controller, then had its new registration refused: the model was gone (every request a 404) until the spec was
fixed, where Kubernetes keeps a Deployment's old pods serving through a rollout that cannot start (and so with a new
servedName). Now it asks the controller first (POST /admin/models?dry_run=true: every check of the registration, in
place of the model of its name, or of `replacing`):
refused, the model stays as it was, serving, and the PooledModel says so (Degraded, Rejected, "still serving its last
applied spec"; its `ready`, `replicas` as they are). On kmock's emulator with a live CPU `tokenpool serve`, the
operator run by kopf in-process, as tests/test_operator_e2e.py."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

kopf = pytest.importorskip("kopf")
kmock = pytest.importorskip("kmock")

from controller.keys import hash_key  # noqa: E402
from tests.kmock_util import SECRETS, operator_world  # noqa: E402
from tests.operator_events import posted  # noqa: E402
from tests.ports import live_server_on  # noqa: E402
from tests.test_operator_e2e import Operator, _obj, _reason, _until  # noqa: E402

ADMIN = "admin-ux67d-operator-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
PORTS = range(29930, 29940)  # the controller's
KMOCK_PORTS = range(29940, 29950)  # kmock's


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
           "models": [{"name": "tiny", "path": str(tiny_model), "aliases": ["small"]}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("srv")) as srv:
        yield srv


def test_a_dry_run_checks_a_registration_and_registers_nothing(server, tiny_model):
    def dry(body: dict) -> httpx.Response:
        return httpx.post(server.url + "/admin/models?dry_run=true", headers=AUTH, json=body)

    r = dry({"name": "tiny", "path": "/no/such/model"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "path /no/such/model does not exist"
    r = dry({"name": "other", "path": str(tiny_model), "aliases": ["small"]})  # (tiny's alias)
    assert r.status_code == 409 and r.json()["error"]["param"] == "aliases"
    # the model of its name is the one it would replace: its name and aliases are free
    assert dry({"name": "tiny", "path": str(tiny_model), "aliases": ["small"]}).json() == {"dry_run": True,
                                                                                          "name": "tiny"}
    assert dry({"name": "fresh", "path": str(tiny_model)}).status_code == 200
    # a rename: in place of `replacing`, whose names are free (its alias kept under the new name)
    r = httpx.post(server.url + "/admin/models?dry_run=true&replacing=tiny", headers=AUTH,
                   json={"name": "other", "path": str(tiny_model), "aliases": ["small"]})
    assert r.json() == {"dry_run": True, "name": "other"}
    for replacing, status in (("small", 200), ("nosuch", 404)):  # (a model by an alias; a name of none)
        r = httpx.post(server.url + f"/admin/models?dry_run=true&replacing={replacing}", headers=AUTH,
                       json={"name": "other", "path": str(tiny_model), "aliases": ["small"]})
        assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == "model_not_found"
    names = [m["name"] for m in httpx.get(server.url + "/admin/models", headers=AUTH).json()]
    assert names == ["tiny"]  # (nothing registered, nothing replaced)
    assert httpx.post(server.url + "/admin/models", headers=AUTH, json={"name": "tiny", "path": str(tiny_model)}
                      ).status_code == 409  # (without dry_run: registered already, as before)


def _served(url: str) -> list[str]:
    return [m["name"] for m in httpx.get(url + "/admin/models", headers=AUTH).json()]


@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_a_spec_the_controller_refuses_leaves_the_model_serving(server, tmp_path, monkeypatch):
    async with operator_world(tmp_path, monkeypatch, controller=None, controller_url=server.url, admin_token=ADMIN,
                              secrets=SECRETS, port_range=KMOCK_PORTS) as w:
        kube = w.kube
        await kube.create("gpupools", _obj("GPUPool", "default", {"gpusPerNode": 1}))
        await kube.create("pooledmodels", _obj("PooledModel", "pace-m", {"engine": {"kind": "pace"}}))
        async with Operator():
            await _until("pace-m serving", lambda: _reason(kube, "pooledmodels", "pace-m", "Serving", "Ready"))
            # the path of a model not on the volume (a typo): the controller would refuse it
            await kube.patch("pooledmodels", "pace-m", {"metadata": {"generation": 2}, "spec": {
                "engine": {"kind": "llm"}, "source": {"path": "qwen2-typo", "memoryGB": 1}}})
            bad = await _until("Rejected", lambda: _reason(kube, "pooledmodels", "pace-m", "Rejected", "Degraded"))
            degraded = next(c for c in bad["status"]["conditions"] if c["type"] == "Degraded")
            assert degraded["message"] == ("path /models/qwen2-typo does not exist; still serving its last applied "
                                           "spec") and degraded["observedGeneration"] == 2
            assert bad["status"].get("ready") is True and bad["status"].get("replicas") == 1  # (an HPA reads it as it is)
            # still served, and answering: it was drained and removed before the controller said no
            assert "pace-m" in _served(server.url)
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            out = await asyncio.to_thread(client.completions.create, model="pace-m", prompt="hi", max_tokens=2)
            assert out.usage.completion_tokens == 2
            # the spec put back: Ready again, with nothing re-registered
            await kube.patch("pooledmodels", "pace-m", {"metadata": {"generation": 3}, "spec": {
                "engine": {"kind": "pace"}, "source": None}})
            await _until("serving again", lambda: _reason(kube, "pooledmodels", "pace-m", "Serving", "Ready"))
            # renamed (servedName) with the wrong path: the model keeps its old name, serving
            await kube.patch("pooledmodels", "pace-m", {"metadata": {"generation": 4}, "spec": {
                "servedName": "pace-new", "engine": {"kind": "llm"}, "source": {"path": "qwen2-typo2", "memoryGB": 1}}})
            bad = await _until("Rejected", lambda: _reason(kube, "pooledmodels", "pace-m", "Rejected", "Degraded"))
            assert bad["status"]["served"] == "pace-m" and bad["status"].get("ready") is True
            assert _served(server.url) == ["tiny", "pace-m"]
        warned = [(e["reason"], e["message"]) for e in posted(kube, "pace-m", "Warning")]
        assert warned == [("Rejected", f"path /models/{p} does not exist; still serving its last applied spec")
                          for p in ("qwen2-typo", "qwen2-typo2")]
