"""Cluster mode's signal source: every replica's load, read from Prometheus.

On Kubernetes the autoscaler does not call each replica; Prometheus already scrapes them (and
DCGM's exporter for the GPUs), so one reconcile is a handful of instant queries against
``/api/v1/query``, all evaluated at the reconcile's ``now``:

- ``up`` of every target carrying the pool label: which replicas exist, their pool, and
  whether the last scrape reached them (``timestamp(up)``: when that scrape was);
- ``vllm:num_requests_waiting`` / ``vllm:num_requests_running`` / ``vllm:kv_cache_usage_perc``
  per replica, and the timestamp of the waiting sample as ``observed_at``;
- ``spotmesh_inference_draining`` (spotmesh's replicas export it: a draining replica is not
  capacity);
- ``DCGM_FI_DEV_GPU_UTIL`` (percent) averaged per replica;
- ``sum(rate(spotmesh_gateway_requests_total[1m]))``: requests/s through the gateways.

The pool comes from a target label (``spotmesh_pool`` by default): replicas export no pool of
their own (no label, no info metric), so the scrape configuration attaches it; on Kubernetes a
relabelling rule copies it from the pod label ``spotmesh.dev/pool``. A target without the label
is not a replica.

What the policy must never see as idle capacity is a replica it cannot see: a target whose last
scrape failed, a sample older than ``staleness_seconds``, or a target that answers without load
metrics comes back ``unreachable``. Whatever stops the whole reading (Prometheus down, an HTTP
or PromQL error, a NaN) raises `SignalsUnavailable` naming the query, and the reconciler holds.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from services.autoscaler.actuator import Observation
from services.autoscaler.signals import POOLS, Pool, ReplicaSignal, ReplicaState, Signals

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class SignalsUnavailable(RuntimeError):
    """Prometheus could not say what the replicas are doing; the autoscaler must hold."""

    def __init__(self, query: str, reason: str) -> None:
        super().__init__(f"prometheus query {query!r}: {reason}")
        self.query = query
        self.reason = reason


@dataclass(frozen=True)
class Sample:
    """One series of an instant-vector answer."""

    labels: dict[str, str]
    value: float


class PrometheusSource:
    """Reads `Signals` from a Prometheus that scrapes the replicas, the gateways and DCGM.

    ``replica_label`` names each replica (the default ``instance`` is the scrape address);
    the policy's scale-in choices come back under these names, so where an actuator removes
    replicas by name (Kubernetes: pod names) use the label that carries that name (``pod``,
    relabelled from ``__meta_kubernetes_pod_name``). DCGM's exporter is a target of its own, so
    its series join a replica through ``gpu_replica_label`` (dcgm-exporter's pod mapping writes
    ``pod``, or ``exported_pod`` when Prometheus keeps its own ``pod`` label); a replica no DCGM
    series joins reports ``gpu_utilization = -1`` (unknown), as CPU replicas do.

    Timestamps are Unix seconds, so ``now`` must be too (``time.time()``): ``observed_at`` is
    the time of the replica's own sample, and the policy compares it with ``now``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        pool_label: str = "spotmesh_pool",
        replica_label: str = "instance",
        gpu_replica_label: str | None = None,
        staleness_seconds: float = 30.0,
        timeout_seconds: float = 5.0,
    ) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"prometheus base_url must be http(s)://host:port[/prefix], got "
                             f"{base_url!r}")
        gpu_replica_label = gpu_replica_label or replica_label
        for key, value in (("pool_label", pool_label), ("replica_label", replica_label),
                           ("gpu_replica_label", gpu_replica_label)):
            # They go into PromQL as they are: a label name is all they may be.
            if not _LABEL_NAME.fullmatch(value):
                raise ValueError(f"prometheus {key} must be a Prometheus label name, got "
                                 f"{value!r}")
        if not staleness_seconds > 0:
            raise ValueError(f"prometheus staleness_seconds must be > 0, got "
                             f"{staleness_seconds}")
        if not timeout_seconds > 0:
            raise ValueError(f"prometheus timeout_seconds must be > 0, got {timeout_seconds}")
        self.base_url = base_url.rstrip("/")
        self.pool_label = pool_label
        self.replica_label = replica_label
        self.gpu_replica_label = gpu_replica_label
        # Two missed scrapes at Prometheus' usual 15 s interval; the policy's own bound
        # (PolicyConfig.signal_staleness_seconds) applies on top of it.
        self.staleness_seconds = staleness_seconds
        self.timeout_seconds = timeout_seconds
        self.queries = self._queries()

    def _queries(self) -> dict[str, str]:
        """The PromQL of one reading, by name; built once, since only the labels vary."""
        r, p = self.replica_label, self.pool_label
        replica = f'{p}!=""'  # a target is a replica when it carries the pool label

        def vllm(name: str) -> str:
            # vLLM names its metrics `vllm:...`, but prometheus_client (0.26 here) answers a
            # scraper that negotiates OpenMetrics (Prometheus does) with
            # `escaping=underscores` and writes the samples as `vllm_...`
            # (prometheus/client_python#1177): which name Prometheus stores depends on both
            # versions, and one target exposes one spelling at a time.
            return f'{{__name__=~"vllm[:_]{name}", {replica}}}'

        def per_replica(agg: str, name: str, own: str, wrap: str = "{}") -> str:
            # spotmesh's own gauges carry the same numbers for engines that export no vLLM
            # metrics (TensorRT-LLM replicas); `or` takes them only where vLLM's are absent.
            primary = wrap.format(vllm(name))
            backup = wrap.format(f"{own}{{{replica}}}")
            return f"{agg} by ({r}) ({primary}) or {agg} by ({r}) ({backup})"

        return {
            "up": f"min by ({r}, {p}) (up{{{replica}}})",
            "scraped_at": f"min by ({r}) (timestamp(up{{{replica}}}))",
            "waiting": per_replica("sum", "num_requests_waiting",
                                   "spotmesh_inference_queue_depth"),
            "running": per_replica("sum", "num_requests_running",
                                   "spotmesh_inference_running_requests"),
            # With several engines behind one replica the fullest cache is what refuses work.
            "kv_cache_usage": per_replica("max", "kv_cache_usage_perc",
                                          "spotmesh_inference_kv_cache_usage_ratio"),
            # The sample's own time (`timestamp()`), not the evaluation time Prometheus puts
            # beside every instant-query value.
            "observed_at": per_replica("min", "num_requests_waiting",
                                       "spotmesh_inference_queue_depth", "timestamp({})"),
            "draining": f"max by ({r}) (spotmesh_inference_draining{{{replica}}})",
            "gpu_utilization_pct": f"avg by ({self.gpu_replica_label}) (DCGM_FI_DEV_GPU_UTIL)",
            # Calls of every method per second; the counter moves when a call ends.
            "arrival_rate": "sum(rate(spotmesh_gateway_requests_total[1m]))",
        }

    async def read(self, obs: Observation | None, now: float) -> Signals:
        """Every replica's signal and the arrival rate as Prometheus saw them at ``now``.

        ``obs`` (the actuator's view) is part of the reconciler's signal-source interface and
        not needed here: Prometheus sees a replica once it is scraped, and the policy counts
        pending and silent replicas from the actuator's pool sizes itself.
        """
        del obs
        names = list(self.queries)
        # urllib blocks; each query runs on a worker thread so the reconcile loop never does.
        answers = await asyncio.gather(
            *(asyncio.to_thread(self.query, self.queries[n], now) for n in names))
        return self._signals(dict(zip(names, answers, strict=True)), now)

    def query(self, promql: str, at: float) -> list[Sample]:
        """One instant query evaluated at ``at``; any failure is `SignalsUnavailable`."""
        url = f"{self.base_url}/api/v1/query?" + urllib.parse.urlencode({
            "query": promql, "time": f"{at:.3f}",
            # Prometheus gives up on the query too, instead of computing for nobody (its
            # durations take whole numbers only).
            "timeout": f"{max(1, round(self.timeout_seconds * 1000))}ms",
        })
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_seconds) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            # Prometheus explains bad queries (400/422) and overload (503) in a JSON body.
            detail = _error_detail(exc.read()) or exc.reason
            raise SignalsUnavailable(promql, f"HTTP {exc.code} from {self.base_url}: "
                                             f"{detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SignalsUnavailable(promql, f"Prometheus unreachable at {self.base_url}: "
                                             f"{reason}") from exc
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise SignalsUnavailable(promql, f"answer from {self.base_url} is not JSON: "
                                             f"{body[:200]!r}") from exc
        if not isinstance(doc, dict):
            raise SignalsUnavailable(promql, f"not a Prometheus API answer: {body[:200]!r}")
        if doc.get("status") != "success":
            detail = _error_detail(body) or f"status {doc.get('status')!r}"
            raise SignalsUnavailable(promql, f"Prometheus answered with an error: {detail}")
        data = doc.get("data")
        kind = data.get("resultType") if isinstance(data, dict) else None
        if kind != "vector":
            raise SignalsUnavailable(promql, f"expected an instant vector, got resultType "
                                             f"{kind!r}")
        samples = []
        for series in data.get("result") or []:
            try:
                labels = dict(series.get("metric") or {})
                _, text = series["value"]  # [evaluation time, value as text]
                value = float(text)
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise SignalsUnavailable(promql, f"malformed sample {series!r}") from exc
            if not math.isfinite(value):
                raise SignalsUnavailable(promql, f"value {text} for {labels}: a NaN or "
                                                 f"infinite load says nothing")
            samples.append(Sample(labels, value))
        return samples

    # --- turning answers into signals --------------------------------------------------------

    def _by_replica(self, samples: list[Sample], query: str, label: str) -> dict[str, float]:
        """Values by replica name; a series that names no replica, or names one twice, is a
        scrape configuration the readings cannot be trusted under."""
        out: dict[str, float] = {}
        for s in samples:
            name = s.labels.get(label, "")
            if not name:
                raise SignalsUnavailable(query, f"a series without the {label!r} label "
                                                f"({s.labels}): every target must carry it")
            if name in out:
                raise SignalsUnavailable(query, f"two series for {label}={name!r}")
            out[name] = s.value
        return out

    def _signals(self, answers: dict[str, list[Sample]], now: float) -> Signals:
        """Joins the answers on the replica label; `up` decides which replicas exist."""
        q, r = self.queries, self.replica_label
        up_samples = answers["up"]
        up = self._by_replica(up_samples, q["up"], r)
        pools: dict[str, Pool] = {}
        for s in up_samples:
            pool = s.labels.get(self.pool_label, "")
            if pool not in POOLS:
                raise SignalsUnavailable(q["up"], f"{self.pool_label}={pool!r} on "
                                                  f"{r}={s.labels[r]!r}; pools are {POOLS}")
            pools[s.labels[r]] = pool  # type: ignore[assignment]
        scraped_at = self._by_replica(answers["scraped_at"], q["scraped_at"], r)
        waiting = self._by_replica(answers["waiting"], q["waiting"], r)
        running = self._by_replica(answers["running"], q["running"], r)
        kv = self._by_replica(answers["kv_cache_usage"], q["kv_cache_usage"], r)
        observed = self._by_replica(answers["observed_at"], q["observed_at"], r)
        draining = self._by_replica(answers["draining"], q["draining"], r)
        gpu = self._by_replica(answers["gpu_utilization_pct"], q["gpu_utilization_pct"],
                               self.gpu_replica_label)

        replicas = []
        for name in sorted(up):
            pool, last_scrape = pools[name], scraped_at.get(name, 0.0)
            loaded = all(name in m for m in (waiting, running, kv, observed))
            fresh = (loaded and now - observed[name] <= self.staleness_seconds
                     and now - last_scrape <= self.staleness_seconds)
            if up[name] < 1 or not fresh:
                # Down, silent or old: unknown, which the policy never counts as idle capacity.
                seen = observed[name] if loaded else last_scrape
                replicas.append(ReplicaSignal(name, pool, state="unreachable", observed_at=seen))
                continue
            for key, values in (("waiting", waiting), ("running", running)):
                if values[name] < 0:
                    raise SignalsUnavailable(q[key], f"{values[name]} requests {key} on "
                                                     f"{name!r}")
            if not 0.0 <= kv[name] <= 1.0:
                raise SignalsUnavailable(q["kv_cache_usage"], f"KV-cache usage {kv[name]} on "
                                                              f"{name!r} is not a 0-1 fraction")
            util = -1.0
            if name in gpu:
                if not 0.0 <= gpu[name] <= 100.0:
                    raise SignalsUnavailable(q["gpu_utilization_pct"],
                                             f"GPU utilisation {gpu[name]}% on {name!r}")
                util = gpu[name] / 100.0
            state: ReplicaState = "draining" if draining.get(name, 0.0) >= 1 else "ready"
            replicas.append(ReplicaSignal(
                name, pool, waiting=round(waiting[name]), running=round(running[name]),
                kv_cache_usage=kv[name], gpu_utilization=util, observed_at=observed[name],
                state=state))

        rates = answers["arrival_rate"]
        # No series: no gateway has finished a call yet (the counter has no labels until then).
        rate = rates[0].value if rates else 0.0
        if rate < 0:
            raise SignalsUnavailable(q["arrival_rate"], f"negative rate {rate}")
        return Signals(replicas=replicas, arrival_rate_rps=rate, now=now)


def _error_detail(body: bytes) -> str:
    """Prometheus' own words from an error answer (``errorType: error``), if there are any."""
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    if isinstance(doc, dict) and doc.get("error"):
        return f"{doc.get('errorType', 'error')}: {doc['error']}"
    return ""

