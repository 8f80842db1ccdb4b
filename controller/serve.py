"""`tokenpool serve`: load the configuration, start engines and the HTTP server."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from controller.config import ServerConfig, ensure_demo_models, load_config
from controller.keys import hash_key, new_key

log = logging.getLogger("tokenpool")


def prepare(config_path: Path | None, host: str | None, port: int | None) -> tuple[ServerConfig, str | None]:
    """The validated config with CLI overrides; a fresh admin token if the config has none (shown once)."""
    cfg = load_config(config_path)
    if host is not None:
        cfg.listen.host = host
    if port is not None:
        cfg.listen.port = port
    token = None
    if cfg.admin_token_hash is None:
        token = new_key("tpadmin")
        cfg.admin_token_hash = hash_key(token)
    return cfg, token


def serve(config_path: Path | None = None, host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    from controller.app import build_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    cfg, admin_token = prepare(config_path, host, port)
    if cfg.is_default:
        if host is None:
            cfg.listen.host = "127.0.0.1"
        log.warning("no --config: serving demo models %s (random weights, made on first run under %s) with NO "
                    "authentication, bound to %s only", [m.name for m in cfg.models],
                    Path(cfg.models[0].path).parent if cfg.models[0].path else "-", cfg.listen.host)
        ensure_demo_models(cfg)
    if admin_token is not None:
        log.warning("admin token for this run (not stored anywhere): %s", admin_token)
    if not cfg.auth_enabled:
        log.warning("authentication is OFF: every caller may use every model")
    app = build_app(cfg)
    log.info("listening on http://%s:%d (OpenAI API under /v1, admin under /admin)", cfg.listen.host, cfg.listen.port)
    uvicorn.run(app, host=cfg.listen.host, port=cfg.listen.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5, backlog=4096)


def main(argv: list[str] | None = None) -> None:
    """python -m controller.serve [--config FILE] [--host H] [--port P] (what `tokenpool serve` runs)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m controller.serve")
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--host", default=None)
    ap.add_argument("--port", type=int, default=None)
    a = ap.parse_args(argv)
    serve(a.config, a.host, a.port)


if __name__ == "__main__":
    main()
