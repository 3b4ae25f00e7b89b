"""CubeTypes on this node: compile each version once, put it in its program
slot when it compiled, and say what happened (the CubeType's status.nodes
entry of this node).

- A version is the spec's source, parameters and counters; a change of any
  recompiles. A version that does not compile, or that the verifier refuses,
  or whose parameter schema is outside the restriction, touches nothing of
  the data path: the version before it (if any) stays in its slot and its
  functions keep running; status lists the errors at the source's lines.
- A version that compiles replaces the previous one in the type's
  program-array slot in one update (Runtime.install_program).
- Deletion, without a finalizer: a deleted CubeType whose cubes still run
  on this node stays loaded, the data path as it was, and its
  NetworkFunctions say so in their status (reason CubeTypeDeleted) until
  they are deleted; then it is unloaded. No finalizer: every node's agent
  would have to remove its own, and a node that is gone would keep the
  object forever.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from pcn_agent.control.reconcile import CubeTypeInfo
from pcn_agent.dataplane.cubes.custom import PROGRAM, CubeBuildError, build, runtime_type
from pcn_agent.dataplane.runtime import Runtime
from pcn_crds.cubetype import (
    MAX_ERRORS,
    RESERVED_NAMES,
    CubeTypeSpec,
    Param,
    SchemaError,
    reserved_name_message,
)

log = logging.getLogger(__name__)

Obj = Mapping[str, Any]


@dataclass
class TypeState:
    """One CubeType on this node."""

    name: str
    version: str = ""  # the last version tried (source, parameters, counters)
    generation: int | None = None  # its metadata.generation
    compiled: bool = False  # the last version tried compiled and is in force
    ready: bool = False  # some version is in its slot
    errors: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""
    params: tuple[Param, ...] = ()  # of the version in force
    counters: tuple[str, ...] = ()
    deleted: bool = False

    def info(self) -> CubeTypeInfo:
        return CubeTypeInfo(self.ready, self.params, self.counters, self.deleted,
                            self.message if not self.compiled else "")

    def node_status(self, used_by: list[str]) -> dict[str, Any]:
        """This node's entry in the CubeType's status.nodes."""
        return {"ready": self.compiled, "compiled": self.compiled, "pods": 0,
                "message": self.message, "errors": self.errors[:MAX_ERRORS],
                "usedBy": used_by}


class CubeTypes:
    def __init__(self) -> None:
        self.states: dict[str, TypeState] = {}

    def sync(self, rt: Runtime, objects: Iterable[Obj], in_use: set[str]) -> bool:
        """Compile the CubeTypes among `objects` whose version changed, and
        mark or unload those gone (`in_use`: runtime types cubes still run).
        Slow (a BCC compile per changed type): run it off the event loop.
        True when some state changed."""
        changed = False
        seen: set[str] = set()
        for obj in objects:
            name = str((obj.get("metadata") or {}).get("name") or "")
            if not name:
                continue
            seen.add(name)
            st = self.states.setdefault(name, TypeState(name))
            if st.deleted:
                st.deleted, changed = False, True
            changed |= self._one(rt, st, obj)
        for name in list(self.states.keys() - seen):
            st = self.states[name]
            if runtime_type(name) in in_use:
                if not st.deleted:
                    st.deleted, changed = True, True
                    log.info("CubeType %s deleted; its cubes stay until their functions go", name)
                continue
            self._unload(rt, name)
            changed = True
        return changed

    def release_unused(self, rt: Runtime, in_use: set[str]) -> None:
        """Unload deleted types whose last cube went."""
        for name, st in list(self.states.items()):
            if st.deleted and runtime_type(name) not in in_use:
                self._unload(rt, name)

    def _unload(self, rt: Runtime, name: str) -> None:
        try:
            rt.remove_type(runtime_type(name))
        except Exception:
            log.exception("could not unload CubeType %s", name)
            return
        del self.states[name]
        log.info("CubeType %s unloaded", name)

    def _one(self, rt: Runtime, st: TypeState, obj: Obj) -> bool:
        spec = obj.get("spec") or {}
        version = json.dumps([spec.get("source"), spec.get("parameters"), spec.get("counters")],
                             sort_keys=True)
        generation = (obj.get("metadata") or {}).get("generation")
        if version == st.version:
            if generation != st.generation:
                st.generation = generation  # a description or hook edit
                return True
            return False
        st.version, st.generation = version, generation
        st.compiled, st.errors = False, []
        if st.name in RESERVED_NAMES:
            return self._failed(st, "name", reserved_name_message(st.name))
        try:  # the spec only: the status the agents write is no reason to refuse it
            ct = CubeTypeSpec.model_validate(dict(spec))
        except ValidationError as exc:
            return self._failed(st, "schema", "; ".join(
                f"spec.{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
                for e in exc.errors()[:5]))
        try:
            built = build(rt, st.name, ct.source, ct.parameters, ct.counters)
        except SchemaError as exc:
            st.errors = [{"stage": "schema", "message": e} for e in exc.errors]
            st.message = f"spec.parameters is outside what a cube can take: {exc.errors[0]}"
            return True
        except CubeBuildError as exc:
            st.errors = [d.as_status() for d in exc.diagnostics]
            first = exc.diagnostics[0]
            where = f"line {first.line}: " if first.line is not None else ""
            st.message = f"{'did not compile' if first.stage == 'compile' else 'the verifier refused it'}" \
                         f": {where}{first.message}"
            log.warning("CubeType %s: %s", st.name, st.message)
            return True
        except Exception as exc:  # never a reason for the agent to stop
            log.exception("CubeType %s could not be built", st.name)
            return self._failed(st, "compile", f"{type(exc).__name__}: {exc}")
        try:
            rt.install_program(runtime_type(st.name), built.module, built.fd, PROGRAM)
        except Exception as exc:
            built.module.cleanup()
            log.exception("CubeType %s could not be installed", st.name)
            return self._failed(st, "compile", f"could not install the program: {exc}")
        st.compiled = st.ready = True
        st.params, st.counters = built.params, built.counters
        st.message = "compiled"
        log.info("CubeType %s compiled and installed", st.name)
        return True

    def _failed(self, st: TypeState, stage: str, message: str) -> bool:
        st.errors = [{"stage": stage, "message": message}]
        st.message = message
        return True

    def infos(self) -> dict[str, CubeTypeInfo]:
        return {name: st.info() for name, st in self.states.items()}
