"""A classic pcap writer (and reader, for tests and tools), standard library
only.

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
from typing import BinaryIO

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

    def write(self, ts_ns: int, data: bytes, orig_len: int | None = None) -> None:
        """One packet: `ts_ns` nanoseconds since the Unix epoch (UTC),
        `data` its captured bytes (cut to snaplen here), `orig_len` its
        length on the wire (default: len(data))."""
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
