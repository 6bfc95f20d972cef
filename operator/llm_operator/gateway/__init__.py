"""The OpenAI-compatible gateway: routes by model over stable/canary tracks with exact
weights, fails over to other backends and fallback routes before the first byte, and
streams answers through untouched. See docs/gateway.md."""
