"""A vLLM simulator: vLLM's OpenAI API, metrics and scheduling behaviour without a GPU.

Run it as `llm-operator sim serve MODEL [vllm serve flags] [--sim-... flags]`; see
docs/simulator.md. Modules: `config` (command line), `latency` (the latency model),
`engine` (scheduler), `protocol` (wire format), `metrics`, `http` (the server),
`app` (routes and failure injection), `server` and `cli`.
"""
