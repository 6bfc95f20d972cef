"""The names the operator shares with the cluster: labels, annotations, field manager.

One home, as KubeAI keeps them in `api/v1/constants.go`: every module that sets or selects
on one of these imports it from here, so a rename is one edit.
"""

from __future__ import annotations

#: The server-side-apply field manager of every object the operator writes.
FIELD_MANAGER = "llm-operator"
#: The value of `app.kubernetes.io/managed-by` on every child.
MANAGED_BY = "llm-operator"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
#: The LLMDeployment a child belongs to (its name, made a valid label value).
LABEL_DEPLOYMENT = "llmoperator.io/deployment"
#: stable or canary.
LABEL_TRACK = "llmoperator.io/track"

#: A hash of the engine's pod template, to tell a rollout from a no-op.
ANNOTATION_POD_TEMPLATE_HASH = "llmoperator.io/pod-template-hash"

#: A request to the canary in progress: promote, abort, pause or resume. `llm-operator
#: rollout` (or `kubectl annotate`) sets it; the operator acts on it and removes it. An
#: annotation, not a spec field, so GitOps tools see no drift (docs/canary.md).
ANNOTATION_ROLLOUT_COMMAND = "llmoperator.io/rollout-command"

#: The label selector of everything the operator manages.
MANAGED_BY_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
