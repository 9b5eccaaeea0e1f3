"""What the routing pipeline knows of a replica and of the request it routes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Candidate:
    name: str  # what the pipeline returns the choice by (the gateway: the replica's address)
    queue: float  # requests waiting or running on it (as this router knows them)
    kv_usage: float = 0.0  # 0-1
    prefix_blocks: int = 0  # leading prompt blocks it already holds
    spot: bool = False
    model: str = ""  # the model it serves
    reachable: bool = True  # answered its last Load poll
    draining: bool = False
    failing: bool = False  # its circuit breaker is open
    scores: dict[str, float] = field(default_factory=dict)  # weighted, by scorer
    decided_by: str = ""  # what made the choice (metrics)


@dataclass(frozen=True)
class RouteRequest:
    model: str = ""
    prompt_blocks: int = 0  # the prompt's full KV blocks
    exclude: frozenset[str] = frozenset()  # candidates already tried (by name)
