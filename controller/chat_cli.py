"""`tokenpool run MODEL [PROMPT]` (as `ollama run`): one chat turn streamed to the terminal, or a conversation when
no prompt is given on a terminal (stdin piped in is the prompt). `tokenpool ls` (as `ollama list`): the models the
key may use.

Talks to the server's OpenAI API (`/v1/chat/completions`, streamed; `/v1/models`) with the standard library only.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, TextIO

from controller.ps import error_message


class ChatError(RuntimeError):
    pass


def _request(url: str, path: str, key: str | None, body: dict | None = None, timeout: float = 600.0):
    headers = {"content-type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers)
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        msg = error_message(e)
        hint = " (pass --api-key or set TOKENPOOL_API_KEY)" if e.code == 401 else ""
        raise ChatError(f"{msg}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ChatError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None


def models(url: str, key: str | None) -> list[dict[str, Any]]:
    with _request(url, "/v1/models", key, timeout=10) as r:
        return json.loads(r.read())["data"]


def stream_chat(url: str, key: str | None, body: dict[str, Any]) -> Iterator[str]:
    """The content deltas of one streamed chat completion; ChatError on an error event or refusal."""
    with _request(url, "/v1/chat/completions", key, {**body, "stream": True}) as r:
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
            for ch in ev.get("choices", []):
                text = (ch.get("delta") or {}).get("content")
                if text:
                    yield text


def turn(url: str, key: str | None, body: dict[str, Any], out: TextIO) -> str:
    """One streamed reply written to `out` as it comes; its whole text."""
    parts = []
    for text in stream_chat(url, key, body):
        out.write(text)
        out.flush()
        parts.append(text)
    out.write("\n")
    out.flush()
    return "".join(parts)


def conversation(url: str, key: str | None, body: dict[str, Any], inp: TextIO, out: TextIO) -> None:
    """A conversation: each line read is a user turn (`/bye` or end of input ends it; Ctrl-C stops a reply)."""
    messages = body["messages"]
    out.write("(/bye or Ctrl-D to leave; Ctrl-C stops a reply)\n")
    while True:
        out.write(">>> ")
        out.flush()
        try:
            line = inp.readline()
        except KeyboardInterrupt:
            out.write("\nUse Ctrl-D or /bye to leave.\n")
            continue
        if not line or line.strip() == "/bye":
            if not line:
                out.write("\n")
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        try:
            reply = turn(url, key, body, out)
        except KeyboardInterrupt:
            out.write("\n")
            messages.pop()
            continue
        except ChatError as e:
            out.write(f"error: {e}\n")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


def run(url: str, key: str | None, model: str, prompt: str | None, system: str | None, options: dict[str, Any],
        inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    body: dict[str, Any] = {"model": model, "messages": messages, **options}
    if prompt is None and not inp.isatty():
        prompt = inp.read()
    if prompt is not None:
        if not prompt.strip():
            raise ChatError("the prompt is empty")
        messages.append({"role": "user", "content": prompt})
        turn(url, key, body, out)
        return
    conversation(url, key, body, inp, out)
