"""`tokenpool serve`: load the configuration, start engines and the HTTP server."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from controller.config import ServerConfig, ensure_demo_models
from controller.keys import hash_key, new_key

log = logging.getLogger("tokenpool")


def prepare(config_path: Path | None, host: str | None, port: int | None) -> tuple[ServerConfig, str | None]:
    """The validated config with CLI overrides; a fresh admin token if the config has none (shown once)."""
    from controller.startup import load_checked

    cfg = load_checked(config_path)
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
    from controller import shutdown, startup

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        cfg, admin_token = prepare(config_path, host, port)
    except startup.StartupError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    if cfg.is_default:
        if host is None:
            cfg.listen.host = "127.0.0.1"
        log.warning("no --config: serving demo models %s (random weights, made on first run under %s) with NO "
                    "authentication, bound to %s only", [m.name for m in cfg.models],
                    Path(cfg.models[0].path).parent if cfg.models[0].path else "-", cfg.listen.host)
        ensure_demo_models(cfg)
    try:
        startup.check_models(cfg)
    except startup.StartupError as e:
        log.error("%s", e)
        raise SystemExit(2) from None
    token_file = None
    if admin_token is not None:
        token_file = startup.write_admin_token(cfg, admin_token)
        log.warning("admin token for this run written to %s (readable by you only)", token_file)
    if not cfg.auth_enabled:
        log.warning("authentication is OFF: every caller may use every model")
    try:
        rc = shutdown.run(cfg)
    finally:
        if token_file is not None:
            startup.remove_admin_token(token_file, admin_token)  # type: ignore[arg-type]
    if rc:
        raise SystemExit(rc)


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
