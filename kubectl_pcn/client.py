"""The cluster, through the `kubernetes` client: kubeconfig and context
loading, the few API calls the plugin makes (as plain dicts), and the
translation of failures into errors that name their fix."""

from __future__ import annotations

import builtins
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, cast

import urllib3
from kubernetes import client as k8s
from kubernetes import config as kubeconfig
from kubernetes.config.config_exception import ConfigException

from .errors import Conflict, CrdsMissing, Forbidden, InputError, NotReachable, PcnError

GROUP = "pcn.dev"
VERSION = "v1alpha1"
INSTALL_HINT = "install them with: kubectl apply -k manifests/ (from the pcn repository)"
STATUS_NAMESPACE = "pcn-system"
STATUS_CONFIGMAP = "pcn-agent-status"  # one per node: <this>-<node>; see the agent
STATUS_LABEL = ("app.kubernetes.io/component", STATUS_CONFIGMAP)


@dataclass(frozen=True)
class Resource:
    kind: str
    plural: str
    namespaced: bool
    group: str = GROUP
    version: str = VERSION

    @property
    def qualified(self) -> str:
        """kubectl's name for it: networkfunctions.pcn.dev, pods."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


NETWORK_FUNCTIONS = Resource("NetworkFunction", "networkfunctions", True)
CUBE_CHAINS = Resource("CubeChain", "cubechains", True)
NODE_PORT_RULES = Resource("NodePortRule", "nodeportrules", False)
CUBE_TYPES = Resource("CubeType", "cubetypes", False)
PODS = Resource("Pod", "pods", True, "", "v1")
CONFIG_MAPS = Resource("ConfigMap", "configmaps", True, "", "v1")
NODES = Resource("Node", "nodes", False, "", "v1")
NAMESPACES = Resource("Namespace", "namespaces", False, "", "v1")
NETWORK_POLICIES = Resource("NetworkPolicy", "networkpolicies", True, "networking.k8s.io", "v1")
SERVICES = Resource("Service", "services", True, "", "v1")
ENDPOINT_SLICES = Resource("EndpointSlice", "endpointslices", True, "discovery.k8s.io", "v1")
# sigs.k8s.io/network-policy-api v0.3.0 (a CRD: absent where nobody installed it)
CLUSTER_NETWORK_POLICIES = Resource("ClusterNetworkPolicy", "clusternetworkpolicies", False,
                                    "policy.networking.k8s.io", "v1alpha2")


def default_kubeconfig() -> str:
    return os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")


class Cluster:
    """One cluster as chosen by --kubeconfig and --context (else $KUBECONFIG
    and its current context, else the in-cluster service account)."""

    def __init__(self, kubeconfig_path: str | None = None, context: str | None = None,
                 timeout: float | None = 30.0, log: Callable[[str], None] | None = None) -> None:
        self.kubeconfig_path = kubeconfig_path
        self.context = context
        self.timeout = timeout or None
        self.log = log

    # ------------------------------------------------------------------ configuration
    @property
    def config_file(self) -> str:
        return self.kubeconfig_path or default_kubeconfig()

    def _in_cluster(self) -> bool:
        return (self.kubeconfig_path is None and self.context is None
                and not any(os.path.exists(os.path.expanduser(p))
                            for p in self.config_file.split(os.pathsep) if p)
                and "KUBERNETES_SERVICE_HOST" in os.environ)

    @cached_property
    def _context_entry(self) -> dict[str, Any]:
        if self._in_cluster():
            return {"name": "in-cluster", "context": {}}
        try:
            contexts, active = kubeconfig.list_kube_config_contexts(self.config_file)
        except (ConfigException, OSError) as exc:
            raise PcnError(f"cannot read a kubeconfig from {self.config_file}: {exc}",
                           "point at one with --kubeconfig FILE or the KUBECONFIG variable"
                           ) from None
        if self.context is None:
            if not active:
                raise PcnError(f"{self.config_file} has no current context",
                               "choose one with --context NAME (kubectl config get-contexts)")
            return active
        for c in contexts or []:
            if c.get("name") == self.context:
                return c
        names = ", ".join(sorted(c.get("name", "") for c in contexts or [])) or "none"
        raise PcnError(f"context {self.context!r} is not in {self.config_file} "
                       f"(contexts: {names})", "pick one of those with --context")

    @property
    def context_name(self) -> str:
        return str(self._context_entry.get("name") or "")

    @property
    def default_namespace(self) -> str:
        """The namespace of the kubeconfig context, else "default"."""
        try:
            ctx = self._context_entry.get("context") or {}
        except PcnError:
            return "default"
        if self._in_cluster():
            try:
                with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
                    return f.read().strip() or "default"
            except OSError:
                return "default"
        return str(ctx.get("namespace") or "default")

    @cached_property
    def api_client(self) -> k8s.ApiClient:
        if self._in_cluster():
            cfg = k8s.Configuration()
            kubeconfig.load_incluster_config(client_configuration=cfg)
            return k8s.ApiClient(cfg)
        self._context_entry  # noqa: B018 - a readable error for a missing context or file
        try:
            return kubeconfig.new_client_from_config(config_file=self.config_file,
                                                     context=self.context,
                                                     persist_config=False)
        except (ConfigException, OSError, ValueError) as exc:
            raise PcnError(f"cannot use context {self.context_name!r} of {self.config_file}: "
                           f"{exc}", "fix the kubeconfig, or choose another with --kubeconfig "
                                     "or --context") from None

    @property
    def server(self) -> str:
        return str(self.api_client.configuration.host)

    @cached_property
    def custom(self) -> k8s.CustomObjectsApi:
        return k8s.CustomObjectsApi(self.api_client)

    @cached_property
    def core(self) -> k8s.CoreV1Api:
        return k8s.CoreV1Api(self.api_client)

    # ------------------------------------------------------------------ calls
    def _call(self, verb: str, res: Resource, namespace: str | None, name: str | None,
              fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one API call with _preload_content=False and return its JSON;
        failures become errors that say what to do."""
        if self.log:
            where = f" -n {namespace}" if namespace and res.namespaced else ""
            self.log(f"{verb} {res.qualified}{' ' + name if name else ''}{where}")
        try:
            resp = fn(*args, _preload_content=False, _request_timeout=self.timeout, **kwargs)
        except k8s.ApiException as exc:
            raise self._api_error(exc, verb, res, namespace, name) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._unreachable(exc) from None
        data = resp.data
        return json.loads(data) if data else None

    def _unreachable(self, exc: BaseException) -> PcnError:
        reason = getattr(exc, "reason", None) or exc
        text = str(reason)
        if "Connection refused" in text:
            text = "connection refused"
        elif isinstance(reason, urllib3.exceptions.SSLError):
            text = f"TLS failed ({reason}); check the cluster's certificate-authority-data"
        elif isinstance(reason, urllib3.exceptions.TimeoutError):
            text = f"no answer within {self.timeout} s (--request-timeout)"
        return NotReachable(
            f"cannot reach the Kubernetes API server at {self.server} (context "
            f"{self.context_name!r} of {self.config_file}): {text}",
            "is the cluster running? Choose another one with --kubeconfig FILE or "
            "--context NAME (kubectl config get-contexts lists them)")

    def _message(self, exc: k8s.ApiException) -> str:
        try:
            body = json.loads(exc.body or "")
            return str(body.get("message") or exc.reason or "")
        except (ValueError, AttributeError):
            return str(exc.body or exc.reason or "").strip()[:300]

    def _api_error(self, exc: k8s.ApiException, verb: str, res: Resource,
                   namespace: str | None, name: str | None) -> PcnError:
        status = exc.status or 0
        message = self._message(exc)
        scope = f" in namespace {namespace}" if namespace and res.namespaced else \
            (" in all namespaces" if res.namespaced else "")
        if status == 401:
            return PcnError(f"the API server at {self.server} rejected the credentials of "
                            f"context {self.context_name!r} (401 Unauthorized): {message}",
                            "log in again or refresh the token in the kubeconfig")
        if status == 403:
            group = res.group or '""  (core)'
            ns_flag = f" -n {namespace}" if namespace and res.namespaced else \
                (" -A" if res.namespaced else "")
            return Forbidden(
                f"forbidden: RBAC does not let you {verb} {res.qualified}{scope} "
                f"({message})",
                f"ask a cluster admin for a Role or ClusterRole granting the verb '{verb}' on "
                f"resource '{res.plural}' of API group {group}; check with: kubectl auth "
                f"can-i {verb} {res.qualified}{ns_flag}")
        if status == 404 and res.group == GROUP and not self.crds_installed(res):
            return CrdsMissing(
                f"the pcn.dev custom resources are not installed in the cluster at "
                f"{self.server} ({res.qualified} is unknown to it)", INSTALL_HINT)
        if status == 404:
            return NotFound(f"{res.kind.lower()} {(namespace + '/') if namespace else ''}"
                            f"{name} not found")
        if status == 409:
            return Conflict(f"{res.kind.lower()} {name} changed while we edited it "
                            f"({message})", "run the command again")
        if status in (400, 422):
            return InputError(f"the API server rejected {res.kind.lower()} "
                              f"{(namespace + '/') if namespace else ''}{name}: {message}")
        return PcnError(f"{verb} {res.qualified}{scope} failed: HTTP {status} "
                        f"{exc.reason or ''}: {message}".rstrip(": "))

    def crds_installed(self, res: Resource) -> bool:
        """Whether the server serves the resource (discovery of its group)."""
        try:
            # _preload_content=False: the raw urllib3 response, not the model the
            # client's annotations promise
            found = cast("urllib3.BaseHTTPResponse",
                         self.custom.get_api_resources(res.group, res.version,
                                                       _preload_content=False,
                                                       _request_timeout=self.timeout))
            names = {r.get("name") for r in json.loads(found.data).get("resources") or []}
        except k8s.ApiException as exc:
            return exc.status != 404
        except (urllib3.exceptions.HTTPError, OSError, ValueError):
            return True  # cannot tell: report the original error
        return res.plural in names

    # ------------------------------------------------------------------ verbs
    def list(self, res: Resource, namespace: str | None = None,
             label_selector: str | None = None) -> builtins.list[dict[str, Any]]:
        """Objects of a resource, in a namespace or in all (namespace None);
        each with kind and apiVersion set (some servers omit them in lists)."""
        extra = {"label_selector": label_selector} if label_selector else {}
        if res.group:
            if namespace is not None and res.namespaced:
                body = self._call("list", res, namespace, None,
                                  self.custom.list_namespaced_custom_object,
                                  res.group, res.version, namespace, res.plural, **extra)
            else:
                body = self._call("list", res, None, None,
                                  self.custom.list_cluster_custom_object,
                                  res.group, res.version, res.plural, **extra)
        else:
            core = self.core
            if res.namespaced and namespace is not None:
                fn = getattr(core, f"list_namespaced_{_snake(res.kind)}")
                body = self._call("list", res, namespace, None, fn, namespace, **extra)
            elif res.namespaced:
                fn = getattr(core, f"list_{_snake(res.kind)}_for_all_namespaces")
                body = self._call("list", res, None, None, fn, **extra)
            else:
                fn = getattr(core, f"list_{_snake(res.kind)}")
                body = self._call("list", res, None, None, fn, **extra)
        api_version = f"{res.group}/{res.version}" if res.group else res.version
        items = []
        for item in (body or {}).get("items") or []:
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", res.kind)
            items.append(item)
        if label_selector and "=" in label_selector:  # not every server filters
            k, _, v = label_selector.partition("=")
            items = [i for i in items if ((i.get("metadata") or {}).get("labels") or {}
                                          ).get(k) == v]
        return sorted(items, key=lambda o: (o["metadata"].get("namespace") or "",
                                            o["metadata"].get("name") or ""))

    def get(self, res: Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            if res.group:
                if res.namespaced:
                    return self._call("get", res, namespace, name,
                                      self.custom.get_namespaced_custom_object,
                                      res.group, res.version, namespace, res.plural, name)
                return self._call("get", res, None, name, self.custom.get_cluster_custom_object,
                                  res.group, res.version, res.plural, name)
            fn = getattr(self.core, f"read_namespaced_{_snake(res.kind)}" if res.namespaced
                         else f"read_{_snake(res.kind)}")
            args = (name, namespace) if res.namespaced else (name,)
            return self._call("get", res, namespace, name, fn, *args)
        except NotFound:
            return None

    def create(self, res: Resource, obj: dict[str, Any]) -> dict[str, Any]:
        ns = obj["metadata"].get("namespace")
        return self._call("create", res, ns, obj["metadata"]["name"],
                          self.custom.create_namespaced_custom_object,
                          res.group, res.version, ns, res.plural, obj) or obj

    def patch(self, res: Resource, namespace: str, name: str,
              patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch."""
        return self._call("patch", res, namespace, name,
                          self.custom.patch_namespaced_custom_object,
                          res.group, res.version, namespace, res.plural, name, patch,
                          _content_type="application/merge-patch+json")

    def delete(self, res: Resource, namespace: str, name: str) -> bool:
        """False when it was already gone."""
        try:
            self._call("delete", res, namespace, name,
                       self.custom.delete_namespaced_custom_object,
                       res.group, res.version, namespace, res.plural, name)
            return True
        except NotFound:
            return False

    def server_version(self) -> str:
        try:
            resp = cast("urllib3.BaseHTTPResponse",  # raw, as with get_api_resources above
                        k8s.VersionApi(self.api_client).get_code(_preload_content=False,
                                                                 _request_timeout=self.timeout))
        except k8s.ApiException as exc:
            return f"unknown (HTTP {exc.status})"
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._unreachable(exc) from None
        return str(json.loads(resp.data).get("gitVersion") or "unknown")

    def agent_status_configmaps(self, namespace: str) -> builtins.list[dict[str, Any]]:
        items = self.list(CONFIG_MAPS, namespace, label_selector="=".join(STATUS_LABEL))
        return [cm for cm in items if cm["metadata"].get("name", "").startswith(
            STATUS_CONFIGMAP + "-")]


class NotFound(PcnError):
    """The object does not exist (the resource does)."""


def _snake(kind: str) -> str:
    return {"ConfigMap": "config_map"}.get(kind, kind.lower())
