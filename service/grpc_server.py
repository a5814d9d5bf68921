"""The gRPC API, served by every API process beside REST (GVPO_GRPC_PORT; 0 turns it off).

grpc.aio runs on the API's event loop; each call's database work runs in a thread (service.rpc).
Besides Runs and Rewards it serves the standard health service, whose status follows the same
checks as /readyz, and server reflection (so grpcurl and similar tools need no .proto files).
"""

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from service.config import Settings
from service.health import readiness
from service.rewards import grpc as rewards_grpc
from service.runs import grpc as runs_grpc
from service.telemetry import GrpcMetrics

log = logging.getLogger(__name__)

READINESS_EVERY_S = 5.0
# Protobuf framing around a reward callback's body: the body itself is capped like REST's.
ENVELOPE_BYTES = 64 * 1024


class GrpcServer:
    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        """`registry`: where the calls are counted (the app's Prometheus registry)."""
        self.settings = settings
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[GrpcMetrics(registry)],
            options=[
                ("grpc.max_receive_message_length", settings.max_callback_bytes + ENVELOPE_BYTES),
                # A port another process holds is an error here, not a silently shared port.
                ("grpc.so_reuseport", 0),
            ],
        )
        self.services = [
            runs_grpc.add_to_server(self.server, settings),
            rewards_grpc.add_to_server(self.server, settings),
        ]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.services, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self._tracker: asyncio.Task | None = None
        self.port: int | None = None  # bound by start()

    @property
    def address(self) -> str:
        return f"{self.settings.api_host}:{self.settings.grpc_port}"

    async def start(self) -> None:
        try:
            self.port = self.server.add_insecure_port(self.address)  # the port it bound
        except RuntimeError as exc:
            raise RuntimeError(
                f"cannot serve gRPC on {self.address} (GVPO_GRPC_PORT): {exc}"
            ) from None
        # Known from the first call on: NOT_SERVING until the first readiness check passes (an
        # unknown name would answer NOT_FOUND, as if the service did not exist).
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        self._tracker = asyncio.create_task(self._track_readiness())
        log.info("gRPC API on %s:%d", self.settings.api_host, self.port)

    async def stop(self, grace: float = 5.0) -> None:
        if self._tracker:
            self._tracker.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def _track_readiness(self) -> None:
        """SERVING while the database and broker answer (as /readyz says), else NOT_SERVING."""
        while True:
            checks = await asyncio.to_thread(readiness, self.settings)
            ok = all(v == "ok" for v in checks.values())
            await self._set_health(
                health_pb2.HealthCheckResponse.SERVING
                if ok
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await asyncio.sleep(READINESS_EVERY_S)

    async def _set_health(self, status) -> None:
        for name in ("", *self.services):
            await self.health.set(name, status)
