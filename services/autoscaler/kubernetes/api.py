"""The Kubernetes API as the actuator uses it: the client (import-guarded, so the RBAC rules stay
readable without it), the calls it makes as RBAC rules, and one clear error per failed call."""

from __future__ import annotations

import json
import os
from typing import Any

# The client, for the other modules of this package to take from here: one guard for all.
# Without it (the `kubernetes` extra not installed) everything stays importable (deploy/ reads
# RBAC_RULES) and KubernetesActuator refuses to start with one line saying what to install.
try:
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config
    from kubernetes.client.exceptions import ApiException
    from kubernetes.watch import Watch
    from urllib3.exceptions import HTTPError as TransportError
except ImportError as exc:
    MISSING: ImportError | None = exc
    k8s = k8s_config = Watch = None

    class ApiException(Exception):  # type: ignore[no-redef]
        """Stands in for the client's exception while the client is not installed."""

    TransportError = ApiException  # type: ignore[misc]
else:
    MISSING = None


POOL_LABEL = "spotmesh.dev/pool"
POOL_SELECTOR = f"{POOL_LABEL} in (spot,on-demand)"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
# Below the default 0 of every other pod, above Karpenter's int32 minimum for pods on nodes it
# is already disrupting (those go first anyway).
REMOVE_FIRST_COST = "-1000"
REMOVE_FIRST_MARK = "spotmesh.dev/remove-first"
DEFAULT_GRPC_PORT = 50061
COMPONENT = "spotmesh-autoscaler"
MERGE_PATCH = "application/merge-patch+json"
# The events.k8s.io API caps a note at 1 kB; core/v1 takes more, but the same cap keeps a long
# list of policy reasons readable in `kubectl describe`.
MAX_EVENT_MESSAGE = 1024
# A real API server ends a watch after timeoutSeconds; the client's read timeout is a little
# longer, so a silently dead connection is noticed too.
WATCH_SECONDS = 300
WATCH_READ_TIMEOUT_SECONDS = WATCH_SECONDS + 30
WATCH_MAX_BACKOFF_SECONDS = 30.0

# Every call this module makes, as Kubernetes PolicyRules: deploy/ renders them into the
# autoscaler's Role, and the kmock test checks each recorded request against them.
RBAC_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
    {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]

class KubernetesActuatorError(RuntimeError):
    """A Kubernetes API call failed; the message names the verb, the object and the namespace,
    and ``status`` carries the HTTP status (None when the API server was not reached)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _status_detail(exc: ApiException) -> str:
    """The API server's own explanation (a Status object's message), else its HTTP reason."""
    try:
        message = json.loads(exc.body or "").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or exc.reason or "no detail")


def _api_error(exc: BaseException, verb: str, resource: str, namespace: str,
               name: str | None) -> KubernetesActuatorError:
    what = f"{verb} {resource} {namespace}/{name}" if name else (
        f"{verb} {resource} in namespace {namespace}")
    if not isinstance(exc, ApiException):
        return KubernetesActuatorError(f"{what}: cannot reach the Kubernetes API ({exc})")
    status, detail = exc.status, _status_detail(exc)
    if status == 404 and resource.startswith("deployments"):
        message = (f"Deployment {namespace}/{name} not found ({what}): the actuator scales "
                   f"existing Deployments and never creates them (deploy/ does); check the "
                   f"namespace and the Deployment names")
    elif status in (401, 403):
        message = (f"{what}: {'forbidden' if status == 403 else 'unauthorized'} ({detail}); "
                   f"the autoscaler's ServiceAccount needs a Role with "
                   f"services.autoscaler.kubernetes.api.RBAC_RULES")
    elif status == 409:
        message = (f"{what}: conflict ({detail}); something else keeps changing it (kubectl "
                   f"scale? an HPA on the same Deployment?)")
    elif status is not None and status >= 500:
        message = f"{what}: Kubernetes API server error {status} ({detail})"
    else:
        message = f"{what}: HTTP {status} ({detail})"
    return KubernetesActuatorError(message, status)


def _client_from_environment() -> Any:
    """In a pod, the ServiceAccount's in-cluster config; elsewhere, the kubeconfig
    ($KUBECONFIG or ~/.kube/config, its current context)."""
    cfg = k8s.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s_config.load_incluster_config(client_configuration=cfg)
        else:
            k8s_config.load_kube_config(client_configuration=cfg)
    except (k8s_config.ConfigException, OSError) as exc:
        raise KubernetesActuatorError(
            f"no Kubernetes configuration: not in a pod (KUBERNETES_SERVICE_HOST unset) and no "
            f"usable kubeconfig ($KUBECONFIG or ~/.kube/config): {exc}") from exc
    api = k8s.ApiClient(cfg)
    api.user_agent = f"{COMPONENT} kubernetes-python"  # names us in the API server's audit log
    return api


