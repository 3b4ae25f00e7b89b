"""IPAM delegation: the IPAM plugin named in the network configuration
(host-local from the reference plugins, as in seed 003) runs exactly as a
runtime runs a plugin (CNI spec 1.1.0 section 4 "Plugin Delegation"), and
its result is read for the pod's one IPv4 address, gateway and routes."""

from __future__ import annotations

import ipaddress
import json
import os
import select
import time

from pcn_agent.cni.spec import (
    INCOMPATIBLE_VERSION,
    INTERNAL,
    INVALID_CONFIG,
    SUPPORTED_VERSIONS,
    TRY_AGAIN_LATER,
    CniError,
    Env,
    NetConf,
)

TYPE_CHECKING = False  # no typing import at run time: the plugin starts once per pod
if TYPE_CHECKING:
    from typing import Any

IPAM_TIMEOUT_S = 60.0


class Ipam:
    """The delegated IPAM plugin, run exactly as a runtime runs a plugin: the
    same environment (but CNI_COMMAND) and the network configuration on stdin.
    A configuration of cniVersion 1.1.0 is handed down as 1.0.0 to plugins
    that stop at 1.0.0 (the result format is the same)."""

    def __init__(self, conf: NetConf, env: Env, environ: dict[str, str]) -> None:
        self.conf = conf
        self.env = env
        self.environ = environ
        self.type = conf.ipam_type
        self._exe: str | None = None
        self._versions: list[str] | None = None

    @property
    def exe(self) -> str:
        return self.locate()

    def locate(self) -> str:
        """The plugin's path on CNI_PATH; CniError if it is not there."""
        if self._exe is None:
            for d in self.env.path:
                candidate = os.path.join(d, self.type)
                if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                    self._exe = candidate
                    break
            else:
                raise CniError(INVALID_CONFIG, f"IPAM plugin {self.type!r} not found in CNI_PATH "
                                               f"{':'.join(self.env.path) or '(empty)'}",
                               "install it there (host-local comes with the CNI reference "
                               "plugins, Debian package containernetworking-plugins) or fix "
                               "ipam.type")
        return self._exe

    def versions(self) -> list[str]:
        if self._versions is None:
            self._versions = [self.conf.cni_version]
            try:
                out = self._exec("VERSION", json.dumps(
                    {"cniVersion": self.conf.cni_version}).encode(), {})
                got = json.loads(out).get("supportedVersions")
                if isinstance(got, list) and got:
                    self._versions = [str(v) for v in got]
            except (CniError, ValueError, AttributeError):
                pass  # the real call will say what is wrong
        return self._versions

    def supports(self, version: str) -> bool:
        return version in self.versions()

    def _stdin(self, version: str) -> bytes:
        if version == self.conf.cni_version:
            return json.dumps(self.conf.raw).encode()
        return json.dumps({**self.conf.raw, "cniVersion": version}).encode()

    def _incompatible(self) -> CniError:
        supported = self.versions()
        return CniError(INCOMPATIBLE_VERSION,
                        f"IPAM plugin {self.type} does not support cniVersion "
                        f"{self.conf.cni_version}",
                        f"it supports {', '.join(supported)}; set the configuration's cniVersion "
                        f"to one both pcn-cni ({', '.join(SUPPORTED_VERSIONS)}) and it support")

    def run(self, command: str, overrides: dict[str, str] | None = None) -> dict[str, Any] | None:
        """Run `command` (ADD, DEL, CHECK, GC, STATUS); ADD's result, else None.

        The configuration goes down as it is, without asking the plugin's
        VERSION first (an exec more on every ADD): a plugin that does not speak
        its cniVersion refuses before doing anything (CNI spec 1.1.0 section 2;
        the reference plugins' skel checks the version first) with code 1, and
        only then is VERSION asked, to hand a 1.1.0 configuration down as 1.0.0
        (the result format is the same) or to say which versions it speaks."""
        try:
            out = self._exec(command, self._stdin(self.conf.cni_version), overrides or {})
        except CniError as exc:
            if exc.code != INCOMPATIBLE_VERSION:
                raise
            supported = self.versions()
            if self.conf.cni_version == "1.1.0" and "1.1.0" not in supported \
                    and "1.0.0" in supported:
                out = self._exec(command, self._stdin("1.0.0"), overrides or {})
            elif self.conf.cni_version not in supported:
                raise self._incompatible() from None
            else:
                raise
        if command != "ADD":
            return None
        try:
            result = json.loads(out)
        except ValueError:
            raise CniError(INTERNAL, f"IPAM plugin {self.type} printed a result that is not "
                                     f"JSON", out[:500].decode(errors="replace")) from None
        if not isinstance(result, dict):
            raise CniError(INTERNAL, f"IPAM plugin {self.type} printed a result that is not "
                                     f"an object")
        return result

    def _exec(self, command: str, stdin: bytes, overrides: dict[str, str]) -> bytes:
        environ = {**self.environ, **overrides, "CNI_COMMAND": command}
        try:
            status, stdout, stderr = run_program(self.exe, stdin, environ, IPAM_TIMEOUT_S)
        except TimeoutError:
            raise CniError(TRY_AGAIN_LATER, f"IPAM plugin {self.type} did not finish {command} "
                                            f"within {IPAM_TIMEOUT_S:g} s") from None
        except OSError as exc:
            raise CniError(INTERNAL, f"cannot run IPAM plugin {self.exe}: {exc}") from None
        if status != 0:
            try:
                err = json.loads(stdout)
                code, msg = int(err["code"]), str(err["msg"])
                details = str(err.get("details") or "")
            except (ValueError, KeyError, TypeError):
                code, msg = INTERNAL, f"exit status {status}"
                details = (stdout + stderr).decode(errors="replace").strip()[:2000]
            raise CniError(code, f"IPAM plugin {self.type} failed {command}: {msg}", details)
        return stdout


SIGKILL = 9  # signal.SIGKILL, without the signal module's enums


def run_program(exe: str, stdin: bytes, env: dict[str, str],
                timeout: float) -> tuple[int, bytes, bytes]:
    """Run `exe` without arguments, in environment `env`, `stdin` on its
    standard input: (exit status, stdout, stderr), the status as subprocess
    gives it (the exit code, or -N for signal N). subprocess.run(...,
    capture_output=True) without importing subprocess (with it signal,
    threading and selectors: ~3 ms of every plugin run): posix_spawn (vfork
    and exec in glibc), pipes served by poll(2). The plugin's own descriptors
    are close-on-exec (PEP 446), so the program gets only its three.
    Raises OSError if it cannot be started; TimeoutError after `timeout` s,
    once the program is killed and reaped."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid = os.posix_spawn(exe, [exe], env, file_actions=[
            (os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2)])
    except BaseException:
        for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
            os.close(fd)
        raise
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    open_fds = {in_w, out_r, err_r}
    got: dict[int, bytearray] = {out_r: bytearray(), err_r: bytearray()}
    try:
        pending = memoryview(stdin)
        os.set_blocking(in_w, False)
        poller = select.poll()
        poller.register(out_r, select.POLLIN)
        poller.register(err_r, select.POLLIN)
        if pending:
            poller.register(in_w, select.POLLOUT)
        else:
            os.close(in_w)
            open_fds.discard(in_w)
        deadline = time.monotonic() + timeout
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"{exe} ran longer than {timeout:g} s")
            for fd, _ in poller.poll(left * 1000):
                if fd == in_w:
                    try:
                        pending = pending[os.write(in_w, pending):]
                    except BrokenPipeError:  # it stopped reading: as subprocess, go on
                        pending = pending[:0]
                    if not pending:
                        poller.unregister(in_w)
                        os.close(in_w)
                        open_fds.discard(in_w)
                else:
                    chunk = os.read(fd, 65536)
                    if chunk:
                        got[fd] += chunk
                    else:
                        poller.unregister(fd)
                        os.close(fd)
                        open_fds.discard(fd)
        _, status = os.waitpid(pid, 0)
    finally:
        for fd in open_fds:
            os.close(fd)
    return os.waitstatus_to_exitcode(status), bytes(got[out_r]), bytes(got[err_r])


def pick_address(ipam_result: dict[str, Any], ipam_type: str) -> tuple[str, str]:
    """The IPv4 address (interface notation) and gateway from an IPAM result."""
    ips = ipam_result.get("ips") or []
    v4 = []
    for entry in ips:
        try:
            iface = ipaddress.ip_interface(entry["address"])
        except (KeyError, TypeError, ValueError):
            raise CniError(INTERNAL, f"IPAM plugin {ipam_type} returned an invalid ips entry "
                                     f"{entry!r}") from None
        if iface.version != 4:
            raise CniError(INVALID_CONFIG, f"IPAM plugin {ipam_type} returned {iface}, but pcn "
                                           f"routes IPv4 only", "configure IPv4 ranges only")
        v4.append((iface, entry.get("gateway")))
    if len(v4) != 1:
        raise CniError(INVALID_CONFIG, f"IPAM plugin {ipam_type} returned {len(v4)} IPv4 "
                                       f"addresses; pcn needs exactly one per pod",
                       "configure one IPv4 range set in ipam.ranges")
    iface, gateway = v4[0]
    if not gateway:
        raise CniError(INVALID_CONFIG, f"IPAM plugin {ipam_type} returned no gateway for "
                                       f"{iface}", "set the range's \"gateway\" to the node's "
                                                   "pod gateway (the first address of its pod "
                                                   "CIDR)")
    return str(iface), str(gateway)


def ipam_routes(ipam_result: dict[str, Any], gateway: str) -> list[dict[str, str]]:
    """The routes to install in the pod: the default route via the gateway
    always, plus any other IPv4 routes IPAM asks for."""
    routes = [{"dst": "0.0.0.0/0", "gw": gateway}]
    for r in ipam_result.get("routes") or []:
        try:
            dst = ipaddress.ip_network(r["dst"], strict=False)
        except (KeyError, TypeError, ValueError):
            raise CniError(INTERNAL, f"IPAM returned an invalid route {r!r}") from None
        if dst.version != 4:
            raise CniError(INVALID_CONFIG, f"IPAM asks for the IPv6 route {dst}; pcn routes "
                                           f"IPv4 only", "remove IPv6 routes from ipam.routes")
        if dst.prefixlen == 0:
            continue
        routes.append({"dst": str(dst), "gw": str(r.get("gw") or gateway)})
    return routes
