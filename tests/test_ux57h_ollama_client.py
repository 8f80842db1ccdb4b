"""Found by using tokenpool through the official `ollama` client (and as the `ollama` CLI reads it), against one live
server of a tiny model:

- `/api/tags` and `/api/ps` listed each model with an empty `digest`: the `ollama` CLI pointed here (OLLAMA_HOST)
  cuts it to 12 for its ID column (`m.Digest[:12]`), a Go panic for `ollama ls` and `ollama ps`;
- `/api/tags`, `/api/show` and `/api/ps` gave no parameter count (`details.parameter_size` "", no
  `general.parameter_count`), which `ollama show`, `tokenpool show` and GUIs print: now summed from the safetensors
  headers, written as Ollama's format.HumanNumber;
- `/api/ps` gave a model held by a CPU worker `size_vram` = its size: `ollama ps` said "100% GPU" (now 0: "100% CPU");
- `/api/generate` with `images` (or `suffix`) alone said "images and suffix are not supported": now the one sent is
  named, `suffix` in Ollama's words ("does not support insert");
- the client's `create_blob` (the first step of a create from a GGUF) got a bare 404 "Not Found", or, for a file past
  the body limit (any GGUF), a 413: now create's 501, saying how models get here.

Found fine, and pinned: the chat/generate/embed replies the client parses (timings, done_reason, created_at),
streamed and not, and through `ollama.AsyncClient`.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from datetime import datetime

import httpx
import ollama
import pytest

from tests import ports


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux57h_ollama")
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": "tiny", "path": str(make_tiny("qwen2")), "engine": {"max_num_seqs": 8}},
                      {"name": "other", "path": str(make_tiny("qwen2")), "engine": {"max_num_seqs": 8}}]}
    with ports.live_server_on(range(19000, 19050), cfg, work) as srv:
        yield srv


def oc(srv) -> ollama.Client:
    return ollama.Client(host=srv.url, timeout=60)


HEX64 = re.compile(r"[0-9a-f]{64}")


def test_ls_and_ps_give_each_model_a_digest_the_ollama_cli_can_cut(server):
    """Each listed model has a sha256-like digest (64 hex digits, as Ollama's), its own, the same in `ps` as in
    `ls` and from one call to the next: `ollama ls`/`ollama ps` print `m.Digest[:12]`, which panicked on ""."""
    c = oc(server)
    c.generate(model="tiny", prompt="hi", options={"num_predict": 1})  # (resident now: listed by ps)
    listed = {m.model: m.digest for m in c.list().models}
    assert set(listed) == {"tiny:latest", "other:latest"}  # (as Ollama names them: test_ux57i_ollama_tags)
    assert all(HEX64.fullmatch(d or "") for d in listed.values()), listed
    assert listed["tiny:latest"] != listed["other:latest"]  # (one folder served twice: still two models)
    assert {m.model: m.digest for m in c.list().models} == listed
    deadline = time.monotonic() + 0.8  # (ps reads the residency the worker reports, each heartbeat: 0.25 s here)
    while "tiny:latest" not in (running := {m.model: m.digest for m in c.ps().models}) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert running["tiny:latest"] == listed["tiny:latest"]


def test_ps_gives_no_vram_for_a_model_on_a_cpu_worker(server):
    """A model resident on a CPU engine only: size_vram 0, as Ollama's ps gives a model in system memory (`ollama ps`
    prints "100% CPU"); it was the model's size ("100% GPU")."""
    c = oc(server)
    c.generate(model="tiny", prompt="hi", options={"num_predict": 1})
    deadline = time.monotonic() + 0.8
    while not (got := [m for m in c.ps().models if m.model == "tiny:latest"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert got and got[0].size > 0 and got[0].size_vram == 0


def test_show_and_ls_give_the_parameter_count(server, make_tiny):
    """general.parameter_count: the tensors' elements in the model's safetensors files; parameter_size as Ollama
    writes it (355K for this tiny model's 354,880), in ls as in show."""
    from safetensors import safe_open

    want = 0
    for f in make_tiny("qwen2").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            want += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    c = oc(server)
    shown = c.show("tiny")
    assert shown.modelinfo["general.parameter_count"] == want
    size = f"{want / 1e3:.0f}K"
    assert shown.details.parameter_size == size
    assert {m.model: m.details.parameter_size for m in c.list().models} == {"tiny:latest": size, "other:latest": size}


@pytest.mark.parametrize("n, said", [(354_880, "355K"), (134_515_008, "134.52M"), (135_000_000, "135M"),
                                     (7_615_616_512, "7.6B"), (8_000_000_000, "8B"), (999, "999")])
def test_parameter_sizes_as_ollama_writes_them(n, said):
    from controller.api.ollama import _human_number

    assert _human_number(n) == said


def test_a_generate_with_images_or_a_suffix_names_the_one_sent(server):
    """images alone: the chat's words, no word of a suffix; a suffix alone: Ollama's "does not support insert"."""
    c = oc(server)
    with pytest.raises(ollama.ResponseError) as e:
        c.generate(model="tiny", prompt="what is it", images=["aGk="])
    assert e.value.status_code == 400
    assert "images are not supported" in e.value.error and "suffix" not in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        c.generate(model="tiny", prompt="def f(", suffix="    return x")
    assert e.value.status_code == 400
    assert '"tiny" does not support insert' in e.value.error and "image" not in e.value.error


@pytest.mark.parametrize("size", [16, 6 << 20])  # (a small file; one past the 4 MiB body limit, as a GGUF is)
def test_create_blob_is_creates_501_saying_how_models_get_here(server, tmp_path, size):
    """The client's create_blob asks HEAD /api/blobs/DIGEST (404: not here, as Ollama's for a blob it lacks) and then
    uploads it: a 501 naming the admin API, as /api/create's, where it was a bare 404 "Not Found" or a 413."""
    blob = tmp_path / "model.gguf"
    blob.write_bytes(b"GGUF" + bytes(size))
    with pytest.raises(ollama.ResponseError) as e:
        oc(server).create_blob(blob)
    assert e.value.status_code == 501
    assert "is not supported" in e.value.error and "POST /admin/models" in e.value.error
    assert httpx.head(server.url + "/api/blobs/sha256:" + "0" * 64).status_code == 404


def test_replies_parse_as_the_client_types_them(server):
    """Chat and generate, streamed and not, and embed: each field the client's models type (ints of nanoseconds,
    done_reason, created_at as RFC 3339 with a zone), the stream's last line carrying the counts."""
    c = oc(server)
    opts = {"num_predict": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 1, "num_ctx": 512}
    r = c.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], options=opts, keep_alive="5m")
    assert r.done and r.done_reason == "length" and r.eval_count == 3 and r.prompt_eval_count > 0
    assert all(isinstance(v, int) for v in (r.total_duration, r.load_duration, r.eval_duration,
                                            r.prompt_eval_duration))
    assert datetime.fromisoformat(r.created_at).tzinfo is not None
    parts = list(c.generate(model="tiny", prompt="hi", stream=True, options=opts))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == 3 and parts[-1].context
    e = c.embed(model="tiny", input=["a", "b"])
    assert len(e.embeddings) == 2 and e.prompt_eval_count == 2


def test_the_async_client(server):
    """ollama.AsyncClient: chat, a stream, embed, ps and an unknown model's 404, requests side by side."""
    async def main():
        a = ollama.AsyncClient(host=server.url, timeout=60)
        msgs = [{"role": "user", "content": "hi"}]
        got = await asyncio.gather(*[a.chat(model="tiny", messages=msgs, options={"num_predict": 2})
                                     for _ in range(4)])
        assert all(r.done and r.eval_count == 2 for r in got)
        parts = [p async for p in await a.chat(model="tiny", messages=msgs, stream=True,
                                               options={"num_predict": 2})]
        assert parts[-1].done and parts[-1].done_reason == "length"
        assert len((await a.embed(model="tiny", input="x")).embeddings) == 1
        assert "tiny:latest" in {m.model for m in (await a.ps()).models}
        with pytest.raises(ollama.ResponseError) as e:
            await a.chat(model="nope", messages=msgs)
        assert e.value.status_code == 404 and e.value.error == "model 'nope' not found"

    asyncio.run(main())
