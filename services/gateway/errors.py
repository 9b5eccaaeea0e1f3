"""How the gateway's domain says "this call ends with this status": the server turns a
:class:`Rejected` into the gRPC status and message, and counts it."""

from __future__ import annotations

import grpc


class Rejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
