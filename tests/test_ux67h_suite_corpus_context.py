"""`tokenpool suite corpus --url` of the embedded default (`--model smollm2`, as the README has it) failed 2 of its 42
cases, exit 1: "prompt over context" and "embedding over context" sent 20,000 "x", which the paced model's bytes
make 20,000 tokens but SmolLM2's tokenizer 5,000, within its 8,192: a 200 (the completion ran 50 s on 2 cores).
The over-context inputs are now sized from the model's context on its /v1/models card. Here a factory model whose
context (12,000) holds 20,000 "x" (10,000 of its tokens) stands for SmolLM2."""

from __future__ import annotations

import json
import shutil

from load_tests import faults
from tests import ports


def test_over_context_cases_pass_the_models_own_context(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path / "cache"))  # (where the server writes its token file)
    model = shutil.copytree(tiny_model, tmp_path / "long")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 12000}))
    cfg = {"models": [{"name": "long", "path": str(model)}], "workers": {"standby": False}}
    with ports.live_server_on(range(30100, 30150), cfg, tmp_path / "work") as srv:
        with faults.target(srv.url, model="long") as t:
            assert faults.model_context(t) == 12000
            out = faults.run_corpus(t)
    rows = {r["case"]: r for r in out["results"]}
    assert rows["prompt over context"]["status"] == 400 and rows["embedding over context"]["status"] == 400, rows
    assert out["as_expected"] == out["cases"], [r for r in out["results"] if not r["ok"]]
