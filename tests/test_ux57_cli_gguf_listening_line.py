"""`tokenpool serve FILE.gguf` on a first run converts the file after the port is bound (minutes for a 7B), but the
line saying where the server is came only after the conversion: the user had nowhere to go meanwhile. The address is
said as soon as the socket is served, with what it is doing first ("converting tiny-chat.gguf (once)"), while
/health answers "starting"; "listening on" still means ready (scripts wait for it)."""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.request

from typer.testing import CliRunner

from controller import real_model
from controller.cli import app
from tests import ports


def _free_port() -> int:
    return ports.free_port(range(18600, 18700))


def test_the_address_is_said_while_the_gguf_converts(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="tokenpool")  # (serve's own logging's level)
    f = tmp_path / "tiny-chat.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    seen = {}

    def ensure_gguf(path, cache):  # (the conversion: what the user saw while it ran)
        said = re.search(r"accepting connections on (http://127\.0\.0\.1:\d+): converting tiny-chat\.gguf \(once\) "
                         r"first; /health says \"starting\" and requests wait", caplog.text)
        seen["said"] = bool(said)
        seen["listening"] = "listening on" in caplog.text
        if said:
            try:
                urllib.request.urlopen(said.group(1) + "/health", timeout=5)
            except urllib.error.HTTPError as e:
                seen["health"] = (e.code, json.loads(e.read()).get("status"))
        out = real_model.gguf_folder(path, cache)
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2048}))
        (out / real_model.MARKER).write_text("{}")
        return out

    monkeypatch.setattr(real_model, "ensure_gguf", ensure_gguf)
    r = CliRunner().invoke(app, ["serve", str(f), "--host", "127.0.0.1", "--port", str(_free_port()),
                                 "--max-model-len", "4096"])
    assert r.exit_code == 2, r.output  # (the converted model takes 2048: refused once it is converted)
    assert seen == {"said": True, "listening": False, "health": (503, "starting")}, (seen, caplog.text)
