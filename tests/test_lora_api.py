"""LoRA adapters through the live server, as vLLM users serve them: configured adapters and ones loaded at runtime
(/v1/load_lora_adapter), asked for by name with the official `openai` client, each output checked against HF
transformers on the model with that adapter merged into its weights (the pooled CPU worker, fp32)."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from controller.keys import hash_key
from controller.model_factory import make_lora, merge_lora
from load_tests.live_server import LiveServer

ADMIN = "admin-lora-token"
ALICE, BOB = "key-alice-lora-0123", "key-bob-lora-0123"
PROMPTS = ["Once upon a time", "The capital of France is", "x"]
GREEDY = dict(max_tokens=10, temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def dirs(make_varied, make_tiny, tmp_path_factory):
    """The base models, their adapters, and the merged references."""
    root = tmp_path_factory.mktemp("lora-api")
    a, b = make_varied("qwen2"), make_varied("llama")
    d = {"tiny-a": a, "tiny-b": b,
         "sql": make_lora(a, root / "sql", rank=4, alpha=48, seed=1),
         "chat": make_lora(a, root / "chat", rank=2, alpha=32, seed=2, targets=("q_proj", "v_proj", "down_proj")),
         "llama-ad": make_lora(b, root / "llama-ad", rank=4, alpha=48, seed=3),
         "qwen3-ad": make_lora(make_tiny("qwen3"), root / "qwen3-ad", rank=4),  # (q/k/v of other shapes)
         "rank72": make_lora(a, root / "rank72", rank=72, targets=("o_proj",))}  # (over the default largest rank)
    for ad in ("sql", "chat"):
        d[f"merged-{ad}"] = merge_lora(a, d[ad], root / f"merged-{ad}")
    return d


@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory):
    cfg = {
        "admin_token_hash": hash_key(ADMIN),
        "workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
        "tenants": [{"name": "alice", "key_hashes": [hash_key(ALICE)]},
                    {"name": "bob", "key_hashes": [hash_key(BOB)], "models": ["sql"]}],
        "models": [
            {"name": "tiny-a", "path": str(dirs["tiny-a"]), "engine": {"max_num_seqs": 8},
             "lora_modules": [{"name": "sql", "path": str(dirs["sql"])}]},
            {"name": "tiny-b", "path": str(dirs["tiny-b"]), "engine": {"max_num_seqs": 8}},
        ],
    }
    with LiveServer(cfg, tmp_path_factory.mktemp("lora-srv")) as srv:
        yield srv


@pytest.fixture(scope="module")
def hf(dirs):
    """name -> (greedy continuation of a text, last hidden state of a text) on HF transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(dirs["tiny-a"]))
    out = {}
    for name, key in (("tiny-a", "tiny-a"), ("sql", "merged-sql"), ("chat", "merged-chat")):
        model = AutoModelForCausalLM.from_pretrained(str(dirs[key]), dtype=torch.float32).eval()

        def gen(text, model=model) -> list[int]:
            ids = tok.encode(text, add_special_tokens=False)
            with torch.no_grad():
                o = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY["max_tokens"], do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
            return o[0, len(ids):].tolist()

        def last(text, model=model) -> torch.Tensor:
            with torch.no_grad():
                ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
                return model(ids, output_hidden_states=True).hidden_states[-1][0, -1]

        out[name] = (gen, last)
    return tok, out


def client(srv, key=ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _post(srv, path: str, body: dict, key: str = ADMIN) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)



def _text(tok, ids: list[int]) -> str:
    """What the API says for `ids`: their text less a character the last tokens only began (detokenizer: dropped, as
    vLLM's, not sent as U+FFFD)."""
    return tok.decode(ids).rstrip("\ufffd")


def test_configured_adapter_matches_merged_weights(server, hf):
    """Requests for the adapter, for its model and for the other model, sent at once: each output is HF's on its own
    weights (the adapter's merged in), and the adapter changes what the model says."""
    tok, ref = hf
    c = client(server)
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(8) as ex:
        futs = {(m, p): ex.submit(c.completions.create, model=m, prompt=p, **GREEDY)
                for m in ("tiny-a", "sql") for p in PROMPTS}
        got = {k: f.result() for k, f in futs.items()}
    differ = 0
    for p in PROMPTS:
        for m in ("tiny-a", "sql"):
            r = got[m, p]
            assert r.model == m
            assert r.choices[0].text == _text(tok, ref[m][0](p)), (m, p)
        differ += got["tiny-a", p].choices[0].text != got["sql", p].choices[0].text
    assert differ >= 2
    chat = c.chat.completions.create(model="sql", messages=[{"role": "user", "content": "hi"}], **GREEDY)
    assert chat.model == "sql" and chat.choices[0].message.content
    # /metrics: the adapter's requests and tokens, beside its model's (which count them too)
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    got_m = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text)
             for s in f.samples}
    assert got_m[("tokenpool_lora_requests_total", (("lora", "sql"), ("model", "tiny-a"), ("status", "200")))] == 4
    assert got_m[("tokenpool_lora_generation_tokens_total", (("lora", "sql"), ("model", "tiny-a")))] == 40


def test_models_list_adapters_with_their_parent(server):
    """/v1/models lists an adapter after the models, with `parent` its model; a tenant allowed only the adapter sees
    only it, may use it, and not the model under it."""
    ids = {m.id: m for m in client(server).models.list().data}
    assert {"tiny-a", "tiny-b", "sql"} <= set(ids)
    assert ids["sql"].model_extra.get("parent") == "tiny-a" and ids["tiny-a"].model_extra.get("parent") is None
    assert client(server).models.retrieve("sql").model_extra.get("parent") == "tiny-a"
    bob = client(server, BOB)
    assert [m.id for m in bob.models.list().data] == ["sql"]
    assert bob.completions.create(model="sql", prompt="x", max_tokens=2).choices[0].text is not None
    with pytest.raises(openai.NotFoundError):
        bob.completions.create(model="tiny-a", prompt="x", max_tokens=2)
    admin = httpx.get(server.url + "/admin/models", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    a = next(m for m in admin if m["name"] == "tiny-a")
    assert [lm["name"] for lm in a["lora_modules"]] == ["sql"]
    tags = httpx.get(server.url + "/api/tags", headers={"Authorization": f"Bearer {ALICE}"}).json()["models"]
    assert {"tiny-a:latest", "tiny-b:latest", "sql:latest"} <= {m["name"] for m in tags}
    show = httpx.post(server.url + "/api/show", json={"model": "sql"}, headers={"Authorization": f"Bearer {BOB}"})
    assert show.status_code == 200 and show.json()["details"]["family"] == "qwen2"


def test_adapter_embeddings(server, hf):
    tok, ref = hf
    r = client(server).embeddings.create(model="sql", input=PROMPTS[1], encoding_format="float")
    want = ref["sql"][1](PROMPTS[1])
    assert (torch.tensor(r.data[0].embedding) - want / want.norm()).abs().max().item() < 1e-4
    base = client(server).embeddings.create(model="tiny-a", input=PROMPTS[1], encoding_format="float")
    assert (torch.tensor(base.data[0].embedding) - torch.tensor(r.data[0].embedding)).abs().max().item() > 1e-3


def test_load_and_unload_at_runtime(server, dirs, hf):
    """vLLM's /v1/load_lora_adapter serves a new adapter at once (HF's output on its merged weights); unloaded, it is
    a 404 again and is gone from /v1/models. A tenant key of a multi-tenant server may not load one."""
    tok, ref = hf
    c = client(server)
    body = {"lora_name": "chat", "lora_path": str(dirs["chat"]), "base_model_name": "tiny-a"}
    assert _post(server, "/v1/load_lora_adapter", body, key=ALICE).status_code == 401
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="chat", prompt="x", max_tokens=2)
    r = _post(server, "/v1/load_lora_adapter", body)
    assert r.status_code == 200 and "chat" in r.text
    for p in PROMPTS[:2]:
        assert c.completions.create(model="chat", prompt=p, **GREEDY).choices[0].text == _text(tok, ref["chat"][0](p))
    assert "chat" in {m.id for m in c.models.list().data}
    r = _post(server, "/v1/unload_lora_adapter", {"lora_name": "chat"})
    assert r.status_code == 200 and "removed" in r.text
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="chat", prompt="x", max_tokens=2)
    assert "chat" not in {m.id for m in c.models.list().data}
    gone = _post(server, "/v1/unload_lora_adapter", {"lora_name": "chat"})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "lora_name"
    # loaded again (the engines retired the first one): the same outputs
    assert _post(server, "/v1/load_lora_adapter", body).status_code == 200
    p = PROMPTS[0]
    assert c.completions.create(model="chat", prompt=p, **GREEDY).choices[0].text == _text(tok, ref["chat"][0](p))
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "chat"}).status_code == 200


def test_unload_while_a_request_streams(server, dirs, hf):
    """An adapter unloaded while its request streams: the request finishes with the adapter (its text is the one it
    gives alone), and the next request for it is a 404."""
    tok, ref = hf
    c = client(server)
    body = {"lora_name": "chat", "lora_path": str(dirs["chat"]), "base_model_name": "tiny-a"}
    assert _post(server, "/v1/load_lora_adapter", body).status_code == 200
    kw = dict(model="chat", prompt=PROMPTS[0], max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
    alone = c.completions.create(**kw).choices[0].text
    text = ""
    for i, ch in enumerate(c.completions.create(stream=True, **kw)):
        if i == 2:
            assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "chat"}).status_code == 200
        text += ch.choices[0].text if ch.choices else ""
    assert text == alone
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="chat", prompt="x", max_tokens=2)


def test_load_errors(server, dirs):
    """Each refusal is a clear OpenAI error naming the field: an adapter of another shape, one of a rank over the
    model's largest (engine.max_lora_rank, default 64), a taken name, an unknown model, a path that is no adapter, two
    models and no base_model_name, a bad name."""
    cases = [
        ({"lora_name": "x1", "lora_path": str(dirs["qwen3-ad"]), "base_model_name": "tiny-a"}, 400, "lora_path",
         "does not fit"),
        ({"lora_name": "x6", "lora_path": str(dirs["rank72"]), "base_model_name": "tiny-a"}, 400, "lora_path",
         "has rank 72; ranks up to 64 are served"),
        ({"lora_name": "sql", "lora_path": str(dirs["chat"]), "base_model_name": "tiny-a"}, 400, "lora_name",
         "already served"),
        ({"lora_name": "tiny-b", "lora_path": str(dirs["chat"]), "base_model_name": "tiny-a"}, 400, "lora_name",
         "already served"),
        ({"lora_name": "x2", "lora_path": str(dirs["chat"]), "base_model_name": "nope"}, 404, "base_model_name",
         "no model"),
        ({"lora_name": "x3", "lora_path": str(dirs["tiny-a"]), "base_model_name": "tiny-a"}, 400, "lora_path",
         "adapter_config.json"),
        ({"lora_name": "x4", "lora_path": "/nonexistent/adapter", "base_model_name": "tiny-a"}, 400, "lora_path",
         "does not exist"),
        ({"lora_name": "x5", "lora_path": str(dirs["chat"])}, 400, "base_model_name", "required"),
        ({"lora_name": "bad name!", "lora_path": str(dirs["chat"]), "base_model_name": "tiny-a"}, 400, "lora_name",
         "characters"),
    ]
    for body, status, param, words in cases:
        r = _post(server, "/v1/load_lora_adapter", body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], (body, err)
    ids = {m.id for m in client(server).models.list().data}
    assert not ids & {"x1", "x2", "x3", "x4", "x5", "x6"}
    # a working adapter of the other model, by base_model_name
    body = {"lora_name": "llama-ad", "lora_path": str(dirs["llama-ad"]), "base_model_name": "tiny-b"}
    assert _post(server, "/v1/load_lora_adapter", body).status_code == 200
    assert client(server).completions.create(model="llama-ad", prompt="x", max_tokens=3).choices[0].text is not None
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "llama-ad"}).status_code == 200


def test_serve_lora_modules_flag(dirs, tmp_path):
    """vLLM's --lora-modules on `tokenpool serve DIR`: NAME=PATH, or JSON naming base_model_name; each mistake is said
    before the server starts."""
    import json
    import re

    from controller.serve import prepare
    from controller.startup import StartupError

    a, b = dirs["tiny-a"], dirs["tiny-b"]
    cfg, _ = prepare(None, None, None, [a], ["main"], lora_modules=[f"sql={dirs['sql']}"])
    assert [(lm.name, lm.path) for lm in cfg.models[0].lora_modules] == [("sql", str(dirs["sql"]))]
    js = json.dumps({"name": "ll", "path": str(dirs["llama-ad"]), "base_model_name": "bb"})
    cfg, _ = prepare(None, None, None, [a, b], ["aa", "bb"], lora_modules=[js])
    assert [m.lora_names for m in cfg.models] == [[], ["ll"]]
    for mods, names, words in (([f"sql={dirs['sql']}"], ["aa", "bb"], "2 models are served"),
                               (["sql"], ["aa"], "give NAME=PATH"),
                               (['{"name": "x"}'], ["aa"], 'JSON needs "name" and "path"'),
                               ([json.dumps({"name": "x", "path": "p", "base_model_name": "zz"})], ["aa"],
                                "base_model_name 'zz' is not one of the MODEL_DIR models (aa)"),
                               (["bad name=p"], ["aa"], "a name is 1-128 characters"),
                               ([f"aa={dirs['sql']}"], ["aa"], "must be unique across models: aa")):
        with pytest.raises((StartupError, ValueError), match=re.escape(words)):
            prepare(None, None, None, [a] if len(names) == 1 else [a, b], names, lora_modules=mods)
    with pytest.raises(StartupError, match="apply to the MODEL_DIR arguments"):
        prepare(None, None, None, [], [], lora_modules=[f"sql={dirs['sql']}"])
    # vLLM's --max-lora-rank: the directories' models' largest adapter rank
    cfg, _ = prepare(None, None, None, [a], ["main"], max_lora_rank=8)
    assert cfg.models[0].engine.max_lora_rank == 8
    assert prepare(None, None, None, [a], ["main"])[0].models[0].engine.max_lora_rank == 64
    with pytest.raises(StartupError, match="--max-lora-rank: Input should be greater than or equal to 1"):
        prepare(None, None, None, [a], ["main"], max_lora_rank=0)
    with pytest.raises(StartupError, match="--max-num-batched-tokens, --seed and --generation-config apply to the MODEL_DIR "
                                           "arguments"):
        prepare(None, None, None, [], [], max_lora_rank=8)
    # vLLM's --max-loras: their adapter slots (unset: the engine's TOKENPOOL_GPU_LORAS)
    assert prepare(None, None, None, [a], ["main"], max_loras=2)[0].models[0].engine.max_loras == 2
    assert prepare(None, None, None, [a], ["main"])[0].models[0].engine.max_loras is None
    with pytest.raises(StartupError, match="--max-loras: Input should be greater than or equal to 1"):
        prepare(None, None, None, [a], ["main"], max_loras=0)


def test_serve_with_lora_modules_live(dirs, hf, tmp_path):
    """`tokenpool serve DIR --lora-modules` with --api-key (one user): the adapter answers as HF's merged weights;
    that user's own key may load and unload adapters, as vLLM's one user may; an adapter that does not fit stops
    the server before it starts."""
    tok, ref = hf
    args = [str(dirs["tiny-a"]), "--served-model-name", "base", "--api-key", "k-one",
            "--lora-modules", f"sql={dirs['sql']}"]
    with LiveServer(None, tmp_path / "ok", args=args) as srv:
        c = client(srv, "k-one")
        assert [(m.id, m.model_extra.get("parent")) for m in c.models.list().data] == [("base", None), ("sql", "base")]
        p = PROMPTS[1]
        assert c.completions.create(model="sql", prompt=p, **GREEDY).choices[0].text == _text(tok, ref["sql"][0](p))
        body = {"lora_name": "chat", "lora_path": str(dirs["chat"])}  # (one model: no base_model_name needed)
        assert _post(srv, "/v1/load_lora_adapter", body, key="wrong").status_code == 401
        assert _post(srv, "/v1/load_lora_adapter", body, key="k-one").status_code == 200
        assert c.completions.create(model="chat", prompt=p, **GREEDY).choices[0].text == _text(tok, ref["chat"][0](p))
        assert _post(srv, "/v1/unload_lora_adapter", {"lora_name": "chat"}, key="k-one").status_code == 200
    bad = LiveServer(None, tmp_path / "bad", args=[str(dirs["tiny-a"]), "--lora-modules",
                                                   f"q3={dirs['qwen3-ad']}"], wait_ready=False)
    with bad as srv:
        assert srv.proc.wait(timeout=60) == 2
        assert "LoRA adapter 'q3'" in srv.log() and "does not fit" in srv.log()
    big = LiveServer(None, tmp_path / "big", args=[str(dirs["tiny-a"]), "--lora-modules", f"sql={dirs['sql']}",
                                                   "--max-lora-rank", "2"], wait_ready=False)
    with big as srv:  # (sql is rank 4)
        assert srv.proc.wait(timeout=60) == 2
        assert "LoRA adapter 'sql'" in srv.log() and "has rank 4; ranks up to 2 are served" in srv.log()
