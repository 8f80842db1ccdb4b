"""Summarize a py-spy raw profile (`py-spy record -f raw`): inclusive samples of the functions below a root.

    python3 load_tests/gpu_runs/spy_summary.py worker.raw [--root MultiModelEngine.step_tokens] [--top 30]

For the served worker's step loop: where the time of a step goes (the policy, the cost model, the engine's
host work), as shares of the root's samples. A diagnostic for the GPU sessions, not a benchmark.
"""

from __future__ import annotations

import argparse
import collections
import json


def summarize(path: str, root: str, top: int) -> dict:
    inc: collections.Counter = collections.Counter()
    child: collections.Counter = collections.Counter()
    total = under = 0
    for line in open(path):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        frames, n = stack.split(";"), int(n)
        total += n
        at = next((i for i, f in enumerate(frames) if f.startswith(root + " ")), None)
        if at is None:
            continue
        under += n
        below = [f.split(" (")[0] for f in frames[at + 1:]]
        child[below[0] if below else "(self)"] += n
        for name in set(below):
            inc[name] += n
    share = lambda c: {k: round(v / under, 4) for k, v in c.most_common(top)} if under else {}  # noqa: E731
    return {"samples": total, "root": root, "root_samples": under, "children": share(child), "inclusive": share(inc)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("--root", default="MultiModelEngine.step_tokens")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    print(json.dumps(summarize(a.raw, a.root, a.top), indent=1))
