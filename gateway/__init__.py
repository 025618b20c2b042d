"""image-gateway: a budget-enforcing reverse proxy for an OpenAI-Images-compatible upstream."""

__version__ = "0.2.0"
