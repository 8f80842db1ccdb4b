"""A configuration file wrong in the ways people get one wrong (a typo in a key, another server's key, a wrong type,
a model path that is not there, a duplicate name, a negative number): `tokenpool serve --config` exits 2 with one
line naming the file and the key, and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from load_tests.live_server import REPO_ROOT


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller.cli", "serve", *args, "--port", "18798"], cwd=REPO_ROOT,
                          capture_output=True, text=True, input="", timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "400"})


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    return lines[0]


CASES = {  # name: (models entry beside a good one, or a whole file when it starts with "!", words the line says)
    "missing-path": ("  - name: b\n    path: /nowhere/model\n", "models.1.path: model 'b': path /nowhere/model does not exist"),
    "relative-path": ("  - name: b\n    path: not-here\n", "models.1.path: model 'b': path {dir}/not-here does not exist"),
    "path-is-a-file": ("  - name: b\n    path: {tiny}/config.json\n", "models.1.path: model 'b': path {tiny}/config.json is a file"),
    "typo": ("  - name: b\n    path: {tiny}\n    keep_alvie: 5m\n",
             "models.1: unknown key 'keep_alvie' (did you mean 'keep_alive'?)"),
    "llama-swap-ttl": ("  - name: b\n    path: {tiny}\n    ttl: 60\n",
                       "models.1: unknown key 'ttl' (llama-swap's ttl is keep_alive here)"),
    "wrong-type": ("  - name: b\n    path: {tiny}\n    priority: high\n", "models.1.priority: Input should be a valid integer"),
    "negative": ("  - name: b\n    path: {tiny}\n    engine: {{max_num_seqs: -3}}\n",
                 "models.1.engine.max_num_seqs: Input should be greater than or equal to 1"),
    "duplicate": ("  - name: a\n    path: {tiny}\n", "model names must be unique: a more than once"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_bad_configuration_is_one_line_naming_the_file_and_the_key(case, make_tiny, tmp_path):
    tiny = make_tiny("qwen2")
    extra, words = CASES[case]
    f = tmp_path / "bad.yaml"
    f.write_text(f"models:\n  - name: a\n    path: {tiny}\n" + extra.format(tiny=tiny))
    line = one_line(serve("--config", str(f)))
    assert f"config {f}: " in line and words.format(tiny=tiny, dir=tmp_path) in line, line


def test_a_top_level_typo_is_named_with_what_it_may_have_meant(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("modles:\n  - name: a\n    engine: {kind: pace}\n")
    line = one_line(serve("--config", str(f)))
    assert f"config {f}: unknown key 'modles' (did you mean 'models'?)" in line, line


def test_serve_arguments_that_are_not_models_are_one_line_on_a_narrow_terminal(tmp_path):
    """`tokenpool serve DIR` with DIR not a model, and --config of no file: one line, exit 2 (it was a boxed
    usage error, wrapped over several lines on an 80-column terminal)."""
    (tmp_path / "empty").mkdir()
    for args, words in (([str(tmp_path / "nowhere")], f"tokenpool serve: path {tmp_path / 'nowhere'} does not exist"),
                        ([str(tmp_path / "empty")], f"tokenpool serve: {tmp_path / 'empty'} has no config.json"),
                        (["--config", str(tmp_path / "c.yaml")], f"tokenpool serve: no configuration file at "
                                                                  f"{tmp_path / 'c.yaml'}")):
        r = subprocess.run([sys.executable, "-m", "controller.cli", "serve", *args], cwd=REPO_ROOT, input="",
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "80"})
        assert words in one_line(r), r.stderr


@pytest.mark.parametrize("text, words", [
    ("models:\n  m1:\n    path: /x\n    ttl: 60\n",
     "models: a list of models (- name: NAME, path: DIR), not a mapping of names as llama-swap's"),
    ('listen: ":8080"\n', "listen: expected a mapping of host, port; got the string ':8080'"),
    ("models:\n  - some-model\n", "models.0: expected a mapping of settings (name, path, aliases, slo, ...); got the "
                                  "string 'some-model'"),
    ("- a\n- b\n", "expected a mapping of settings (listen, admin_token_hash, metrics_public, metrics_token_hash, "
                   "...); got a list"),
], ids=["llama-swap-models-mapping", "listen-string", "model-string", "top-level-list"])
def test_a_section_of_the_wrong_shape_says_what_it_takes(text, words, tmp_path):
    """A section given as something other than a mapping said 'Input should be a valid dictionary or instance of
    Listen' (a class name, not the keys); llama-swap's models (a mapping of names) said 'Input should be a valid
    list'."""
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    line = one_line(serve("--config", str(f)))
    assert f"config {f}: {words}" in line, line


def test_paths_in_a_configuration_may_start_with_a_tilde(make_tiny, tmp_path, monkeypatch):
    """`path: ~/models/x` (as people write it, and as `tokenpool serve ~/models/x` takes it) is under the home
    directory; it was read as relative to the file (FILE_DIR/~/models/x). LoRA adapter paths, tenants_file and
    admin_token_file likewise; a relative LoRA path is relative to the file, as a model's is."""
    import shutil

    from controller.config import load_config

    home = tmp_path / "home"
    shutil.copytree(make_tiny("qwen2"), home / "models" / "tiny")
    monkeypatch.setenv("HOME", str(home))
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "c.yaml").write_text("tenants_file: ~/tenants.yaml\nadmin_token_file: ~/token\nmodels:\n"
                                 "  - name: a\n    path: ~/models/tiny\n"
                                 "    lora_modules: [{name: l1, path: ~/adapters/l1}, {name: l2, path: ad/l2}]\n")
    cfg = load_config(conf / "c.yaml")
    m = cfg.models[0]
    assert m.path == str(home / "models" / "tiny")
    assert [lm.path for lm in m.lora_modules] == [str(home / "adapters" / "l1"), str(conf / "ad" / "l2")]
    assert (cfg.tenants_file, cfg.admin_token_file) == (str(home / "tenants.yaml"), str(home / "token"))


def test_a_gpu_budget_out_of_range_is_one_line(make_tiny):
    """--gpu-budget past the bound a configuration's gpus.budget_gb has (1e6 GB) was a pydantic traceback, exit 1."""
    r = subprocess.run([sys.executable, "-m", "controller.cli", "serve", str(make_tiny("qwen2")), "--gpu-budget",
                        "1e7", "--port", "18798"], cwd=REPO_ROOT, capture_output=True, text=True, input="",
                       timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "400"})
    assert "--gpu-budget 1e+07: Input should be less than or equal to 1000000" in one_line(r), r.stderr


def test_policy_options_from_the_environment_are_checked_at_start(monkeypatch, tmp_path):
    """TOKENPOOL_POLICY_OPTIONS (the policy's options where the configuration has none) was read only by a worker at
    its first load: a bad one passed `config check` and `serve`, and every model's load then failed with a traceback,
    retried for ever. Now it is a configuration error at start, as the same options under gpus.policy_options are;
    the configuration's own options win over it."""
    import pydantic

    from controller.config import ServerConfig

    for raw, said in (('{"bogus": 1}', "bogus"), ("nojson", "not JSON"), ("[1]", "a JSON object")):
        monkeypatch.setenv("TOKENPOOL_POLICY_OPTIONS", raw)
        with pytest.raises(pydantic.ValidationError, match=said) as ei:
            ServerConfig()
        assert "TOKENPOOL_POLICY_OPTIONS" in str(ei.value)
    ServerConfig(gpus={"policy_options": {}})  # (the configuration's own: the variable is not read)
    monkeypatch.setenv("TOKENPOOL_POLICY_OPTIONS", '{"headroom": 1.2}')
    ServerConfig()
    (tmp_path / "c.yaml").write_text("gpus: {policy: token}\n")
    r = subprocess.run([sys.executable, "-m", "controller.cli", "config", "check", str(tmp_path / "c.yaml")],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "TOKENPOOL_POLICY_OPTIONS": '{"x": 1}'})
    assert r.returncode == 2 and "TOKENPOOL_POLICY_OPTIONS" in r.stderr and "Traceback" not in r.stderr, r.stderr
