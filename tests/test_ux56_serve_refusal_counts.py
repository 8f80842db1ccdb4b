"""`tokenpool_requests_total` counts every refusal of the serving routes (401, 404, 413, 429, a context too long:
400) under its model and tenant, but a body that failed the request's schema (`"messages": "bad"`, a JSON syntax
error, Ollama's options of the wrong type) was answered 400 and counted nowhere: an error-rate panel built on
`status=~"4.."` missed every such client bug. Counted now, on the OpenAI, Anthropic, vLLM and Ollama routes. And
Ollama's generation routes answered a caller without a key 400 for such a body where the OpenAI routes answer 401
whatever the body holds; now 401 there too."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.test_hardening import ADMIN, PACE, auth, run

BAD = [  # (path, body): each refused for its body's shape, naming model pace-a
    ("/v1/chat/completions", {"model": "pace-a", "messages": "bad"}),
    ("/v1/completions", {"model": "pace-a", "prompt": {"x": 1}}),
    ("/v1/embeddings", {"model": "pace-a", "input": {"x": 1}}),
    ("/v1/messages", {"model": "pace-a", "messages": "bad", "max_tokens": 5}),
    ("/v1/responses", {"model": "pace-a", "input": 5}),
    ("/rerank", {"model": "pace-a", "query": 5, "documents": ["a"]}),
    ("/api/chat", {"model": "pace-a", "messages": "bad"}),
    ("/api/generate", {"model": "pace-a", "prompt": "hi", "options": {"temperature": "hot"}}),
    ("/api/embed", {"model": "pace-a", "input": 5}),
    ("/api/embeddings", {"model": "pace-a", "prompt": 5}),
]


def _counts(text: str) -> dict[tuple[str, str, str], float]:
    return {(s.labels["model"], s.labels["tenant"], s.labels["status"]): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == "tokenpool_requests_total"}


def test_a_body_refused_by_the_schema_is_a_counted_refusal():
    async def body(c, app):
        statuses = []
        for path, payload in BAD:
            r = await c.post(path, json=payload, headers=auth())
            statuses.append((path, r.status_code, r.text[:200]))
        syntax = await c.post("/v1/chat/completions", content=b"{not json", headers={
            **auth(), "content-type": "application/json"})
        statuses.append(("syntax", syntax.status_code, syntax.text[:200]))
        # no key, bad body: 401 on every route (a 400 there told a stranger how the body was wrong)
        keyless = [(path, (await c.post(path, json=payload)).status_code) for path, payload in BAD]
        m = await c.get("/metrics", headers=auth(ADMIN))
        return statuses, keyless, _counts(m.text)

    statuses, keyless, counts = run(PACE, body)
    assert all(s == 400 for _, s, _ in statuses), statuses
    assert counts.get(("pace-a", "alice", "400")) == len(BAD), counts
    assert counts.get(("-", "alice", "400")) == 1, counts  # (the JSON syntax error: no model read)
    assert all(s == 401 for _, s in keyless), keyless
    assert counts.get(("-", "-", "401")) == len(BAD), counts
