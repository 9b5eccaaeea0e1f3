"""The caches: a semantic cache over Milvus and a prefix index of replicas' KV blocks.

Built by the semantic-cache and prefix-routing issues; contract: protos/spotmesh/v1/cache.proto.
"""
