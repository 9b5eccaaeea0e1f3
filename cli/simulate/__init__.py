"""``spotmesh simulate``: replay real request arrivals and real spot availability against
autoscaling policies, and price what each one costs and how often it keeps its latency promise.

A discrete-event simulation. Requests arrive from a trace (the Azure LLM inference trace with
per-request prompt and output tokens, or a per-minute counts trace scaled by ``--rate-scale``).
The gateway holds a FIFO queue and hands each request to the ready replica with the least
prefill backlog that has a free batch slot. A replica follows a measured profile: prefill runs
alone at ``prefill_tokens_per_s`` (decoding stalls meanwhile, as in vLLM's default scheduler),
then the request decodes alongside the others at ``T(n) / n`` tokens/s each, ``T`` the profile's
aggregate decode throughput at ``n`` concurrent requests. Time to first token (TTFT) is queue
wait + prefill wait + own prefill.

Replicas start in ``startup_seconds``. Spot replicas can only be obtained up to the capacity in
the availability trace; when capacity drops below what is held the cloud reclaims replicas with
a notice (``--preemption-notice-seconds``). As spotmesh's replicas do on a reclaim notice
(``Drain`` with ``admit_seconds``), they keep taking requests for ``--drain-admit-seconds`` of the
notice, then stop; what they still hold when the notice ends resumes on another replica
(re-prefilling prompt + tokens already sent). Every policy is simulated on this same serving
behaviour; ``--drain-admit-seconds 0`` stops admission at the notice.
Billing is per second from the moment an instance exists (a spot request waiting for capacity
costs nothing) until it is terminated.

Alignment of the traces: the arrivals trace (one hour for Azure) and the availability trace
(45.5 days) differ in length. The run is ``--windows`` windows of ``--window-hours`` each,
spread evenly over the availability trace (window i starts at i/windows of its length), each
preceded by ``--warmup-minutes`` that are simulated but neither billed nor measured (so no
policy is judged on its cold start). Inside a window the arrivals trace is replayed in a loop
from the same fractional offset, and availability advances ``--time-scale`` trace seconds per
simulated second (1 = real time; larger values compress more of the availability history,
and so more preemptions, into each window). The Azure hour ends with a sparse partial minute,
so every replay loop has a short lull followed by a ramp: a burst test every policy meets.

Policies, all deciding every ``--interval-seconds`` on the same observations:

- ``static_on_demand``: on-demand only, a fixed count sized for the peak of the replay.
- ``keda_threshold``: on-demand only; KEDA's Prometheus trigger with an AverageValue target on
  waiting + running per replica, scaled by the HPA algorithm (10% tolerance, scale-up at most
  max(100%, 4 pods) per period, 300 s scale-down stabilisation).
- ``skyserve_fallback``: SkyServe's FallbackRequestRateAutoscaler with its defaults (60 s QPS
  window, 300 s upscale and 1200 s downscale delay, base on-demand fallback replicas, dynamic
  on-demand fallback for spot that is not ready).
- ``spotmesh``: ``services.autoscaler.policy.plan``, the policy the autoscaler runs.
- ``oracle``: perfect foresight of arrivals and spot capacity: launches exactly what the next
  minutes need a cold start ahead, spot wherever capacity will be there, no reactive headroom.

Every policy sizes with the same per-replica load (``--target-load-per-replica``): KEDA and
spotmesh target it directly, SkyServe's QPS target and the oracle's and static fleet's sizes
are derived from the profile at that concurrency (the static fleet is the oracle's peak).
What the reactive policies observe is what a real deployment has: per-replica queue, KV and
GPU numbers, the gateway's queue and arrival rate, reclaim notices, and whether spot requests
are being filled (a cloud's spot request status); never the capacity or the future.

Modules: ``traces`` (arrivals, spot availability and prices as the simulation replays them),
``profile`` (how fast a simulated replica serves), ``engine`` (the discrete-event fleet),
``baselines`` (the policies spotmesh is compared against), ``adapter`` (spotmesh's own policy
fed the simulated fleet), ``scenario`` (one run over many windows), ``report`` (the table, JSON
and plot), ``command`` (the command line).
"""
