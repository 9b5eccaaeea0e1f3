"""spotmesh: serve LLM traffic at the lowest cost per token. The package shared by every service."""

__version__ = "0.1.0"
