"""The caches: a semantic cache over Milvus and a prefix index of replicas' KV blocks.

Contract: protos/spotmesh/v1/cache.proto. The semantic cache (``python -m services.cache``):

* ``semantic``: the domain, :class:`~services.cache.semantic.SemanticCache` over pymilvus'
  MilvusClient (embedded milvus-lite, or a Milvus server): per-tenant isolation by filter,
  absolute TTLs, durable stores, exact invalidation. No gRPC.
* ``server``: the gRPC surface (auth by service/admin token, validation, status codes).
* ``maintenance``: flushing on a timer and sweeping expired entries in the background.
* ``config``, ``metrics``, ``__main__``: flags, Prometheus metrics, the process.
* ``netns_milvus``: a real Milvus 2.3.5 server in a private network namespace, for tests and
  ``measure`` (latency at 1k/10k/100k entries on both backends).

The prefix-routing issue builds the prefix index.
"""
