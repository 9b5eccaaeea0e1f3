"""The embedder: sentence embeddings for the semantic cache.

Built by the semantic-cache issue; its contract is protos/spotmesh/v1/embedder.proto.
"""
