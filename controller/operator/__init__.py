"""Kubernetes operator: GPUPool, PooledModel and Tenant custom resources reconciled into the controller.

`builders` holds pure functions from custom resources to what the controller's admin API and the Kubernetes
API take (tested as data); `admin` is the admin-API client; `handlers` are the thin kopf handlers.
"""

GROUP = "tokenpool.dev"
VERSION = "v1alpha1"
