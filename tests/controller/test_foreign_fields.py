"""Other field managers' additions to the pod template are found in managedFields (issue 17)."""

from __future__ import annotations

from llm_operator.constants import FIELD_MANAGER
from llm_operator.controller.reconciler import (
    RESTART_ANNOTATION,
    foreign_template_fields,
    keep_restart,
)

OURS = {
    "manager": FIELD_MANAGER,
    "operation": "Apply",
    "fieldsV1": {
        "f:metadata": {"f:labels": {"f:app.kubernetes.io/managed-by": {}}},
        "f:spec": {
            "f:template": {
                "f:spec": {
                    "f:containers": {
                        'k:{"name":"vllm"}': {".": {}, "f:image": {}, "f:name": {}},
                    }
                }
            }
        },
    },
}
THEIRS = {
    "manager": "intruder",
    "operation": "Apply",
    "fieldsV1": {
        "f:metadata": {"f:labels": {"f:team": {}}},  # metadata: theirs to keep
        "f:spec": {
            "f:template": {
                "f:spec": {
                    "f:nodeSelector": {"f:disk": {}},
                    "f:containers": {
                        'k:{"name":"vllm"}': {
                            ".": {},  # shared with the operator: not an addition
                            "f:name": {},
                            "f:env": {'k:{"name":"FOO"}': {".": {}, "f:name": {}, "f:value": {}}},
                        }
                    },
                }
            }
        },
    },
}
STATUS = {"manager": "kube-controller-manager", "operation": "Update", "subresource": "status",
          "fieldsV1": {"f:status": {"f:replicas": {}}}}  # fmt: skip


def test_additions_are_named_by_manager_and_outermost_path() -> None:
    assert foreign_template_fields([OURS, THEIRS, STATUS]) == {
        "intruder": [
            "spec.template.spec.containers[name=vllm].env[name=FOO]",
            "spec.template.spec.nodeSelector.disk",
        ]
    }


def test_the_operators_own_fields_and_metadata_are_not_foreign() -> None:
    assert foreign_template_fields([OURS, STATUS]) == {}
    metadata_only = {**THEIRS, "fieldsV1": {"f:metadata": {"f:annotations": {"f:x": {}}}}}
    assert foreign_template_fields([OURS, metadata_only]) == {}


RESTART = {
    "manager": "kubectl-rollout",
    "operation": "Update",
    "fieldsV1": {
        "f:spec": {
            "f:template": {
                "f:metadata": {"f:annotations": {"f:kubectl.kubernetes.io/restartedAt": {}}}
            }
        }
    },
}


def test_a_rollout_restart_is_honoured_not_undone() -> None:
    # `kubectl rollout restart` alone is not foreign; beside another addition, the replaced
    # template keeps the live restart annotation, so the pods are not rolled a second time.
    assert foreign_template_fields([OURS, RESTART]) == {}
    assert foreign_template_fields([OURS, RESTART, THEIRS])["intruder"]
    desired = {"spec": {"template": {"metadata": {"labels": {"a": "b"}}, "spec": {}}}}
    live = {
        "spec": {
            "template": {
                "metadata": {"annotations": {RESTART_ANNOTATION: "2026-12-02T15:00:00Z", "x": "y"}}
            }
        }
    }
    kept = keep_restart(desired, live)["spec"]["template"]["metadata"]
    assert kept == {
        "labels": {"a": "b"},
        "annotations": {RESTART_ANNOTATION: "2026-12-02T15:00:00Z"},
    }
    assert keep_restart(desired, {"spec": {"template": {}}}) is desired
