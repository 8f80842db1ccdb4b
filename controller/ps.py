"""`tokenpool ps`: which models a running server has registered, and where they are resident (as `ollama ps`);
`tokenpool stop`; and how every client command reads its --url (`base_url`).

Reads the admin API (`/admin/models`, `/admin/engines`) with the admin token; stdlib HTTP only.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from controller.ollama_names import pick


class PsError(RuntimeError):
    pass


class Refused(PsError):
    """An HTTP error answer of the admin API: `status`, and `reason` (its error message) for a command that says it
    in its own words."""

    def __init__(self, text: str, status: int, reason: str):
        super().__init__(text)
        self.status, self.reason = status, reason


DEFAULT_PORT = 8000  # the server's (controller.config.Listen), where a client's --url leaves it out


def base_url(url: str) -> str:
    """--url as given, or without a scheme as OLLAMA_HOST takes it: over http, the host 127.0.0.1 and the port 8000
    where they are left out (`:8001`, `myhost`); an OpenAI client's base URL (ending in /v1) is its server's (the
    commands add /v1/... and /admin/... themselves). ValueError, saying why, for what no request could be sent to
    (a port that is not one, another scheme, no host)."""
    given = url
    if "://" not in url:
        import ipaddress

        url = url.strip()
        try:  # (a bare IPv6 address, ::1, has colons and no port)
            host, port, path = str(ipaddress.IPv6Address(url.strip("[]"))), DEFAULT_PORT, ""
        except ValueError:
            u = urllib.parse.urlsplit(f"http://{url}")
            try:
                host, port, path = u.hostname or "127.0.0.1", u.port or DEFAULT_PORT, u.path
            except ValueError:  # (a port that is not a number 0-65535, a bracket left open)
                raise ValueError(f"{given}: not HOST:PORT, :PORT or a URL (a port is a number up to 65535)") from None
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"
    try:
        u = urllib.parse.urlsplit(url)
        u.port  # noqa: B018 - (read for its ValueError: a port that is not a number 0-65535)
    except ValueError:
        raise ValueError(f"{given}: not a URL the server can be reached at (a port is a number up to 65535; an IPv6 "
                         "address is in brackets, http://[::1]:8000)") from None
    if u.scheme not in ("http", "https"):
        raise ValueError(f"{given}: the server's URL is http:// or https://")
    if not u.hostname:
        raise ValueError(f"{given}: the URL names no host")
    trimmed = url.rstrip("/")
    return trimmed.removesuffix("/v1") if trimmed.endswith("/v1") else url


def server_error(e: urllib.error.HTTPError) -> str | None:
    """The message of an HTTP error's body as this server writes one: OpenAI's error object's (the OpenAI and admin
    APIs'), or Ollama's `{"error": "..."}` (/api/*'s); None where the body is neither (another server's page)."""
    try:
        err = json.loads(e.read())["error"]
    except (ValueError, KeyError, TypeError):
        return None
    msg = err.get("message") if isinstance(err, dict) else err
    return msg if isinstance(msg, str) else None


def error_message(e: urllib.error.HTTPError) -> str:
    """The message of an HTTP error's body (`server_error`; its reason where the body is not one)."""
    msg = server_error(e)
    return e.reason if msg is None else msg


def read_json(r, where: str, error: type[Exception]) -> Any:
    """A response's JSON body; `error` naming `where` when it is none (--url at a server that is not this one)."""
    try:
        return json.loads(r.read())
    except ValueError:
        raise error(f"{where}: not JSON (is it a tokenpool server?)") from None


def fetch(url: str, path: str, token: str | None, timeout: float = 10.0, method: str = "GET") -> Any:
    req = urllib.request.Request(url.rstrip("/") + path, method=method,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return read_json(r, url.rstrip("/") + path, PsError)
    except urllib.error.HTTPError as e:
        msg = error_message(e)
        hint = (" (pass --admin-token or set TOKENPOOL_ADMIN_TOKEN; a server without admin_token_hash writes this "
                "run's token to the file its log names, by default ~/.cache/tokenpool/models/admin-token-PORT)"
                if e.code == 401 else "")
        raise Refused(f"{url}{path}: HTTP {e.code}: {msg}{hint}", e.code, msg) from None
    except (urllib.error.URLError, OSError) as e:
        raise PsError(unreachable(url, e)) from None


def unreachable(url: str, e: OSError) -> str:
    """What a client command says when no request got to `url` (nothing listening: how a server is started, as
    `ollama` asks whether its server is running)."""
    reason = getattr(e, "reason", e)
    hint = (" (is a tokenpool server running there? `tokenpool serve` starts one; --url or TOKENPOOL_URL names "
            "another)" if isinstance(reason, ConnectionRefusedError) else "")
    return f"cannot reach {url}: {reason}{hint}"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    s = max(0.0, now - t)
    for limit, size, unit in ((60, 1, "second"), (3600, 60, "minute"), (86400, 3600, "hour"), (None, 86400, "day")):
        if limit is None or s < limit - size / 2:  # (59.7 s reads "1 minute", not "60 seconds")
            n = round(s / size)
            return f"{n} {unit}{'' if n == 1 else 's'} ago"


def rows(models: list[dict], engines: list[dict], now: float | None = None) -> list[list[str]]:
    """One row per (model, engine holding it); a registered model held nowhere gets one row with no engine."""
    now = time.time() if now is None else now
    where: dict[str, list[tuple[dict, dict]]] = {}
    for e in engines:
        for r in e.get("models", []):
            where.setdefault(r["model"], []).append((e, r))
    out = []
    for m in models:
        common = [m["name"], _size(m.get("size_bytes", 0))]
        asked = m.get("keep_alive_asked")  # (an Ollama request's, in force instead of the configured one)
        flags = ("pinned" if m.get("pin") else "") or (
            ("keep for ever" if asked < 0 else f"keep {asked:g}s") + " (asked)" if asked is not None else
            ("keep for ever" if m["keep_alive"] < 0 else f"keep {m['keep_alive']:g}s") if m.get("keep_alive") is not None
            else "")
        names = [*(m.get("aliases") or []), *(f"{lm['name']}(lora)" for lm in m.get("lora_modules") or [])]
        tail = [_ago(m.get("last_used"), now), ",".join(names) or "-", flags or "-"]
        places = where.get(m["name"], [])
        if not places:
            out.append(common + ["-", "-", "failed" if m.get("load_error") else "registered", "0"] + tail)
        for e, r in places:
            state = r["state"]
            if e.get("alive") is False:  # (its engine died: what it held there serves nothing until it is back)
                state = "unavailable"
            elif state == "ready":  # registered; a pooled engine says whether its weights are in VRAM now
                state = ((e.get("pool") or {}).get("models") or {}).get(m["name"], {}).get("state", state)
            out.append(common + [e["id"], f"{e['host']}/{e['device']}", state, str(r["inflight"])] + tail)
    return out


HEADER = ["NAME", "SIZE", "ENGINE", "DEVICE", "STATE", "IN-FLIGHT", "LAST USED", "ALIASES", "RESIDENCY"]


def render(models: list[dict], engines: list[dict], now: float | None = None) -> str:
    table = [HEADER] + rows(models, engines, now)
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = ["   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.append("")
    for m in models:
        if m.get("load_error"):
            lines.append(f"{m['name']} failed to load: {m['load_error']}")
    for e in engines:
        state = "alive" if e.get("alive") else "dead"
        if e.get("draining"):
            state += ", draining"
        vram = (e.get("pool") or {}).get("vram") or {}
        used = vram.get("weights_bytes", e.get("used_bytes", 0))
        arena = vram.get("budget_bytes")  # (a pooled engine's arena: gpus.budget_gb, --gpu-budget, or the default)
        # (not the device's memory beside it: once a pooled engine reports, its memory_bytes is the arena's room for
        # weights, which the line said was "the device" -- 7.5 GB of a 25 GB machine's 8 GB CPU arena)
        kv = vram.get("kv_bytes")
        # (the KV cache beside the weights, not a part of them: "0 B of a 8.0 GB arena used by weights (501.2 MB
        # of it KV cache)" read as if the KV cache were inside the weights' 0 B)
        memory = ((f"{_size(used)} weights" + (f" and {_size(kv)} KV cache" if isinstance(kv, (int, float)) else "")
                   + f" in a {_size(arena)} arena") if isinstance(arena, (int, float)) and arena > 0 else
                  f"{_size(used)} of {_size(e.get('memory_bytes', 0))} used by weights")
        lines.append(f"engine {e['id']} on {e['host']}/{e['device']}: {memory}, {e.get('inflight', 0)} in "
                     f"flight, step {1000 * e.get('step_s', 0.0):.1f} ms ({state})")
    if not engines:
        lines.append("no engine is registered")
    return "\n".join(lines)


def _listed(url: str, path: str, token: str | None, key: str) -> list[dict]:
    """The admin API's list at `path`, each item an object naming its `key`; PsError naming the URL where the answer
    is not one (--url at another server that answers JSON: it was a traceback)."""
    got = fetch(url, path, token)
    if not isinstance(got, list) or not all(isinstance(x, dict) and isinstance(x.get(key), str) for x in got):
        raise PsError(f"{url}{path}: not a tokenpool admin API answer (is it a tokenpool server?)")
    return got


def ps(url: str, token: str | None) -> str:
    models, engines = _listed(url, "/admin/models", token, "name"), _listed(url, "/admin/engines", token, "id")
    try:
        return render(models, engines)
    except (KeyError, TypeError, AttributeError, ValueError):  # (an item of another shape than tokenpool's)
        raise PsError(f"{url}/admin/engines: not a tokenpool admin API answer (is it a tokenpool server?)") from None


def not_found(model: str, names: list[str]) -> str:
    """How a client command says `model` is not served, as `ollama run` says it (`model "nope" not found`), with the
    `names` served where Ollama says to pull it (nothing is pulled here): `tokenpool run`'s, `show`'s and `stop`'s."""
    if not names:
        return f'model "{model}" not found; the server serves no model'
    more = f" and {len(names) - SHOWN} more (tokenpool ls)" if len(names) > SHOWN else ""
    return f'model "{model}" not found; served: {", ".join(names[:SHOWN])}{more}'


SHOWN = 5  # (models named in that line; `tokenpool ls` lists them all)


def stop(url: str, token: str | None, model: str) -> str:
    """`tokenpool stop MODEL`: free the model's memory on its engines once its requests finish (as `ollama stop`):
    VRAM on a GPU, host RAM on a CPU engine (its arena); what was done. MODEL may be an alias, as `tokenpool run`
    takes it (the admin API names a model by its own name)."""
    served = _listed(url, "/admin/models", token, "name")
    names = {n: m["name"] for m in served for n in (m["name"], *(m.get("aliases") or []))}
    # (read as the server's Ollama API reads a name, as `ollama stop` takes it: NAME:latest, library/NAME, Name)
    name = names.get(pick(model, names.__contains__, lambda: names) or "")
    if name is None:  # (as `tokenpool run` and `show` say it: every name `stop` takes, aliases too, as /v1/models
        # lists them to `run`; it named the models alone)
        raise PsError(not_found(model, list(names)))
    path = f"/admin/models/{urllib.parse.quote(name, safe='')}/evict"
    try:
        got = fetch(url, path, token, method="POST")
    except Refused as e:
        if e.status != 409:
            raise
        raise PsError(f"{model}: {e.reason}") from None  # (pinned: said as the model's, not the route's HTTP answer)
    n = got.get("engines") if isinstance(got, dict) else None
    if not isinstance(n, int):
        raise PsError(f"{url}{path}: not a tokenpool admin API answer (is it a tokenpool server?)")
    held = got.get("resident")  # (of those, where its weights were in VRAM; a server before it said only `engines`)
    held = held if isinstance(held, int) and not isinstance(held, bool) else n
    if not n:
        return f"{model}: registered on no engine"
    # (what its weights leave: VRAM on a GPU, an engine's memory otherwise; `_on_gpus`)
    engines = f"{held} engine{'' if held == 1 else 's'}"
    gpus = _on_gpus(url, token, name)
    if not held:  # (it said its weights "leave VRAM on 1 engine" however long they had been out)
        nowhere = "VRAM on any engine" if gpus else "any engine's memory"
        return f"{model}: not in {nowhere}, nothing to free; the next request brings its weights in"
    where = f"VRAM on {engines}" if gpus else f"the memory of {engines}"
    return f"{model}: its weights leave {where} once its requests there finish; the next request brings them back"


def _on_gpus(url: str, token: str | None, name: str) -> bool:
    """Whether every engine the model is registered on is a GPU, where `stop` says its weights leave VRAM; else their
    engines' memory (a CPU engine's arena is host RAM: "VRAM" on a machine without a GPU named a memory it has not).
    Read after the evict, which leaves the model registered where it was; False where the engines cannot be read
    (the evict is done all the same)."""
    try:
        engines = _listed(url, "/admin/engines", token, "id")
    except PsError:
        return False
    devices = [str(e.get("device")) for e in engines
               if any(isinstance(r, dict) and r.get("model") == name for r in e.get("models") or [])]
    return bool(devices) and all(d.startswith("cuda") for d in devices)
