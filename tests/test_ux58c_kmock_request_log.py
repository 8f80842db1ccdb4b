"""tests/kmock_util.forget_requests: kmock's request log, which it goes through for each new request, bounded by a
long test; the emulator serves on as before (objects, lists, patches), and the requests counted after it are the
new ones."""

from __future__ import annotations

import pytest

kmock = pytest.importorskip("kmock")
aiohttp = pytest.importorskip("aiohttp")

from tests.kmock_util import FakeController, forget_requests, free_port  # noqa: E402


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_forgetting_kmocks_old_requests_keeps_it_serving():
    async with (kmock.KubernetesEmulator() as k8s, kmock.Server(k8s, port=free_port()) as srv,
                kmock.RawHandler() as ctl, kmock.Server(ctl, port=free_port()) as ctl_srv,
                aiohttp.ClientSession() as s):
        k8s.resources["v1/secrets"] = kmock.ResourceInfo(kind="Secret", namespaced=True)
        fake = FakeController(ctl)
        url, path = str(srv.url).rstrip("/"), "/api/v1/namespaces/ns/secrets"
        async with s.post(url + path, json={"apiVersion": "v1", "kind": "Secret",
                                            "metadata": {"name": "x", "namespace": "ns"}}) as r:
            assert r.status in (200, 201), await r.text()
        for i in range(60):
            async with s.patch(f"{url}{path}/x", json={"metadata": {"labels": {"i": str(i)}}},
                               headers={"Content-Type": "application/merge-patch+json"}) as r:
                assert r.status == 200
        for _ in range(5):
            async with s.get(str(ctl_srv.url).rstrip("/") + "/admin/models") as r:
                assert r.status == 200
        assert len(list(k8s)) == 61 and fake.count("GET", "/admin/models") == 5

        assert forget_requests(k8s, keep=10) == 51 and len(list(k8s)) == 10
        assert forget_requests(ctl, keep=0) == 5 and fake.count("GET", "/admin/models") == 0
        async with s.patch(f"{url}{path}/x", json={"metadata": {"labels": {"i": "last"}}},
                           headers={"Content-Type": "application/merge-patch+json"}) as r:
            assert r.status == 200
        async with s.get(url + path) as r:
            items = (await r.json())["items"]
        assert [o["metadata"]["labels"] for o in items] == [{"i": "last"}]
        async with s.get(str(ctl_srv.url).rstrip("/") + "/admin/models") as r:
            assert r.status == 200
        assert len(list(k8s)) == 12 and fake.count("GET", "/admin/models") == 1
