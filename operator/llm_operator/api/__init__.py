"""The LLMDeployment API (pure: no I/O). Import models from here."""

from llm_operator.api.base import ApiModel, Rule
from llm_operator.api.v1alpha1 import *  # noqa: F403
from llm_operator.api.v1alpha1 import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    LLMDeployment,
    LLMDeploymentSpec,
    LLMDeploymentStatus,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "ApiModel",
    "LLMDeployment",
    "LLMDeploymentSpec",
    "LLMDeploymentStatus",
    "Rule",
]
