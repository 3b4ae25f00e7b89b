"""Custom cubes: CubeTypes (pcn_crds.cubetype) a cluster admin registers.

A CubeType's C source defines `pcn_cube_handle` against the cube API
(bpf/include/pcn_cube_api.h); `wrap()` puts it, unchanged, between the API
and a transparent cube's program (`pcn_cube_rx`), the shape of
bpf/policer.c: find the instance's parameters, call the function, pass the
packet along the chain or drop it. `build()` compiles that text with BCC
and loads it; a failure raises CubeBuildError with the diagnostics at the
lines of the user's source (`compile_errors`, `verifier_errors` map the
wrapped text's lines back) and touches nothing of the data path.
`Runtime.install_program` then puts the program in the type's program-array
slot: one map update, so every instance on every pod switches to the new
program between two packets.

An instance (CustomFunction) is one map value of parameter words
(pcn_cube_params, keyed by instance id) and PCN_CUBE_MAX_COUNTERS per-CPU
counters (pcn_cube_ctrs); both tables are declared by the API header and
created with the entry module (bpf/entry.c includes it).
"""

from __future__ import annotations

import ctypes as ct
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pcn_agent.dataplane import maps
from pcn_agent.dataplane.compiler import (
    BpfModule,
    CompileError,
    SourceCompileError,
    compile_source,
    inline_headers,
)
from pcn_agent.dataplane.cubes.functions import FunctionCube
from pcn_agent.dataplane.runtime import Runtime
from pcn_crds.common import Model
from pcn_crds.cubetype import (
    MAX_COUNTERS,
    MAX_ERRORS,
    MAX_PARAMS,
    Param,
    ParamValue,
    c_defines,
    encode,
    param_layout,
    param_property,
)

PREFIX = "cubetype."  # runtime type name of CubeType NAME: cubetype.NAME
PROGRAM = "pcn_cube_rx"
HANDLER = "pcn_cube_handle"

_DIAG = re.compile(r"^/virtual/main\.c:(\d+):(\d+): (?:fatal )?error: (.*)$")
_DID_YOU_MEAN = re.compile(r"^/virtual/main\.c:\d+:\d+: note: (did you mean '[^']+'\?)$")
_VERIFIER_LINE = re.compile(r"^; (.*) @ main\.c:(\d+)$")


def runtime_type(name: str) -> str:
    """The runtime's type name of CubeType `name`."""
    return PREFIX + name


def is_custom(type_name: str) -> bool:
    return type_name.startswith(PREFIX)


@dataclass(frozen=True)
class Diagnostic:
    """A compiler or verifier error at a line of the user's source (None:
    outside it), as CubeType status lists it."""

    stage: str  # compile or verify
    line: int | None
    column: int | None
    message: str

    def as_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stage": self.stage, "message": self.message}
        if self.line is not None:
            out["line"] = self.line
        if self.column is not None:
            out["column"] = self.column
        return out


class CubeBuildError(CompileError):
    """A CubeType that did not compile or load; `diagnostics` says where."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        super().__init__("; ".join(
            (f"line {d.line}: " if d.line is not None else "") + d.message for d in diagnostics))
        self.diagnostics = diagnostics


@dataclass(frozen=True)
class Wrapped:
    """The text BCC compiles: `first_line` is the line of the wrapped text
    (1-based) holding the user's line 1; the user's source has `lines`."""

    text: str
    first_line: int
    lines: int

    def user_line(self, line: int) -> int | None:
        """The user's line of wrapped line `line`, None outside the source."""
        n = line - self.first_line + 1
        return n if 1 <= n <= self.lines else None


def wrap(source: str, params: Sequence[Param], counters: Sequence[str]) -> Wrapped:
    """The user's source, as given, between the cube API with the
    parameters' and counters' #defines (names and indexes only) and the
    transparent cube program that calls it."""
    prelude = inline_headers('#include "pcn_cube_api.h"\n', "the cube API") + "\n" + \
        c_defines(tuple(params), list(counters)) + "\n" + \
        "/* the user's function, inlined into the program below */\n" + \
        f"static __always_inline int {HANDLER}(struct __sk_buff *skb, struct pcn_cube_ctx *ctx);\n"
    body = source if source.endswith("\n") else source + "\n"
    program = f"""
int {PROGRAM}(struct __sk_buff *skb)
{{
    struct pcn_cube_ctx ctx = {{}};
    ctx.instance = pcn_meta_instance(skb);
    ctx.params = pcn_cube_params.lookup(&ctx.instance);
    if (!ctx.params)
        return pcn_pass(skb); /* an instance being created or deleted */
    ctx.port = pcn_meta_port(skb);
    ctx.direction = pcn_meta_hook(skb) == PCN_HOOK_EGRESS ? PCN_CUBE_TO_POD : PCN_CUBE_FROM_POD;
    if ({HANDLER}(skb, &ctx) == PCN_CUBE_DROP)
        return pcn_filter_drop(skb, PCN_DROP_FILTERED);
    return pcn_pass(skb);
}}
"""
    first = prelude.count("\n") + 1
    return Wrapped(prelude + body + program, first, body.count("\n"))


def compile_errors(output: str, wrapped: Wrapped) -> list[Diagnostic]:
    """clang's errors in BCC's output ("/virtual/main.c:LINE:COL: error:
    MSG"), at the user's lines; an error outside the source (in the wrapper:
    most often a missing or misdeclared pcn_cube_handle) has no line and says
    so. Warnings and notes are left out, but for clang's spelling
    suggestion ("note: did you mean 'pcn_cube_param'?"), which is added to
    the error before it; at most MAX_ERRORS."""
    out: list[Diagnostic] = []
    for raw in output.splitlines():
        m = _DIAG.match(raw.strip())
        if not m:
            hint = _DID_YOU_MEAN.match(raw.strip())
            if hint and out and "did you mean" not in out[-1].message:
                d = out[-1]
                out[-1] = Diagnostic(d.stage, d.line, d.column, f"{d.message} ({hint.group(1)})")
            continue
        line = wrapped.user_line(int(m.group(1)))
        msg = m.group(3)
        if line is None:
            msg = f"{msg} (in the code pcn wraps the source with: does the source define " \
                  f"static int {HANDLER}(struct __sk_buff *skb, struct pcn_cube_ctx *ctx)?)"
        out.append(Diagnostic("compile", line, int(m.group(2)) if line else None, msg))
    return out[:MAX_ERRORS] or [Diagnostic("compile", None, None, _last_lines(output))]


def verifier_errors(output: str, wrapped: Wrapped) -> list[Diagnostic]:
    """The verifier's refusal in its log, at the user's line of the last
    instruction it annotated ("; <source text> @ main.c:N"). N counts lines
    of the text BCC rewrote, which gains lines of its own (map declarations
    expand), so N is not the wrapped text's line: the annotated text is
    looked up in the user's source; when it is there more than once, the
    one nearest to N less the offset the other annotations of the source's
    region show is taken."""
    lines = output.splitlines()
    notes = [(i, m.group(1).strip(), int(m.group(2))) for i, raw in enumerate(lines)
             if (m := _VERIFIER_LINE.match(raw.strip()))]
    wrapped_lines = [x.strip() for x in wrapped.text.splitlines()]
    user_first = wrapped.first_line
    offsets: Counter[int] = Counter()
    for _, text, n in notes:
        at = [i + 1 for i, x in enumerate(wrapped_lines) if x == text]
        if len(at) == 1 and at[0] >= user_first:  # the source's region and after
            offsets[n - at[0]] += 1
    message_lines = [x for x in lines[notes[-1][0] + 1:] if x.strip()] if notes else lines
    message = "; ".join(x.strip() for x in message_lines
                        if not re.match(r"^\d+: \(", x.strip())
                        and not x.startswith(("processed ", "bpf: "))
                        and "Permission denied" not in x)[:500]
    line = None
    if notes:
        _, text, n = notes[-1]
        candidates = [i + 1 for i in range(wrapped.lines)
                      if wrapped_lines[user_first - 1 + i] == text]
        if len(candidates) == 1:
            line = candidates[0]
        elif candidates and offsets:
            guess = wrapped.user_line(n - offsets.most_common(1)[0][0]) or 0
            line = min(candidates, key=lambda c: abs(c - guess))
    return [Diagnostic("verify", line, None, message or _last_lines(output))]


def _last_lines(output: str) -> str:
    return " / ".join(x.strip() for x in output.strip().splitlines()[-3:]) or "no diagnostics"


@dataclass
class BuiltType:
    """A compiled and loaded CubeType, not yet in any program slot."""

    name: str
    module: BpfModule
    fd: int
    params: tuple[Param, ...]
    counters: tuple[str, ...]


def build(rt: Runtime, name: str, source: str, schema: Mapping[str, Any],
          counters: Sequence[str]) -> BuiltType:
    """Compile and load CubeType `name` for `rt`. CubeBuildError with the
    user's lines (a schema outside the restriction is a SchemaError, from
    param_layout). Touches no slot, cube or port."""
    params = param_layout(schema)
    if len(counters) > MAX_COUNTERS or len(params) > MAX_PARAMS:
        raise CubeBuildError([Diagnostic("compile", None, None, "too many counters or params")])
    wrapped = wrap(source, params, counters)
    assert rt.pin_dir is not None, "Runtime.open() first"
    try:
        module, fd = compile_source(wrapped.text, rt.pin_dir, PROGRAM, rt.defines)
    except SourceCompileError as exc:
        diags = compile_errors(exc.output, wrapped) if exc.stage == "compile" else \
            verifier_errors(exc.output, wrapped)
        raise CubeBuildError(diags) from exc
    return BuiltType(name, module, fd, params, tuple(counters))


# ----------------------------------------------------------------------------- instances
@dataclass(frozen=True)
class CustomSettings:
    """A custom function's settings: its CubeType, the layout it was
    validated against (the parameters, hashable) and the counters' names,
    and every parameter's value by name in index order
    (pcn_crds.cubetype.config_values)."""

    cubetype: str
    params: tuple[Param, ...]
    counters: tuple[str, ...]
    values: tuple[tuple[str, ParamValue], ...]

    def to_json(self) -> dict[str, Any]:
        """As saved with the cube for an agent restart. The parameters are a
        list: the runtime's state file sorts keys, and a parameter's index
        is its place."""
        schema = _schema_of(self.params)
        return {"cubetype": self.cubetype, "required": schema["required"],
                "params": [[name, prop] for name, prop in schema["properties"].items()],
                "counters": list(self.counters), "values": [list(v) for v in self.values]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CustomSettings:
        schema = {"type": "object", "required": list(d["required"]),
                  "properties": {str(name): prop for name, prop in d["params"]}}
        return cls(d["cubetype"], param_layout(schema), tuple(d["counters"]),
                   tuple((str(k), v) for k, v in d["values"]))


def _schema_of(params: tuple[Param, ...]) -> dict[str, Any]:
    """A restricted schema that lays out as `params` (saved with a cube, for
    an agent restart to read its settings back)."""
    props = {p.name: param_property(p, documented=True) for p in params}
    return {"type": "object", "properties": props,
            "required": [p.name for p in params if p.required]}


class CustomFunction(FunctionCube):
    """A NetworkFunction whose spec.type is a CubeType: one instance of the
    type's program (the type's slot), with its parameter words and counters."""

    type = "custom"
    config_model = Model

    def __init__(self, rt: Runtime, name: str, settings: CustomSettings) -> None:
        self.rt = rt
        self.name = name
        self._settings = settings

    def function_type(self) -> str:
        return runtime_type(self._settings.cubetype)

    @classmethod
    def settings_of(cls, config: Model) -> Hashable:
        raise TypeError("a custom function's settings come from its CubeType's schema "
                        "(pcn_crds.cubetype.config_values)")

    @classmethod
    def create(cls, rt: Runtime, name: str, settings: Hashable) -> CustomFunction:
        if not isinstance(settings, CustomSettings):
            raise TypeError(f"expected CustomSettings, got {type(settings).__name__}")
        words = encode(settings.params, settings.values)  # ValueError before anything is made
        cube = rt.add_cube(name, runtime_type(settings.cubetype))
        try:
            f = cls(rt, name, settings)
            f._zero_counters(cube.id)
            f._write(cube.id, settings, words)
        except BaseException:
            rt.remove_cube(name)
            raise
        return f

    @classmethod
    def adopt(cls, rt: Runtime, name: str) -> CustomFunction:
        cube = rt.cube(name)
        return cls(rt, name, CustomSettings.from_json(cube.config["settings"]))

    @classmethod
    def warm_up(cls, rt: Runtime) -> None:
        return None  # compiled when its CubeType is seen

    @property
    def settings(self) -> CustomSettings:
        return self._settings

    def configure(self, settings: Hashable) -> None:
        if not isinstance(settings, CustomSettings):
            raise TypeError(f"expected CustomSettings, got {type(settings).__name__}")
        if settings.cubetype != self._settings.cubetype:
            raise ValueError("a function changes its CubeType by being made again")
        cube = self.rt.cube(self.name)
        self._write(cube.id, settings, encode(settings.params, settings.values))
        if settings.counters != self._settings.counters:
            self._zero_counters(cube.id)  # the indexes mean other counters now
        self._settings = settings

    def _write(self, cube_id: int, settings: CustomSettings, words: list[int]) -> None:
        value = maps.CubeParams()
        for i, w in enumerate(words):
            value.v[i] = w
        self.rt.table("pcn_cube_params")[ct.c_uint32(cube_id)] = value  # one update: atomic
        self.rt.cube(self.name).config = {"settings": settings.to_json()}

    def _zero_counters(self, cube_id: int) -> None:
        t = self.rt.table("pcn_cube_ctrs")
        for i in range(MAX_COUNTERS):
            t[ct.c_uint32(cube_id * MAX_COUNTERS + i)] = t.Leaf()

    def counters(self) -> dict[str, int]:
        """Each named counter, summed over CPUs."""
        cube = self.rt.cube(self.name)
        t = self.rt.table("pcn_cube_ctrs")
        return {c: int(sum(t[ct.c_uint32(cube.id * MAX_COUNTERS + i)]))
                for i, c in enumerate(self._settings.counters)}

    def status(self) -> dict[str, Any]:
        """The CubeType, its parameters' values, its counters by name, and its
        drops (pcn_cube_drop)."""
        return {"cubeType": self._settings.cubetype,
                "params": {k: v for k, v in self._settings.values},
                "counters": self.counters(),
                "drops": self.rt.cube_drops(self.name).get("filtered", 0)}

    def delete(self) -> None:
        cube = self.rt.cube(self.name)
        maps.discard(self.rt.table("pcn_cube_params"), ct.c_uint32(cube.id))
        self.rt.remove_cube(self.name)
