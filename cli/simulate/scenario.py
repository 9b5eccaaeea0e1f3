"""What one ``spotmesh simulate`` run compares the policies on: the traces, the replica profile,
the prices and the windows."""

from __future__ import annotations

from dataclasses import dataclass

from cli.simulate.profile import ReplicaProfile
from cli.simulate.traces import Arrivals, Availability, SpotPrice
from services.autoscaler.signals import Prices

POLICY_NAMES = ("static_on_demand", "keda_threshold", "skyserve_fallback", "spotmesh", "oracle")
WINDOW_SUBSETS = ("all", "even", "odd")


@dataclass(frozen=True)
class Scenario:
    """Everything one `simulate` run compares the policies on."""

    arrivals: Arrivals
    availability: Availability
    profile: ReplicaProfile
    prices: Prices
    spot_price: SpotPrice
    instance_type: str
    windows: int
    window_hours: float
    warmup_minutes: float
    time_scale: float
    interval: float
    notice: float
    slo_ttft: float
    target_load: float
    on_demand_floor: int
    static_replicas: int
    skyserve_delays: tuple[float, float] = (300.0, 1200.0)
    # Which of the `windows` windows run: "all", or "even" / "odd" indices (0-based), so a
    # policy can be tuned on one half of the windows and judged on the other.
    window_subset: str = "all"
    # Seconds of a reclaim notice a replica keeps taking requests (0: it stops at the notice).
    drain_admit: float = 0.0

    def indices(self) -> list[int]:
        """The indices (of `windows`) of the windows this run simulates."""
        if self.window_subset not in WINDOW_SUBSETS:
            raise SystemExit(f"--window-subset must be one of {WINDOW_SUBSETS}, got "
                             f"{self.window_subset!r}")
        return [i for i in range(self.windows) if self.window_subset == "all"
                or i % 2 == (0 if self.window_subset == "even" else 1)]

    def offsets(self) -> list[tuple[float, float]]:
        """(arrivals offset, availability offset) in trace seconds for each window run."""
        return [(i * self.arrivals.span / self.windows, i * self.availability.span / self.windows)
                for i in self.indices()]
