"""Repository tooling, apart from the product: the CRD and chart generators, `make demo`, and
the local control plane (`llm-operator dev cluster`). Nothing in `llm_operator` imports it."""
