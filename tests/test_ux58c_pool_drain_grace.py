"""GPUPool `spec.drainGraceSeconds`: a worker pod's SIGTERM drain grace (each worker's TOKENPOOL_WORKER_DRAIN_S) and,
with a margin over it, the pod's terminationGracePeriodSeconds. It could not be set (always 45 s under 60 s): a pool
whose requests run longer (long generations) lost them at every node drain. Unset, the DaemonSet is the one from
before the field (no rollout of every pool's workers at the operator's upgrade); the CRD bounds it."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

from controller.operator import builders as b  # noqa: E402
from tests.test_manifests import (  # noqa: E402
    K8S_VERSION,
    OBJECTS,
    _apply_defaults,
    _cel_refusals,
    _crd_schema,
    _validate_cr,
    kv,
)
from tokenpool import env  # noqa: E402


def _pod(spec: dict) -> dict:
    ds = b.build_worker_daemonset("default", "tokenpool", spec)
    kv.validate(ds, K8S_VERSION, strict=True)
    return ds["spec"]["template"]["spec"]


def _drain_env(pod: dict) -> list[str | None]:
    return [next((e.get("value") for e in c["env"] if e["name"] == env.WORKER_DRAIN_S.name), None)
            for c in pod["containers"]]


def _pool(**spec) -> dict:
    pool = copy.deepcopy(next(d for _, d in OBJECTS if d["kind"] == "GPUPool"))
    pool["spec"].pop("drainGraceSeconds", None)
    pool["spec"].update(spec)
    return pool


def test_unset_the_workers_keep_their_default_grace_and_the_pod_its_60_s():
    pod = _pod({"gpusPerNode": 2})
    assert _drain_env(pod) == [None, None]  # (the DaemonSet of before: no rollout at the operator's upgrade)
    assert pod["terminationGracePeriodSeconds"] == 60
    assert float(env.WORKER_DRAIN_S.default) == b.WORKER_DRAIN_DEFAULT_S
    assert b.WORKER_DRAIN_DEFAULT_S + b.WORKER_STOP_MARGIN_S == 60
    assert "drainGraceSeconds" not in b.POOL_DEFAULTS  # (nor a CRD default, which the API server would fill in)
    assert "default" not in _crd_schema("GPUPool")["properties"]["spec"]["properties"]["drainGraceSeconds"]


@pytest.mark.parametrize("grace", [0, 45, 300, 3600])
def test_drain_grace_sets_every_workers_env_and_the_pods_grace_period(grace):
    pod = _pod({"gpusPerNode": 3, "drainGraceSeconds": grace})
    assert _drain_env(pod) == [str(grace)] * 3
    assert pod["terminationGracePeriodSeconds"] == grace + b.WORKER_STOP_MARGIN_S
    pool = _pool(drainGraceSeconds=grace)
    _validate_cr(pool)
    assert _cel_refusals(pool) == []


def test_the_pods_margin_covers_the_workers_own_stop_margin():
    from controller import worker

    assert b.WORKER_STOP_MARGIN_S >= worker.STOP_MARGIN_S + 5  # (and the process's exit after it)


def test_a_changed_grace_rolls_the_workers():
    a = b.build_worker_daemonset("default", "tokenpool", {"drainGraceSeconds": 45})
    c = b.build_worker_daemonset("default", "tokenpool", {"drainGraceSeconds": 120})
    assert a["metadata"]["annotations"][b.ANNOTATION_DIGEST] != c["metadata"]["annotations"][b.ANNOTATION_DIGEST]


@pytest.mark.parametrize("value", [-1, 3601, 1.5, "45", "45s", True])
def test_the_crd_refuses_a_grace_out_of_bounds_or_not_whole_seconds(value):
    with pytest.raises(jsonschema.ValidationError):
        _validate_cr(_pool(drainGraceSeconds=value))


def test_the_crd_describes_it_and_the_defaults_leave_it_unset():
    field = _crd_schema("GPUPool")["properties"]["spec"]["properties"]["drainGraceSeconds"]
    assert field["type"] == "integer" and field["minimum"] == 0 and field["maximum"] == 3600
    assert "terminationGracePeriodSeconds" in field["description"] and env.WORKER_DRAIN_S.name in field["description"]
    assert "drainGraceSeconds" not in _apply_defaults(_crd_schema("GPUPool")["properties"]["spec"], {})
