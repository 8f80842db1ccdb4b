"""What a user of a fresh install meets on the command line, each a one-line error with a non-zero exit where a
traceback or a restart loop was: the tools without the test extra, GPU indices the machine lacks, a configuration
file given as a model directory; and the usage lines name their arguments as the help and README do."""

from __future__ import annotations

import logging
import sys

import pytest
from typer.testing import CliRunner

from controller.cli import app


@pytest.mark.parametrize("args", [["suite", "corpus"], ["suite", "block"], ["bench", "serve", "--device", "cpu"]])
def test_the_tools_without_the_test_extra_say_how_to_install_it(monkeypatch, args):
    """`pip install -e .` (no [test]) has the server, not the tools' httpx: `tokenpool suite corpus` was a
    ModuleNotFoundError traceback."""
    for mod in ("load_tests.faults", "load_tests.dashboard_cost", "load_tests.bench_serve"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    monkeypatch.setitem(sys.modules, "httpx", None)  # (import httpx: ModuleNotFoundError, as where it is missing)
    r = CliRunner().invoke(app, args, prog_name="tokenpool")
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == 2 and len(lines) == 1, (r.exit_code, r.output, r.exception)
    assert lines[0] == (f"tokenpool {' '.join(args[:2])}: needs the test extra (httpx is not installed): "
                        "pip install -e '.[test]' in the repository"), lines[0]


def test_gpu_indices_the_machine_lacks_are_refused_at_start(tmp_path, caplog, monkeypatch):
    """`workers.local: [64]`: a worker started on a GPU that is not there died at its first CUDA call, traceback
    after traceback as it was restarted, behind a server that said it listened."""
    from controller import shutdown
    from controller.serve import serve

    def started(cfg, prepare=None, tenants=None):
        raise AssertionError("the server started")

    monkeypatch.setattr(shutdown, "run", started)

    cfg = tmp_path / "c.yaml"
    cfg.write_text("workers: {local: [64]}\nlisten: {port: 0}\n")
    with caplog.at_level(logging.ERROR, logger="tokenpool"), pytest.raises(SystemExit) as e:
        serve(config_path=cfg)
    assert e.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"config {cfg}: workers.local: GPU 64 is not on this machine"), \
        errors
    # and one given twice (two workers, each sizing an arena for the whole device)
    from controller.config import ServerConfig
    from controller.startup import StartupError, check_local_workers

    with pytest.raises(StartupError, match="workers.local: GPU 0 is given twice"):
        check_local_workers(ServerConfig.model_validate({"workers": {"local": [0, 0]}}))


def test_a_configuration_file_given_as_a_model_directory_points_at_config(tmp_path):
    f = tmp_path / "models.yaml"
    f.write_text("models: []\n")
    r = CliRunner().invoke(app, ["serve", str(f)])
    assert r.exit_code == 2 and "(a configuration file is given with --config FILE)" in r.output, r.output


@pytest.mark.parametrize(("args", "names"), [(["serve"], ["MODEL_DIR"]), (["run"], ["MODEL", "PROMPT"]),
                                            (["stop"], ["MODEL"]), (["keys", "hash"], ["KEY"])])
def test_usage_lines_name_the_arguments_as_the_help_does(args, names):
    """The help and the README say MODEL_DIR, MODEL, PROMPT; the usage line said {model} [prompt]... and
    [model_dirs]..."""
    r = CliRunner().invoke(app, [*args, "--help"], prog_name="tokenpool", env={"COLUMNS": "200"})
    usage = next(x for x in r.output.splitlines() if "Usage:" in x)
    assert r.exit_code == 0 and all(n in usage and f"{{{n.lower()}" not in usage and f"[{n.lower()}" not in usage
                                    for n in names), usage


@pytest.mark.parametrize("args", [["-h"], ["run", "-h"], ["bench", "pool", "-h"], ["keys", "hash", "-h"]])
def test_dash_h_is_help_everywhere(args):
    """`-h`, as ollama, git and vllm take it, was 'No such option: -h'."""
    r = CliRunner().invoke(app, args, prog_name="tokenpool")
    assert r.exit_code == 0 and f"Usage: tokenpool {' '.join(args[:-1])}".rstrip() in " ".join(r.output.split()), \
        r.output


def test_dash_v_and_list_as_ollama_has_them(monkeypatch):
    import tokenpool

    r = CliRunner().invoke(app, ["-v"])
    assert r.exit_code == 0 and r.output == f"tokenpool {tokenpool.version()}\n", r.output
    seen = []
    monkeypatch.setattr("controller.chat_cli.models", lambda url, key: seen.append(url) or [{"id": "m"}])
    r = CliRunner().invoke(app, ["list", "--url", "h:1"])
    assert r.exit_code == 0 and seen == ["http://h:1"] and "m" in r.output.split(), r.output


@pytest.mark.parametrize(("args", "said"), [
    (["bench", "engine", "--model", "/nonexistent"], "Invalid value for --model: path /nonexistent does not exist"),
    (["bench", "swap", "--model", "/nonexistent"], "Invalid value for --model: path /nonexistent does not exist"),
    (["bench", "engine", "--model", "MODEL", "--batch", "1,x"], "Invalid value for --batch: a comma list"),
    (["bench", "pool", "--models", "4x7z"], "Invalid value for --models: qwen2:7z is not a factory model"),
    (["bench", "pool", "--models", "ax7b"], "Invalid value for --models: cannot read 'ax7b'"),
    (["bench", "pool", "--policy", "fifo"], "Invalid value for --policy: unknown policy 'fifo'"),
    (["bench", "serve", "--models", "2xgpt2:7b"], "Invalid value for --models: gpt2:7b is not a factory model"),
    (["bench", "pool", "--real", "--merge", "/nonexistent.json"], "Invalid value for '--merge': file "
     "'/nonexistent.json' does not exist"),
    (["bench", "pool", "--real", "--resimulate", "/nonexistent.json"], "Invalid value for '--resimulate': file "
     "'/nonexistent.json' does not exist"),
])
def test_bench_options_are_checked_before_it_runs(tmp_path, args, said):
    """Each was a ValueError or FileNotFoundError traceback from inside the benchmark, exit 1."""
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    args = [str(tmp_path) if a == "MODEL" else a for a in args]
    r = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert r.exit_code == 2 and said in r.output, (r.exit_code, r.output, r.exception)


def test_api_key_beside_a_config_tenant_of_its_name_says_which(tmp_path):
    """--api-key is served as a tenant named api-key; beside a configuration that has one, the error was 'tenant
    names must be unique', naming neither."""
    from controller.serve import prepare
    from controller.startup import StartupError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("tenants:\n  - {name: api-key, key_hashes: []}\n")
    with pytest.raises(StartupError, match=r"--api-key is served as a tenant named 'api-key', and config .* has a "
                                           r"tenant of that name"):
        prepare(cfg, None, None, api_key="k")


def test_a_key_given_twice_in_the_configuration_is_refused(tmp_path):
    """YAML keeps the last of two equal keys silently: a second `models:` dropped the first one's models, and the
    server started without them."""
    from controller.startup import StartupError, load_checked

    f = tmp_path / "c.yaml"
    f.write_text("models:\n  - {name: a, engine: {kind: pace}}\nlisten: {port: 0}\nmodels:\n"
                 "  - {name: b, engine: {kind: pace}}\n")
    with pytest.raises(StartupError, match=r"line 4, column 1: found key 'models' twice \(first at line 1\)"):
        load_checked(f)
    # a merge key's keys may still be given again (to override them)
    f.write_text("listen: &l {host: 127.0.0.2, port: 0}\nworkers:\n  listen:\n    <<: *l\n    host: 127.0.0.1\n")
    assert load_checked(f).workers.listen.host == "127.0.0.1"


@pytest.mark.parametrize("prefix", ["my key", "-x", "tp/admin"])
def test_a_key_prefix_that_would_break_its_use_is_refused(prefix):
    """`keys new --prefix "my key"` made a key with a space (a broken Bearer header), `--prefix=-x` one that
    `keys hash KEY` reads as an option."""
    r = CliRunner().invoke(app, ["keys", "new", f"--prefix={prefix}"], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "Invalid value for --prefix" in r.output, r.output
    assert CliRunner().invoke(app, ["keys", "new", "--prefix", "tp.admin_1"]).exit_code == 0


@pytest.mark.parametrize("what", ["default", "model_dir"])
def test_a_cache_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, caplog, what):
    """TOKENPOOL_CACHE at a file (or a folder not writable): the default's models, and a run's admin token file,
    were a FileExistsError traceback, exit 1. (The token is written first: the default's models are made once the
    server listens, `test_a_default_model_that_cannot_be_made_is_one_line`.)"""
    from controller import shutdown
    from controller.serve import serve

    def started(cfg, prepare=None, tenants=None):
        raise AssertionError("the server started")

    monkeypatch.setattr(shutdown, "run", started)
    (tmp_path / "cache").write_text("a file, not a folder")
    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2"}')
    with caplog.at_level(logging.ERROR, logger="tokenpool"), pytest.raises(SystemExit) as e:
        serve(port=0, model_dirs=[model] if what == "model_dir" else None)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert e.value.code == 2 and len(errors) == 1, errors
    want = "cannot write this run's admin token to"
    assert errors[0].startswith(f"{want} {tmp_path / 'cache'}") and "TOKENPOOL_CACHE" in errors[0], errors


def test_a_default_model_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    """A demo model of the default that cannot be made (a file where its folder goes): the start-up step `tokenpool
    serve` runs once it listens (`make_default_models`) raises a one-line StartupError naming the cache, which the
    server logs before it exits 2."""
    from controller.config import DEMO_MODELS, REAL_MODEL, default_config
    from controller.real_model import MARKER
    from controller.serve import make_default_models
    from controller.startup import StartupError

    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path))
    cfg = default_config()
    assert cfg.is_default and all(str(m.path).startswith(str(tmp_path)) for m in cfg.models if m.path)
    (tmp_path / REAL_MODEL).mkdir()  # (the real model converted already: no 9 s conversion here)
    for f in ("config.json", MARKER):
        (tmp_path / REAL_MODEL / f).write_text("{}")
    (tmp_path / DEMO_MODELS[0][0]).write_text("a file, not a folder")
    with pytest.raises(StartupError) as e:
        make_default_models(cfg)
    assert str(e.value).startswith(f"cannot make the default's models under {tmp_path}: ") and \
        "\n" not in str(e.value), str(e.value)


def test_make_model_into_a_folder_it_cannot_make_is_one_line(tmp_path):
    (tmp_path / "f").write_text("a file")
    r = CliRunner().invoke(app, ["make-model", "--arch", "qwen2", "--size", "tiny", "--out", str(tmp_path / "f" / "m")])
    assert r.exit_code == 1 and r.output.strip() == \
        f"tokenpool make-model: cannot write {tmp_path / 'f' / 'm'}: Not a directory", (r.output, r.exception)


@pytest.mark.parametrize("args", [["loadtest"], ["bench", "pool"], ["suite", "corpus"]])
def test_a_json_path_that_cannot_be_a_file_is_refused_before_the_run(tmp_path, monkeypatch, args):
    """--json at a folder (or under a file) failed when the result was written, after the whole run."""
    def ran(*a, **kw):
        raise AssertionError("it ran")

    for where in ("load_tests.loadtest.run_loadtest", "load_tests.bench_pool.run_bench_pool",
                  "load_tests.faults.target"):
        monkeypatch.setattr(where, ran)
    (tmp_path / "f").write_text("a file")
    for bad, said in ((tmp_path, "is a folder"), (tmp_path / "f" / "r.json", "is not a folder")):
        r = CliRunner().invoke(app, [*args, "--json", str(bad)], env={"COLUMNS": "300"})
        assert r.exit_code == 2 and "Invalid value for '--json'" in r.output and said in r.output, r.output


def test_vllm_serve_flags_its_users_type(tmp_path, monkeypatch, caplog):
    """`--max-num-seqs` and `--enforce-eager` set the MODEL_DIR models' engine as vLLM's do; `--trust-remote-code` is
    accepted with a line saying it is not needed; `--gpu-memory-utilization` and `-tp` say what is given here
    instead (each was typer's 'No such option')."""
    from controller import shutdown
    from controller.serve import prepare

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2"}')
    cfg, _ = prepare(None, None, None, [model], max_num_seqs=4, enforce_eager=True)
    assert (cfg.models[0].engine.max_num_seqs, cfg.models[0].engine.cuda_graphs) == (4, False)
    for flag in (["--gpu-memory-utilization", "0.9"], ["-tp", "2"]):
        r = CliRunner().invoke(app, ["serve", str(model), *flag], env={"COLUMNS": "300"})
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and "are vLLM's" in lines[0] and "--gpu-budget GB" in lines[0], \
            r.output
    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(shutdown, "run", lambda cfg, prepare=None, tenants=None: 0)
    with caplog.at_level(logging.WARNING, logger="tokenpool"):
        r = CliRunner().invoke(app, ["serve", str(model), "--trust-remote-code", "--port", "0"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert any(x.getMessage().startswith("--trust-remote-code is ignored") for x in caplog.records)


def test_ollamas_latest_tag_names_the_model(monkeypatch):
    """`tokenpool run smollm2:latest` (as `ollama run` users type it) was 'The model `smollm2:latest` does not
    exist', where the server's own Ollama API takes either; so was `tokenpool stop smollm2:latest`."""
    import io

    from controller import chat_cli, ps

    def turn(url, key, body, out, stats=None):
        if body["model"] != "m":  # (the server's OpenAI API: exact names)
            raise chat_cli.ChatError(f"The model `{body['model']}` does not exist.", 404)
        sent.append(body["model"])
        return "ok"

    sent = []
    monkeypatch.setattr(chat_cli, "models", lambda url, key: [{"id": "m"}])  # (the names the key may use)
    monkeypatch.setattr(chat_cli, "turn", turn)
    chat_cli.run("http://h", None, "m:latest", "hi", None, {}, io.StringIO(""), io.StringIO())
    assert sent == ["m"]
    with pytest.raises(chat_cli.ChatError, match='model "x:latest" not found; served: m'):
        chat_cli.run("http://h", None, "x:latest", "hi", None, {}, io.StringIO(""), io.StringIO())
    asked = []
    monkeypatch.setattr(ps, "fetch", lambda url, path, token, method="GET": asked.append(path) or (
        [{"name": "m", "aliases": ["a"]}] if path == "/admin/models" else {"engines": 1}))
    ps.stop("http://h", None, "a:latest")
    ps.stop("http://h", None, "m:latest")
    assert [a for a in asked if a.endswith("/evict")] == ["/admin/models/m/evict", "/admin/models/m/evict"], asked


def test_make_model_on_a_device_it_cannot_draw_on_is_refused_before_writing(tmp_path):
    """--device mps (or meta) was a RuntimeError traceback after half the folder was written."""
    r = CliRunner().invoke(app, ["make-model", "--arch", "qwen2", "--size", "tiny", "--out", str(tmp_path / "m"),
                                 "--device", "mps"], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "the factory draws weights on cpu or cuda" in r.output, (r.output, r.exception)
    assert not (tmp_path / "m").exists()


def test_auth_on_without_a_tenant_says_every_request_is_refused(tmp_path, monkeypatch, caplog):
    """`auth: true` and no tenant: a server nobody may use, said nowhere; and so a server with no model."""
    from controller import shutdown
    from controller.serve import serve

    monkeypatch.setattr(shutdown, "run", lambda cfg, prepare=None, tenants=None: 0)
    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("auth: true\nlisten: {port: 0}\n")
    with caplog.at_level(logging.WARNING, logger="tokenpool"):
        serve(config_path=cfg)
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("authentication is on and no tenant is configured") for m in said), said
    assert any(m.startswith("no model is configured: add models through the admin API") for m in said), said


def test_input_piped_in_that_is_not_utf8_is_said_so(monkeypatch):
    """Bytes that are not UTF-8 piped into `tokenpool run` went on as lone surrogates (Python's stdin keeps them so),
    and the server's 400 named 'lone UTF-16 surrogate'; a strict decoder raised a traceback."""
    import io

    from controller import chat_cli

    monkeypatch.setattr(chat_cli, "turn", lambda *a: pytest.fail("sent"))
    for raw, errors in ((b"caf\xe9\n", "surrogateescape"), (b"caf\xe9\n", "strict")):
        inp = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors=errors)
        with pytest.raises(chat_cli.ChatError, match="what is piped in is not UTF-8 text"):
            chat_cli.run("http://h", None, "m", None, None, {}, inp, io.StringIO())


def test_a_conversation_at_the_terminal_reads_lines_with_editing(monkeypatch):
    """At a terminal, `tokenpool run`'s lines come through input() (readline: arrow keys edit a line and recall
    earlier ones, as in `ollama run`); a plain read of stdin echoed the arrows as ^[[A."""
    import builtins
    import io

    from controller import chat_cli
    from tests.http_stub import Terminal

    typed = iter(['"""first', 'second"""', "/bye"])
    prompts = []

    def fake_input(prompt=""):
        prompts.append(prompt)
        return next(typed)

    sent = []
    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr("sys.stdin", Terminal(""))
    monkeypatch.setattr("sys.stdout", io.StringIO())
    monkeypatch.setattr(chat_cli, "check_model", lambda *a: None)
    monkeypatch.setattr(chat_cli, "turn",
                        lambda url, key, body, out, stats=None: sent.append(body["messages"][-1]) or "ok")
    chat_cli.run("http://h", None, "m", None, None, {})
    assert prompts == [">>> ", "... ", ">>> "] and sent == [{"role": "user", "content": "first\nsecond"}], \
        (prompts, sent)


def test_no_auth_on_a_listener_other_machines_reach_says_so(tmp_path, monkeypatch, caplog):
    from controller import shutdown
    from controller.serve import serve

    monkeypatch.setattr(shutdown, "run", lambda cfg, prepare=None, tenants=None: 0)
    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2"}')
    with caplog.at_level(logging.WARNING, logger="tokenpool"):
        serve(host="0.0.0.0", port=0, model_dirs=[model])
    assert "authentication is OFF: every caller may use every model, and 0.0.0.0 is reachable from other machines " \
           "(give tenants, or --api-key)" in [r.getMessage() for r in caplog.records]


def test_the_defaults_start_up_line_says_whether_a_key_is_asked():
    """`tokenpool serve` on the embedded default says it runs with NO authentication; with `--api-key` it runs
    behind that key (requests without it are 401s) and says so, not "NO authentication"."""
    from controller.serve import default_banner, prepare

    plain, _ = prepare(None, None, None, [], [], None, None)
    keyed, _ = prepare(None, None, None, [], [], None, "k-banner")
    assert plain.is_default and keyed.is_default and keyed.auth_enabled and not plain.auth_enabled
    assert "with NO authentication" in default_banner(plain)
    said = default_banner(keyed)
    assert "NO authentication" not in said and "to requests that send the --api-key" in said, said
