"""`tokenpool config check FILE` (and `serve --config FILE`) given a file that is no configuration, as a new user
may (a log, /etc/passwd, a prompt): one short line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

from load_tests.live_server import REPO_ROOT


def test_a_text_file_given_as_the_configuration_is_not_echoed_whole(tmp_path):
    """A text file of no YAML mapping is one YAML string: the error quoted all of it ("got the string 'root:x:0:0:...
    <every line of the file>'", 6,600 characters for 200 lines) in its one line. The string is cut after 60
    characters now; a short one is still quoted whole."""
    f = tmp_path / "passwd"
    f.write_text("root:x:0:0:root:/root:/bin/bash\n" * 200)
    r = subprocess.run([sys.executable, "-m", "controller.cli", "config", "check", str(f)], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r
    assert "expected a mapping of settings" in r.stderr and "got the string 'root:x:0:0:root:/root:/bin/bash " in \
        r.stderr and len(r.stderr) < 300, r.stderr
    f.write_text("just some words\n")
    r = subprocess.run([sys.executable, "-m", "controller.cli", "config", "check", str(f)], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert r.returncode == 2 and "got the string 'just some words'" in r.stderr, r
