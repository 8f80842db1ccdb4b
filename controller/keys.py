"""Secrets (tenant API keys, the admin token, the worker join token) are kept only as salted hashes.

Keys are generated with 256 bits of entropy, so a salted SHA-256 is enough (a slow KDF protects
low-entropy passwords, and would cost milliseconds on every request). Format: ``sha256$<salt hex>$<digest hex>``.
Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sys

PREFIX = "sha256"


def new_key(prefix: str = "tp") -> str:
    """A new API key: `prefix-` then 256 random bits, URL-safe (a prefix that ends in '-' or '_' is used as it is;
    no prefix: no leading dash, which a command line would read as an option)."""
    key = secrets.token_urlsafe(32)
    if prefix:
        return f"{prefix}{key}" if prefix.endswith(("-", "_")) else f"{prefix}-{key}"
    while key.startswith("-"):  # (token_urlsafe's alphabet has '-')
        key = secrets.token_urlsafe(32)
    return key


def hash_key(key: str, salt: str | None = None) -> str:
    salt = salt if salt is not None else secrets.token_hex(16)
    digest = hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest()
    return f"{PREFIX}${salt}${digest}"


def is_key_hash(s: str) -> bool:
    parts = s.split("$")
    if len(parts) != 3 or parts[0] != PREFIX or len(parts[2]) != 64:
        return False
    try:
        bytes.fromhex(parts[1])
        bytes.fromhex(parts[2])
    except ValueError:
        return False
    return True


def verify_key(key: str, stored: str) -> bool:
    try:
        _, salt, digest = stored.split("$")
        candidate = hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest()
    except ValueError:
        return False
    return hmac.compare_digest(candidate, digest)


def main(argv: list[str] | None = None) -> int:
    """python -m controller.keys new [--prefix P] | hash KEY  (the same as `tokenpool keys ...`)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m controller.keys",
                                 description="Make API keys and tokens, and the salted hashes a config stores.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("new", help="a fresh random key and its hash")
    n.add_argument("--prefix", default="tp", help="key prefix (tp: tenant key, tpadmin: admin token, ...)")
    h = sub.add_parser("hash", help="the hash of a key you already have ('-' reads it from stdin)")
    h.add_argument("key")
    a = ap.parse_args(argv)
    if a.cmd == "new":
        k = new_key(a.prefix)
        print(f"key:  {k}\nhash: {hash_key(k)}")
        return 0
    try:
        keys = keys_given(a.key)
    except ValueError as e:
        ap.error(str(e))
    for k in keys:
        print(hash_key(k))
    return 0


def keys_given(key: str) -> list[str]:
    """The keys `keys hash KEY` hashes (`tokenpool keys hash` and `python -m controller.keys hash`): KEY, or for '-'
    every line of stdin, a hash each (the first line alone was read: a file of keys piped in gave one hash, unsaid);
    typed at a terminal, the one line, its hash printed at its Enter; stdin closed (`<&-`): none. ValueError where
    there is no key ("the key is empty", "stdin holds no key")."""
    if key != "-":
        if not key:
            raise ValueError("the key is empty")
        return [key]
    text = "" if sys.stdin is None else sys.stdin.readline() if sys.stdin.isatty() else sys.stdin.read()
    keys = [line.strip() for line in text.splitlines() if line.strip()]
    if not keys:
        raise ValueError("stdin holds no key")
    return keys


if __name__ == "__main__":
    sys.exit(main())
