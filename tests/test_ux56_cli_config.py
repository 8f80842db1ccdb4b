"""Configuration and keys at the command line: `tokenpool config check` (and `serve --config`) on a configuration
naming a tenant twice says which name, as it says a model's ("tenant names must be unique" left the user to search a
file of many tenants); `tokenpool keys hash -` hashes every key piped in."""

from __future__ import annotations

from typer.testing import CliRunner

from controller.cli import app


def test_a_tenant_named_twice_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("tenants:\n  - {name: team-a}\n  - {name: team-b}\n  - {name: team-a}\n")
    r = CliRunner().invoke(app, ["config", "check", str(f)])
    assert r.exit_code == 2
    assert " ".join(r.output.split()) == (f"tokenpool config check: config {f}: tenant names must be unique: team-a "
                                          "more than once"), r.output


def test_keys_hash_from_stdin_hashes_each_line():
    """`tokenpool keys hash -` with a file of keys piped in: a hash each (the lines after the first were dropped
    without a word); nothing piped in is said."""
    from controller.keys import verify_key

    r = CliRunner().invoke(app, ["keys", "hash", "-"], input="key-one\n\nkey-two\n")
    assert r.exit_code == 0, r.output
    hashes = r.output.split()
    assert len(hashes) == 2 and verify_key("key-one", hashes[0]) and verify_key("key-two", hashes[1])
    r = CliRunner().invoke(app, ["keys", "hash", "-"], input="\n")
    assert r.exit_code == 2 and "stdin holds no key" in r.output


def test_a_list_key_with_every_entry_commented_out_is_an_empty_list(tmp_path):
    """`models:` (or `tenants:`) with every entry commented out is YAML's null: no models, as an empty list (it was
    refused: 'models: Input should be a valid list')."""
    f = tmp_path / "c.yaml"
    f.write_text("models:\n#  - name: qwen\n#    path: /models/qwen\ntenants:\n")
    r = CliRunner().invoke(app, ["config", "check", str(f)])
    assert r.exit_code == 0, r.output
    assert "models none" in r.output
