"""`pcn-agent capture` and `pcn-agent flows`: commands of the agent's image
that ask the node's agent (its local API socket, PCN_SOCKET) for a pod's
packets or flows. `kubectl pcn capture|flows` runs them in the node's
pcn-agent pod with `kubectl exec` (as `kubectl sniff` runs tcpdump in a
pod), or, in the emulated lab, next to the lab's agents.

capture writes pcapng (nanosecond timestamps, LINKTYPE_ETHERNET, each
packet marked inbound, to the pod, or outbound, from it: pcn_agent.control.
pcap) or with --format pcap a classic pcap (no direction) to stdout or
-w FILE, and progress to stderr; it heartbeats the agent while
it reads, so a capture whose reader dies stops by itself. flows prints the
agent's JSON answer, and on stderr what the agent is busy with while it
waits for it (a new flow monitor compiles for a few seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
from typing import BinaryIO

from pcn_agent.cni import localapi
from pcn_agent.control import captureproto as proto
from pcn_agent.control import pcap

DEFAULT_SOCKET = "/run/pcn/agent.sock"
FORMATS = ("pcapng", "pcap")
# the direction of a copy as pcapng's epb_flags says it, from the pod's view
# (its interface): what it receives is inbound, what it sends outbound
_EPB_DIRECTION = {proto.HOOK_TO_POD: pcap.INBOUND, proto.HOOK_FROM_POD: pcap.OUTBOUND}


def _socket_path(args: argparse.Namespace) -> str:
    return str(args.socket or os.environ.get("PCN_SOCKET") or DEFAULT_SOCKET)


def _pod_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("pod", help="the pod's name")
    ap.add_argument("-n", "--namespace", default="default", help="the pod's namespace")
    ap.add_argument("--socket", help=f"the agent's local API socket (default: $PCN_SOCKET or "
                                     f"{DEFAULT_SOCKET})")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pcn-agent", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("capture", help="capture a pod's packets as pcap")
    _pod_args(c)
    c.add_argument("-f", "--filter", default="", help="tcpdump-like filter (pcn_crds.capfilter)")
    c.add_argument("-c", "--count", type=int, default=0, help="stop after N packets (0: no)")
    c.add_argument("--duration", type=float, default=0, help="stop after S seconds (0: no)")
    c.add_argument("-s", "--snaplen", type=int, default=8192, help="bytes kept of each frame")
    c.add_argument("--budget", type=int, default=2000, help="frames copied a second, at most")
    c.add_argument("--heartbeat", type=float, default=proto.DEFAULT_HEARTBEAT_S,
                   help="the agent stops the capture after S seconds without a heartbeat")
    c.add_argument("-w", "--write", default="-", help="capture file ('-': stdout)")
    c.add_argument("--format", choices=FORMATS, default="pcapng",
                   help="pcapng (default: each packet marked inbound, to the pod, or "
                        "outbound, from it) or classic pcap (no direction)")
    c.add_argument("-v", "--verbose", action="store_true",
                   help="one line per packet on stderr: time, direction, length")
    c.add_argument("--stop-on-stdin-eof", action="store_true",
                   help="end the capture when stdin closes (kubectl exec -i: the user's "
                        "kubectl pcn went away)")
    f = sub.add_parser("flows", help="the flows of a pod from the flow monitors on its chain")
    _pod_args(f)
    return ap


def _connect(path: str, request: dict[str, object]) -> tuple[socket.socket, proto.StreamReader]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise localapi.AgentUnavailable(f"no pcn agent answers on {path}: {exc}") from None
    sock.sendall(json.dumps(request).encode() + b"\n")
    return sock, proto.StreamReader(sock)


def accounting(stats: dict[str, int]) -> str:
    """The end line's account of what the capture's cube matched, from the
    agent's stats (pcn_agent.control.observe.capture_stats), which partition
    it: matched == captured + notCopied + lost. "" without them (a capture
    point deleted during the capture)."""
    if "matched" not in stats:
        return ""
    why_not = [f"{stats['rateLimited']} over the rate bound" if stats.get("rateLimited") else "",
               f"{stats['pastCount']} past -c" if stats.get("pastCount") else ""]
    why_lost = [f"{stats['ringFull']} for a full ring buffer" if stats.get("ringFull") else "",
                f"{stats['queueFull']} for a full agent queue" if stats.get("queueFull") else "",
                f"{stats['unsent']} not sent before the reader went" if stats.get("unsent")
                else ""]
    not_copied = "; ".join(w for w in why_not if w)
    lost = "; ".join(w for w in why_lost if w)
    return (f"; of the {stats['matched']} packets the filter matched, {stats['captured']} "
            f"were captured, {stats['notCopied']} not copied"
            f"{f' ({not_copied})' if not_copied else ''} and {stats['lost']} lost"
            f"{f' ({lost})' if lost else ''}")


def capture(args: argparse.Namespace, out: BinaryIO | None = None) -> int:
    request: dict[str, object] = {
        "op": proto.OP, "namespace": args.namespace, "pod": args.pod, "filter": args.filter,
        "snaplen": args.snaplen, "budget": args.budget, "count": args.count,
        "duration": args.duration, "heartbeat": args.heartbeat}
    try:
        sock, reader = _connect(_socket_path(args), request)
    except localapi.LocalApiError as exc:
        print(f"pcn-agent capture: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    try:
        head = json.loads(reader.line())
        while "progress" in head and "ok" not in head:
            print(f"pcn-agent capture: {head['progress']}", file=sys.stderr, flush=True)
            head = json.loads(reader.line())
        if not head.get("ok"):
            print(f"pcn-agent capture: {head.get('error')}", file=sys.stderr)
            return 1
        # the agent answers once its capture cube copies packets, not before
        if head.get("function"):  # the pod's packetcapture NetworkFunction
            sides = head.get("sides") or []
            only = "" if len(sides) == 2 else \
                f"; it sits on one side: only packets {' '.join(sides)}"
            print(f"capturing {head['pod']} on node {head['node']} through its capture "
                  f"point {head['function']} (filter {head.get('filter', '')!r}, snaplen "
                  f"{head['snaplen']}, at most {head['budget']} packets/s{only})",
                  file=sys.stderr, flush=True)
        else:
            print(f"capturing {head['pod']} on node {head['node']} (filter {args.filter!r}, "
                  f"snaplen {head['snaplen']}, at most {head['budget']} packets/s)",
                  file=sys.stderr, flush=True)

        def beat() -> None:
            while not stop.wait(max(0.05, args.heartbeat / 3)):
                try:
                    sock.sendall(proto.HEARTBEAT)
                except OSError:
                    return

        threading.Thread(target=beat, name="heartbeat", daemon=True).start()
        if args.stop_on_stdin_eof:
            def watch_stdin() -> None:
                try:
                    while os.read(sys.stdin.fileno(), 4096):
                        pass
                except (OSError, ValueError):
                    pass
                stop.set()
                try:
                    sock.shutdown(socket.SHUT_WR)  # the agent ends the capture, sends its end
                except OSError:
                    pass

            threading.Thread(target=watch_stdin, name="stdin", daemon=True).start()
        own = out is None and args.write != "-"
        stream: BinaryIO = out if out is not None else (
            open(args.write, "wb") if own else sys.stdout.buffer)  # noqa: SIM115
        try:
            writer: pcap.CaptureWriter = (
                pcap.PcapngWriter(stream, int(head["snaplen"]), if_name=str(head["pod"]))
                if args.format == "pcapng" else pcap.PcapWriter(stream, int(head["snaplen"])))
            writer.flush()
            by_dir = {d: 0 for d in proto.DIRECTIONS.values()}
            while True:
                item = reader.next()
                if isinstance(item, dict):
                    print(f"{writer.packets} packets captured ({by_dir['from-pod']} from the "
                          f"pod, {by_dir['to-pod']} to it); {item.get('reason')}"
                          f"{accounting(item.get('stats') or {})}", file=sys.stderr, flush=True)
                    return 0
                writer.write(item.ts_ns, item.data, item.wire_len,
                             _EPB_DIRECTION.get(item.hook, pcap.DIRECTION_UNKNOWN))
                writer.flush()
                by_dir[item.direction] = by_dir.get(item.direction, 0) + 1
                if args.verbose:
                    print(f"{item.ts_ns / 1e9:.9f} {item.direction:8} {item.wire_len} bytes",
                          file=sys.stderr, flush=True)
        finally:
            if own:
                stream.close()
    except BrokenPipeError:
        return 0  # the pcap's reader (a pipe) went: so does the capture
    except EOFError as exc:
        print(f"pcn-agent capture: {exc}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        sock.close()


def flows(args: argparse.Namespace) -> int:
    try:
        # progress ("waiting for the agent ...: a flow monitor compiles") on
        # stderr, ending in "...", which kubectl pcn flows relays as it comes
        answer = localapi.call(
            _socket_path(args), {"op": "flows", "namespace": args.namespace, "pod": args.pod},
            progress=lambda text: print(f"pcn-agent flows: {text}...", file=sys.stderr,
                                        flush=True))
    except localapi.LocalApiError as exc:
        print(f"pcn-agent flows: {exc}", file=sys.stderr)
        return 1
    answer.pop("ok", None)
    print(json.dumps(answer, indent=1, sort_keys=True))
    return 0


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.command == "capture":
        try:
            return capture(args)
        except KeyboardInterrupt:
            return 130
    return flows(args)
