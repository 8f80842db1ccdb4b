"""What the operator's tests against kmock (a Kubernetes API emulator) share."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_kubeconfig(k8s, path: Path, namespace: str) -> Path:
    """A kubeconfig at `path` whose current context is the emulator `k8s`, in `namespace`."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(k8s.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "kmock"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": namespace}}]}))
    return path
