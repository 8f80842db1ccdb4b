"""One request of more engine requests than an engine runs at once (a completions prompt list, as lm-eval-harness
batches them, times n) was refused on an idle server: admission placed its engine requests one by one, and each
after the engine's first max_num_seqs was judged queued behind its own siblings -- a 429 "overloaded: estimated
time to first token ... exceeds the SLO" with a Retry-After, and the same answer at every retry (on the CPU, 64
prompts x n=2 of SmolLM2: Retry-After 176 s). Admission now judges a request by its first engine request: other
requests' load still refuses it, its own does not."""

from __future__ import annotations

import httpx

from load_tests import faults
from load_tests.live_server import LiveServer


def test_a_request_larger_than_the_batch_is_not_refused_by_its_own_load(tmp_path):
    # an engine of 4 slots at 0.01 s a token, a TTFT SLO of 0.2 s: 8 prompts of 40 tokens each queue 4 of them
    # 0.4 s behind the other 4
    cfg = faults.paced_config(pace_s=0.01, max_num_seqs=4, ttft_s=0.2)
    cfg["workers"]["standby"] = False
    with LiveServer(cfg, tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=60, headers={
            "Authorization": f"Bearer {faults.SUITE_KEY}"}) as c:
        c.post("/v1/completions", json={"model": "pace", "prompt": "warm", "max_tokens": 5})  # (a step time measured)
        r = c.post("/v1/completions", json={"model": "pace", "prompt": [f"p{i}" for i in range(8)], "max_tokens": 40})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 8 and r.json()["usage"]["completion_tokens"] == 8 * 40, r.text
