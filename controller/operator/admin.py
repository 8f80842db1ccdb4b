"""The controller's admin API as the operator uses it (HTTP, admin bearer token). Every change is logged."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import quote

import httpx

log = logging.getLogger("tokenpool.operator")


class AdminError(Exception):
    """The controller refused a change (4xx): retrying the same request will not help."""


class AdminUnauthorized(AdminError):
    """The controller refused the operator's admin token (401, 403): a misconfiguration (the token is not the one whose
    hash the controller's configuration holds), not a refused change."""


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
        if r.status_code in (401, 403):
            raise AdminUnauthorized(f"the controller refused the operator's admin token ({r.status_code} "
                                    f"{self._error(r)}): TOKENPOOL_ADMIN_TOKEN must be the token whose hash is the "
                                    "controller's admin_token_hash")
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

    @property
    def models(self) -> Named:
        return Named(self, "/admin/models", safe="/")  # a served name may hold '/' (org/model)

    @property
    def tenants(self) -> Named:
        return Named(self, "/admin/tenants")

    def drain_model(self, name: str) -> bool:
        """Stop the controller admitting the model's requests (those in flight finish); False if it is gone."""
        return self._if_present("POST", self.models.path_of(name) + "/drain")

    def set_pin(self, name: str, on: bool) -> dict:
        """Pin the model (its weights kept in VRAM wherever it is registered) or unpin it, in place."""
        return self._expect("POST", self.models.path_of(name) + ("/pin" if on else "/unpin"), 200)

    def health(self) -> dict | None:
        """The controller's /health answer (its `instance`, new at each start; `engines`, the live ones), whatever its
        status code (503 while it starts); None when it does not answer with a JSON object. /health answers at once,
        while the controller starts too, and needs no token."""
        try:
            r = httpx.get(self.url.rstrip("/") + "/health", timeout=min(self.timeout_s, 3.0))
            v = r.json()
        except (httpx.HTTPError, ValueError):
            return None
        return v if isinstance(v, dict) else None

    def instance(self) -> str | None:
        """The controller's instance (its /health's `instance`, new at each start); None when it does not answer
        (or is older than the field)."""
        v = (self.health() or {}).get("instance")
        return v if isinstance(v, str) and v else None

    def engines(self) -> list[dict]:
        return self._expect("GET", "/admin/engines", 200)

    def inflight(self, model: str) -> int:
        """Requests of `model` now running on any engine."""
        return sum(rep["inflight"] for e in self.engines() for rep in e["models"] if rep["model"] == model)


@dataclass(frozen=True)
class Named:
    """Resources of one kind the admin API keeps by name at `path` (models, tenants): read, added, removed, and
    (models) some fields changed in place; any other change is a remove and an add."""

    admin: AdminClient
    path: str
    safe: str = ""  # characters a name keeps unquoted in its URL

    def path_of(self, name: str) -> str:
        return f"{self.path}/{quote(name, safe=self.safe)}"

    def by_name(self) -> dict[str, dict]:
        return {x["name"]: x for x in self.admin._expect("GET", self.path, 200)}

    def add(self, body: dict) -> dict:
        return self.admin._expect("POST", self.path, 201, body)

    def check(self, body: dict, replacing: str) -> None:
        """Whether the controller would register one in place of `replacing` (models: POST ?dry_run=true); AdminError
        saying why not. Nothing changes."""
        self.admin._expect("POST", f"{self.path}?dry_run=true&replacing={quote(replacing, safe='')}", 200, body)

    def update(self, name: str, body: dict) -> dict:
        """Change fields of one in place (PATCH; models: slo, priority, replicas)."""
        return self.admin._expect("PATCH", self.path_of(name), 200, body)

    def remove(self, name: str) -> bool:
        """False if it was gone already."""
        return self.admin._if_present("DELETE", self.path_of(name))
