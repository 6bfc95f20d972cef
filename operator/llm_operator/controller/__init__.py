"""The kopf shell around the pure core: watches, the reconcile loop, and `llm-operator run`."""

import sys

# kopf imports the `kubernetes` package whenever it is installed, only to accept its model
# objects as bodies (kopf/_cogs/helpers/thirdparty.py). The operator passes dicts and has a
# transport of its own (kube/transport.py), and the package costs about 21 MiB of RSS
# (bench/results/operator.md): it is hidden while kopf loads, and importable again after
# (the exec-plugin fallback of kube/transport.py, the CLI tools).
if "kopf" not in sys.modules:
    _hidden = {
        name: sys.modules.pop(name)
        for name in list(sys.modules)
        if name == "kubernetes" or name.startswith("kubernetes.")
    }
    sys.modules["kubernetes"] = None  # type: ignore[assignment]
    try:
        import kopf  # noqa: F401
    finally:
        del sys.modules["kubernetes"]
        sys.modules.update(_hidden)
