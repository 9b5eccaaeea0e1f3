"""The autoscaler: sizes the spot and on-demand pools.

Its contract is protos/spotmesh/v1/autoscaler.proto.
"""
