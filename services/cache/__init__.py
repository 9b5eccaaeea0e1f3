"""The caches (``python -m services.cache``): a semantic cache over Milvus and a prefix index of
the replicas' KV blocks. Contract: protos/spotmesh/v1/cache.proto.

* ``semantic``: the operations, :class:`~services.cache.semantic.SemanticCache` (per-tenant
  isolation by filter, absolute TTLs, durable stores, exact invalidation); ``answers`` what it
  stores and answers; ``bounds`` the contract's bounds and field checks; ``rows`` an entry as a
  Milvus row; ``milvus`` the collection and its connection; ``options`` its knobs. No gRPC.
* ``server``, ``prefix_server``: the gRPC surfaces (auth by service/admin token, validation,
  status codes); the prefix index itself is ``spotmesh.prefix_index``, shared with the gateway.
* ``maintenance``: flushing on a timer and sweeping expired entries in the background.
* ``auth``, ``config``, ``metrics``, ``__main__``: tokens, flags, Prometheus metrics, the
  process.
"""
