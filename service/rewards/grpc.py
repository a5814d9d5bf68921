"""The gRPC Rewards servicer: async reward callbacks, authenticated by the run's webhook
signature in `gvpo-signature` metadata over the exact body bytes (no API key)."""

import grpc

from gvpo.v1 import rewards_pb2 as pb
from gvpo.v1 import rewards_pb2_grpc
from service import rpc
from service.config import Settings
from service.rewards import service

SIGNATURE_KEY = "gvpo-signature"


class RewardsServicer(rewards_pb2_grpc.RewardsServicer):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def SubmitRewards(self, request, context) -> pb.SubmitRewardsResponse:
        signature = rpc.metadata(context, SIGNATURE_KEY)
        return await rpc.call(
            context,
            self.settings,
            lambda session: pb.SubmitRewardsResponse(
                **service.accept_callback(
                    session,
                    self.settings,
                    rpc.checked(rpc.RunRef, request).run_id,
                    request.body,
                    signature,
                )
            ),
        )


def add_to_server(server: grpc.aio.Server, settings: Settings) -> str:
    rewards_pb2_grpc.add_RewardsServicer_to_server(RewardsServicer(settings), server)
    return pb.DESCRIPTOR.services_by_name["Rewards"].full_name
