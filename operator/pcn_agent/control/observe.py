"""Observation ops of the agent's local API: packet captures (a stream, see
pcn_agent.control.captureproto) and the flow monitors' tables (`flows`).

A capture reads the pod's packetcapture NetworkFunction when its chain has
one nobody reads (PacketCaptureFunction: already compiled and in place,
with its filter narrowed by the reader's, its snap length and rate bounded
by the function's; afterwards it copies nothing again). The function's one
cube serves every pod of its chain on the node: the reader gets the copies
made on its pod's port, and the other pods' matching packets count against
the rate bound too. Otherwise it is a
packetcapture cube stacked outermost on both hooks of one
pod's port (NodeDataplane.set_pod_taps) for as long as its reader keeps the
connection open and heartbeats: it ends at its frame count, its duration,
when the reader closes, or after `heartbeat` seconds without a heartbeat
(a reader that died or stopped reading), and then leaves no trace in the
data plane. One thread reads the packetcapture ring buffer for every capture
of the agent and queues each copy to its capture's connection.

A capture's end frame accounts for every packet its cube matched on the
pod's port (capture_stats): exactly one of captured (sent to the reader),
notCopied (over the rate bound, or past -c) and lost (the ring buffer or
the agent's queue was full, or the reader went before it was sent), so

    matched == captured + notCopied + lost

To that end the cube stops matching before the counters are read, and the
copies it made before are all delivered (a barrier on the ring's reader
thread) and sent, or counted, before the end frame.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pcn_agent.cni.spec import INTERNAL, INVALID_CONFIG, INVALID_ENV, TRY_AGAIN_LATER
from pcn_agent.control import captureproto as proto
from pcn_agent.control.localapi import ApiError
from pcn_agent.dataplane.cubes import packetcapture as pc
from pcn_agent.dataplane.cubes.functions import PacketCaptureFunction
from pcn_agent.node.wiring import CAPTURE_PREFIX
from pcn_crds.capfilter import FilterError, compile_filter

if TYPE_CHECKING:
    from pcn_agent.control.manager import DataplaneManager
    from pcn_agent.node.wiring import NodeDataplane, Pod

log = logging.getLogger(__name__)

PROGRESS_FIRST_S = 1.0  # a flows request waits this long in silence, then says why
PROGRESS_EVERY_S = 5.0  # and again at this interval (below the client's read timeout)
QUEUE_MAX = 20_000  # copies waiting for a slow reader before the agent drops them
MAX_HEARTBEAT_S = 60.0
# bytes of copies per send (32 of the largest, 8 KiB); sends follow each other
# without a pause while copies are queued, and each must end within the
# heartbeat (a reader slower than SEND_CHUNK / heartbeat is taken for gone)
SEND_CHUNK = 256 * 1024
IDLE_WAIT_S = 0.05  # how long the stream waits for a copy before it checks its ends
RING_SYNC_S = 5.0  # the longest wait for the ring's reader to deliver what is in it


@dataclass
class _Tally:
    """Copies a capture's stream sent, and those of a send that failed."""

    sent: int = 0
    failed: int = 0


def capture_stats(kernel: Mapping[str, int], sent: int, queue_full: int, past_count: int,
                  unsent: int) -> dict[str, int]:
    """A capture's accounting for its end frame, from its cube's counters
    (PacketCapture.stats over the capture: matched == copied + not_copied +
    lost) and what the agent did with the copies (copied == sent +
    queue_full + past_count + unsent): {"matched", "captured" (sent to the
    reader), "notCopied" (the cube's not_copied, over the rate bound, +
    past_count, copies after -c's count was met), "lost" (the cube's lost, a
    full ring buffer, + queue_full, copies the agent's queue had no room
    for, + unsent, copies the reader went away before), and those parts:
    "copied", "rateLimited", "pastCount", "ringFull", "queueFull", "unsent"}.
    matched == captured + notCopied + lost."""
    matched, copied = int(kernel.get("matched", 0)), int(kernel.get("copied", 0))
    rate, ring = int(kernel.get("not_copied", 0)), int(kernel.get("lost", 0))
    return {"matched": matched, "captured": sent, "notCopied": rate + past_count,
            "lost": ring + queue_full + unsent, "copied": copied, "rateLimited": rate,
            "pastCount": past_count, "ringFull": ring, "queueFull": queue_full,
            "unsent": unsent}


def _int(request: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = request.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ApiError(f"request field {name!r} must be an integer within {lo}-{hi}, "
                       f"got {value!r}", INVALID_ENV)
    return value


def _num(request: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = request.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ApiError(f"request field {name!r} must be a number within {lo:g}-{hi:g}, "
                       f"got {value!r}", INVALID_ENV)
    return float(value)


class Observer:
    """Serves `capture` (a stream) and `flows` for one node."""

    OPS = ("flows",)

    def __init__(self, node: NodeDataplane, manager: DataplaneManager) -> None:
        self.node = node
        self.manager = manager
        self.lock = manager.lock
        self._ring: pc.CaptureRing | None = None
        self._ring_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ids = 0
        self.active: dict[str, pc.PacketCapture] = {}
        self._polled = threading.Condition()
        self._polls = 0  # ring polls completed (sync_ring waits for two more)

    # ---------------------------------------------------------------- pods
    def _pod(self, request: Mapping[str, Any]) -> Pod:
        ns, name = request.get("namespace"), request.get("pod")
        if not isinstance(ns, str) or not isinstance(name, str) or not ns or not name:
            raise ApiError("request needs the pod's 'namespace' and 'pod' (its name)", INVALID_ENV)
        pod = self.node.find_pod(ns, name)
        if pod is None:
            raise ApiError(f"pod {ns}/{name} is not attached on node {self.node.cfg.name}",
                           INVALID_ENV)
        return pod

    # ---------------------------------------------------------------- flows
    def __call__(self, request: Mapping[str, Any]) -> dict[str, Any]:
        if request.get("op") != "flows":
            raise ApiError(f"unknown op {request.get('op')!r}", INTERNAL)
        return self.op_flows(request)

    def flows_stream(self, request: dict[str, Any], conn: socket.socket) -> None:
        """`flows` as the local API's streaming op: {"progress": TEXT} lines
        while the data plane is busy (a new flow monitor compiles its own
        program under the manager's lock, a few seconds: a trial of issue 12
        waited ~7 s in silence), one every PROGRESS_EVERY_S, then op_flows'
        answer line ({"ok": true, ...}, or {"ok": false, "error", "code"})."""
        waited = 0.0
        while not self.lock.acquire(timeout=PROGRESS_FIRST_S if not waited
                                    else PROGRESS_EVERY_S):
            waited += PROGRESS_FIRST_S if not waited else PROGRESS_EVERY_S
            busy = self.manager.busy or "applying a change"
            _send_json(conn, {"progress": f"waiting for the agent on node "
                                          f"{self.node.cfg.name} ({waited:.0f} s): {busy}"})
        try:
            answer: dict[str, Any] = {"ok": True, **self.op_flows(request)}
        except ApiError as exc:
            answer = {"ok": False, "error": str(exc), "code": exc.code}
        except Exception as exc:
            log.exception("flows failed")
            answer = {"ok": False, "error": f"flows failed in the agent: {exc}",
                      "code": INTERNAL}
        finally:
            self.lock.release()
        _send_json(conn, answer)

    def op_flows(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The flows of the pod's address in the flow monitors on its chain:
        {"pod", "ip", "node", "monitors": [{"function", "flows": [...]}]}."""
        with self.lock:
            pod = self._pod(request)
            names = [n for n in dict.fromkeys([*pod.ingress, *pod.egress])
                     if n in self.manager.monitors]
            ip = pod.iface.address.split("/")[0]
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            monitors = []
            for name in names:
                fm = self.manager.monitors[name]
                flows = [f.as_dict(now) for f in fm.flows() if ip in (f.src, f.dst)]
                monitors.append({"function": name, "maxFlows": fm.max_flows, "flows": flows})
        return {"pod": f"{pod.k8s_namespace}/{pod.k8s_name}", "ip": ip,
                "node": self.node.cfg.name, "monitors": monitors}

    # ---------------------------------------------------------------- captures
    def _ensure_ring(self) -> pc.CaptureRing:
        if self._ring is None:
            self._ring = pc.CaptureRing(self.node.rt)
            self._ring_thread = threading.Thread(target=self._poll, name="capture-ring",
                                                 daemon=True)
            self._ring_thread.start()
        return self._ring

    def _poll(self) -> None:
        while not self._stop.is_set():
            ring = self._ring
            if ring is None:
                return
            try:
                ring.poll(100)
            except Exception:
                log.exception("capture ring poll failed")
                time.sleep(0.1)
            with self._polled:
                self._polls += 1
                self._polled.notify_all()

    def sync_ring(self) -> None:
        """Return once every copy in the ring buffer when called went to its
        sink: two whole polls of the reader thread after the call (the first
        may have started before; each consumes what the ring holds when it
        starts, its epoll being level-triggered). With no reader thread
        running, poll here (nobody else consumes then)."""
        ring, thread = self._ring, self._ring_thread
        if ring is None:
            return
        if thread is None or not thread.is_alive():
            ring.poll(0)
            return
        deadline = time.monotonic() + RING_SYNC_S
        with self._polled:
            want = self._polls + 2
            while self._polls < want and thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("the capture ring's reader did not poll for %g s", RING_SYNC_S)
                    return
                self._polled.wait(min(left, 0.2))
        if not thread.is_alive():  # it stopped meanwhile (the agent is stopping)
            ring.poll(0)

    def close(self) -> None:
        """Stop every capture (their streams end) and the ring thread."""
        self._stop.set()
        if self._ring_thread is not None:
            self._ring_thread.join(2.0)

    def capture(self, request: dict[str, Any], conn: socket.socket) -> None:
        """The `capture` stream (captureproto): set up, stream, tear down."""
        try:
            snaplen = _int(request, "snaplen", pc.DEFAULT_SNAPLEN, 1, pc.SNAP_MAX)
            budget = _int(request, "budget", pc.DEFAULT_BUDGET, 1, pc.MAX_BUDGET)
            count = _int(request, "count", 0, 0, 1 << 31)
            duration = _num(request, "duration", 0, 0, 7 * 86400)
            heartbeat = _num(request, "heartbeat", proto.DEFAULT_HEARTBEAT_S, 0.1,
                             MAX_HEARTBEAT_S)
            text = request.get("filter") or ""
            if not isinstance(text, str):
                raise ApiError("request field 'filter' must be a string", INVALID_ENV)
            try:
                program = compile_filter(text)
            except FilterError as exc:
                raise ApiError(str(exc), INVALID_CONFIG) from None
            if self._stop.is_set():
                raise ApiError("the agent is stopping", TRY_AGAIN_LATER)
            if not self.node.rt.type_loaded(pc.TYPE):  # (a capture function loads it too)
                # the agent compiles it in the background after its first
                # reconcile (manager.warm_up_capture); a capture before that
                # waits for it: say so
                _send_json(conn, {"progress": f"compiling the capture program on node "
                                              f"{self.node.cfg.name} (first use), a few "
                                              f"seconds; the capture starts after it"})
                t0 = time.monotonic()
                self.node.rt.load_type(pc.TYPE)  # outside the manager's lock: pods attach
                log.info("capture program compiled in %.1f s", time.monotonic() - t0)
            q: queue.Queue[pc.Captured] = queue.Queue(QUEUE_MAX)
            overflow = [0]

            def sink(c: pc.Captured) -> None:
                try:
                    q.put_nowait(c)
                except queue.Full:
                    overflow[0] += 1

            with self.lock:
                pod = self._pod(request)
                ring = self._ensure_ring()
                fn = self._capture_function(pod)
                if fn is not None:  # the pod's capture point: read it
                    name, cap = fn.name, fn.cap
                    try:
                        program = compile_filter(_narrower(fn.settings.filter, text))
                    except FilterError as exc:
                        raise ApiError(f"{exc} (with the filter of {fn.name})",
                                       INVALID_CONFIG) from None
                    # a capture point serves every pod of its chain on the
                    # node: the reader's counts and copies are its pod's
                    # port's only (the cube matches nothing else meanwhile),
                    # from a base read while it matched nothing
                    cap.stop_matching()
                    base = cap.stats()
                    ring.register(cap.instance, sink)
                    try:
                        fn.start_reading(program, snaplen, budget, pod.port.id)
                    except BaseException:
                        ring.unregister(cap.instance)
                        fn.stop_reading()
                        raise
                    snaplen, budget = cap.snaplen, cap.budget
                else:
                    self._ids += 1
                    name = f"{CAPTURE_PREFIX}{self._ids}.{pod.k8s_name}"[:60]
                    cap = pc.PacketCapture(self.node.rt, name, program, snaplen, budget)
                    base = {}
                    ring.register(cap.instance, sink)
                    try:
                        self._stack(pod, name, add=True)
                    except BaseException:
                        ring.unregister(cap.instance)
                        cap.delete()
                        raise
                    self.active[name] = cap
        except ApiError as exc:
            _send_json(conn, {"ok": False, "error": str(exc), "code": exc.code})
            return
        except Exception as exc:  # a compile or map failure: the reader must hear why
            log.exception("capture could not start")
            _send_json(conn, {"ok": False, "error": f"capture failed in the agent: {exc}",
                              "code": INTERNAL})
            return
        log.info("capture %s of %s/%s started (filter %r, snaplen %d, budget %d/s)", name,
                 pod.k8s_namespace, pod.k8s_name, text, snaplen, budget)
        reason, reader_there = "stopped: an error in the agent (see its log)", False
        tally = _Tally()
        try:
            head: dict[str, Any] = {
                "ok": True, "capture": name, "node": self.node.cfg.name,
                "pod": f"{pod.k8s_namespace}/{pod.k8s_name}", "snaplen": snaplen,
                "budget": budget}
            if fn is not None:
                head["function"] = name
                head["sides"] = [side for side, names in (("from-pod", pod.ingress),
                                                          ("to-pod", pod.egress))
                                 if name in names]
                head["filter"] = _narrower(fn.settings.filter, text)
            _send_json(conn, head)
            reason, reader_there = self._stream(conn, q, pod, count, duration, heartbeat,
                                                tally)
        except OSError as exc:
            reason = f"stopped: the reader went away ({exc})"
        finally:
            stats = self._finish(conn, name, cap, fn, pod, ring, q, base, count, tally,
                                 reader_there, overflow)
            log.info("capture %s ended: %s (%s)", name, reason, stats)
            try:
                conn.settimeout(1.0)
                conn.sendall(proto.end_frame(reason, stats))
            except OSError:
                pass

    def _finish(self, conn: socket.socket, name: str, cap: pc.PacketCapture,
                fn: PacketCaptureFunction | None, pod: Pod, ring: pc.CaptureRing,
                q: queue.Queue[pc.Captured], base: Mapping[str, int], count: int,
                tally: _Tally, reader_there: bool, overflow: list[int]) -> dict[str, int]:
        """End a capture: its cube stops matching, the copies it made reach
        the queue (sync_ring) and, while the reader is there, the reader
        (but those past -c's count); then the cube is taken away (or the
        capture point goes back to counting) and the accounting returned
        (capture_stats; {} for a capture point deleted meanwhile)."""
        with self.lock:
            live = fn is None or self.manager.functions.get(name) is fn
            if live:
                cap.stop_matching()
        self.sync_ring()
        with self.lock:
            kernel = {k: v - base.get(k, 0) for k, v in cap.stats().items()} if live else {}
        left: list[pc.Captured] = []
        while True:
            try:
                left.append(q.get_nowait())
            except queue.Empty:
                break
        sent, past_count = tally.sent, 0
        if count and sent + len(left) > count:
            past_count = sent + len(left) - count
            left = left[: max(0, count - sent)]
        if reader_there and left:
            sent, left = _send_rest(conn, left, sent)
        with self.lock:
            ring.unregister(cap.instance)
            if fn is not None:
                if live:
                    fn.stop_reading()
            else:
                self._stack(pod, name, add=False)
                cap.delete()
                self.active.pop(name, None)
        if not live:
            return {}
        return capture_stats(kernel, sent, overflow[0], past_count, len(left) + tally.failed)

    def _capture_function(self, pod: Pod) -> PacketCaptureFunction | None:
        """The first packetcapture NetworkFunction of the pod's chain that
        nobody reads (None: the capture is an on-demand cube of its own)."""
        for n in dict.fromkeys([*pod.ingress, *pod.egress]):
            f = self.manager.functions.get(n)
            if isinstance(f, PacketCaptureFunction) and not f.reader:
                return f
        return None

    def _stack(self, pod: Pod, name: str, add: bool) -> None:
        """Add or take capture `name` to or from both of the pod's taps."""
        if self.node.pods.get(pod.key) is not pod:
            return  # the pod went meanwhile (its port and taps with it)
        tap_from, tap_to = self.node.taps.get(pod.port.id, ([], []))
        tap_from = [n for n in tap_from if n != name] + ([name] if add else [])
        tap_to = [n for n in tap_to if n != name] + ([name] if add else [])
        self.node.set_pod_taps(pod.key, tap_from, tap_to)

    def _stream(self, conn: socket.socket, q: queue.Queue[pc.Captured], pod: Pod, count: int,
                duration: float, heartbeat: float, tally: _Tally) -> tuple[str, bool]:
        """Send copies until the capture ends: (why it ended, whether the
        reader is still there to be sent the rest); `tally` counts the
        copies sent, and those of a send that failed (OSError then). Copies
        go out as soon as they come (up to SEND_CHUNK bytes a send); the
        ends are checked at least every IDLE_WAIT_S."""
        offset = time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        start = last_beat = time.monotonic()
        conn.settimeout(heartbeat)  # a reader that stops reading stalls sendall: stop then
        while True:
            sent = tally.sent
            now = time.monotonic()
            if count and sent >= count:
                return f"stopped: {sent} packets captured (-c {count})", True
            if duration and now - start >= duration:
                return f"stopped: {duration:g} s elapsed (--duration {duration:g})", True
            if now - last_beat > heartbeat:
                return f"stopped: no heartbeat from the reader for {heartbeat:g} s", False
            if self._stop.is_set():
                return "stopped: the agent is stopping", True
            if self.node.pods.get(pod.key) is not pod:
                return "stopped: the pod is gone", True
            readable, _, _ = select.select([conn], [], [], 0)
            if readable:
                if not conn.recv(4096):
                    # the reader shut its side (Ctrl-C): it still reads the rest and the end
                    return "stopped: the reader closed the stream (interrupted)", True
                last_beat = now
            try:
                first = q.get(timeout=IDLE_WAIT_S)
            except queue.Empty:
                continue
            out = bytearray(proto.packet_frame(first.ts_ns + offset, first.wire_len,
                                               first.hook, first.data))
            n = 1
            while len(out) < SEND_CHUNK and not (count and sent + n >= count):
                try:
                    c = q.get_nowait()
                except queue.Empty:
                    break
                out += proto.packet_frame(c.ts_ns + offset, c.wire_len, c.hook, c.data)
                n += 1
            try:
                conn.sendall(out)
            except TimeoutError:
                tally.failed += n
                return f"stopped: the reader did not read for {heartbeat:g} s", False
            except OSError:
                tally.failed += n
                raise
            tally.sent += n


def _send_rest(conn: socket.socket, copies: list[pc.Captured], sent: int,
               timeout: float = proto.DEFAULT_HEARTBEAT_S) -> tuple[int, list[pc.Captured]]:
    """Send `copies` (the end of a capture whose reader is still there)
    in SEND_CHUNK pieces, each within `timeout` seconds: (copies sent in
    all, those not sent: the reader went or stalled)."""
    offset = time.time_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    i = 0
    while i < len(copies):
        out, j = bytearray(), i
        while j < len(copies) and (j == i or len(out) < SEND_CHUNK):
            c = copies[j]
            out += proto.packet_frame(c.ts_ns + offset, c.wire_len, c.hook, c.data)
            j += 1
        try:
            conn.settimeout(timeout)
            conn.sendall(out)
        except OSError:
            break
        sent, i = sent + (j - i), j
    return sent, copies[i:]


def _narrower(function_filter: str, text: str) -> str:
    """What a capture through a packetcapture function copies: its filter,
    narrowed by the reader's (both must match)."""
    if function_filter and text:
        return f"({function_filter}) and ({text})"
    return function_filter or text


def _send_json(conn: socket.socket, obj: Mapping[str, Any]) -> None:
    import json

    conn.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
