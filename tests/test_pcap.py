"""The classic pcap writer (pcn_agent.control.pcap): the exact bytes of its
headers, a round trip through its reader, and tcpdump reading its files."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from bpfunit import ETH_P_IP, IPPROTO_TCP, TCP_SYN, eth, ipv4, tcp

from pcn_agent.control import pcap
from pcn_agent.control.pcap import PcapngWriter, PcapWriter, read_pcap, read_pcapng

TCPDUMP = shutil.which("tcpdump")


def syn(src: str, dst: str, sport: int, dport: int, data: bytes = b"") -> bytes:
    return eth("02:00:00:00:00:02", "02:00:00:00:00:01", ETH_P_IP,
               ipv4(src, dst, IPPROTO_TCP, tcp(src, dst, sport, dport, TCP_SYN, data=data)))


def test_file_and_record_headers() -> None:
    buf = io.BytesIO()
    w = PcapWriter(buf, snaplen=96)
    w.write(1_700_000_000_123_456_789, b"\xaa" * 120, orig_len=1500)
    raw = buf.getvalue()
    assert raw[:24] == struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 96, 1)
    assert raw[24:40] == struct.pack("<IIII", 1_700_000_000, 123_456_789, 96, 1500)
    assert raw[40:] == b"\xaa" * 96
    assert len(raw) == 24 + 16 + 96


def test_round_trip() -> None:
    buf = io.BytesIO()
    w = PcapWriter(buf, snaplen=1000)
    frames = [syn("10.0.0.1", "10.0.0.2", 1000 + i, 80) for i in range(3)]
    for i, f in enumerate(frames):
        w.write(10**18 + i, f)
    buf.seek(0)
    pf = read_pcap(buf)
    assert (pf.snaplen, pf.linktype, pf.nanosecond) == (1000, 1, True)
    assert [(r.ts_ns, r.orig_len, r.data) for r in pf.records] == \
        [(10**18 + i, len(f), f) for i, f in enumerate(frames)]


def test_orig_len_is_never_below_the_captured_length() -> None:
    buf = io.BytesIO()
    PcapWriter(buf, 100).write(0, b"x" * 50, orig_len=10)
    buf.seek(0)
    assert read_pcap(buf).records[0].orig_len == 50


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        PcapWriter(io.BytesIO(), 0)
    with pytest.raises(ValueError):
        PcapWriter(io.BytesIO(), 10).write(-1, b"")
    with pytest.raises(ValueError, match="magic"):
        read_pcap(io.BytesIO(b"\0" * 24))


@pytest.mark.skipif(TCPDUMP is None, reason="tcpdump is not installed (Debian: apt-get install "
                    "tcpdump; make setup installs it); no stand-in reads pcap files here")
def test_tcpdump_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.pcap"
    with path.open("wb") as f:
        w = PcapWriter(f, snaplen=64)
        w.write(1_700_000_000_000_000_001, syn("10.0.0.1", "10.0.0.2", 40000, 80))
        w.write(1_700_000_000_500_000_000, syn("10.0.0.2", "10.0.0.1", 80, 40000,
                                               data=b"y" * 200))
    assert TCPDUMP is not None
    out = subprocess.run([TCPDUMP, "-r", str(path), "-nn", "-tt", "--nano"],
                         capture_output=True, text=True, check=True, timeout=30)
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out
    assert lines[0].startswith("1700000000.000000001 IP 10.0.0.1.40000 > 10.0.0.2.80: Flags [S]")
    # the second frame is cut at the file's snap length, 64 bytes: tcpdump
    # knows from its orig_len that 190 of its IP bytes are missing
    assert lines[1].startswith("1700000000.500000000 IP truncated-ip - 190 bytes missing! "
                               "10.0.0.2.80 > 10.0.0.1.40000: Flags [S]")
    assert "snapshot length 64" in out.stderr


# ----------------------------------------------------------------------------- pcapng
def test_pcapng_blocks() -> None:
    """The exact bytes of draft-ietf-opsawg-pcapng 4.1-4.3: SHB (byte-order
    magic, version 1.0, section length -1), IDB (Ethernet, snaplen, if_name,
    if_tsresol 9), EPB (64-bit timestamp split high/low, data padded to 32
    bits, epb_flags 2: outbound)."""
    buf = io.BytesIO()
    w = PcapngWriter(buf, snaplen=96, if_name="demo/web-1")
    w.write(1_700_000_000_123_456_789, b"\xaa" * 5, orig_len=60, direction=pcap.OUTBOUND)
    raw = buf.getvalue()
    shb = struct.pack("<IIIHHqI", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1, 28)
    assert raw[:28] == shb
    idb_body = (struct.pack("<HHI", 1, 0, 96) + struct.pack("<HH", 2, 10) + b"demo/web-1\0\0"
                + struct.pack("<HHB", 9, 1, 9) + b"\0\0\0" + struct.pack("<HH", 0, 0))
    idb = struct.pack("<II", 1, len(idb_body) + 12) + idb_body + struct.pack(
        "<I", len(idb_body) + 12)
    assert raw[28:28 + len(idb)] == idb
    ts = 1_700_000_000_123_456_789
    epb_body = (struct.pack("<IIIII", 0, ts >> 32, ts & 0xFFFFFFFF, 5, 60) + b"\xaa" * 5
                + b"\0\0\0" + struct.pack("<HHI", 2, 4, 2) + struct.pack("<HH", 0, 0))
    assert raw[28 + len(idb):] == struct.pack("<II", 6, len(epb_body) + 12) + epb_body + \
        struct.pack("<I", len(epb_body) + 12)


def test_pcapng_round_trip_keeps_directions() -> None:
    buf = io.BytesIO()
    w = PcapngWriter(buf, snaplen=1000, if_name="p")
    frames = [syn("10.0.0.1", "10.0.0.2", 1000 + i, 80) for i in range(3)]
    dirs = [pcap.INBOUND, pcap.OUTBOUND, pcap.DIRECTION_UNKNOWN]
    for i, (f, d) in enumerate(zip(frames, dirs, strict=True)):
        w.write(10**18 + i, f, direction=d)
    buf.seek(0)
    pf = read_pcapng(buf)
    assert (pf.snaplen, pf.linktype, pf.if_name, pf.tsresol) == (1000, 1, "p", 9)
    assert [(r.ts_ns, r.orig_len, r.data, r.direction) for r in pf.records] == \
        [(10**18 + i, len(f), f, d) for i, (f, d) in enumerate(zip(frames, dirs, strict=True))]
    with pytest.raises(ValueError, match="pcapng"):
        read_pcapng(io.BytesIO(b"\xd4\xc3\xb2\xa1" + b"\0" * 20))


@pytest.mark.skipif(TCPDUMP is None, reason="tcpdump is not installed (Debian: apt-get install "
                    "tcpdump; make setup installs it); no stand-in reads pcapng files here")
def test_tcpdump_reads_the_pcapng_file(tmp_path: Path) -> None:
    path = tmp_path / "c.pcapng"
    with path.open("wb") as f:
        w = PcapngWriter(f, snaplen=64, if_name="demo/web-1")
        w.write(1_700_000_000_000_000_001, syn("10.0.0.1", "10.0.0.2", 40000, 80),
                direction=pcap.OUTBOUND)
        w.write(1_700_000_000_500_000_000, syn("10.0.0.2", "10.0.0.1", 80, 40000,
                                               data=b"y" * 201), direction=pcap.INBOUND)
    assert TCPDUMP is not None
    out = subprocess.run([TCPDUMP, "-r", str(path), "-nn", "-tt", "--nano"],
                         capture_output=True, text=True, check=True, timeout=30)
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out
    assert lines[0].startswith("1700000000.000000001 IP 10.0.0.1.40000 > 10.0.0.2.80: Flags [S]")
    assert lines[1].startswith("1700000000.500000000 IP truncated-ip - 191 bytes missing! "
                               "10.0.0.2.80 > 10.0.0.1.40000: Flags [S]")
    assert "snapshot length 64" in out.stderr
