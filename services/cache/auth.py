"""Bearer-token authorization shared by the cache tier's services.

Callers send ``authorization: Bearer <token>``. The service token lets the gateway (and, in
precise prefix mode, the replicas) read and write; the admin token also lets an operator delete.
Both comparisons always run, so response timing does not tell which token was close.
"""

from __future__ import annotations

import hmac

import grpc

ROLE_SERVICE = "service"
ROLE_ADMIN = "admin"


class Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class TokenAuth:
    def __init__(self, token: str, admin_token: str = "") -> None:
        if not token:
            raise ValueError("a service token is required")
        self._token = token.encode()
        self._admin_token = admin_token.encode() if admin_token else b""

    def authorize(self, context, needed: str, method: str = "this call") -> None:
        """Raise :class:`Denied` unless the call carries a token good for ``needed``."""
        header = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value
                break
        if header is None:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED,
                         "missing authorization metadata: send 'authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        token_bytes = token.strip().encode()
        if scheme.lower() != "bearer" or not token_bytes:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED,
                         "authorization metadata must be 'Bearer <token>'")
        is_admin = bool(self._admin_token) & hmac.compare_digest(token_bytes, self._admin_token)
        is_service = hmac.compare_digest(token_bytes, self._token)
        if not (is_admin or is_service):
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        if needed == ROLE_ADMIN and not is_admin:
            raise Denied(grpc.StatusCode.PERMISSION_DENIED,
                         f"{method} needs the admin token" if self._admin_token else
                         f"{method} needs the admin token, and this cache has none configured")
