"""The dev requester: Bacalhau's legacy wire contract on a local port, for trials and tests."""

from reconciler.devnet.run import DevRequesterThread, serve
from reconciler.devnet.server import DevConfig, DevRequester

__all__ = ["DevConfig", "DevRequester", "DevRequesterThread", "serve"]
