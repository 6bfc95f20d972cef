"""The Kubernetes client side of the operator: API calls and the resources it manages."""
