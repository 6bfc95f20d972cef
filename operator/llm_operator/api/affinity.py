"""A typed Kubernetes Affinity for `spec.scheduling.affinity`.

An untyped object was accepted by the CRD and then refused by the API server inside the
Deployment (HTTP 500 on every apply, no status): typed, the CRD refuses a bad affinity at
apply time with the field that is wrong. The shapes and rules are core/v1's (Affinity,
NodeSelectorTerm, PodAffinityTerm, LabelSelector), field for field.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, TypeAdapter

from llm_operator.api.base import ApiModel, Rule
from llm_operator.api.gateway_config import LabelKey, LabelValue

_LABEL_KEY: TypeAdapter[str] = TypeAdapter(LabelKey)


def _label_keys(labels: dict[str, str]) -> dict[str, str]:
    for key in labels:
        _LABEL_KEY.validate_python(key)
    return labels


Values = Annotated[list[Annotated[str, Field(max_length=317)]], Field(max_length=256)]
Weight = Annotated[int, Field(ge=1, le=100)]


class LabelSelectorRequirement(ApiModel):
    """`key operator values`, as in a LabelSelector's matchExpressions."""

    key: LabelKey
    """The label key."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """In, NotIn, Exists or DoesNotExist."""
    values: Values = []
    """Values for In and NotIn; none for Exists and DoesNotExist."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.operator in ['Exists', 'DoesNotExist'] ? "
            "(!has(self.values) || size(self.values) == 0) : "
            "(has(self.values) && size(self.values) > 0)",
            message="In and NotIn need values; Exists and DoesNotExist take none",
            holds=lambda r: (r.operator in ("Exists", "DoesNotExist")) == (not r.values),
        ),
    )


class LabelSelector(ApiModel):
    """Pods by labels: every matchLabels pair and every matchExpressions requirement."""

    # Keys checked by the model only: a CRD schema cannot constrain a map's keys.
    match_labels: Annotated[
        dict[str, LabelValue], Field(max_length=64), AfterValidator(_label_keys)
    ] = {}
    """Labels the pods carry."""
    match_expressions: Annotated[list[LabelSelectorRequirement], Field(max_length=64)] = []
    """Requirements on the pods' labels."""


class NodeSelectorRequirement(ApiModel):
    """`key operator values` on a node's labels or fields."""

    key: Annotated[str, Field(min_length=1, max_length=317)]
    """The label key (or, in matchFields, the field: metadata.name)."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    """In, NotIn, Exists, DoesNotExist, Gt or Lt."""
    values: Values = []
    """Values for In and NotIn, one integer for Gt and Lt, none for Exists and DoesNotExist."""

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.operator in ['Exists', 'DoesNotExist'] ? "
            "(!has(self.values) || size(self.values) == 0) : "
            "self.operator in ['Gt', 'Lt'] ? "
            "(has(self.values) && size(self.values) == 1 "
            "&& self.values[0].matches('^-?[0-9]+$')) : "
            "(has(self.values) && size(self.values) > 0)",
            message="In and NotIn need values, Gt and Lt one integer, Exists and DoesNotExist none",
            holds=lambda r: (
                not r.values
                if r.operator in ("Exists", "DoesNotExist")
                else len(r.values) == 1 and r.values[0].lstrip("-").isdigit()
                if r.operator in ("Gt", "Lt")
                else bool(r.values)
            ),
        ),
    )


class NodeSelectorTerm(ApiModel):
    """Requirements a node meets all of."""

    match_expressions: Annotated[list[NodeSelectorRequirement], Field(max_length=64)] = []
    """Requirements on node labels."""
    match_fields: Annotated[list[NodeSelectorRequirement], Field(max_length=64)] = []
    """Requirements on node fields."""


class NodeSelector(ApiModel):
    """Nodes that meet any one of the terms."""

    node_selector_terms: Annotated[list[NodeSelectorTerm], Field(min_length=1, max_length=64)]
    """The terms, ORed."""


class PreferredSchedulingTerm(ApiModel):
    """A node term with a weight: the scheduler prefers nodes that meet it."""

    weight: Weight
    """1 to 100."""
    preference: NodeSelectorTerm
    """The term."""


class NodeAffinity(ApiModel):
    """Which nodes the pods may (required) or should (preferred) run on."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    """Nodes the pods must run on."""
    preferred_during_scheduling_ignored_during_execution: Annotated[
        list[PreferredSchedulingTerm], Field(max_length=64)
    ] = []
    """Nodes the pods should run on."""


class PodAffinityTerm(ApiModel):
    """Pods (by labels and namespaces) on the same topology domain."""

    label_selector: LabelSelector | None = None
    """The pods."""
    namespaces: Annotated[list[Annotated[str, Field(max_length=63)]], Field(max_length=64)] = []
    """Their namespaces; empty with no namespaceSelector: this pod's namespace."""
    namespace_selector: LabelSelector | None = None
    """Their namespaces, by labels."""
    topology_key: Annotated[str, Field(min_length=1, max_length=317)]
    """The node label that defines a domain, for example kubernetes.io/hostname."""
    match_label_keys: Annotated[list[LabelKey], Field(max_length=64)] = []
    """Label keys whose values (from this pod) are added to labelSelector as In."""
    mismatch_label_keys: Annotated[list[LabelKey], Field(max_length=64)] = []
    """Label keys whose values (from this pod) are added to labelSelector as NotIn."""


class WeightedPodAffinityTerm(ApiModel):
    """A pod term with a weight."""

    weight: Weight
    """1 to 100."""
    pod_affinity_term: PodAffinityTerm
    """The term."""


class PodAffinity(ApiModel):
    """Pods to run near (podAffinity) or away from (podAntiAffinity)."""

    required_during_scheduling_ignored_during_execution: Annotated[
        list[PodAffinityTerm], Field(max_length=64)
    ] = []
    """Terms that must hold."""
    preferred_during_scheduling_ignored_during_execution: Annotated[
        list[WeightedPodAffinityTerm], Field(max_length=64)
    ] = []
    """Terms the scheduler prefers."""


class Affinity(ApiModel):
    """A Kubernetes Affinity (core/v1), passed through to the pods."""

    node_affinity: NodeAffinity | None = None
    """Node affinity."""
    pod_affinity: PodAffinity | None = None
    """Pod affinity."""
    pod_anti_affinity: PodAffinity | None = None
    """Pod anti-affinity."""
