"""`tokenpool make-model` with an unknown --arch, --size or --dtype is a usage error said before torch and
transformers are imported (ux67c): it took ~2.2 s on 2 cores to say so (0.3 s now), the choices checked only once
the model's config was built; nothing is written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from load_tests.live_server import REPO_ROOT

# the command as the console script runs it; then whether torch was imported on the way to the usage error
CODE = ("import sys\n"
        "from controller.cli_main import main\n"
        "sys.argv = ['tokenpool', 'make-model', *sys.argv[1:]]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'torch' in sys.modules)\n")


@pytest.mark.parametrize(("args", "words"), [
    (["--arch", "gpt2", "--size", "tiny"], "unknown arch 'gpt2'"),
    (["--arch", "qwen2", "--size", "huge"], "unknown size 'huge'"),
    (["--arch", "qwen2", "--size", "tiny", "--dtype", "int8"], "unknown dtype 'int8'"),
])
def test_an_unknown_choice_is_said_before_torch_is_imported(args, words, tmp_path):
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-c", CODE, *args, "--out", str(out)], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.stdout.strip() == "exit 2 False", (r.stdout, r.stderr)
    assert words in " ".join(r.stderr.replace("│", " ").split()), r.stderr
    assert not out.exists()
