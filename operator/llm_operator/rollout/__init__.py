"""Canary rollouts, decided without I/O: the PromQL the analysis asks, the verdict of one
analysis, and the state machine that moves a canary through its steps (pure).

The controller feeds it what the cluster and Prometheus say and applies what it returns;
docs/canary.md describes the behaviour and the queries for users.
"""

from llm_operator.rollout.analysis import Sample, TrackSample, Verdict, evaluate
from llm_operator.rollout.machine import (
    COMMANDS,
    CanaryState,
    Decision,
    Observed,
    decide,
    parse_state,
)
from llm_operator.rollout.queries import TrackQueries, analysis_queries

__all__ = [
    "COMMANDS",
    "CanaryState",
    "Decision",
    "Observed",
    "Sample",
    "TrackQueries",
    "TrackSample",
    "Verdict",
    "analysis_queries",
    "decide",
    "evaluate",
    "parse_state",
]
