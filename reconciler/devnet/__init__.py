"""The dev requester: Bacalhau's legacy or orchestrator API on a local port, for tests."""

from reconciler.devnet.run import DevRequesterThread, serve
from reconciler.devnet.server import DevConfig, DevRequester

__all__ = ["DevConfig", "DevRequester", "DevRequesterThread", "serve"]
