"""The dashboard's browser tests' pages: a page whose console errors and page errors are collected, a page signed in
with an admin token, a wait for the page's next snapshots of the pool, and the page's clock run by hand (its
reconnects' waits, seconds each, run without waiting them out)."""

from __future__ import annotations

import contextlib


def watch(page, failed: list[str]) -> None:
    """Collect the page's console errors and uncaught page errors in `failed`."""
    page.on("console", lambda m: failed.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: failed.append(f"page error: {e}"))


@contextlib.contextmanager
def signed_in(browser, url: str, token: str, failed: list[str] | None = None, requests: bool = False,
              clock: bool = False):
    """A page of a fresh context, signed in with the admin `token` and live, its dialogs accepted. With `failed`: its
    console and page errors collected there, and (`requests`) its failed requests until the block ends (closing the
    page aborts what it has in flight: not the page's). `clock`: the page's clock is Playwright's (page.clock),
    installed before it loaded."""
    from playwright.sync_api import expect

    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    page = ctx.new_page()
    if clock:
        page.clock.install()
    live = [True]
    if failed is not None:
        watch(page, failed)
        if requests:
            page.on("requestfailed", lambda r: failed.append(f"failed: {r.method} {r.url} {r.failure}") if live[0]
                    else None)
    page.on("dialog", lambda d: d.accept())
    page.goto(url + "/dashboard")
    page.fill("#token", token)
    page.click("#login")
    expect(page.locator("#conn")).to_have_text("live", timeout=10_000)
    try:
        yield page
    finally:
        live[0] = False
        ctx.close()


def snapshots(page, n: int, timeout: int = 15_000) -> None:
    """Wait until the page has drawn n more snapshots of the pool (one a second)."""
    seen = page.evaluate("S.snapshots")
    page.wait_for_function("n => S.snapshots >= n", arg=seen + n, timeout=timeout)


# The page's header says its event stream is open
LIVE = "document.getElementById('conn').textContent === 'live'"
# Nothing of the page's on the network: no reconnect() call in flight, its event stream not opening
_SETTLED = "() => S.calls === 0 && !(S.es && S.es.readyState === EventSource.CONNECTING)"


def pause_clock(page) -> None:
    """Pause the page's clock (Playwright's, page.clock.install() before the page loaded) 1 s on from now: from here
    its timers fire only as run_clock runs it."""
    at = page.evaluate("Date.now()") + 1000  # (a moment ahead: its time runs on meanwhile, and no pause is in the past)
    page.clock.pause_at(at / 1000)  # (a number here is in seconds, as Python's)


def run_clock(page, ms: int, until: str | None = None, step_ms: int = 500) -> None:
    """Run the page's paused clock `ms` on, its timers fired as they come due, `step_ms` at a time, what the page has
    on the network done after each step (an answer comes in real time, the clock standing still: what it starts, a
    try's next wait, counts from the step's end); with `until` (a JS expression), stop at the first step after which
    it holds. The page's waits are whole seconds: a try falls due at a step's end."""
    ran = 0
    while ran < ms:
        page.clock.run_for(step_ms)
        ran += step_ms
        page.wait_for_function(_SETTLED, polling=10)
        if until is not None and page.evaluate(until):
            break
