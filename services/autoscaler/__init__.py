"""The autoscaler: sizes the spot and on-demand pools.

Built by the autoscaler issue; its contract is protos/spotmesh/v1/autoscaler.proto.
"""
