"""`tokenpool run MODEL [PROMPT]` (as `ollama run`): one chat turn streamed to the terminal, or a conversation when
no prompt is given on a terminal (stdin piped in is the prompt, or comes before PROMPT as `ollama run` puts it).
`tokenpool ls` (as `ollama list`): the models the
key may use.

Talks to the server's OpenAI API (`/v1/chat/completions`, streamed; `/v1/models`) with the standard library only.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any, TextIO

from controller.ollama_names import LATEST, pick
from controller.ps import not_found, read_json, server_error, unreachable

# A route the server does not have, as its error JSON says it (app.no_route's "Invalid URL (...)", a 405's "... is
# not allowed: it takes ..."; before them Starlette's words): not a model's or a key's refusal
NO_ROUTE = {(404, "Not Found"), (405, "Method Not Allowed")}


def no_route(code: int, msg: str) -> bool:
    return ((code, msg) in NO_ROUTE or (code == 404 and msg.startswith("Invalid URL ("))
            or (code == 405 and " is not allowed: it takes " in msg))


class ChatError(RuntimeError):
    def __init__(self, message: str, status: int | None = None, foreign: bool = False):
        super().__init__(message)
        self.status = status  # (the server's HTTP status, where it answered with an error)
        self.foreign = foreign  # (an error answer that is not this server's JSON: a path it does not have)


def _request(url: str, path: str, key: str | None, body: dict | None = None, timeout: float = 600.0):
    headers = {"content-type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers)
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        msg = server_error(e)
        if msg is None:  # (not this server's error: say which URL answered what)
            raise ChatError(f"{url.rstrip('/')}{path}: HTTP {e.code}: {e.reason}", e.code, foreign=True) from None
        if no_route(e.code, msg):  # (a path this server does not have, --url's own path: the URL said too, as
            # another server's; "tokenpool ls: Not Found" named nothing)
            raise ChatError(f"{url.rstrip('/')}{path}: HTTP {e.code}: {msg}", e.code, foreign=True) from None
        hint = " (pass --api-key or set TOKENPOOL_API_KEY)" if e.code == 401 else ""
        raise ChatError(f"{msg}{hint}", e.code) from None
    except (urllib.error.URLError, OSError) as e:
        raise ChatError(unreachable(url, e)) from None


def models(url: str, key: str | None) -> list[dict[str, Any]]:
    with _request(url, "/v1/models", key, timeout=10) as r:
        got = read_json(r, url.rstrip("/") + "/v1/models", ChatError)
    data = got.get("data") if isinstance(got, dict) else None
    if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
        raise ChatError(f"{url.rstrip('/')}/v1/models: not an OpenAI model list (is it a tokenpool server?)")
    return data


def sizes(url: str, key: str | None) -> dict[str, int]:
    """Each model's size in bytes, from the server's Ollama /api/tags: what `ls` shows as `ollama list` does ({} from a
    server without it, or one that fails it: the sizes are left out, the list is not)."""
    try:
        with _request(url, "/api/tags", key, timeout=10) as r:
            got = read_json(r, url.rstrip("/") + "/api/tags", ChatError)
    except ChatError:
        return {}
    listed = got.get("models") if isinstance(got, dict) else None
    out: dict[str, int] = {}
    for m in listed if isinstance(listed, list) else []:
        if isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("size"), int):
            # (listed as Ollama names models, NAME:latest for the model served as NAME: both names are kept)
            out.setdefault(m["name"].removesuffix(LATEST), m["size"])
            out[m["name"]] = m["size"]
    return out


def not_served(url: str, key: str | None, model: str) -> str | None:
    """`run`'s and `show`'s line for a model the server does not serve (`ps.not_found`: `model "nope" not found;
    served: a, b`); None where the list says it is served or cannot be read (the error that came is said then)."""
    try:
        names = [m["id"] for m in models(url, key)]
    except ChatError:
        return None
    if pick(model, names.__contains__, lambda: names) is not None:
        return None
    return not_found(model, names)


@contextlib.contextmanager
def said_if_not_served(url: str, key: str | None, model: str) -> Iterator[None]:
    """A 404 in the block, for a model the server does not serve, said as `not_served` says it (exit 1 at the CLI);
    other errors as they came."""
    try:
        yield
    except ChatError as e:
        if e.status == 404 and (line := not_served(url, key, model)) is not None:
            raise ChatError(line, 404) from None
        raise


def check_model(url: str, key: str | None, model: str) -> None:
    """ChatError unless the server serves `model` (a name or an alias) to this key: said before a conversation
    starts, as `ollama run` does, rather than as an error after every line typed."""
    with _request(url, f"/v1/models/{urllib.parse.quote(model, safe='/')}", key, timeout=10):
        pass


def resolve(url: str, key: str | None, model: str) -> str:
    """`model` as the server names it, read as its Ollama API reads a name (`ollama_names.pick`: `NAME:latest`,
    `library/NAME`, `Name` for `name`), so that `run`, `show` and `pull` take what `ollama run` would of this server
    where the OpenAI API they ask is exact (it said "not found" for `TINY`): among the names the key may use, as the
    server's; as typed where none is meant or the list cannot be read (the request's own error says what is
    wrong)."""
    try:
        names = [m["id"] for m in models(url, key)]
    except ChatError:
        return model
    return pick(model, names.__contains__, lambda: names) or model


def show(url: str, key: str | None, model: str) -> dict[str, Any]:
    """`tokenpool show MODEL` (as `ollama show`): the server's Ollama /api/show answer for `model` (as `resolve`
    reads it); an unknown model is said as `run` says it (`said_if_not_served`)."""
    with said_if_not_served(url, key, model):
        model = resolve(url, key, model)
        check_model(url, key, model)
    with _request(url, "/api/show", key, {"model": model}, timeout=10) as r:
        got = read_json(r, url.rstrip("/") + "/api/show", ChatError)
    if not isinstance(got, dict) or not {"model_info", "details", "capabilities", "template"} & set(got):
        raise ChatError(f"{url.rstrip('/')}/api/show: not an Ollama show answer (is it a tokenpool server?)")
    return got


def _count(n: int) -> str:
    """A parameter count as Ollama writes it: 134.52M, 8.0B."""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def render_show(got: dict[str, Any]) -> str:
    """/api/show's answer laid out as `ollama show` prints it: the model's facts, its capabilities, its parameters
    (the server's `parameters`: stop, num_ctx, the sampling its generation_config recommends), then the head of its
    system message and licence where the server gives them."""
    info = got.get("model_info") if isinstance(got.get("model_info"), dict) else {}
    details = got.get("details") if isinstance(got.get("details"), dict) else {}
    arch = info.get("general.architecture") or details.get("family")
    count = info.get("general.parameter_count")
    params = details.get("parameter_size") or (_count(count) if isinstance(count, int) and count > 0 else None)
    facts = [("architecture", arch), ("parameters", params),
             ("context length", info.get(f"{arch}.context_length", info.get("context_length"))),
             ("embedding length", info.get(f"{arch}.embedding_length")),
             ("quantization", details.get("quantization_level")), ("format", details.get("format"))]
    lines = ["  Model", *(f"    {k:<20}{v}" for k, v in facts if v not in (None, ""))]
    if caps := [c for c in got.get("capabilities") or [] if isinstance(c, str)]:
        lines += ["", "  Capabilities", *(f"    {c}" for c in caps)]
    # (the server's parameters, a name and its value a line: a table, as Ollama's, its names' column as wide as the
    # longest and 4 spaces after it)
    rows = [r.split(None, 1) for r in (got.get("parameters") or "").splitlines() if r.strip()] \
        if isinstance(got.get("parameters"), str) else []
    if rows:
        width = max(len(r[0]) for r in rows) + 4
        lines += ["", "  Parameters", *(f"    {r[0]:<{width}}{r[1].strip()}".rstrip() if len(r) > 1 else f"    {r[0]}"
                                          for r in rows)]
    for head, field in (("System", "system"), ("License", "license")):
        if isinstance(got.get(field), str) and got[field].strip():
            lines += ["", f"  {head}", *(f"    {x}" for x in _head(got[field]))]
    return "\n".join(lines)


def _head(text: str, n: int = 2, width: int = 100) -> list[str]:
    """A long text's first `n` non-blank lines (stripped; wrapped at `width`), then "..." where there are more: the
    System and License sections of `ollama show`."""
    import textwrap

    said = [x.strip() for x in text.splitlines() if x.strip()]
    out = [w for x in said[:n] for w in textwrap.wrap(x, width)]
    return out + ["..."] if len(said) > n else out


def stream_chat(url: str, key: str | None, body: dict[str, Any], usage: dict | None = None) -> Iterator[str]:
    """The content deltas of one streamed chat completion; ChatError on an error event or refusal. `usage`, where
    given, gets the stream's token counts (asked for with stream_options.include_usage)."""
    if usage is not None:
        body = {**body, "stream_options": {"include_usage": True}}
    with _request(url, "/v1/chat/completions", key, {**body, "stream": True}) as r:
        try:
            for raw in r:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                ev = json.loads(data)
                if "error" in ev:
                    raise ChatError(ev["error"].get("message", "the stream failed"))
                if usage is not None and isinstance(ev.get("usage"), dict):
                    usage.update(ev["usage"])
                for ch in ev.get("choices", []):
                    text = (ch.get("delta") or {}).get("content")
                    if text:
                        yield text
        except (OSError, http.client.HTTPException) as e:  # (a connection reset, a chunked body cut short)
            raise ChatError(f"the stream ended before the reply did ({type(e).__name__})") from None
    # (no [DONE]: the server went away mid-reply, or a proxy cut it; what came is not the whole reply)
    raise ChatError("the stream ended before the reply did (the server closed it)")


# a request's sampling fields (the OpenAI names the body carries) as Ollama's options name them
OLLAMA_OPTIONS = {"max_tokens": "num_predict", "temperature": "temperature", "seed": "seed", "top_p": "top_p",
                  "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repeat_penalty", "stop": "stop",
                  "num_ctx": "num_ctx"}


def ollama_body(body: dict[str, Any]) -> dict[str, Any]:
    """The chat request `body` (OpenAI's fields) as the server's Ollama /api/chat takes it."""
    options = {OLLAMA_OPTIONS[k]: v for k, v in body.items() if k in OLLAMA_OPTIONS}
    if options.get("top_k") == -1:  # (off: Ollama's 0)
        options["top_k"] = 0
    out: dict[str, Any] = {"model": body["model"], "messages": body["messages"], "stream": True}
    if options:
        out["options"] = options
    if body.get("response_format"):
        out["format"] = "json"
    return out


def stream_ollama_chat(url: str, key: str | None, body: dict[str, Any], stats: dict) -> Iterator[str]:
    """As `stream_chat`, over the server's Ollama /api/chat (`run --verbose`): `stats` gets its closing line's
    counts and durations (load_duration, prompt_eval_duration, ...), which the OpenAI stream does not carry."""
    try:
        r = _request(url, "/api/chat", key, ollama_body(body))
    except ChatError as e:
        if e.status not in (404, 405) or not e.foreign:
            raise
        if "num_ctx" in body:  # (the OpenAI API has no field for it: it would go unsaid)
            raise ChatError(f"/set parameter num_ctx needs the server's Ollama API, and {url.rstrip('/')}/api/chat "
                            "is not there") from None
        # (a server without the Ollama API: the OpenAI stream's counts, and the client's timings)
        yield from stream_chat(url, key, body, stats)
        return
    thinking = ""  # (the last piece of thinking shown, while the reply's thinking goes on)
    with r:
        try:
            for raw in r:
                line = raw.decode("utf-8").strip()
                if not line:
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    raise ChatError(f"{url.rstrip('/')}/api/chat: not an Ollama stream (is it a tokenpool "
                                    "server?)") from None
                if not isinstance(ev, dict):
                    continue
                if "error" in ev:
                    raise ChatError(str(ev["error"]) or "the stream failed")
                message = ev.get("message") if isinstance(ev.get("message"), dict) else {}
                # (a model that thinks: the server's /api/chat gives its thinking apart, `thinking`, where the OpenAI
                # stream of `run` without --verbose has it in the content; read as content alone, --verbose showed
                # a blank line for a reply that was all thinking. Shown as `ollama run` shows it)
                if isinstance(message.get("thinking"), str) and message["thinking"]:
                    if not thinking:
                        yield Thinking(THINKING_OPENS)
                    thinking = message["thinking"]
                    yield Thinking(thinking)
                text = message.get("content")
                if text:
                    if thinking:
                        yield Thinking(("" if thinking.endswith("\n") else "\n") + THINKING_CLOSES)
                        thinking = ""
                    yield text
                if ev.get("done"):
                    stats.update({k: v for k, v in ev.items() if k in OLLAMA_STATS and isinstance(v, int)})
                    return
        except (OSError, http.client.HTTPException) as e:
            raise ChatError(f"the stream ended before the reply did ({type(e).__name__})") from None
    raise ChatError("the stream ended before the reply did (the server closed it)")


class Thinking(str):
    """Text of a reply's stream that is shown but is not the reply (its thinking, and the lines around it, as `ollama
    run` prints them): left out of the turn a conversation keeps, as Ollama keeps a reply's thinking apart."""


THINKING_OPENS, THINKING_CLOSES = "Thinking...\n", "...done thinking.\n\n"  # (`ollama run`'s words)
OLLAMA_STATS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                "eval_duration")


def _took(s: float) -> str:
    return f"{s:.3f}s" if s >= 1 else f"{1000 * s:.1f}ms"


def ollama_timings(st: dict) -> list[tuple[str, str]]:
    """The server's Ollama counts as `ollama run --verbose` prints them (its Metrics.Summary: a line where the
    value is above 0, a rate beside each duration)."""
    lines = []
    for name, key in (("total duration", "total_duration"), ("load duration", "load_duration"),
                      ("prompt eval count", "prompt_eval_count"), ("prompt eval duration", "prompt_eval_duration"),
                      ("eval count", "eval_count"), ("eval duration", "eval_duration")):
        v = st.get(key) or 0
        if v <= 0:
            continue
        if key.endswith("_count"):
            lines.append((name, f"{v} token(s)"))
            continue
        lines.append((name, _took(v / 1e9)))
        if key != "total_duration" and key != "load_duration":
            n = st.get(key.replace("_duration", "_count")) or 0
            lines.append((name.replace("duration", "rate"), f"{n / (v / 1e9):.2f} tokens/s"))
    return lines


def timings(usage: dict, total_s: float, first_s: float | None, last_s: float | None) -> str:
    """`run --verbose`'s lines after a reply, as `ollama run --verbose` prints them: the server's own (its Ollama
    reply's, `usage` holding them), then the first token's wait as this client saw it; from a stream without them
    (OpenAI's usage), the client's timings (the first token's wait standing for Ollama's load and prompt eval
    durations, which a client cannot tell apart)."""
    if isinstance(usage.get("total_duration"), int):
        lines = ollama_timings(usage)
        if first_s is not None:
            lines.append(("time to first token", _took(first_s)))
        return "".join(f"{k + ':':<22}{v}\n" for k, v in lines)
    lines = [("total duration", _took(total_s))]
    if first_s is not None:
        lines.append(("time to first token", _took(first_s)))
    if isinstance(usage.get("prompt_tokens"), int):
        lines.append(("prompt eval count", f"{usage['prompt_tokens']} token(s)"))
    n = usage.get("completion_tokens")
    if isinstance(n, int):
        lines.append(("eval count", f"{n} token(s)"))
        if first_s is not None and last_s is not None and n > 1 and last_s > first_s:
            lines += [("eval duration", _took(last_s - first_s)),  # (the tokens after the first)
                      ("eval rate", f"{(n - 1) / (last_s - first_s):.2f} tokens/s")]
    return "".join(f"{k + ':':<22}{v}\n" for k, v in lines)


class Spinner:
    """`ollama run`'s wait: a spinner on the terminal (stderr) until a reply's first text comes (a model's weights
    loading, a long prompt's prefill: seconds of a blank line), then erased; nothing where stderr is not a
    terminal. The thread draws only until `stop` returns, so no frame lands in the reply."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, term: TextIO | None, every_s: float = 0.1):
        self.term, self.every_s, self.drawn = term, every_s, 0
        self._done = threading.Event()
        # (term None: stderr closed, `2>&-`; its AttributeError ended the command before the reply, exit 1, unsaid)
        spins = term is not None and term.isatty()
        self._thread = threading.Thread(target=self._spin, daemon=True) if spins else None

    def __enter__(self) -> Spinner:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spin(self) -> None:
        while not self._done.wait(self.every_s):
            self.term.write(f"\r{self.FRAMES[self.drawn % len(self.FRAMES)]} ")
            self.term.flush()
            self.drawn += 1

    def stop(self) -> None:
        if self._thread is None or self._done.is_set():
            return
        self._done.set()
        self._thread.join()
        if self.drawn:
            self.term.write("\r\x1b[K")  # (the frame erased: the reply starts at the line's start)
            self.term.flush()


def turn(url: str, key: str | None, body: dict[str, Any], out: TextIO, stats: TextIO | None = None) -> str:
    """One streamed reply written to `out` as it comes, a `Spinner` until it does; its whole text. `stats`: where
    `timings` go after it."""
    import time

    parts, usage = [], ({} if stats is not None else None)
    t0, first, last = time.monotonic(), None, None
    try:
        with Spinner(sys.stderr) as wait:
            # (--verbose: the server's Ollama API, whose closing line carries Ollama's durations; /set parameter
            # num_ctx too, which the OpenAI API has no field for)
            ollama_api = usage is not None or "num_ctx" in body
            for text in (stream_ollama_chat(url, key, body, {} if usage is None else usage) if ollama_api else
                         stream_chat(url, key, body)):
                wait.stop()
                last = time.monotonic()
                first = last if first is None else first
                out.write(text)
                out.flush()
                if not isinstance(text, Thinking):
                    parts.append(text)
    except ChatError:
        if parts:  # (the error's line after the text that came, not on it)
            out.write("\n")
            out.flush()
        raise
    out.write("\n")
    out.flush()
    if stats is not None:
        stats.write(timings(usage or {}, time.monotonic() - t0, None if first is None else first - t0,
                            None if last is None else last - t0))
        stats.flush()
    return "".join(parts)


MULTILINE = '"""'


def prompt_line(inp: TextIO, out: TextIO, prompt: str) -> str:
    """A line typed after `prompt` ("" at the end of input). At the terminal itself through `input()` with
    readline, so a line can be edited and earlier ones recalled with the arrow keys, as `ollama run` allows (a
    plain read of stdin echoes the keys' escapes as ^[[A)."""
    if inp is sys.stdin and out is sys.stdout and inp.isatty():
        try:
            import readline  # noqa: F401 - (imported, it gives input() line editing and history)
        except ImportError:  # (a Python built without it: input() without editing)
            pass
        try:
            return input(prompt) + "\n"
        except EOFError:
            return ""
    out.write(prompt)
    out.flush()
    return inp.readline()


def read_message(inp: TextIO, out: TextIO, prompt: str = "") -> str | None:
    """One user turn, read after `prompt`: a line, or as `ollama run` takes them, the lines from one that begins
    with \"\"\" to one that ends with it (pasted text, code); None at the end of input."""
    line = prompt_line(inp, out, prompt)
    if not line:
        return None
    if not line.lstrip().startswith(MULTILINE):
        return line.rstrip("\n")
    rest, parts = line.lstrip()[len(MULTILINE):].rstrip("\n"), []
    while not rest.endswith(MULTILINE):
        parts.append(rest)
        line = prompt_line(inp, out, "... ")
        if not line:  # (the input ended inside the message: what was given is the message)
            return "\n".join(parts)
        rest = line.rstrip("\n")
    parts.append(rest[:-len(MULTILINE)])
    return "\n".join(parts)


HELP = """Available commands:
  /set      set the system message or a parameter, verbose or quiet, json format (/set alone: how)
  /show     the model's info, its template, the system message or the parameters set (/show alone: how)
  /clear    forget the conversation so far (the system message stays)
  /load     another model: /load MODEL (the conversation begins anew)
  /bye      leave (as Ctrl-D does)
  /?, /help this help
Begin and end a multi-line message with \"\"\". Ctrl-C stops a reply.
"""
SET_HELP = """Available commands:
  /set parameter NAME VALUE  set a sampling parameter (/set parameter alone: which)
  /set system TEXT           set the system message
  /set verbose               after each reply, its timings and token counts
  /set quiet                 no timings (the default)
  /set format json           each reply a JSON object
  /set noformat              replies as the model writes them
"""
SHOW_HELP = """Available commands:
  /show info        the model's architecture, context length and capabilities
  /show template    its chat template
  /show system      the system message
  /show parameters  the parameters set
"""
# `/set parameter NAME VALUE` as `ollama run` takes it: Ollama's option name -> the request's field, its type
PARAMETERS = {"temperature": ("temperature", float), "seed": ("seed", int), "num_predict": ("max_tokens", int),
              "top_p": ("top_p", float), "top_k": ("top_k", int), "min_p": ("min_p", float),
              "repeat_penalty": ("repetition_penalty", float), "stop": ("stop", str),
              "num_ctx": ("num_ctx", int)}  # (not an OpenAI field: a reply then comes over /api/chat, `turn`)
# What the server takes (controller/api/protocol.py's bounds): a value past them is refused at /set, where it was
# taken and every message after it refused ("error: temperature: Input should be less than or equal to 2")
RANGES = {"temperature": ("0 to 2", lambda v: 0 <= v <= 2), "top_p": ("more than 0, up to 1", lambda v: 0 < v <= 1),
          "top_k": ("-1 (off) or 0 to 1048576", lambda v: -1 <= v <= 1 << 20),
          "min_p": ("0 to 1", lambda v: 0 <= v <= 1),
          "repeat_penalty": ("more than 0, up to 10", lambda v: 0 < v <= 10),
          "seed": ("a 64-bit integer", lambda v: -(2**63) <= v < 2**63),
          "num_ctx": ("a whole number of at least 1 (the model's context at most: a larger one is capped at it)",
                      lambda v: 1 <= v < 2**63)}
# Ollama's options a request sets there and the server here
SERVERS = {"num_gpu": "every model's layers are on its GPU", "num_thread": "its workers' threads"}
PARAMETER_HELP = "Available parameters:\n" + "".join(f"  /set parameter {n} VALUE\n" for n in PARAMETERS) + \
    "(stop takes one or more strings)\n"


class Chat:
    """A conversation's settings the /set commands change: the request body (its model, messages and sampling
    parameters) and where a reply's timings go (None: nowhere)."""

    def __init__(self, url: str, key: str | None, body: dict[str, Any], stats: TextIO | None):
        self.url, self.key, self.body, self.stats = url, key, body, stats

    @property
    def messages(self) -> list[dict[str, str]]:
        return self.body["messages"]

    def system(self) -> str | None:
        m = self.messages
        return m[0]["content"] if m and m[0]["role"] == "system" else None

    def set(self, args: list[str], text: str) -> str:
        """`/set ...`'s answer, as `ollama run` words it; `text`: what follows `/set system`, as typed."""
        what = args[0] if args else ""
        if what == "system" and len(args) > 1:
            if self.system() is not None:
                self.messages[0]["content"] = text
            else:
                self.messages.insert(0, {"role": "system", "content": text})
            return "Set system message.\n"
        if what == "parameter":
            return self._parameter(args[1:])
        if what in ("verbose", "quiet") and len(args) == 1:
            self.stats = sys.stderr if what == "verbose" else None
            return f"Set '{what}' mode.\n"
        if args == ["format", "json"]:
            self.body["response_format"] = {"type": "json_object"}
            return "Set format to 'json' mode.\n"
        if args == ["noformat"]:
            self.body.pop("response_format", None)
            return "Disabled format.\n"
        if what in ("history", "nohistory", "wordwrap", "nowordwrap", "think", "nothink"):
            return f"/set {what} is not supported here\n"
        return SET_HELP

    def _parameter(self, args: list[str]) -> str:
        if args and args[0] in SERVERS:
            return f"Couldn't set parameter: {args[0]} is the server's here ({SERVERS[args[0]]})\n"
        if len(args) < 2 or args[0] not in PARAMETERS:
            return (f"Unknown parameter '{args[0]}'\n" if args and args[0] not in PARAMETERS else "") + PARAMETER_HELP
        name, values = args[0], args[1:]
        field, kind = PARAMETERS[name]
        if kind is str:
            self.body[field] = values
            return f"Set parameter '{name}' to '{', '.join(values)}'\n"
        try:
            value = kind(values[0]) if len(values) == 1 else None
        except ValueError:
            value = None
        if value is None:
            return f"Couldn't set parameter: {name} takes one {'whole ' if kind is int else ''}number\n"
        if name in RANGES and not RANGES[name][1](value):
            return f"Couldn't set parameter: {name} is {RANGES[name][0]} here\n"
        if name == "num_predict" and value < 1:  # (Ollama's -1: no limit, its default; -2: up to the context)
            if value == 0:
                return "Couldn't set parameter: num_predict takes a whole number of at least 1, or -1 (no limit)\n"
            self.body.pop(field, None)  # (the reply's room is then the model's, as with no --max-tokens)
            return f"Set parameter '{name}' to '{values[0]}'\n"
        self.body[field] = value
        return f"Set parameter '{name}' to '{values[0]}'\n"

    def show(self, args: list[str]) -> str:
        what = args[0] if len(args) == 1 else ""
        if what == "system":
            return (self.system() or "No system message was specified.") + "\n"
        if what == "parameters":
            fields = {f: n for n, (f, _) in PARAMETERS.items()}
            set_ = [(fields[k], v) for k, v in self.body.items() if k in fields]
            if not set_:
                return "No parameters were set.\n"
            return "User defined parameters:\n" + "".join(
                f"  {n:<16}{' '.join(map(str, v)) if isinstance(v, list) else v}\n" for n, v in set_)
        if what in ("info", "template"):
            try:
                got = show(self.url, self.key, self.body["model"])
            except ChatError as e:
                return f"error: {e}\n"
            if what == "info":
                return render_show(got) + "\n"
            return (got.get("template") or "The model has no chat template.") + "\n"
        return SHOW_HELP


def conversation(url: str, key: str | None, body: dict[str, Any], inp: TextIO, out: TextIO,
                 stats: TextIO | None = None) -> None:
    """A conversation: each line read is a user turn, or the lines between \"\"\" and \"\"\" (`/bye` or end of input
    ends it; Ctrl-C stops a reply); `/set`, `/show`, `/clear`, `/?` and `/help` as `ollama run` has them."""
    chat = Chat(url, key, body, stats)
    messages = chat.messages
    out.write("(/bye or Ctrl-D to leave; /? for help; Ctrl-C stops a reply)\n")
    while True:
        try:
            line = read_message(inp, out, ">>> ")
        except KeyboardInterrupt:
            out.write("\nUse Ctrl-D or /bye to leave.\n")
            continue
        if line is None or line.strip() == "/bye":
            if line is None:
                out.write("\n")
            return
        if not line.strip():
            continue
        command = line.strip()
        if command in ("/?", "/help"):
            out.write(HELP)
            continue
        if command == "/clear":
            del messages[1 if chat.system() is not None else 0:]
            out.write("Cleared the conversation so far.\n")
            continue
        word, *args = command.split()
        if word == "/set":
            out.write(chat.set(args, command.split(None, 2)[2] if len(args) > 1 else ""))
            continue
        if word == "/show":
            out.write(chat.show(args))
            continue
        if word == "/load" and len(args) == 1:  # (as `ollama run`'s: another model, the conversation begun anew)
            try:
                with said_if_not_served(chat.url, chat.key, args[0]):
                    check_model(chat.url, chat.key, name := resolve(chat.url, chat.key, args[0]))
            except ChatError as e:
                out.write(f"error: {e}\n")
                continue
            chat.body["model"] = name
            del messages[1 if chat.system() is not None else 0:]
            out.write(f"Loading model '{args[0]}'\n")
            continue
        if word == "/load":
            out.write("Usage:\n  /load <modelname>\n")
            continue
        if word == "/save":  # (`ollama run`'s: a model made of the session, which this server does not make)
            out.write(f"{word} is not supported here\n")
            continue
        if word == command and command.startswith("/"):  # (as `ollama run`: a lone /word is a command)
            out.write(f"Unknown command {command!r}. Type /? for help\n")
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = turn(url, key, body, out, chat.stats)
        except KeyboardInterrupt:
            out.write("\n")
            messages.pop()
            continue
        except ChatError as e:
            out.write(f"error: {e}\n")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


def read_text(inp: TextIO) -> str:
    """What is piped in, as text; ChatError when it is not UTF-8 (a decoder that keeps undecodable bytes, as
    Python's does in the C locale, would send them on as lone surrogates, which the server refuses by another
    name)."""
    try:
        text = inp.read()
        text.encode("utf-8")
    except UnicodeError:
        raise ChatError("what is piped in is not UTF-8 text") from None
    return text


def run(url: str, key: str | None, model: str, prompt: str | None, system: str | None, options: dict[str, Any],
        inp: TextIO | None = None, out: TextIO | None = None, verbose: bool = False) -> None:
    inp, out = inp or sys.stdin, out or sys.stdout  # (read when called: a test runner swaps them after import)
    if inp is None:  # (stdin closed, `<&-`: Python's sys.stdin is None; nothing is piped in, it was a traceback)
        import io

        inp = io.StringIO()
    if out is None:  # (stdout closed, `>&-`: the reply goes nowhere, as click's echo drops `ls`'s lines; it was a
        # traceback after the reply had been asked for)
        import os

        out = open(os.devnull, "w")  # noqa: SIM115 - (the process's own stdout, left to its end as sys.stdout is)
    with said_if_not_served(url, key, model):
        _run(url, key, model, prompt, system, options, inp, out, verbose)


def _run(url: str, key: str | None, model: str, prompt: str | None, system: str | None, options: dict[str, Any],
         inp: TextIO, out: TextIO, verbose: bool) -> None:
    stats = sys.stderr if verbose else None  # (as `ollama run --verbose`: the timings on stderr, the reply alone out)
    model = resolve(url, key, model)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    body: dict[str, Any] = {"model": model, "messages": messages, **options}
    if not inp.isatty():  # piped in: the prompt, or (as `ollama run`) text the prompt's words follow
        piped = read_text(inp)
        prompt = piped if prompt is None else f"{piped.rstrip()}\n\n{prompt}" if piped.strip() else prompt
    if prompt is not None:
        if not prompt.strip():
            raise ChatError("the prompt is empty")
        messages.append({"role": "user", "content": prompt})
        turn(url, key, body, out, stats)
        return
    check_model(url, key, model)
    conversation(url, key, body, inp, out, stats)
