"""User check, as a user would: `tokenpool serve` (embedded default: three models, CPU) from a fresh venv (e.g. the
one `.ci/run` made), the official openai client (streamed == unstreamed), errors, /metrics, co-stepping counters from
/admin/engines, a clean Ctrl-C, no process of its own or /dev/shm file left. Usage: VENV/bin/python
load_tests/user_check.py VENV [--port PORT] (default 8000; the venv needs openai, which `pip install -e ".[test]"`
brings)."""

import argparse
import concurrent.futures as cf
import glob
import json
import os
import re
import signal
import subprocess
import time
import urllib.request

from openai import BadRequestError, NotFoundError, OpenAI
from prometheus_client.parser import text_string_to_metric_families

BASE = "http://127.0.0.1:8000"  # (main's --port changes it)
WORK = "/tmp/user_check"


def descendants(pid: int) -> set[int]:
    """The processes under `pid` now (its workers and their standbys), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    """Running still (a zombie, exited but not yet reaped, is not)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def find(x, key):
    """Every value under `key` anywhere in nested dicts and lists."""
    if isinstance(x, dict):
        for k, v in x.items():
            if k == key:
                yield v
            yield from find(v, key)
    elif isinstance(x, list):
        for v in x:
            yield from find(v, key)


def chat(client, model, i, stream):
    kw = dict(model=model, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=24, temperature=0)
    if stream:
        chunks = client.chat.completions.create(stream=True, **kw)
        return "".join((ch.choices[0].delta.content or "") for ch in chunks if ch.choices)
    return client.chat.completions.create(**kw).choices[0].message.content


def main(venv: str, port: int = 8000) -> None:
    global BASE
    BASE = f"http://127.0.0.1:{port}"
    os.makedirs(WORK, exist_ok=True)
    env = dict(os.environ, PATH=f"{venv}/bin:" + os.environ["PATH"], TOKENPOOL_URL=BASE)  # (for `tokenpool run`)
    shm0 = set(glob.glob("/dev/shm/*"))
    log_path = f"{WORK}/serve.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        # (SIGINT as a terminal gives it: a check started in the background has it ignored, and the server with it)
        p = subprocess.Popen([f"{venv}/bin/tokenpool", "serve", "--port", str(port)], stdout=log,
                             stderr=subprocess.STDOUT, env=env, cwd=WORK,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for _ in range(300):
        if p.poll() is not None:  # (a port taken: /health would answer from another server)
            raise SystemExit(f"tokenpool serve exited {p.returncode}: " + open(log_path).read()[-2000:])
        try:
            urllib.request.urlopen(BASE + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    print(f"up in {time.time() - t0:.1f} s")
    c = OpenAI(base_url=BASE + "/v1", api_key="x")
    models = [m.id for m in c.models.list().data]
    print("models", models)
    jobs = [(m, i) for m in models for i in range(4)]
    with cf.ThreadPoolExecutor(12) as ex:
        streamed = list(ex.map(lambda a: chat(c, *a, True), jobs))
        whole = list(ex.map(lambda a: chat(c, *a, False), jobs))
    print("streamed == unstreamed:", streamed == whole, len(streamed))
    try:
        c.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "hi"}], max_tokens=-3)
        print("NO ERROR for max_tokens -3")
    except BadRequestError as e:
        print("max_tokens -3 ->", e.status_code, e.body.get("type") if isinstance(e.body, dict) else e.body)
    try:
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    except NotFoundError as e:
        print("unknown model ->", e.status_code)
    # the output shaped: a JSON schema's instance, a named tool's call, the prompt scored by echo with logprobs
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    r = c.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "Capital of France?"}],
                                  max_tokens=30, temperature=0, response_format={"type": "json_schema", "json_schema": {
                                      "name": "city", "schema": schema}})
    print("json_schema ->", json.loads(r.choices[0].message.content), r.choices[0].finish_reason)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": schema}}
    r = c.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "Weather in Paris?"}],
                                  max_tokens=30, temperature=0, tools=[tool],
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    print("tool call ->", [(t.function.name, t.function.arguments) for t in r.choices[0].message.tool_calls],
          r.choices[0].finish_reason)
    r = c.completions.create(model=models[0], prompt="The capital of France is Paris", echo=True, logprobs=1,
                             max_tokens=1, temperature=0)
    print("echo logprobs ->", len(r.choices[0].logprobs.tokens), "tokens, first", r.choices[0].logprobs.token_logprobs[0])
    texts = ["The cat sat on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply today."]
    v = [d.embedding for d in c.embeddings.create(model=models[0], input=texts).data]
    cos = [round(sum(x * y for x, y in zip(v[0], w)), 3) for w in v[1:]]
    print("embeddings ->", len(v), "x", len(v[0]), "cos(cat, cat'), cos(cat, stocks):", cos)
    r1 = c.responses.create(model=models[0], input="What is the capital of France?", max_output_tokens=20,
                            temperature=0)
    r2 = c.responses.create(model=models[0], input="And of Italy?", previous_response_id=r1.id, max_output_tokens=20,
                            temperature=0)
    print("responses ->", repr(r1.output_text), "then", repr(r2.output_text), r2.usage.input_tokens, "input tokens,",
          r2.usage.input_tokens_details.cached_tokens, "of them cached")
    # a LoRA adapter loaded at runtime (vLLM's route; no auth on the embedded default), asked for by name
    base_dir = json.loads(subprocess.run([f"{venv}/bin/python", "-c", "import json; from controller.config import "
                                          "default_config; print(json.dumps(default_config().models[0].path))"],
                                         capture_output=True, text=True, env=env, cwd=WORK).stdout)
    subprocess.run([f"{venv}/bin/python", "-c", f"from controller.model_factory import make_lora; make_lora("
                    f"{base_dir!r}, {WORK + '/adapter'!r}, rank=4, alpha=8)"], check=True, env=env, cwd=WORK)
    req = urllib.request.Request(BASE + "/v1/load_lora_adapter", method="POST", headers={
        "Content-Type": "application/json"}, data=json.dumps({"lora_name": "mini-lora", "lora_path": WORK + "/adapter",
                                                              "base_model_name": models[0]}).encode())
    print("load_lora_adapter ->", urllib.request.urlopen(req).read().decode())
    parents = {m.id: m.model_extra.get("parent") for m in c.models.list().data}
    said = [chat(c, m, 2, False) for m in (models[0], "mini-lora")]
    print("lora -> parent", parents.get("mini-lora"), "| base:", repr(said[0]), "| adapter:", repr(said[1]))
    req = urllib.request.Request(BASE + "/v1/unload_lora_adapter", method="POST", headers={
        "Content-Type": "application/json"}, data=json.dumps({"lora_name": "mini-lora"}).encode())
    print("unload_lora_adapter ->", urllib.request.urlopen(req).read().decode())
    run = subprocess.run([f"{venv}/bin/tokenpool", "run", models[0], "Say hi", "--temperature", "0", "--max-tokens",
                          "8"], capture_output=True, text=True, env=env, timeout=60)
    print("tokenpool run ->", run.returncode, repr(run.stdout))
    text = urllib.request.urlopen(BASE + "/metrics").read().decode()
    print("metrics families", len(list(text_string_to_metric_families(text))))
    tokfile = re.search(r"admin token for this run written to (\S+)", open(log_path).read())
    if tokfile:
        tok = open(tokfile.group(1)).read().strip()
        req = urllib.request.Request(BASE + "/admin/engines", headers={"Authorization": f"Bearer {tok}"})
        engines = json.loads(urllib.request.urlopen(req).read())
        print("co_steps", list(find(engines, "co_steps")), "co_kept", list(find(engines, "co_kept")),
              "co_deep_kept", list(find(engines, "co_deep_kept")))
    ours = descendants(p.pid)  # (only this server's: other servers on the machine are none of its business)
    p.send_signal(signal.SIGINT)
    print("rc", p.wait(60))
    deadline = time.time() + 5  # its workers exit with it; give the last of them a moment to go
    while any(alive(q) for q in ours) and time.time() < deadline:
        time.sleep(0.1)
    left = sorted(q for q in ours if alive(q))
    print("processes left", left, "of", len(ours), "shm left", sorted(set(glob.glob("/dev/shm/*")) - shm0))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("venv", help="the virtual environment whose tokenpool is checked (its bin/tokenpool, bin/python)")
    ap.add_argument("--port", type=int, default=8000, help="the port the server listens on (8000)")
    a = ap.parse_args()
    main(a.venv, a.port)
