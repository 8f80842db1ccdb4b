"""Imports go one way: tokenpool (what all share: env) -> gpu_pool -> model_swapper -> token_scheduler -> controller, and the tools (load_tests:
benchmarks, workloads, load tests) above the product. The command line (controller/cli*.py) is the entry point
and may reach the tools. Every import counts, those inside functions too: an upward import, or an import
cycle between packages, fails here. The shared description of a model (model_swapper/model_config.py,
model_swapper/weights.py) sits at the bottom, so every layer above reads it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYER = {"tokenpool": -1, "gpu_pool": 0, "model_swapper": 1, "token_scheduler": 2, "controller": 3, "load_tests": 4}
ENTRY = {"controller/cli.py", "controller/cli_suite.py"}  # the command line: may import the tools


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
    assert not upward, ("imports against the layer order (gpu_pool < model_swapper < token_scheduler < controller "
                        f"< tools): {sorted(upward)}")


def test_no_import_cycle_between_packages():
    edges = {(_pkg(s), _pkg(m)) for s, m in _imports() if _pkg(s) and _pkg(m) and _pkg(s) != _pkg(m)
             and s not in ENTRY}
    cycles = sorted((a, b) for a, b in edges if (b, a) in edges)
    assert not cycles, f"packages that import each other: {cycles}"


def test_environment_variables_are_read_in_one_place():
    """tokenpool/env.py names each variable, its default and meaning; the product reads them through it (the
    tools and tests set them for the processes they start, and read what they like)."""
    read = re.compile(r"os\.environ|getenv|envvar=[\"']")
    readers = sorted(f.relative_to(ROOT).as_posix() for pkg in LAYER if pkg != "load_tests"
                     for f in (ROOT / pkg).rglob("*.py")
                     if f.relative_to(ROOT).as_posix() != "tokenpool/env.py" and read.search(f.read_text()))
    assert not readers, f"environment read outside tokenpool/env.py: {readers}"


def test_the_controller_runs_without_torch():
    """The controller process (the app, its metrics with the GPU inventory) never imports torch: importing the
    gpu_pool package for its inventory imported the arena, and torch with it, ~1.4 s of every server's start-up."""
    import subprocess
    import sys

    code = ("import sys\nfrom controller.app import build_app\nfrom controller.config import ServerConfig\n"
            "app = build_app(ServerConfig())\napp.state.controller.metrics.render()\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["False"], (out.stdout, out.stderr[-2000:])
