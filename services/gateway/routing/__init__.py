"""Choosing a replica as a pipeline, in the style of the Gateway API Inference Extension's
endpoint picker: filters drop replicas that cannot take the request, weighted scorers rate the
rest in [0, 1] on one concern each, a picker chooses. Each part is a small named object
(``filters``, ``scorers``, ``pickers``); ``pipeline.Router`` chains them, and
``pipeline.router_for`` builds the one the gateway's config asks for.

The weighted sum decides, so prefix affinity wins while load is even and load wins when one
replica's queue grows, instead of one hot prefix piling every request onto one replica.
"""
