"""`tokenpool config check` counts the tenants `serve` starts with: a tenant of the configuration that the tenants
file keeps revoked (deleted through the admin API: it stays so across restarts) was counted as active ("auth on, 2
tenants" with one of them refused at every request); it is left out of the count and named as revoked, a tenant
some of whose keys are revoked says how many, and the tenants file's own tenants are counted. A tenants file `serve`
could not read is said, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

from controller.keys import hash_key
from load_tests.live_server import REPO_ROOT


def _check(path) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "controller.cli", "config", "check", str(path)], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "400"})
    return p.returncode, p.stdout, p.stderr


def _config(tmp_path, tenants_file: str):
    a, b1, b2, c = (hash_key(k) for k in ("tp-alice", "tp-bob-1", "tp-bob-2", "tp-carol"))
    (tmp_path / "c.yaml").write_text(
        f"tenants:\n  - {{name: alice, key_hashes: ['{a}']}}\n  - {{name: bob, key_hashes: ['{b1}', '{b2}']}}\n"
        "tenants_file: tenants.yaml\n")
    (tmp_path / "tenants.yaml").write_text(tenants_file.format(a=a, b1=b1, c=c))
    return tmp_path / "c.yaml"


def test_a_tenant_the_tenants_file_keeps_revoked_is_not_counted_as_active(tmp_path):
    cfg = _config(tmp_path, "tenants:\n  - {{name: carol, key_hashes: ['{c}']}}\nrevoked:\n"
                            "  - {{name: alice, key_hashes: ['{a}']}}\n  - {{name: bob, key_hashes: ['{b1}']}}\n")
    code, out, err = _check(cfg)
    assert (code, err) == (0, ""), err
    assert out.strip().endswith(
        f"auth on, 2 tenants (1 from the tenants file); revoked through the admin API, as {tmp_path / 'tenants.yaml'} "
        "records: alice, bob (1 of 2 keys) (remove its entry under `revoked` there to bring it back)"), out


def test_without_revocations_the_count_is_the_configurations(tmp_path):
    code, out, _ = _check(_config(tmp_path, "[]\n"))
    assert code == 0 and out.strip().endswith("auth on, 2 tenants"), out


def test_a_tenants_file_serve_could_not_read_is_said(tmp_path):
    code, out, err = _check(_config(tmp_path, "tenants:\n  - {{name: carol, key_hashes: [not-a-hash]}}\n"))
    assert code == 2 and out == "", out
    assert err.startswith(f"tokenpool config check: tenants_file {tmp_path / 'tenants.yaml'}: "), err
