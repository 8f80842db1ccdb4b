"""What the README names exists: every file it cites in backticks (result JSONs, tests, modules, manifests; its
`{a,b}` and `*` spellings expanded), every `python -m` module it tells a user to run, every `TOKENPOOL_*` variable
it mentions (tokenpool/env.py lists each one), every command of its command-line table, and the links it makes.
A file renamed or removed leaves the README pointing at nothing; these checks read files only (no server)."""

import glob
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# where a bare file name in the README is found: the repository, the results, the examples and the manifests
BASES = [ROOT, ROOT / "bench" / "results", ROOT / "examples", *sorted(p for p in (ROOT / "manifests").rglob("*")
                                                                      if p.is_dir())]
# files the README names that are a model's or an adapter's, or a Secret's key, not this repository's
NOT_OURS = {"adapter_config.json", "adapter_model.safetensors", "generation_config.json", "config.json"}


def braces(s: str) -> list[str]:
    """`a{b,c}d` as the shell expands it (nested and several groups too)."""
    m = re.search(r"\{([^{}]*)\}", s)
    if not m:
        return [s]
    return [x for alt in m.group(1).split(",") for x in braces(s[:m.start()] + alt + s[m.end():])]


def cited_files() -> list[str]:
    names = set(re.findall(r"`([^`\s]+\.(?:py|json|yaml|md|sh|png|log))`", README))
    names |= {m for m in re.findall(r"\]\(([^)\s]+)\)", README) if not m.startswith("http")}
    return sorted(n for n in names if Path(n).name not in NOT_OURS and not n.startswith("~"))


@pytest.mark.parametrize("name", cited_files())
def test_cited_file_exists(name):
    found = [hit for spelled in braces(name) for base in BASES for hit in glob.glob(str(base / spelled))]
    missing = [s for s in braces(name) if not any(glob.glob(str(base / s)) for base in BASES)]
    assert found and not missing, f"README cites {name!r}: no such file ({missing})"


def test_cited_files_are_found():
    # the parse itself: the README cites dozens of results, tests and manifests; an empty list would pass anything
    names = cited_files()
    assert len(names) > 50 and "tests/test_dashboard_browser.py" in names and "examples/one-gpu.yaml" in names


def test_python_m_modules_exist():
    mods = sorted(set(re.findall(r"python3? -m ([A-Za-z_][\w.]*)", README)) - {"pytest"})
    assert "controller.real_model" in mods and "load_tests.bench_prefix" in mods
    missing = [m for m in mods if importlib.util.find_spec(m.split(".")[0]) is None
               or not ((ROOT / m.replace(".", "/")).with_suffix(".py").exists()
                       or (ROOT / m.replace(".", "/") / "__init__.py").exists())]
    assert not missing, f"README says `python -m` for modules that do not exist: {missing}"


def test_environment_variables_are_listed_in_env_py():
    from tokenpool import env

    known = {v.name for v in vars(env).values() if isinstance(v, env.Var)}
    named = set(re.findall(r"\bTOKENPOOL_[A-Z0-9_]*[A-Z0-9]\b", README))
    assert len(named) > 20
    assert not named - known, f"README names variables tokenpool/env.py does not have: {sorted(named - known)}"


def test_command_table_names_real_commands():
    from typer.main import get_command

    from controller.cli import app

    cli = get_command(app)
    table = README.split("## Command line", 1)[1].split("\n## ", 1)[0]
    # `tokenpool bench engine\|swap\|pool\|serve`: a group and its commands, `\|` between them in the table
    rows = re.findall(r"`tokenpool ([a-z][a-z-]*)(?: ([a-z][a-z-]*(?:\\\|[a-z][a-z-]*)*))?", table)
    assert len(rows) > 10 and ("suite", "corpus\\|fuzz\\|kill\\|pooled-kill\\|disconnects\\|drops\\|overload\\|soak"
                                         "\\|dashboards\\|block") in rows
    for cmd, subs in rows:
        assert cmd in cli.commands, f"README's command table has `tokenpool {cmd}`, which is no command"
        group = cli.commands[cmd]
        for sub in filter(None, subs.split("\\|")):
            if hasattr(group, "commands"):
                assert sub in group.commands, f"README's command table has `tokenpool {cmd} {sub}`: no such command"
