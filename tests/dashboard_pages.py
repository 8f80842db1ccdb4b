"""The dashboard's browser tests' pages: a page whose console errors and page errors are collected, a page signed in
with an admin token, and a wait for the page's next snapshots of the pool."""

from __future__ import annotations

import contextlib


def watch(page, failed: list[str]) -> None:
    """Collect the page's console errors and uncaught page errors in `failed`."""
    page.on("console", lambda m: failed.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: failed.append(f"page error: {e}"))


@contextlib.contextmanager
def signed_in(browser, url: str, token: str, failed: list[str] | None = None, requests: bool = False):
    """A page of a fresh context, signed in with the admin `token` and live, its dialogs accepted. With `failed`: its
    console and page errors collected there, and (`requests`) its failed requests until the block ends (closing the
    page aborts what it has in flight: not the page's)."""
    from playwright.sync_api import expect

    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    page = ctx.new_page()
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
