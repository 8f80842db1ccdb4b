"""The controller's admin API as the operator uses it (HTTP, admin bearer token). Every change is logged."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import quote

import httpx

log = logging.getLogger("tokenpool.operator")


class AdminError(Exception):
    """The controller refused a change (4xx): retrying the same request will not help."""


class AdminUnavailable(Exception):
    """The controller could not be reached or failed (5xx): retry later."""


@dataclass(frozen=True)
class AdminClient:
    url: str
    token: str
    timeout_s: float = 10.0

    def _call(self, method: str, path: str, json: dict | None = None) -> httpx.Response:
        if method != "GET":
            log.info("admin %s %s %s", method, path, (json or {}).get("name", ""))  # a converged reconcile logs nothing
        try:
            r = httpx.request(method, self.url.rstrip("/") + path, json=json, timeout=self.timeout_s,
                              headers={"Authorization": f"Bearer {self.token}"})
        except httpx.HTTPError as e:
            raise AdminUnavailable(f"{method} {path}: {e}") from e
        if r.status_code >= 500:
            raise AdminUnavailable(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r

    @staticmethod
    def _error(r: httpx.Response) -> str:
        try:
            return r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return r.text[:300]

    def _expect(self, method: str, path: str, ok: int, json: dict | None = None):
        """The JSON of a call that must answer `ok`; any other 4xx is the controller refusing it."""
        r = self._call(method, path, json)
        if r.status_code != ok:
            raise AdminError(self._error(r))
        return r.json()

    def _if_present(self, method: str, path: str) -> bool:
        """A call on something that may be gone already: True if it was there (404: it was not)."""
        r = self._call(method, path)
        if r.status_code not in (200, 404):
            raise AdminError(self._error(r))
        return r.status_code == 200

    def models(self) -> dict[str, dict]:
        return {m["name"]: m for m in self._expect("GET", "/admin/models", 200)}

    def add_model(self, body: dict) -> dict:
        return self._expect("POST", "/admin/models", 201, body)

    def remove_model(self, name: str) -> bool:
        return self._if_present("DELETE", f"/admin/models/{quote(name, safe='/')}")

    def drain_model(self, name: str) -> bool:
        """Stop the controller admitting the model's requests (those in flight finish); False if it is gone."""
        return self._if_present("POST", f"/admin/models/{quote(name, safe='/')}/drain")

    def engines(self) -> list[dict]:
        return self._expect("GET", "/admin/engines", 200)

    def inflight(self, model: str) -> int:
        """Requests of `model` now running on any engine."""
        return sum(rep["inflight"] for e in self.engines() for rep in e["models"] if rep["model"] == model)

    def tenants(self) -> dict[str, dict]:
        return {t["name"]: t for t in self._expect("GET", "/admin/tenants", 200)}

    def add_tenant(self, body: dict) -> dict:
        return self._expect("POST", "/admin/tenants", 201, body)

    def remove_tenant(self, name: str) -> bool:
        return self._if_present("DELETE", f"/admin/tenants/{quote(name, safe='')}")
