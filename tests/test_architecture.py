"""Imports go one way: gpu_pool -> model_swapper -> token_scheduler -> controller, and the tools (load_tests:
benchmarks, workloads, load tests) above the product. The command line (controller/cli*.py) is the entry point
and may reach the tools. Every import counts, those inside functions too.

KNOWN lists the upward imports that exist today (issue 17 removes them); a new one, or a new import cycle
between packages, fails here. When one of KNOWN is removed, remove it from the list too (the test says so).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYER = {"gpu_pool": 0, "model_swapper": 1, "token_scheduler": 2, "controller": 3, "load_tests": 4}
ENTRY = {"controller/cli.py", "controller/cli_suite.py"}  # the command line: may import the tools
KNOWN = {  # (importing file, imported module): upward imports still to remove (issue 17)
    ("controller/hosting.py", "load_tests.pace_engine"),
    ("controller/service.py", "load_tests.pace_engine"),
}


def _imports() -> list[tuple[str, str]]:
    out = []
    for pkg in LAYER:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(f.read_text(), rel)):
                if isinstance(node, ast.Import):
                    out += [(rel, a.name) for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    out.append((rel, node.module))
    return out


def _pkg(name: str) -> str | None:
    top = name.split(".")[0].split("/")[0]
    return top if top in LAYER else None


def test_imports_go_one_way():
    upward = set()
    for src, mod in _imports():
        a, b = _pkg(src), _pkg(mod)
        if a and b and LAYER[b] > LAYER[a] and src not in ENTRY:
            upward.add((src, mod))
    new = sorted(upward - KNOWN)
    assert not new, f"imports against the layer order (gpu_pool < model_swapper < token_scheduler < controller < tools): {new}"
    gone = sorted(KNOWN - upward)
    assert not gone, f"these upward imports are gone: remove them from KNOWN too: {gone}"


def test_no_import_cycle_between_packages_beyond_the_known_ones():
    edges = {(_pkg(s), _pkg(m)) for s, m in _imports() if _pkg(s) and _pkg(m) and _pkg(s) != _pkg(m)
             and s not in ENTRY and (s, m) not in KNOWN}
    cycles = sorted((a, b) for a, b in edges if (b, a) in edges)
    assert not cycles, f"packages that import each other: {cycles}"
