"""Capture file writers (and readers, for tests and tools), standard
library only: pcapng (the default of `pcn-agent capture`, since it marks
each packet's direction) and classic pcap.

pcapng: draft-ietf-opsawg-pcapng ("PCAP Next Generation Dump File Format").
This writer writes one section, little-endian: a Section Header Block (4.1),
one Interface Description Block (4.2) for the pod's port, LINKTYPE_ETHERNET,
with if_name (the pod), if_tsresol 9 (timestamps in nanoseconds) and the
snap length, then per packet an Enhanced Packet Block (4.3) whose epb_flags
option (4.3.1) says inbound (the pod received it) or outbound (the pod sent
it), as on the pod's own interface. tcpdump -r (libpcap >= 1.1) and
Wireshark (frame.flags.direction) read it.

Format: the libpcap file format as documented in
draft-ietf-opsawg-pcap ("PCAP Capture File Format") and pcap-savefile(5):
a 24-byte file header, then per packet a 16-byte record header and the
captured bytes. This writer uses the nanosecond variant (magic 0xa1b23c4d:
the second field of a record's timestamp is nanoseconds), version 2.4,
LINKTYPE_ETHERNET (1), little-endian (a reader knows the byte order from
the magic). tcpdump and Wireshark read it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

MAGIC_NS = 0xA1B23C4D
MAGIC_US = 0xA1B2C3D4
VERSION = (2, 4)
LINKTYPE_ETHERNET = 1
_FILE_HDR = struct.Struct("<IHHiIII")  # magic, major, minor, thiszone, sigfigs, snaplen, linktype
_REC_HDR = struct.Struct("<IIII")  # ts_sec, ts_nsec, incl_len, orig_len


class PcapWriter:
    """Write packets to `out` (a binary stream: a file, sys.stdout.buffer).
    `snaplen` is the largest `incl_len` of the file, bytes."""

    def __init__(self, out: BinaryIO, snaplen: int, linktype: int = LINKTYPE_ETHERNET) -> None:
        if not 1 <= snaplen <= 0x7FFFFFFF:
            raise ValueError(f"snaplen {snaplen} out of range")
        self.out = out
        self.snaplen = snaplen
        self.packets = 0
        out.write(_FILE_HDR.pack(MAGIC_NS, *VERSION, 0, 0, snaplen, linktype))

    def write(self, ts_ns: int, data: bytes, orig_len: int | None = None,
              direction: int = 0) -> None:
        """One packet: `ts_ns` nanoseconds since the Unix epoch (UTC),
        `data` its captured bytes (cut to snaplen here), `orig_len` its
        length on the wire (default: len(data)); classic pcap has no place
        for its `direction`."""
        if ts_ns < 0:
            raise ValueError("a pcap timestamp cannot be before 1970")
        data = data[: self.snaplen]
        orig = len(data) if orig_len is None else max(orig_len, len(data))
        sec, nsec = divmod(ts_ns, 1_000_000_000)
        self.out.write(_REC_HDR.pack(sec & 0xFFFFFFFF, nsec, len(data), orig) + data)
        self.packets += 1

    def flush(self) -> None:
        self.out.flush()


@dataclass(frozen=True)
class PcapRecord:
    ts_ns: int
    orig_len: int
    data: bytes


@dataclass(frozen=True)
class PcapFile:
    snaplen: int
    linktype: int
    nanosecond: bool
    records: list[PcapRecord]


def read_pcap(f: BinaryIO) -> PcapFile:
    """Read a classic pcap file of either byte order and either resolution."""
    head = f.read(_FILE_HDR.size)
    if len(head) != _FILE_HDR.size:
        raise ValueError("not a pcap file: shorter than its header")
    (magic,) = struct.unpack("<I", head[:4])
    order = "<"
    if magic not in (MAGIC_NS, MAGIC_US):
        (magic,) = struct.unpack(">I", head[:4])
        order = ">"
        if magic not in (MAGIC_NS, MAGIC_US):
            raise ValueError(f"not a pcap file: magic {head[:4].hex()}")
    _m, _maj, _min, _zone, _sig, snaplen, linktype = struct.unpack(order + "IHHiIII", head)
    ns = magic == MAGIC_NS
    rec = struct.Struct(order + "IIII")
    return PcapFile(snaplen, linktype, ns, list(_records(f, rec, ns)))


def _records(f: BinaryIO, rec: struct.Struct, ns: bool) -> Iterator[PcapRecord]:
    while True:
        head = f.read(rec.size)
        if not head:
            return
        if len(head) != rec.size:
            raise ValueError("pcap file ends inside a record header")
        sec, frac, incl, orig = rec.unpack(head)
        data = f.read(incl)
        if len(data) != incl:
            raise ValueError("pcap file ends inside a record")
        yield PcapRecord(sec * 1_000_000_000 + (frac if ns else frac * 1000), orig, data)


# ----------------------------------------------------------------------------- pcapng
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_IDB = 0x00000001
PCAPNG_EPB = 0x00000006
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D
OPT_ENDOFOPT = 0
IF_NAME = 2
IF_TSRESOL = 9
EPB_FLAGS = 2
# epb_flags bits 0-1 (draft-ietf-opsawg-pcapng 4.3.1): the packet's direction
DIRECTION_UNKNOWN = 0
INBOUND = 1
OUTBOUND = 2


class CaptureWriter(Protocol):
    """What `pcn-agent capture` writes packets with (PcapWriter, PcapngWriter)."""

    packets: int

    def write(self, ts_ns: int, data: bytes, orig_len: int | None = None,
              direction: int = DIRECTION_UNKNOWN) -> None: ...

    def flush(self) -> None: ...


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad4(value)


def _block(kind: int, body: bytes) -> bytes:
    """A pcapng block: type, total length, body (padded to 32 bits), total length."""
    body = _pad4(body)
    n = len(body) + 12
    return struct.pack("<II", kind, n) + body + struct.pack("<I", n)


class PcapngWriter:
    """Write a pcapng section to `out`: one Ethernet interface named
    `if_name` with nanosecond timestamps and snap length `snaplen` (bytes),
    then one Enhanced Packet Block per packet with its direction."""

    def __init__(self, out: BinaryIO, snaplen: int, if_name: str = "",
                 linktype: int = LINKTYPE_ETHERNET) -> None:
        if not 1 <= snaplen <= 0x7FFFFFFF:
            raise ValueError(f"snaplen {snaplen} out of range")
        self.out = out
        self.snaplen = snaplen
        self.packets = 0
        # section length -1: not given (the file is a stream)
        shb = struct.pack("<IHHq", PCAPNG_BYTE_ORDER_MAGIC, 1, 0, -1)
        opts = (_option(IF_NAME, if_name.encode()) if if_name else b"") + \
            _option(IF_TSRESOL, bytes([9])) + _option(OPT_ENDOFOPT, b"")
        idb = struct.pack("<HHI", linktype, 0, snaplen) + opts
        out.write(_block(PCAPNG_SHB, shb) + _block(PCAPNG_IDB, idb))

    def write(self, ts_ns: int, data: bytes, orig_len: int | None = None,
              direction: int = DIRECTION_UNKNOWN) -> None:
        """One packet: `ts_ns` nanoseconds since the Unix epoch (UTC),
        `data` its captured bytes (cut to snaplen here), `orig_len` its
        length on the wire (default: len(data)), `direction` INBOUND,
        OUTBOUND or DIRECTION_UNKNOWN."""
        if ts_ns < 0:
            raise ValueError("a timestamp cannot be before 1970")
        data = data[: self.snaplen]
        orig = len(data) if orig_len is None else max(orig_len, len(data))
        body = struct.pack("<IIIII", 0, (ts_ns >> 32) & 0xFFFFFFFF, ts_ns & 0xFFFFFFFF,
                           len(data), orig) + _pad4(data)
        if direction:
            body += _option(EPB_FLAGS, struct.pack("<I", direction)) + _option(OPT_ENDOFOPT, b"")
        self.out.write(_block(PCAPNG_EPB, body))
        self.packets += 1

    def flush(self) -> None:
        self.out.flush()


@dataclass(frozen=True)
class PcapngRecord:
    ts_ns: int
    orig_len: int
    data: bytes
    direction: int  # epb_flags bits 0-1 (DIRECTION_UNKNOWN without the option)


@dataclass(frozen=True)
class PcapngFile:
    snaplen: int
    linktype: int
    if_name: str
    tsresol: int  # if_tsresol as written (9: nanoseconds; 6 when absent)
    records: list[PcapngRecord]


def read_pcapng(f: BinaryIO) -> PcapngFile:
    """Read a little-endian pcapng section of one interface whose
    if_tsresol is a power of 10 (what PcapngWriter writes); ValueError
    when it is not one."""
    data = f.read()
    pos, snaplen, linktype, name, tsresol = 0, 0, -1, "", 6
    records = []
    while pos < len(data):
        if len(data) - pos < 12:
            raise ValueError("pcapng file ends inside a block header")
        kind, n = struct.unpack_from("<II", data, pos)
        if n < 12 or n % 4 or pos + n > len(data):
            raise ValueError(f"pcapng block at {pos}: bad total length {n}")
        body = data[pos + 8:pos + n - 4]
        if struct.unpack_from("<I", data, pos + n - 4)[0] != n:
            raise ValueError(f"pcapng block at {pos}: trailing length differs")
        if pos == 0 and (kind != PCAPNG_SHB or struct.unpack_from("<I", body)[0]
                         != PCAPNG_BYTE_ORDER_MAGIC):
            raise ValueError("not a little-endian pcapng file")
        if kind == PCAPNG_IDB:
            linktype, _r, snaplen = struct.unpack_from("<HHI", body)
            for code, value in _options(body[8:]):
                if code == IF_NAME:
                    name = value.decode(errors="replace")
                elif code == IF_TSRESOL:
                    tsresol = value[0]
        elif kind == PCAPNG_EPB:
            _if, hi, lo, caplen, orig = struct.unpack_from("<IIIII", body)
            ts = (hi << 32) | lo
            packet = body[20:20 + caplen]
            direction = DIRECTION_UNKNOWN
            for code, value in _options(body[20 + caplen + (-caplen % 4):]):
                if code == EPB_FLAGS:
                    direction = struct.unpack("<I", value)[0] & 3
            records.append(PcapngRecord(ts * 10 ** (9 - tsresol) if tsresol <= 9 else
                                        ts // 10 ** (tsresol - 9), orig, packet, direction))
        pos += n
    return PcapngFile(snaplen, linktype, name, tsresol, records)


def _options(raw: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(raw):
        code, n = struct.unpack_from("<HH", raw, pos)
        if code == OPT_ENDOFOPT:
            return
        yield code, raw[pos + 4:pos + 4 + n]
        pos += 4 + n + (-n % 4)
