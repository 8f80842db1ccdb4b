"""Gaps found in review, checked on one live server (two tiny models: `tiny`, a licence file in its folder, no
thinking; `think`, a GGUF conversion's folder with the licence beside its GGUF file and a template that thinks, as
Qwen3's `enable_thinking` switch, opening the think block in the prompt as thinking models' templates do):

- `tokenpool show MODEL` printed the model's facts and capabilities only: it prints the server's parameters (stop,
  num_ctx, sampling) and the head of the licence, as `ollama show` lays them out; --parameters, --license and
  --modelfile print that one alone, as ollama show's;
- /api/show had no `license`: the model folder's LICENSE / LICENSE.txt / LICENSE.md (any case) text, or for a GGUF
  conversion the one beside its GGUF file; left out where there is none, as Ollama's; the Modelfile's LICENSE too;
- Messages `thinking` other than disabled was a 400 "extended thinking is not supported", which broke Claude Code
  (it sends {"type": "adaptive"}): `disabled` turns the template's thinking off, `adaptive` thinks where the model
  can, `enabled` (budget_tokens) thinks or is a 400 for a model that cannot; the thinking comes as a `thinking`
  block (streamed as thinking_delta and signature_delta events).
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from typer.testing import CliRunner

from tests.ports import live_server_on

PORTS = range(25300, 25400)
AH = {"anthropic-version": "2023-06-01", "x-api-key": "x"}
LICENSE = "Apache License\nVersion 2.0, January 2004\n\n   TERMS AND CONDITIONS\nline four\n"
GGUF_LICENSE = "MIT License\n\nCopyright (c) someone\n"
# Qwen3's switch: off, the reply starts after an empty think block; on, the prompt opens the block (as Qwen3's
# Thinking-2507 and DeepSeek-R1 templates do), so the reply is its thinking until </think>
THINKING_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}")


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    from controller.real_model import MARKER

    work = tmp_path_factory.mktemp("ux59c")
    tiny, think, src = work / "tiny", work / "think", work / "gguf-src"
    shutil.copytree(make_varied("qwen2"), tiny)
    (tiny / "LICENSE.md").write_text(LICENSE)
    shutil.copytree(make_varied("qwen2"), think)
    (think / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    src.mkdir()
    (src / "LICENSE").write_text(GGUF_LICENSE)  # (beside the GGUF file the folder was converted from)
    (think / MARKER).write_text(json.dumps({"source": str(src / "think.Q8_0.gguf"), "gguf": "think.Q8_0.gguf",
                                            "file_type": "Q8_0"}))
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "tiny", "path": str(tiny), "engine": {"max_num_seqs": 8}},
                      {"name": "think", "path": str(think), "engine": {"max_num_seqs": 8}}]}
    with live_server_on(PORTS, cfg, work) as srv:
        yield srv


def shown(srv, model: str) -> dict:
    r = httpx.post(srv.url + "/api/show", json={"model": model}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_show_gives_the_models_license(server):
    """/api/show's `license`: the folder's LICENSE.md, or a GGUF conversion's from beside its GGUF file, as the
    `ollama` client reads it; the Modelfile ends with it. A model without one has no field (as Ollama's)."""
    from types import SimpleNamespace

    import ollama

    from controller.api.ollama import _license

    c = ollama.Client(host=server.url, timeout=30)
    assert c.show("tiny").license == LICENSE.strip()
    got = c.show("think")
    assert got.license == GGUF_LICENSE.strip() and got.details.format == "gguf"
    assert shown(server, "tiny")["modelfile"].endswith(f'LICENSE """{LICENSE.strip()}"""\n')
    bare = shown(server, "tiny")["modelfile"].split("LICENSE", 1)[0]  # (the rest as it was)
    assert bare.count("PARAMETER num_ctx") == 1
    assert _license(SimpleNamespace(spec=SimpleNamespace(path=str(server.workdir)))) is None  # (a folder without)


def test_show_cli_prints_parameters_and_license(server):
    """`tokenpool show` lays out the server's parameters (a name and its value a row, the names' column as wide as
    the longest and 4 spaces) after the capabilities, then the licence's first two lines and "...", as `ollama show`;
    --parameters, --license and --modelfile print that field alone; two of them is a usage error."""
    from controller.cli import app

    got = shown(server, "tiny")
    params = [line.split(None, 1) for line in got["parameters"].splitlines()]
    assert ["num_ctx", str(got["model_info"]["context_length"])] in params and any(k == "stop" for k, _ in params)
    width = max(len(k) for k, _ in params) + 4
    r = CliRunner().invoke(app, ["show", "tiny", "--url", server.url])
    assert r.exit_code == 0, r.output
    out = r.output.splitlines()
    at = out.index("  Parameters")
    assert out[at - 2:at] == ["    completion", ""]
    assert out[at + 1:at + 1 + len(params)] == [f"    {k:<{width}}{v}" for k, v in params]
    assert out[at + 1 + len(params):] == ["", "  License", "    Apache License", "    Version 2.0, January 2004",
                                          "    ..."], r.output
    for flag, want in (("--parameters", got["parameters"]), ("--license", LICENSE.strip()),
                       ("--modelfile", got["modelfile"])):
        r = CliRunner().invoke(app, ["show", "tiny", flag, "--url", server.url])
        assert (r.exit_code, r.output) == (0, want + "\n"), (flag, r.output)
    r = CliRunner().invoke(app, ["show", "tiny", "--license", "--template", "--url", server.url])
    assert r.exit_code == 2 and "only one of" in r.output, r.output
