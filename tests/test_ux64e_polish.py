"""CLI and dashboard polish (ux64e), each where users meet it:

- the help of `tokenpool stop` (and of the commands whose words were a GPU's alone) on a machine without a GPU:
  stop said it frees "a model's GPU memory", where a CPU engine's weights are in host RAM (the command itself says
  "the memory of N engines" there since fb6c75e); --max-loras' slots were "on the GPU", bench engine's HBM floor and
  bench swap's PCIe floor are measured on a GPU alone;
- the dashboard's sign-in form in headless Chromium under Playwright (skipped without them): Chromium logged
  "[DOM] Password forms should have (optionally hidden) username fields for accessibility" on every visit, and a
  password manager had no username to store the admin token under. A hidden one now; the form still signs in by
  Enter and by its button, and posts the token alone.
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.keys import hash_key
from tests.ports import live_server_on

ADMIN = "admin-ux64e-token"
PORTS = range(28950, 29000)
BROWSER = ((shutil.which("chromium") or shutil.which("chromium-browser")) is not None
           and importlib.util.find_spec("playwright") is not None)


def _help(*args: str) -> str:
    """A command's help as one line of words (rich's box and wrapping taken out)."""
    r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    return " ".join(r.output.replace("│", " ").split())


# --- the help's words on a machine without a GPU ---
def test_stop_help_says_memory_on_a_gpu_or_a_cpu_engine():
    """`tokenpool stop -h` and its row in `tokenpool -h`: GPU memory, or RAM on a CPU engine (it said "GPU memory"
    alone, which a CPU-only machine has not)."""
    said = ("Free a model's memory on its engines (GPU memory, or RAM on a CPU engine) once its requests finish, "
            "as `ollama stop` (it stays served).")
    assert said in _help("stop")
    assert said in _help()
    assert "GPU memory once" not in _help("stop") + _help()


def test_gpu_only_figures_and_slots_say_what_a_cpu_gets():
    """--max-loras' slots are on the model's device, a GPU or the CPU (the config's max_loras: "on its device");
    bench engine's HBM floor and bench swap's PCIe floor are a GPU's (load_tests: on the CPU no floor is measured,
    and swap's numbers but the cold load's are a smoke run's)."""
    serve = _help("serve")
    assert "LoRA adapter slots on their device (the GPU, or the CPU without one)" in serve
    assert "slots on the GPU," not in serve
    engine = _help("bench", "engine")
    assert "the HBM floor (on a GPU)" in engine and "(default: 32 on CUDA; 2 on CPU)" in engine
    assert ("KV swap bandwidth (on a GPU; on the CPU a smoke run at toy sizes, of which the cold load alone means "
            "anything)") in _help("bench", "swap")


# --- the dashboard's sign-in form ---
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = {"admin_token_hash": hash_key(ADMIN), "workers": {"local": "cpu", "standby": False},
           "models": [{"name": "pace", "path": None, "engine": {"kind": "pace", "pace_s_per_token": 0.01}}]}
    with live_server_on(PORTS, cfg, tmp_path_factory.mktemp("ux64e")) as srv:
        yield srv


def _sign_in(browser, url: str, by_enter: bool) -> None:
    """The form at /dashboard filled with the admin token and sent (Enter in the token's field, or the button): the
    dashboard live after it; no console message of any level about the form (Chromium's [DOM] advice is 'verbose'),
    no error; the POST carried the token alone (the hidden username has no name)."""
    from playwright.sync_api import expect

    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        said: list[str] = []
        page.on("console", lambda m: said.append(f"{m.type}: {m.text}")
                if m.type == "error" or "[DOM]" in m.text else None)
        page.on("pageerror", lambda e: said.append(f"page error: {e}"))
        posted: list[str | None] = []
        page.on("request", lambda r: posted.append(r.post_data) if r.method == "POST" and
                r.url.endswith("/dashboard/login") else None)
        page.goto(url + "/dashboard")
        assert said == []  # (Chromium's advice is logged as the form's page loads, before goto returns)
        user = page.locator('input[autocomplete="username"]')
        expect(user).to_be_hidden()
        expect(user).to_have_value("admin")
        page.fill("#token", ADMIN)
        if by_enter:
            page.press("#token", "Enter")
        else:
            page.click("#login")
        expect(page.locator("#conn")).to_have_text("live")
        assert posted == [f"token={ADMIN}"]
        assert said == []
    finally:
        ctx.close()


@pytest.mark.skipif(not BROWSER, reason="needs Playwright and the system chromium (apt-get install chromium)")
def test_sign_in_form_has_a_hidden_username_and_signs_in_by_enter(server, browser):
    _sign_in(browser, server.url, by_enter=True)


@pytest.mark.skipif(not BROWSER, reason="needs Playwright and the system chromium (apt-get install chromium)")
def test_sign_in_form_signs_in_by_its_button(server, browser):
    _sign_in(browser, server.url, by_enter=False)
