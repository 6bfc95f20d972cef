"""llm-operator: one LLMDeployment custom resource in, a production LLM service on GPUs out."""

__version__ = "0.1.0"
