"""The kopf shell around the pure core: watches, the reconcile loop, and `llm-operator run`."""
