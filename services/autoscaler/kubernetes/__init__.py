"""The Kubernetes actuator: the two pools as two Deployments, sized through their ``scale``
subresource, followed through their pods, explained with Events.

Everything it acts on is re-read from the API server, so it is level-triggered and safe to
restart: ``apply`` reads each Deployment's Scale and patches it only when the size differs,
and ``observe`` lists the pods of both pools (label ``spotmesh.dev/pool: spot|on-demand``).

Choosing which replicas go. A Deployment cannot be told "delete this pod"; its ReplicaSet
picks. Since Kubernetes 1.22 the ReplicaSet honours the ``controller.kubernetes.io/
pod-deletion-cost`` annotation, so before a shrink the actuator annotates the pods the policy
named with a cost of -1000 (unannotated pods count as 0) and only then lowers the replicas. The
cost is the ReplicaSet's fourth criterion: pods not yet scheduled, then pending, then not ready
ones still go before any annotated pod, which is what the policy wants too (a replica still
starting has nothing to drain). The pods it leaves get SIGTERM and drain their streams within
their ``terminationGracePeriodSeconds`` (deploy/ sets it). Marks it no longer wants it takes back
at the next shrink of that pool; ``spotmesh.dev/remove-first`` says which costs are its own.
Karpenter's alpha ``PodDeletionCostManagement`` writes the same annotation: do not enable both.

Reclaim notices and preemptions. A pod whose ``DisruptionTarget`` condition is True is about to
be evicted by the platform: Kubernetes sets it for evictions through the Eviction API (node
drains by Karpenter, the AWS node termination handler, the cluster autoscaler), taint-based
eviction of unreachable nodes, graceful node shutdown (GKE spot preemption) and PodGC of pods on
deleted nodes. Such a pod is ``reclaim_notice`` and ``draining``, and on the spot pool it counts
as one preemption. Node taints (``karpenter.sh/disrupted``, GKE's termination taints) would say
it a little earlier, but reading Nodes needs a ClusterRole; least privilege won, and every
eviction path above sets the condition anyway. A spot pod that goes away *without* the condition
(deleted, evicted by an old cluster) counts when the pool is then short of the Deployment's
replicas: a ReplicaSet only deletes pods above its count, so a loss below it was not a
scale-in. A pod replaced by a newer pod of another ``pod-template-hash`` is a rollout, not a
loss. The counting follows a pod watch (``kubernetes.watch.Watch`` on a background thread, list
then watch from the list's resourceVersion, relist on 410 Gone), so a pod that is preempted and
replaced between two reconciles is still seen, in the order the API server saw it. With the
watch off (``watch_pods=False``) the same rules run on successive observations.

The ``kubernetes`` client is synchronous: every call runs in a worker thread, so the
autoscaler's event loop never waits on the API server.

Modules: ``api`` (the client, its errors, the RBAC rules every call needs), ``pods`` (what a pod
says about a replica), ``preemptions`` (the ledger of spot pods the platform took), ``watcher``
(the pod watch that feeds it), ``actuator`` (the pools as Deployments).
"""
