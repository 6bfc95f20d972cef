"""The only code that talks to the API server: server-side apply, delete, list, status.

Raw JSON over urllib3 (kube/transport.py: in-cluster or kubeconfig credentials), objects
addressed by path, so no discovery round-trips are needed and no model classes are built.
"""

from __future__ import annotations

import logging
from typing import Any

from llm_operator.constants import FIELD_MANAGER
from llm_operator.kube.resources import LLMDEPLOYMENT, NODE, POD, Kind, kind_of
from llm_operator.kube.transport import ApiError, Connection, compact, connect
from llm_operator.kubeformat import rfc3339_now

log = logging.getLogger(__name__)

# Errors worth another try: the API server is busy, restarting, or the object moved on.
RETRYABLE_STATUSES = {409, 429, 500, 502, 503, 504}
LIST_PAGE_SIZE = 250


# Reconciles run in threads; each needs its own keep-alive connection, or urllib3 drops and
# reopens connections (TLS handshakes) under load.
API_CONCURRENCY = 16


def load_config() -> Connection:
    """Connections from the pod's ServiceAccount, or from KUBECONFIG / ~/.kube/config."""
    return connect(API_CONCURRENCY)


class KubeClient:
    def __init__(self, api: Connection | None = None) -> None:
        self.api = api or load_config()

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        return self.api.call(method, path, body, query=query, content_type=content_type)

    def apply(self, obj: dict[str, Any], field_manager: str = FIELD_MANAGER) -> dict[str, Any]:
        """Server-side apply as the operator's field manager; force, since the operator is
        the controller of these fields."""
        kind = kind_of(obj)
        metadata = obj["metadata"]
        result: dict[str, Any] = self._call(
            "PATCH",
            kind.object_path(metadata["namespace"], metadata["name"]),
            obj,
            query=[("fieldManager", field_manager), ("force", "true")],
            content_type="application/apply-patch+yaml",
        )
        compacted: dict[str, Any] = compact(result)  # cached until the watch brings a newer one
        return compacted

    def replace_pod_template(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Set a workload's spec.template to exactly the one given (a JSON patch): unlike an
        apply, this also removes what other field managers added to it."""
        metadata = obj["metadata"]
        result: dict[str, Any] = self._call(
            "PATCH",
            kind_of(obj).object_path(metadata["namespace"], metadata["name"]),
            [{"op": "replace", "path": "/spec/template", "value": obj["spec"]["template"]}],
            query=[("fieldManager", FIELD_MANAGER)],
            content_type="application/json-patch+json",
        )
        compacted: dict[str, Any] = compact(result)
        return compacted

    def delete(self, obj: dict[str, Any]) -> None:
        """Delete with a UID precondition, so a re-created object of the same name survives."""
        kind = kind_of(obj)
        metadata = obj["metadata"]
        try:
            self._call(
                "DELETE",
                kind.object_path(metadata["namespace"], metadata["name"]),
                {"preconditions": {"uid": metadata["uid"]}, "propagationPolicy": "Background"},
            )
        except ApiError as error:
            if error.status not in (404, 409):
                raise

    def list_page(
        self, kind: Kind, namespace: str | None, label_selector: str, token: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of a list and the token for the next (None at the end). Pages keep the
        operator's start-up peak small when it owns thousands of objects."""
        query = [("labelSelector", label_selector), ("limit", str(LIST_PAGE_SIZE))]
        if token:
            query.append(("continue", token))
        try:
            result = self._call("GET", kind.collection_path(namespace), query=query)
        except ApiError as error:
            if error.status == 404:  # an optional CRD (KEDA) that is not installed
                return [], None
            raise
        items: list[dict[str, Any]] = result.get("items", [])
        for item in items:
            item.setdefault("kind", kind.kind)
            item.setdefault("apiVersion", kind.api_version)
        return items, (result.get("metadata") or {}).get("continue") or None

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """The pods matching a selector in one namespace, read only. `resourceVersion=0`
        lets the API server answer from its watch cache rather than a quorum read from etcd:
        status does not need the last millisecond, and the operator asks again while a
        rollout lasts. Without `limit` (the cache would ignore it anyway): one
        LLMDeployment's pods are a handful."""
        result = self._call(
            "GET",
            POD.collection_path(namespace),
            query=[("labelSelector", label_selector), ("resourceVersion", "0")],
        )
        items: list[dict[str, Any]] = result.get("items", [])
        for item in items:
            item.setdefault("kind", POD.kind)
            item.setdefault("apiVersion", POD.api_version)
        return items

    def any_node(self, label_selector: str) -> bool:
        """Whether some node has these labels: one list with `limit=1` (one node read back,
        whatever the size of the cluster)."""
        result = self._call(
            "GET",
            NODE.collection_path(None),
            query=[("labelSelector", label_selector), ("limit", "1")],
        )
        return bool(result.get("items"))

    def delete_pod(self, namespace: str, name: str, uid: str) -> None:
        """Delete one engine pod (a stalled one: its Deployment makes a new one), only if it is
        still that pod (UID precondition); already gone is fine."""
        try:
            self._call(
                "DELETE",
                POD.object_path(namespace, name),
                {"preconditions": {"uid": uid}, "propagationPolicy": "Background"},
            )
        except ApiError as error:
            if error.status not in (404, 409):
                raise

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Replace status with a merge patch (null removes keys the new status lacks); the
        LLMDeployment as it now is."""
        result: dict[str, Any] = self._call(
            "PATCH",
            LLMDEPLOYMENT.object_path(namespace, name) + "/status",
            {"status": status},
            # Named, so managedFields say who wrote the status (not "OpenAPI-Generator").
            query=[("fieldManager", FIELD_MANAGER)],
            content_type="application/merge-patch+json",
        )
        return result

    def clear_annotation(self, namespace: str, name: str, annotation: str) -> None:
        """Remove one annotation of an LLMDeployment (a spent rollout command)."""
        self.annotate(namespace, name, annotation, None)

    def annotate(self, namespace: str, name: str, annotation: str, value: str | None) -> None:
        """Set (or with None remove) one annotation of an LLMDeployment; nothing else."""
        self._call(
            "PATCH",
            LLMDEPLOYMENT.object_path(namespace, name),
            {"metadata": {"annotations": {annotation: value}}},
            query=[("fieldManager", FIELD_MANAGER)],
            content_type="application/merge-patch+json",
        )

    def get_llmdeployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self._call("GET", LLMDEPLOYMENT.object_path(namespace, name))
            return result
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def post_event(self, owner: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the LLMDeployment, as `kubectl describe` shows them."""
        metadata = owner["metadata"]
        timestamp = rfc3339_now()
        try:
            self._call(
                "POST",
                f"/api/v1/namespaces/{metadata['namespace']}/events",
                {
                    "metadata": {
                        "generateName": f"{metadata['name']}.",
                        "namespace": metadata["namespace"],
                    },
                    "involvedObject": {
                        "apiVersion": owner["apiVersion"],
                        "kind": owner["kind"],
                        "name": metadata["name"],
                        "namespace": metadata["namespace"],
                        "uid": metadata["uid"],
                    },
                    "type": type_,
                    "reason": reason,
                    "message": message[:1024],
                    "source": {"component": FIELD_MANAGER},
                    "firstTimestamp": timestamp,
                    "lastTimestamp": timestamp,
                    "count": 1,
                    "reportingComponent": FIELD_MANAGER,
                },
            )
        except ApiError as error:  # an Event is best effort; never fail a reconcile on it
            log.warning("could not post event %s on %s: %s", reason, metadata["name"], error.status)

    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """One named Secret (GET only: the operator never lists or watches Secrets)."""
        try:
            result: dict[str, Any] = self._call(
                "GET", f"/api/v1/namespaces/{namespace}/secrets/{name}"
            )
            return result
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self._call(
                "GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}"
            )
            return result
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def get_path(self, path: str) -> dict[str, Any] | None:
        """Any one object by its API path; None when it does not exist."""
        try:
            result: dict[str, Any] = self._call("GET", path)
            return result
        except ApiError as error:
            if error.status == 404:
                return None
            raise
