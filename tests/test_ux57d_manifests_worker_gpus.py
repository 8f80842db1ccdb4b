"""A platform engineer used to `resources: {limits: {nvidia.com/gpu: 8}}` writes it in a GPUPool's workerResources.
The operator gives each worker container exactly one GPU (one worker per GPU, gpusPerNode of them per node), so that
count was overridden without a word: one worker on one GPU, the node's other seven idle (and a `requests` count
made a DaemonSet the API server refused). The CRD refuses it when applied, saying what sets the GPUs."""

from __future__ import annotations

import copy

import pytest

from controller.operator import builders as b
from tests.test_manifests import _apply_defaults, _cel_refusals, _crd_schema, _validate_cr

pytest.importorskip("celpy")

NO_GPU = ("workerResources takes no nvidia.com/gpu: each worker has one GPU; gpusPerNode sets how many workers (and "
          "GPUs) a node runs")


@pytest.mark.parametrize("resources,refused", [
    ({"limits": {"nvidia.com/gpu": 8}}, NO_GPU),
    ({"requests": {"nvidia.com/gpu": "1"}}, NO_GPU),
    ({"requests": {"cpu": "4", "memory": "40Gi"}, "limits": {"memory": "64Gi"}}, None),
    ({}, None),
])
def test_a_gpu_count_in_worker_resources_is_refused_when_applied(resources, refused):
    spec = {"gpusPerNode": 1, "workerResources": resources}
    obj = {"apiVersion": "tokenpool.dev/v1alpha1", "kind": "GPUPool", "metadata": {"name": "p"},
           "spec": _apply_defaults(_crd_schema("GPUPool")["properties"]["spec"], copy.deepcopy(spec))}
    _validate_cr(obj)
    assert _cel_refusals(obj) == ([refused] if refused else [])
    [worker] = b.build_worker_daemonset("p", "ns", spec)["spec"]["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"  # (what the operator makes of any count)
