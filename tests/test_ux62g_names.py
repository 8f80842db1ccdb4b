"""Ollama model names on the CLI and with Ollama's registry prefixes, and Ollama's default thinking beside `format`,
as a user meets them on a live server (tiny random-weights models; the official `ollama` client, and the CLI through
typer's CliRunner):

- `tokenpool run TINY`, `show Tiny`, `pull Tiny`, `stop TINY`: the CLI asks the OpenAI and admin APIs, whose names
  are exact, so it said `model "TINY" not found` for a name the Ollama routes (7ad3c08) and `ollama run` take. Now
  the CLI reads a name by the Ollama routes' rule (one function, `controller.ollama_names.pick`) and sends the
  served name;
- `library/NAME` and `registry.ollama.ai/library/NAME[:tag]`: Ollama's names are `[host/][namespace/]model[:tag]`,
  its registry's host and its `library` namespace where left out (its types/model ParseName), so those are NAME
  there; here they were a 404. Taken now for a served NAME, routes and CLI; another host or namespace stays a 404;
- the rule's exact step saw every key's models: a key allowed `twin` asking for `Twin` (another key's model) got a
  404 where `TWIN` was `twin`. Now a key's own names only, as /v1/models lists them to the CLI;
- `format` without `think`, to a model that thinks: Ollama turns thinking on (its chat and generate handlers default
  `think` for a model with the thinking capability whatever the format); here it was left off, the JSON held from
  the reply's first token (test_ux61e asserted that: changed). Now on: the think block, then the JSON.
"""

from __future__ import annotations

import json
import shutil

import ollama
import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.keys import hash_key
from controller.ollama_names import pick, spellings
from tests.ports import live_server_on
from tests.test_ux60b_thinking_budget import THINKING_TEMPLATE

PORTS = range(27800, 27900)
ALL, BOB = "key-all-ux62g-0123", "key-bob-ux62g-0123"
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
          "required": ["n", "ok"]}
HI = [{"role": "user", "content": "Hello there"}]
GREEDY = {"temperature": 0, "num_predict": 4}


@pytest.fixture(scope="module")
def server(make_varied, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux62g")
    thinker = work / "thinker"
    shutil.copytree(make_varied("qwen2"), thinker)
    (thinker / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    tiny = str(make_varied("qwen2"))
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "tenants": [{"name": "all", "key_hashes": [hash_key(ALL)]},
                       {"name": "bob", "key_hashes": [hash_key(BOB)], "models": ["twin"]}],
           "models": [{"name": "tiny", "path": tiny, "aliases": ["Nick"], "engine": {"max_num_seqs": 8}},
                      {"name": "twin", "path": tiny, "engine": {"max_num_seqs": 8}},
                      {"name": "Twin", "path": tiny, "engine": {"max_num_seqs": 8}},
                      {"name": "org/model", "path": tiny, "engine": {"max_num_seqs": 8}},
                      {"name": "thinker", "path": str(thinker), "engine": {"max_num_seqs": 8}}]}
    with live_server_on(PORTS, cfg, work) as srv:
        yield srv


def oc(srv, key: str = ALL) -> ollama.Client:
    return ollama.Client(host=srv.url, timeout=120, headers={"Authorization": f"Bearer {key}"})


def cli(srv, *args: str, key: str = ALL):
    return CliRunner().invoke(app, [*args, "--url", srv.url, "--api-key", key], env={"COLUMNS": "200"})


def test_the_rule_read_as_ollama_parses_a_name():
    """Ollama's host and namespace dropped only where they are its registry's and its library's (in any case, a
    URL's scheme before them too), `:latest` as before; a served name with a `/` of its own is found as written."""
    assert spellings("Registry.Ollama.AI/LIBRARY/Tiny:Latest") == \
        ["Registry.Ollama.AI/LIBRARY/Tiny:Latest", "Registry.Ollama.AI/LIBRARY/Tiny", "Tiny:Latest", "Tiny"]
    assert spellings("https://registry.ollama.ai/library/tiny") == ["https://registry.ollama.ai/library/tiny", "tiny"]
    for other in ("other/tiny", "hf.co/library/tiny", "registry.ollama.ai/tiny", "library/a/b", "library/"):
        assert spellings(other) == [other], other
    served = ["tiny", "twin", "Twin", "org/model"]
    got = {n: pick(n, served.__contains__, lambda: served)
           for n in ("library/TINY", "Twin:latest", "TWIN", "org/model:latest", "ORG/MODEL", "library/org/model")}
    assert got == {"library/TINY": "tiny", "Twin:latest": "Twin", "TWIN": None, "org/model:latest": "org/model",
                   "ORG/MODEL": "org/model", "library/org/model": None}


def test_ollama_routes_take_the_library_and_registry_prefixes(server):
    """`library/tiny`, `registry.ollama.ai/library/TINY:latest` are `tiny` on every Ollama route that names a model
    (chat, generate, embed, show, pull), the reply echoing the name as sent; another host or namespace: a 404."""
    c = oc(server)
    want = c.chat(model="tiny", messages=HI, options=GREEDY)
    for name in ("library/tiny", "registry.ollama.ai/library/TINY:latest", "Library/Nick"):
        got = c.chat(model=name, messages=HI, options=GREEDY)
        assert (got.model, got.message.content) == (name, want.message.content), name
    assert c.generate(model="library/tiny:latest", prompt="Hello", options=GREEDY).response == \
        c.generate(model="tiny", prompt="Hello", options=GREEDY).response
    assert c.embed(model="registry.ollama.ai/library/tiny", input="hi").embeddings == \
        c.embed(model="tiny", input="hi").embeddings
    assert c.show("library/tiny").capabilities == c.show("tiny").capabilities
    assert c.pull("registry.ollama.ai/library/tiny").status == "success"
    for name in ("other/tiny", "hf.co/library/tiny", "registry.ollama.ai/tiny", "example.com/library/tiny"):
        with pytest.raises(ollama.ResponseError) as ei:
            c.chat(model=name, messages=HI, options=GREEDY)
        assert (ei.value.status_code, ei.value.error) == (404, f"model '{name}' not found"), name


def test_a_keys_names_are_its_own(server):
    """A key allowed `twin` only: `Twin` (another key's model, by that exact name) and `TWIN` are its `twin`, as the
    CLI reads them from its /v1/models; the other key sees both and `TWIN` names neither."""
    bob = oc(server, BOB)
    for name in ("Twin", "TWIN:latest", "library/Twin"):
        assert bob.chat(model=name, messages=HI, options=GREEDY).done, name
    with pytest.raises(ollama.ResponseError) as ei:
        oc(server).chat(model="TWIN", messages=HI, options=GREEDY)
    assert ei.value.status_code == 404
    r = cli(server, "run", "Twin", "hi", "--max-tokens", "2", key=BOB)
    assert r.exit_code == 0, r.output


def test_cli_takes_what_ollama_run_takes(server):
    """`tokenpool run`, `show`, `pull` and `stop` with a name in other cases, with `:latest`, or with Ollama's
    library prefixes: served (the served name sent); the reply is the one the exact name gets. A name no model
    answers to (`TWIN`: twin and Twin) or of another namespace is said as before, with what is served."""
    want = cli(server, "run", "tiny", "Hello there", "--max-tokens", "4", "--temperature", "0")
    assert want.exit_code == 0 and want.output.strip(), want.output
    for name in ("TINY", "Tiny:Latest", "library/tiny", "registry.ollama.ai/library/Tiny", "nick"):
        r = cli(server, "run", name, "Hello there", "--max-tokens", "4", "--temperature", "0")
        assert (r.exit_code, r.output) == (0, want.output), (name, r.output)
    shown = cli(server, "show", "Tiny")
    assert shown.exit_code == 0 and shown.output == cli(server, "show", "tiny").output, shown.output
    assert cli(server, "show", "library/TINY", "--parameters").exit_code == 0
    r = cli(server, "pull", "Tiny")
    assert r.exit_code == 0 and "Tiny: served by" in r.output and "(as tiny)" in r.output, r.output
    r = CliRunner().invoke(app, ["stop", "TINY", "--url", server.url], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and r.output.startswith("TINY: "), r.output
    r = CliRunner().invoke(app, ["stop", "library/tiny:latest", "--url", server.url], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "not found" not in r.output, r.output
    for name in ("TWIN", "other/tiny"):
        for cmd in (["run", name, "hi"], ["show", name]):
            r = cli(server, *cmd)
            assert r.exit_code == 1 and f'model "{name}" not found; served: tiny, Nick, twin, Twin' in r.output, \
                (cmd, r.output)
        r = CliRunner().invoke(app, ["stop", name, "--url", server.url], env={"COLUMNS": "200"})
        assert r.exit_code == 1 and f'model "{name}" not found' in r.output, r.output


def test_format_without_think_thinks_as_ollamas(server):
    """`format` without `think`, to a model that thinks: as `think: true` with it (the thinking apart, then the
    schema's JSON where the block closed in time), chat and generate; `think: false` keeps it off (the JSON from
    the first token, the content)."""
    c = oc(server)
    opts = {"temperature": 0, "num_predict": 24}
    for fmt in (SCHEMA, "json"):
        on = c.chat(model="thinker", messages=HI, think=True, format=fmt, options=opts)
        got = c.chat(model="thinker", messages=HI, format=fmt, options=opts)
        assert got.message.thinking and not got.message.thinking.lstrip().startswith("{"), got.message
        assert (got.message.thinking, got.message.content) == (on.message.thinking, on.message.content)
        if got.message.content:
            assert isinstance(json.loads(got.message.content), dict)
        g_on = c.generate(model="thinker", prompt="Hello there", think=True, format=fmt, options=opts)
        g = c.generate(model="thinker", prompt="Hello there", format=fmt, options=opts)
        assert g.thinking and (g.thinking, g.response) == (g_on.thinking, g_on.response)
    off = c.chat(model="thinker", messages=HI, think=False, format=SCHEMA, options={"temperature": 0,
                                                                                  "num_predict": 60})
    assert not off.message.thinking and off.message.content.startswith('{"n": ')
