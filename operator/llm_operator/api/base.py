"""Shared base for the API models: camelCase aliases, strictness, and cross-field rules.

A cross-field rule is written once, as a `Rule`: a CEL expression for the CRD (so the API
server rejects the spec at `kubectl apply` time) and a Python predicate for the same check
inside the operator, the CLI and the tests, both with one message that says what to change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class Rule:
    """One cross-field rule, enforced by the API server (CEL) and by the models (Python)."""

    cel: str
    message: str
    holds: Callable[[Any], bool]
    field_path: str | None = None

    def as_crd_validation(self) -> dict[str, str]:
        validation = {"rule": self.cel, "message": self.message}
        if self.field_path:
            validation["fieldPath"] = self.field_path
        return validation


def _attach_rules(schema: dict[str, Any], cls: type[Any]) -> None:
    rules: tuple[Rule, ...] = getattr(cls, "rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [rule.as_crd_validation() for rule in rules]


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
        json_schema_extra=_attach_rules,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> ApiModel:
        broken = [rule.message for rule in type(self).rules if not rule.holds(self)]
        if broken:
            raise ValueError("; ".join(broken))
        return self

    def to_wire(self) -> dict[str, Any]:
        """The object as a user would write it: camelCase, without unset fields."""
        return self.model_dump(by_alias=True, exclude_unset=True, mode="json")
