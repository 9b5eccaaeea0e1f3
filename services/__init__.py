"""spotmesh services: one deployable each (gateway, inference, embedder, cache, autoscaler)."""
