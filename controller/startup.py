"""What `tokenpool serve` checks and reports before it serves: config errors as one line, model directories,
and the admin token of a run without one (written to a 0600 file, never to the log)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import stat
from pathlib import Path

import yaml
from pydantic import ValidationError

from controller.config import ServerConfig, admin_token_file, load_config
from tokenpool.models import adapter_fit_problem, model_dir_problem


class StartupError(Exception):
    """A problem the operator must fix; `tokenpool serve` prints its message as one line and exits 2."""


def validation_line(e: ValidationError) -> str:
    errs = e.errors()
    first = errs[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc}: {msg}{more}" if loc else f"{msg}{more}"


def load_checked(path: Path | None) -> ServerConfig:
    """load_config, with every way a file can be wrong turned into a one-line StartupError."""
    where = f"config {path}"
    try:
        return load_config(path)
    except FileNotFoundError:
        raise StartupError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise StartupError(f"{where}: is a directory, not a YAML file") from None
    except PermissionError:
        raise StartupError(f"{where}: permission denied") from None
    except UnicodeDecodeError:
        raise StartupError(f"{where}: not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise StartupError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except ValidationError as e:
        raise StartupError(f"{where}: {validation_line(e)}") from None
    except (TypeError, AttributeError) as e:  # e.g. a top-level list instead of a mapping
        raise StartupError(f"{where}: expected a mapping of settings ({e})") from None


def check_models(cfg: ServerConfig) -> None:
    """Each model path is a directory holding a config.json of an architecture the engine runs (said precisely when
    not): a server that started would list the model, then fail to load it at every request."""
    for m in cfg.models:
        if m.path is not None and (why := model_dir_problem(m.path)) is not None:
            raise StartupError(f"model {m.name!r}: {why}")
        for lm in m.lora_modules:
            if (why := adapter_fit_problem(lm.path, m.path, m.engine.max_lora_rank)) is not None:
                raise StartupError(f"model {m.name!r}, LoRA adapter {lm.name!r}: {why}")


def check_local_workers(cfg: ServerConfig, config_path: Path | None = None) -> None:
    """workers.local's GPU indices are GPUs this machine has (as CUDA sees them: CUDA_VISIBLE_DEVICES counts): a
    worker started on one that is not there dies at its first CUDA call, and is restarted, again and again."""
    spec = cfg.workers.local
    if not isinstance(spec, list):
        return
    where = f"config {config_path}: " if config_path is not None else ""
    if twice := sorted({i for i in spec if spec.count(i) > 1}):  # (two workers, two arenas, on one device)
        raise StartupError(f"{where}workers.local: GPU {', '.join(map(str, twice))} is given twice; a GPU has one "
                           "worker, which pools every model placed on it")
    from controller.pool import local_devices

    have = [d for d in local_devices("auto") if d != "cpu"]
    if missing := [i for i in spec if f"cuda:{i}" not in have]:
        seen = f"{len(have)} GPU{'' if len(have) == 1 else 's'} (0 to {len(have) - 1})" if have else "no GPU"
        raise StartupError(f"{where}workers.local: GPU {', '.join(map(str, missing))} is not on this machine, which "
                           f"has {seen} as CUDA sees them; give indices it has, or auto, or cpu")


def admin_token_path(cfg: ServerConfig) -> Path:
    return Path(cfg.admin_token_file) if cfg.admin_token_file else admin_token_file(cfg.listen.port)


_locks: dict[Path, int] = {}  # token file -> the descriptor holding its lock, while its run serves

_WRITTEN = re.compile(r"tpadmin-[A-Za-z0-9_-]{43}\n")  # what `write_admin_token` writes: new_key("tpadmin"), a line


def left_admin_token(cfg: ServerConfig) -> Path | None:
    """A configured `admin_token_file` (not the cache's `admin-token-PORT`, which `remove_dead_admin_tokens` sees to)
    that is there before this run writes its token: the file a server no longer running wrote (killed by SIGKILL:
    its token, mode 0600, yours, unlocked), which this run replaces and removes at its exit; None where there is none.
    StartupError for any other file there: the server writes its run's token over the file and removes it at exit,
    and it never reads one from it, so a file of yours (a token you put there, a path given by mistake) or a running
    server's (its lock held: two servers would share one file) is left as it is and the start refused."""
    if not cfg.admin_token_file:
        return None
    path = Path(cfg.admin_token_file)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:  # (a link, which a server writes none of; another user's file)
        why = "it is a symbolic link" if path.is_symlink() else e.strerror or e
        raise StartupError(f"admin_token_file {path} cannot be used: {why}; name a path that is not there (the server "
                           "writes a fresh token for each run there and removes the file at exit)") from None
    try:
        st = os.fstat(fd)
        ours = (stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
                and _WRITTEN.fullmatch(os.read(fd, 100).decode(errors="replace")) is not None)
        if not ours:
            raise StartupError(f"admin_token_file {path} is there already and no tokenpool server wrote it: the server "
                               "writes a fresh token for each run there and removes the file at exit (it reads no token "
                               "from it; to choose the token, set admin_token_hash: tokenpool keys hash); name a path "
                               "that is not there, or remove the file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StartupError(f"admin_token_file {path} is the token file of a server still running (it holds it): "
                               "give each server its own admin_token_file") from None
        except OSError:  # (a file system without locks: whether its server runs is not known; replaced, as before)
            pass
    finally:
        os.close(fd)
    return path


def write_admin_token(cfg: ServerConfig, token: str) -> Path:
    """Write this run's admin token to a file only its owner can read; the log gets the path, never the token. The
    file is locked (flock) from before it appears until `remove_admin_token`: a server killed by SIGKILL leaves it,
    unlocked, and the next start removes it (`remove_dead_admin_tokens`)."""
    path = admin_token_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        # (a file system without locks, some NFS mounts: unlocked, its file is kept by every start, as where a
        # start cannot lock it, `remove_dead_admin_tokens`)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.fchmod(fd, 0o600)  # whatever the umask or an older file said
        os.write(fd, (token + "\n").encode())
        os.replace(tmp, path)
    except BaseException:
        os.close(fd)
        raise
    _locks[path] = fd
    return path


def remove_admin_token(path: Path, token: str) -> None:
    """Remove the token file at exit, unless another run has written its own token there since."""
    try:
        if path.read_text().strip() == token:
            path.unlink()
    except OSError:
        pass
    finally:
        if (fd := _locks.pop(path, None)) is not None:
            os.close(fd)


def remove_dead_admin_tokens(directory: Path) -> list[int]:
    """Remove the `admin-token-PORT` files under `directory` (`config.admin_token_file`'s) of servers no longer
    running: one killed by SIGKILL, or by a crash or a power cut, left its run's token there, a file a port it used,
    for good. A file is a running server's while that server holds its lock (`write_admin_token`; the kernel lets go
    of it when the process ends, however it ends); an unlocked one is still kept while a server answers on its port
    on this machine (one of a version that took no lock). The ports whose files were removed."""
    removed = []
    for f in directory.glob("admin-token-*"):
        port = f.name.removeprefix("admin-token-")
        if not port.isdigit() or int(port) > 65535:  # (a writer's temporary file, PORT.PID.tmp: not looked at)
            continue
        try:
            fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # (gone meanwhile; another user's; a link)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # (not a file another server has written there since this one was opened)
            if not _answers(int(port)) and os.stat(f).st_ino == os.fstat(fd).st_ino:
                f.unlink()
                removed.append(int(port))
        except OSError:  # (locked: its server runs)
            pass
        finally:
            os.close(fd)
    return sorted(removed)


def _answers(port: int) -> bool:
    """Whether a server answers on `port` on this machine's loopback, where `tokenpool ps` reads the port's file."""
    for host in ("127.0.0.1", "::1"):
        try:
            with socket.create_connection((host, port), timeout=0.5) as s:
                # (a connect to an ephemeral port nothing listens on may be given that port, and open to itself)
                if s.getsockname() != s.getpeername():
                    return True
        except OSError:
            pass
    return False
