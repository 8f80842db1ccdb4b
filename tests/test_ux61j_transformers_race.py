"""transformers imported first on two threads at once, in a fresh process (a controller adding a model reads its
config on one thread while it loads its tokenizer on another; a worker's load thread beside its warm-up): each
import goes through tokenpool.imports' lock. Without it the lazy module answered "cannot import name
'AutoTokenizer' from 'transformers'" every time (seen adding a model from the dashboard to a server that had served
only paced models)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys, threading
    from model_swapper.model_config import ModelConfig
    from token_scheduler.tokenizer import load_tokenizer
    from controller import model_factory

    path, errors = sys.argv[1], []
    calls = (lambda: ModelConfig.from_pretrained(path), lambda: load_tokenizer(path),
             lambda: model_factory.model_config("qwen3", "tiny", "fp32"))
    go = threading.Barrier(len(calls))

    def run(f):
        go.wait()
        try:
            f()
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(f,)) for f in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "transformers" in sys.modules
    print(errors or "ok")
""")


def test_first_imports_of_transformers_on_three_threads_at_once(tiny_model):
    # One fresh process (each is ~5 s of imports): without the lock every run failed (6 of 6, the lock swapped for
    # a no-op in the child), so the three runs this took were 10 s of the suite that caught nothing one does not
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "ok", r.stdout[-2000:]
