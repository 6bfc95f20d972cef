"""Label selectors written the way `kubectl -l` takes them, as a Kubernetes LabelSelector.

Installation settings arrive as flags and environment variables, so a selector is one line of
text: `app.kubernetes.io/name=prometheus,team!=batch,monitoring`. Equality (`=`, `==`),
inequality (`!=`), existence (`key`) and absence (`!key`) are understood; the set forms
(`in`, `notin`) are not, and are refused rather than misread.
"""

from __future__ import annotations

import re
from typing import Any

from llm_operator.api.patterns import LABEL_KEY_PATTERN, LABEL_PREFIX_MAX, LABEL_VALUE_PATTERN

_KEY = re.compile(LABEL_KEY_PATTERN)
_VALUE = re.compile(LABEL_VALUE_PATTERN)
_TERM = re.compile(r"^\s*(!?)\s*([^=!\s]+)\s*(?:(==|=|!=)\s*(\S*))?\s*$")


def _key(key: str, text: str) -> str:
    prefix, _, _ = key.rpartition("/")
    if not _KEY.match(key) or len(prefix) > LABEL_PREFIX_MAX:
        raise ValueError(f"{key!r} in {text!r} is not a label key")
    return key


def parse_label_selector(text: str) -> dict[str, Any]:
    """`k=v,k2!=v2,k3,!k4` as {matchLabels, matchExpressions}; raises ValueError naming the
    term that is not one. An empty text selects everything ({})."""
    labels: dict[str, str] = {}
    expressions: list[dict[str, Any]] = []
    for term in filter(str.strip, text.split(",")):
        match = _TERM.match(term)
        if match is None or (match.group(1) and match.group(3)):
            raise ValueError(
                f"{term.strip()!r} in {text!r} is not key=value, key!=value, key or !key"
            )
        negated, key, operator, value = match.groups()
        key = _key(key, text)
        if operator is None:
            expressions.append({"key": key, "operator": "DoesNotExist" if negated else "Exists"})
            continue
        if len(value) > 63 or not _VALUE.match(value):
            raise ValueError(f"{value!r} in {text!r} is not a label value")
        if operator == "!=":
            expressions.append({"key": key, "operator": "NotIn", "values": [value]})
        elif labels.get(key, value) != value:
            raise ValueError(f"{key!r} is given two values in {text!r}")
        else:
            labels[key] = value
    selector: dict[str, Any] = {}
    if labels:
        selector["matchLabels"] = labels
    if expressions:
        selector["matchExpressions"] = expressions
    return selector
