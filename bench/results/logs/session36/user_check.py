"""User check: tokenpool serve (embedded default, 3 models, CPU), the openai client, co-stepping counters."""
import concurrent.futures as cf, json, os, re, signal, subprocess, sys, time, urllib.request, glob
venv = sys.argv[1]
home = "/tmp/uc36/home"
os.makedirs(home, exist_ok=True)
env = dict(os.environ, PATH=f"{venv}/bin:" + os.environ["PATH"])
shm0 = set(glob.glob("/dev/shm/*"))
log = open("/tmp/uc36/serve.log", "w")
t0 = time.time()
p = subprocess.Popen([f"{venv}/bin/tokenpool", "serve"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/tmp/uc36")
base = "http://127.0.0.1:8000"
for _ in range(300):
    try:
        urllib.request.urlopen(base + "/health", timeout=1); break
    except Exception:
        time.sleep(0.5)
print(f"up in {time.time() - t0:.1f} s")
from openai import OpenAI, BadRequestError, NotFoundError
c = OpenAI(base_url=base + "/v1", api_key="x")
models = [m.id for m in c.models.list().data]
print("models", models)
def chat(m, i, stream):
    kw = dict(model=m, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=24, temperature=0)
    if stream:
        return "".join((ch.choices[0].delta.content or "") for ch in c.chat.completions.create(stream=True, **kw) if ch.choices)
    return c.chat.completions.create(**kw).choices[0].message.content
jobs = [(m, i) for m in models for i in range(4)]
with cf.ThreadPoolExecutor(12) as ex:
    s = list(ex.map(lambda a: chat(*a, True), jobs))
    u = list(ex.map(lambda a: chat(*a, False), jobs))
print("streamed == unstreamed:", s == u, len(s))
try:
    c.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "hi"}], max_tokens=-3)
    print("NO ERROR for max_tokens -3")
except BadRequestError as e:
    print("max_tokens -3 ->", e.status_code, e.body.get("type") if isinstance(e.body, dict) else e.body)
try:
    c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
except NotFoundError as e:
    print("unknown model ->", e.status_code)
from prometheus_client.parser import text_string_to_metric_families
fams = list(text_string_to_metric_families(urllib.request.urlopen(base + "/metrics").read().decode()))
print("metrics families", len(fams))
tokfile = re.search(r"admin token for this run written to (\S+)", open("/tmp/uc36/serve.log").read())
if tokfile:
    tok = open(tokfile.group(1)).read().strip()
    req = urllib.request.Request(base + "/admin/engines", headers={"Authorization": f"Bearer {tok}"})
    pool = json.loads(urllib.request.urlopen(req).read())
    def find(x, k):
        if isinstance(x, dict):
            for kk, v in x.items():
                if kk == k: yield v
                yield from find(v, k)
        elif isinstance(x, list):
            for v in x: yield from find(v, k)
    print("co_steps", list(find(pool, "co_steps")), "co_kept", list(find(pool, "co_kept")))
p.send_signal(signal.SIGINT)
print("rc", p.wait(60))
time.sleep(1)
left = subprocess.run(["pgrep", "-f", "controller.(serve|worker)"], capture_output=True, text=True).stdout.split()
print("processes left", left, "shm left", sorted(set(glob.glob("/dev/shm/*")) - shm0))
