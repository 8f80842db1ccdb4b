"""The few Kubernetes API calls the operator makes besides kopf's own: read a Secret or a GPUPool, apply a
DaemonSet. Plain dicts in and out (raw JSON, no client models), through the official client's configuration
(in-cluster service account, else KUBECONFIG)."""

from __future__ import annotations

import copy
import json

from controller.operator import GROUP, VERSION
from controller.operator.builders import ANNOTATION_DIGEST, LABEL_POOL

# Seconds a call of the API server may take (the client's default: none). A call that never answered kept its
# handler's thread, and the object's lock (handlers._lock), for good: that object was never reconciled again.
REQUEST_TIMEOUT_S = 15.0  # (per try: the client tries a read 4 times)


class Kube:
    def __init__(self, kubeconfig: str | None = None) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            # The client reads KUBECONFIG once, at import; an explicit path sees the current one.
            config.load_kube_config(config_file=kubeconfig)
        self.api = client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    @staticmethod
    def _raw(call, *args, **kwargs) -> dict | None:
        """The JSON object a client call returns, or None on 404."""
        from kubernetes.client.exceptions import ApiException

        try:
            r = call(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S, **kwargs)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return json.loads(r.data)

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        s = self._raw(self.core.read_namespaced_secret, name, namespace)
        return None if s is None else (s.get("data") or {})

    def pool(self, namespace: str, name: str) -> dict | None:
        if not name:  # (a GET of .../gpupools/ is the list of them)
            return None
        return self._raw(self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, "gpupools", name)

    def worker_pods(self, namespace: str, pool: str) -> list[dict] | None:
        """The worker pods of GPUPool `pool`; None where the operator may not list pods (an older install's Role)."""
        from kubernetes.client.exceptions import ApiException

        try:
            got = self._raw(self.core.list_namespaced_pod, namespace,
                            label_selector=f"app.kubernetes.io/component=worker,{LABEL_POOL}={pool}")
        except ApiException as e:
            if e.status == 403:
                return None
            raise
        return list((got or {}).get("items") or [])

    def namespace_leaving(self, name: str) -> bool:
        """Whether namespace `name` is being deleted (Terminating): an uninstall, which takes the controller with it.
        (A Role may read its own namespace: the API server authorizes GET /namespaces/N in namespace N.) Not found
        or not allowed (an older install's Role): not known, so not leaving."""
        from kubernetes.client.exceptions import ApiException

        try:
            ns = self._raw(self.core.read_namespace, name)
        except ApiException as e:
            if e.status == 403:
                return False
            raise
        return ns is not None and bool((ns.get("metadata") or {}).get("deletionTimestamp"))

    def objects(self, namespace: str, plural: str) -> list[dict]:
        """The namespace's custom resources of `plural` (one of this operator's kinds)."""
        got = self._raw(self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, plural)
        return list((got or {}).get("items") or [])

    def release(self, obj: dict, plural: str, finalizer: str) -> None:
        """Remove `finalizer` from `obj` (a merge patch of its finalizers without it, on the resourceVersion read:
        the API server refuses it if another writer changed the list meanwhile)."""
        meta = obj["metadata"]
        keep = [f for f in meta.get("finalizers") or [] if f != finalizer]
        self._raw(self.custom.patch_namespaced_custom_object, GROUP, VERSION, meta["namespace"], plural, meta["name"],
                  {"metadata": {"finalizers": keep, **({"resourceVersion": meta["resourceVersion"]}
                                                        if meta.get("resourceVersion") else {})}},
                  _content_type="application/merge-patch+json")

    def apply_daemonset(self, ds: dict) -> dict:
        """Create `ds`, or replace its spec when the builder's digest annotation differs; the current object."""
        ns, name = ds["metadata"]["namespace"], ds["metadata"]["name"]
        cur = self._raw(self.apps.read_namespaced_daemon_set, name, ns)
        if cur is None:
            return self._raw(self.apps.create_namespaced_daemon_set, ns, ds) or ds
        want = ds["metadata"]["annotations"][ANNOTATION_DIGEST]
        meta = cur.get("metadata") or {}
        # Its owner too: a pool deleted with --cascade=orphan, or made again before the garbage collector came by,
        # leaves a DaemonSet of the same spec owned by no pool or by the old one (deleting the new pool would leave
        # the workers behind, or the collector would take the new pool's workers).
        owners = {o.get("uid") for o in meta.get("ownerReferences") or []}
        # And what it holds: a hand edit (kubectl set image, kubectl edit) keeps the digest annotation, and the pool
        # would keep the edited workers for good.
        if ((meta.get("annotations") or {}).get(ANNOTATION_DIGEST) == want
                and owners >= {o["uid"] for o in ds["metadata"].get("ownerReferences") or []}
                and not differs(ds["spec"], cur.get("spec")) and not differs(ds["metadata"].get("labels"),
                                                                                meta.get("labels"))):
            return cur
        # A JSON merge patch replaces lists whole (a strategic merge would keep containers the builder dropped), but
        # merges objects: a free-form map's keys the builder no longer has are deleted explicitly (null).
        patch = {"metadata": ds["metadata"], "spec": copy.deepcopy(ds["spec"])}
        for path in FREE_FORM_MAPS:
            have, want = _at(cur, path), _at(patch, path, create=True)
            want.update({k: None for k in have if k not in want})
        return self._raw(self.apps.patch_namespaced_daemon_set, name, ns, patch,
                         _content_type="application/merge-patch+json") or ds


def differs(want, have) -> bool:
    """Whether `have` (an object as the API server keeps it) differs from `want` (the builder's) in what `want`
    sets. What the API server adds by itself (its defaults) is no difference, nor a quantity written another way
    (0.5 and 500m), nor an empty map or list it left out."""
    if isinstance(want, dict | list):
        kind = type(want)
        have = kind() if have is None else have
        if not isinstance(have, kind):
            return True
        if kind is list:
            return len(want) != len(have) or any(differs(w, h) for w, h in zip(want, have))
        return any(differs(v, have.get(k)) for k, v in want.items())
    if want == have and type(want) is type(have):
        return False
    if isinstance(want, str | int | float) and isinstance(have, str | int | float) and not isinstance(want, bool) \
            and not isinstance(have, bool):
        from kubernetes.utils import parse_quantity

        try:
            return parse_quantity(want) != parse_quantity(have)
        except (ValueError, TypeError, ArithmeticError):
            return True
    return True


# Maps in the worker DaemonSet whose keys come from the GPUPool's spec (the rest of its objects have fixed keys).
FREE_FORM_MAPS = (("spec", "template", "spec", "nodeSelector"),)


def _at(obj: dict, path: tuple[str, ...], create: bool = False) -> dict:
    """The map at `path` in `obj` ({} where absent; made in place with `create`)."""
    for key in path:
        if not isinstance(obj.get(key), dict):
            if not create:
                return {}
            obj[key] = {}
        obj = obj[key]
    return obj
