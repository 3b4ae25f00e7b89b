"""Control of `bridge` cubes: ports, flooding list, aging, FDB view."""

from __future__ import annotations

import ctypes as ct
import time
from dataclasses import dataclass

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.runtime import PortState, Runtime

TYPE = "bridge"
DEFAULT_AGING_S = 300


@dataclass
class FdbEntry:
    mac: str
    port: str
    age_s: float


class Bridge:
    def __init__(self, rt: Runtime, name: str, aging_s: float = DEFAULT_AGING_S) -> None:
        self.rt = rt
        self.name = name
        if name in rt.cubes:  # adopted from a previous agent
            self.cube = rt.cube(name)
            aging_s = self.cube.config.get("aging_s", aging_s)
        else:
            self.cube = rt.add_cube(name, TYPE)
        self.aging_s = aging_s
        self.cube.config = {"aging_s": aging_s}
        self._cfg = rt.table("bridge_cfgs", TYPE)
        self._fdb = rt.table("bridge_fdb", TYPE)
        self._write_cfg()
        rt.watch_ports(name, lambda _port: self._write_cfg())

    def add_port(self, port_name: str) -> PortState:
        if len(self.cube.ports) >= maps.BRIDGE_MAX_PORTS:
            raise ValueError(f"bridge {self.name} already has {maps.BRIDGE_MAX_PORTS} ports")
        return self.rt.add_port(self.name, port_name)

    def remove_port(self, port_name: str) -> None:
        port = self.rt.port(self.name, port_name)
        self.rt.remove_port(self.name, port_name)
        self._write_cfg()
        self._forget_port(port.id)

    def port(self, port_name: str) -> PortState:
        return self.rt.port(self.name, port_name)

    def fdb(self) -> list[FdbEntry]:
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        names = {pid: pname for pname, pid in self.cube.ports.items()}
        out = []
        for k, v in self._fdb.items():
            if k.cube != self.cube.id:
                continue
            age = (now - v.seen_ns) / 1e9
            if age <= self.aging_s and v.port in names:
                out.append(FdbEntry(maps.mac_str(k.mac), names[v.port], age))
        return out

    def delete(self) -> None:
        for port_id in list(self.cube.ports.values()):
            self._forget_port(port_id)
        del self._cfg[ct.c_uint32(self.cube.id)]
        self.rt.remove_cube(self.name)

    def _forget_port(self, port_id: int) -> None:
        for k, v in list(self._fdb.items()):
            if k.cube == self.cube.id and v.port == port_id:
                del self._fdb[k]

    def _write_cfg(self) -> None:
        cfg = maps.BridgeCfg()
        cfg.aging_ns = int(self.aging_s * 1e9)
        n = 0
        for pid in sorted(self.cube.ports.values()):
            port = self.rt.ports.get(pid)
            if port is None:
                continue  # being added: the runtime writes it next
            if port.peer_kind == maps.PEER_PORT:
                if cfg.cube_port and cfg.cube_port != pid:
                    raise ValueError(f"bridge {self.name}: only one port may peer with another "
                                     "cube (flooding gives it the original packet)")
                cfg.cube_port = pid
            elif port.peer_kind == maps.PEER_NETDEV:
                cfg.ports[n] = pid
                cfg.ifindex[n] = port.peer
                n += 1
        cfg.n_ports = n
        self._cfg[ct.c_uint32(self.cube.id)] = cfg
