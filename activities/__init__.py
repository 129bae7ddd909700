"""Activities: the work the TuneLLM workflow orchestrates. Idempotent, keyed by run id and step."""
