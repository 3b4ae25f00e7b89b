"""Frame builders for the tests and benchmarks that hand frames to
BPF_PROG_TEST_RUN: Ethernet, IPv4 (RFC 791, no options, DF) and TCP/UDP
(RFC 793/768) with their checksums (RFC 1071) computed."""

from __future__ import annotations

import socket
import struct

ETH_P_IP = 0x0800
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP = 1, 6, 17, 132
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def mac_b(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def mac_s(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def ip_b(ip: str) -> bytes:
    return socket.inet_aton(ip)


def ip_s(raw: bytes) -> str:
    return socket.inet_ntoa(raw)


def inet_csum(data: bytes) -> int:
    """RFC 1071 checksum; 0 when computed over data that holds a valid checksum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def eth(dst: str, src: str, ethertype: int, payload: bytes, pad: bool = True) -> bytes:
    """An Ethernet frame; padded to the 60-byte minimum unless `pad` is False
    (a veth delivers short frames unpadded: only the IP length tells where
    the datagram ends)."""
    frame = mac_b(dst) + mac_b(src) + struct.pack("!H", ethertype) + payload
    return frame.ljust(60, b"\0") if pad else frame  # minimum Ethernet frame without FCS


def ipv4(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64,
         ident: int = 0x1234) -> bytes:
    """An IPv4 packet (no options, DF set) carrying `payload`, header checksum right."""
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, ttl, proto, 0,
                      ip_b(src), ip_b(dst))
    csum = inet_csum(hdr)
    return hdr[:10] + struct.pack("!H", csum) + hdr[12:] + payload


def pseudo_header(src: str, dst: str, proto: int, length: int) -> bytes:
    return ip_b(src) + ip_b(dst) + struct.pack("!BBH", 0, proto, length)


def tcp(src: str, dst: str, sport: int, dport: int, flags: int = TCP_SYN, seq: int = 1000,
        ack: int = 0, window: int = 64240, data: bytes = b"") -> bytes:
    """A TCP segment (no options) with its checksum over the pseudo header of
    `src` -> `dst`."""
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, window, 0, 0) + data
    csum = inet_csum(pseudo_header(src, dst, IPPROTO_TCP, len(seg)) + seg)
    return seg[:16] + struct.pack("!H", csum) + seg[18:]


def udp_csum(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    """A UDP datagram with its checksum (0 is sent as 0xffff, RFC 768)."""
    dgram = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    csum = inet_csum(pseudo_header(src, dst, IPPROTO_UDP, len(dgram)) + dgram) or 0xFFFF
    return dgram[:6] + struct.pack("!H", csum) + dgram[8:]
