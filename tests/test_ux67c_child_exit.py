"""The children of a first run (`python -m controller.model_factory`, which makes the default's models) and of
`tokenpool serve FILE.gguf` (`python -m controller.real_model --gguf`) exit without the interpreter's teardown (ux67c).

With torch and transformers imported the teardown took 1.4-2.3 s of a busy 2-core host (py-spy: the cyclic
collector), which the server waited for: on a first run's way to ready (its workers join once the models are made),
and after a Ctrl-C during one (the server said "stopped", then the prompt came back ~1.5-3 s later; the child's own
unwinding on the stop's SIGTERM 1.3-2.9 s, now 0.1-0.4 s). What the teardown does that matters is still done: the
atexit functions run, a SIGTERM's unwinding (the half-made folder removed) and the reason written. The server's
own process (the console script) then exits with its heap frozen: stopped during its start-up, before the server
froze it, the teardown's collection took ~1.1 s more after "stopped".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from load_tests.live_server import REPO_ROOT

# an object freed only by the interpreter's teardown says so; an atexit function says it ran
SETUP = ("import atexit, os, runpy, sys\n"
         "class Teardown:\n"
         "    def __del__(self): os.write(2, b'TEARDOWN\\n')\n"
         "kept = Teardown()\n"
         "atexit.register(os.write, 2, b'ATEXIT\\n')\n")


def _run(code: str, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HOME=str(tmp), TOKENPOOL_CACHE=str(tmp / "cache"))
    return subprocess.run([sys.executable, "-c", SETUP + code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, env=env)


def _made(tmp: Path) -> list[str]:
    """The default's three models, made already (as `default_models_made` reads them): the child has nothing to do."""
    from controller.real_model import MARKER

    args = []
    for name in ("smollm2-135m-instruct", "demo-random-qwen2-small", "demo-random-qwen3-small"):
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text("{}")
        (tmp / name / MARKER).write_text("{}")
        args.append(f"{name}={tmp / name}")
    return args


def test_the_model_factory_exits_without_the_teardown(tmp_path):
    argv = ["model_factory", *_made(tmp_path)]
    out = _run(f"sys.argv = {argv!r}\nrunpy.run_module('controller.model_factory', run_name='__main__', "
               "alter_sys=True)\n", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ATEXIT" in out.stderr, out.stderr
    assert "TEARDOWN" not in out.stderr, out.stderr


def test_the_model_factory_stopped_unwinds_then_exits_without_the_teardown(tmp_path):
    """The server's stop (children.stop_all's SIGTERM) while the models are made: exit 143, its `finally` blocks run
    on the way out (a conversion's temporary folder removed), then no teardown."""
    argv = ["model_factory", *_made(tmp_path)]
    making = ("import signal, time\n"
              "import controller.config\n"
              "def making(cfg):\n"
              "    try:\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "        time.sleep(30)\n"
              "    finally:\n"
              "        os.write(2, b'UNWOUND\\n')\n"
              "controller.config.ensure_demo_models = making\n")
    out = _run(making + f"sys.argv = {argv!r}\nrunpy.run_module('controller.model_factory', run_name='__main__', "
               "alter_sys=True)\n", tmp_path)
    assert out.returncode == 128 + 15, out.stderr
    assert "UNWOUND" in out.stderr and "ATEXIT" in out.stderr, out.stderr
    assert "TEARDOWN" not in out.stderr, out.stderr


def test_the_gguf_converter_exits_without_the_teardown(tmp_path):
    """A file that cannot be converted (torch and transformers imported by then): exit 1, its reason written to the
    server's pipe, no teardown."""
    bad = tmp_path / "m.gguf"
    bad.write_text("not a GGUF file")
    reason = tmp_path / "reason"
    code = (f"fd = os.open({str(reason)!r}, os.O_WRONLY | os.O_CREAT)\n"
            f"sys.argv = ['real_model', '--gguf', {str(bad)!r}, {str(tmp_path / 'out')!r}, '--result-fd', str(fd)]\n"
            "runpy.run_module('controller.real_model', run_name='__main__', alter_sys=True)\n")
    out = _run(code, tmp_path)
    assert out.returncode == 1, out.stderr
    assert "GGUF magic" in reason.read_text(), out.stderr
    assert "ATEXIT" in out.stderr, out.stderr
    assert "TEARDOWN" not in out.stderr, out.stderr


def test_the_console_script_exits_with_its_heap_out_of_the_collectors_reach(tmp_path):
    """`tokenpool serve` stopped before its start-up froze the heap (here: a port in use, exit 2; the same way out
    as a Ctrl-C during a first run's start-up, where the teardown's collection took ~1.1 s after "stopped"): the
    console script freezes it first, so the teardown collects nothing. A cyclic object, which only that collection
    frees, stands for the heap."""
    import socket

    from tests.ports import free_port

    port = free_port(range(29850, 29900))
    code = ("class Cyclic:\n"
            "    def __del__(self, write=os.write): write(2, b'COLLECTED\\n')\n"
            "cyclic = Cyclic()\n"
            "cyclic.me = cyclic\n"
            f"sys.argv = ['tokenpool', 'serve', '--port', '{port}']\n"
            "from controller.cli_main import main\n"
            "sys.exit(main())\n")
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen()
        out = _run(code, tmp_path)
    assert out.returncode == 2 and "Address already in use" in out.stderr, out.stderr
    assert "ATEXIT" in out.stderr, out.stderr
    assert "COLLECTED" not in out.stderr, out.stderr


def test_a_worker_stopped_while_it_imports_torch_logs_none_of_torchs_info_lines(tmp_path):
    """A worker whose run ends while its warm-up still imports torch (Ctrl-C a few seconds into a start): torch's
    atexit function (`fake_tensor.dump_cache_stats`, registered as its import goes) logged "FakeTensor cache stats:"
    and its counts at INFO into the server's log, torch's loggers not yet set to torch's default (WARNING) by the
    end of its import. Here an atexit function logs as torch's does; the worker's run ends at once (nothing listens
    where its controller should be)."""
    from tests.ports import free_port

    port = free_port(range(29850, 29900))  # (nothing listens there: the worker's connection is refused)
    code = ("import logging\n"
            "atexit.register(logging.getLogger('torch._subclasses.fake_tensor').info, 'FakeTensor cache stats:')\n"
            f"sys.argv = ['worker', '--controller', '127.0.0.1:{port}', '--device', 'cpu', '--slot', '0']\n"
            "runpy.run_module('controller.worker', run_name='__main__', alter_sys=True)\n")
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "controller connection:" in out.stderr and "ATEXIT" in out.stderr, out.stderr
    assert "FakeTensor" not in out.stderr, out.stderr
