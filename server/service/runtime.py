"""What the servicers share: the engine and registry once the model has loaded, the metrics, the drain flag."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ServiceConfig
from ..errors import Unavailable


@dataclass(slots=True)
class Runtime:
    config: ServiceConfig
    metrics: object | None = None
    """ServiceMetrics, or None when metrics are off."""
    engine: object | None = None
    """The Engine, None until the model has loaded (calls meanwhile get UNAVAILABLE)."""
    registry: object | None = None
    """The AdapterRegistry, set together with `engine`."""
    workers: object | None = None
    """The WorkerPool that validates and tokenizes requests off the event loop."""
    first_use: object | None = None
    """The FirstUseLoader when --adapter-source rules are set (else None), set together with `engine`."""
    draining: bool = False

    def require_engine(self):
        if self.draining:
            raise Unavailable("the server is shutting down")
        if self.engine is None:
            raise Unavailable("the model is still loading; retry when health reports SERVING")
        return self.engine

    def require_registry(self):
        self.require_engine()
        return self.registry
