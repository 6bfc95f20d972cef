"""Other field managers' additions to the pod template are found in managedFields (issue 17)."""

from __future__ import annotations

from llm_operator.constants import FIELD_MANAGER
from llm_operator.controller.reconciler import foreign_template_fields

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
