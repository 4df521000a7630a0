"""grpc.health.v1: liveness and readiness as named services.

- "liveness": SERVING as soon as the process answers (a Kubernetes liveness probe).
- "" (the server as a whole), "readiness", "sol.v1.Inference": SERVING only while at least
  one model is loaded and warmed and the server is not draining (readiness probes,
  the container healthcheck, load balancers).
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

LIVENESS = "liveness"
READINESS_SERVICES = ("", "readiness", "sol.v1.Inference", "sol.v1.Admin")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    def __init__(self) -> None:
        self.servicer = HealthServicer()
        self.ready = False
        self.draining = False

    async def start(self) -> None:
        await self.servicer.set(LIVENESS, SERVING)
        await self._publish()

    async def set_models_ready(self, ready: bool) -> None:
        self.ready = ready
        await self._publish()

    async def start_drain(self) -> None:
        self.draining = True
        await self._publish()

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining

    async def _publish(self) -> None:
        status = SERVING if self.serving else NOT_SERVING
        for name in READINESS_SERVICES:
            await self.servicer.set(name, status)
