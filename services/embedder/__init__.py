"""The embedder: sentence embeddings for the semantic cache.

Its contract is protos/spotmesh/v1/embedder.proto.
"""
