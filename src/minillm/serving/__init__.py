"""Serving: an OpenAI-compatible HTTP API and a chat page for a trained model (`minillm serve`)."""

from minillm.serving.app import background_server, create_app, default_model_id, run_server
from minillm.serving.protocol import APIError, ServerLimits

__all__ = ["APIError", "ServerLimits", "background_server", "create_app", "default_model_id", "run_server"]
