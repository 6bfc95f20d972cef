"""A real Kubernetes control plane on this machine, for development and end-to-end tests.

``llm-operator dev cluster up|down|status|env`` builds etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kubectl, kwok and helm from their Go modules into a
cache (``e2e/cluster/build.sh``), then runs them as plain processes on loopback with fake GPU
nodes. No containers, no Docker. Standard library, ``openssl`` and PyYAML only.
"""

from llm_operator_dev.devcluster.cli import main

__all__ = ["main"]
