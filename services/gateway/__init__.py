"""The gateway: the public gRPC entry point (auth, validation, routing, cost ledger)."""
