"""The service health server: kube-proxy's healthCheckNodePort, which pcn
serves in kube-proxy's stead.

For every Service with externalTrafficPolicy Local and a
spec.healthCheckNodePort, cloud load balancers ask each node
``GET http://<node>:<healthCheckNodePort>/healthz`` and send traffic only to
nodes that answer 200. kube-proxy (pkg/proxy/healthcheck/service_health.go)
answers 200 when the node has at least one ready endpoint of the Service and
503 otherwise, with the body
``{"service": {"namespace": ..., "name": ...}, "localEndpoints": N,
"serviceProxyHealthy": true}`` and the header
``X-Load-Balancing-Endpoint-Weight: N``; so does this module, one listener
per port on every address of the node (the agent runs in the node's
network namespace).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pcn_agent.control.reconcile import HealthCheck
from pcn_agent.dataplane.netns import entered

log = logging.getLogger(__name__)


def answer(check: HealthCheck) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a health check request, as kube-proxy gives them."""
    body = json.dumps({"service": {"namespace": check.namespace, "name": check.name},
                       "localEndpoints": check.local_endpoints,
                       "serviceProxyHealthy": True}).encode()
    headers = {"Content-Type": "application/json", "X-Content-Type-Options": "nosniff",
               "X-Load-Balancing-Endpoint-Weight": str(check.local_endpoints)}
    return (200 if check.local_endpoints > 0 else 503), headers, body


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    check: HealthCheck


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        status, headers, body = answer(self.server.check)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # a load balancer asks every few seconds: not worth a log line


class HealthServers:
    """One HTTP listener per healthCheckNodePort (sync() starts, updates and
    stops them), on every address of network namespace `netns` (None: this
    process's)."""

    def __init__(self, netns: str | None = None, host: str = "") -> None:
        self.netns = netns
        self.host = host
        self._servers: dict[int, _Server] = {}
        self._lock = threading.Lock()

    @property
    def ports(self) -> set[int]:
        return set(self._servers)

    def sync(self, checks: Mapping[int, HealthCheck]) -> None:
        """Serve exactly `checks`. A port that cannot be bound (another
        process holds it) is logged and tried again at the next sync."""
        with self._lock:
            for port in set(self._servers) - set(checks):
                self._stop(port)
            for port, check in checks.items():
                server = self._servers.get(port)
                if server is None:
                    try:
                        with entered(self.netns):  # the socket lives where it was made
                            server = _Server((self.host, port), _Handler)
                    except OSError as exc:
                        log.warning("healthCheckNodePort %d of %s/%s: %s", port, check.namespace,
                                    check.name, exc)
                        continue
                    server.check = check
                    threading.Thread(target=server.serve_forever, daemon=True,
                                     name=f"pcn-healthcheck-{port}").start()
                    self._servers[port] = server
                    log.info("serving healthCheckNodePort %d of %s/%s", port, check.namespace,
                             check.name)
                server.check = check

    def _stop(self, port: int) -> None:
        server = self._servers.pop(port)
        server.shutdown()
        server.server_close()
        log.info("stopped healthCheckNodePort %d", port)

    def close(self) -> None:
        with self._lock:
            for port in list(self._servers):
                self._stop(port)
