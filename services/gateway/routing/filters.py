"""Filters: a candidate that fails one cannot take the request at all."""

from __future__ import annotations

from typing import Protocol

from services.gateway.routing.candidate import Candidate, RouteRequest


class Filter(Protocol):
    name: str

    def keep(self, c: Candidate, req: RouteRequest) -> bool: ...


class Reachable:
    """It answered its last Load poll."""

    name = "reachable"

    def keep(self, c: Candidate, req: RouteRequest) -> bool:
        return c.reachable


class Admitting:
    """It is not draining (it would refuse the stream)."""

    name = "admitting"

    def keep(self, c: Candidate, req: RouteRequest) -> bool:
        return not c.draining


class ServesModel:
    name = "serves_model"

    def keep(self, c: Candidate, req: RouteRequest) -> bool:
        return c.model == req.model


class BreakerClosed:
    """It has not failed repeatedly just now (see the gateway's circuit breaker)."""

    name = "breaker_closed"

    def keep(self, c: Candidate, req: RouteRequest) -> bool:
        return not c.failing


class NotTried:
    """This request did not fail on it already."""

    name = "not_tried"

    def keep(self, c: Candidate, req: RouteRequest) -> bool:
        return c.name not in req.exclude


DEFAULT_FILTERS: tuple[Filter, ...] = (NotTried(), Reachable(), Admitting(), ServesModel(),
                                       BreakerClosed())
