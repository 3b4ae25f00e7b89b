"""A Dockerfile interpreter without Docker: enough of BuildKit's semantics to
build manifests/Dockerfile into a root filesystem folder and an image config.

Parsing is the official one: the ``dockerfile`` package wraps BuildKit's own
Go parser (line continuations, comments, JSON and shell forms, flags). This
module adds what the parser leaves to the builder, following BuildKit's
``dockerfile2llb`` and its shell lexer:

* stages (``FROM <image or stage> [AS name]``), global ``ARG`` s (before the
  first ``FROM``, usable only in ``FROM`` lines) and per-stage ``ARG`` s
  (a bare ``ARG NAME`` in a stage takes the global value), build arguments
  overriding defaults;
* word expansion of ``FROM``, ``ARG``, ``ENV``, ``LABEL``, ``WORKDIR``,
  ``COPY``, ``USER``: ``$VAR``, ``${VAR}``, ``${VAR:-word}``,
  ``${VAR:+word}`` (and ``-``/``+`` without the colon), single and double
  quotes and backslash escapes, with quote removal;
* ``RUN`` (shell form through ``/bin/sh -c``, or JSON form) in a chroot of
  the stage's root (pcn_lab.cluster.chroot) with the stage's ``ENV`` and
  ``ARG`` values in its environment;
* ``COPY [--from=<stage>] <src>... <dest>`` from the build context (after
  .dockerignore) or another stage's root: a folder's contents are copied
  into the destination, several sources or a trailing ``/`` make the
  destination a folder, relative destinations follow ``WORKDIR``, sources
  may be globs, copied files belong to root;
* ``WORKDIR`` (created), ``ENV``, ``LABEL``, ``ENTRYPOINT`` (resets an
  inherited ``CMD``, as Docker does), ``CMD``, ``USER``, ``EXPOSE``.

Anything else (``ADD``, ``ONBUILD``, ``RUN --mount``, heredocs...) raises
DockerfileError naming the instruction and its line, rather than being
built differently from what ``docker build`` would do.

.dockerignore: Docker's patterns are root-anchored Go ``filepath.Match``
patterns with ``**``, matched against every path, last match wins, ``!``
re-includes. ``context_files`` maps each to an anchored gitignore pattern
of ``pathspec`` (``/`` prefixed; gitwildmatch), which has the same meaning for the forms
these files use (``**``, ``dir/**``, ``**/name``, ``*.ext``, ``!``), and
matches file by file so a re-included file inside an excluded folder is
kept, as Docker keeps it.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import hashlib
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import dockerfile as dockerfile_parser
import pathspec

from pcn_lab.cluster import chroot
from pcn_lab.cluster.oci import ImageConfig

log = logging.getLogger(__name__)


class DockerfileError(Exception):
    """A Dockerfile this interpreter cannot build, with the line."""


@dataclass(frozen=True)
class Instruction:
    """One instruction: ``cmd`` upper case, ``args`` as the parser split
    them (not yet expanded), ``flags`` like ``--from=build``."""

    cmd: str
    args: tuple[str, ...]
    flags: tuple[str, ...] = ()
    json: bool = False
    line: int = 0

    def flag(self, name: str) -> str | None:
        for flag in self.flags:
            if flag.startswith(f"--{name}="):
                return flag.split("=", 1)[1]
        return None


@dataclass
class Stage:
    """A build stage: ``base`` is an image reference or an earlier stage's
    name, already expanded with the global ARGs."""

    index: int
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Parsed:
    global_args: dict[str, str | None]
    stages: list[Stage]

    def stage(self, ref: str) -> Stage | None:
        """The stage named (or numbered) ``ref`` or None."""
        for stage in self.stages:
            if stage.name == ref.lower() or str(stage.index) == ref:
                return stage
        return None


_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def expand(word: str, variables: Mapping[str, str]) -> str:
    """Expand ``$VAR``-style references and remove quotes, as BuildKit's
    shell lexer does for ENV, LABEL, COPY, WORKDIR and FROM words.
    Raises DockerfileError on an unterminated quote or ``${``."""
    out: list[str] = []
    i, n = 0, len(word)
    quote: str | None = None
    while i < n:
        c = word[i]
        if quote == "'":
            if c == "'":
                quote = None
            else:
                out.append(c)
            i += 1
        elif c == "\\":
            nxt = word[i + 1] if i + 1 < n else ""
            if quote == '"' and nxt not in ('"', "$", "\\"):
                out.append(c)
                i += 1
            else:
                out.append(nxt)
                i += 2
        elif c in ("'", '"') and (quote is None or quote == c):
            if quote is None and c == "'":
                quote = "'"
            else:
                quote = None if quote == c else c
            i += 1
        elif c == "$":
            value, i = _expand_variable(word, i + 1, variables)
            out.append(value)
        else:
            out.append(c)
            i += 1
    if quote:
        raise DockerfileError(f"unterminated {quote} in {word!r}")
    return "".join(out)


def _expand_variable(word: str, i: int, variables: Mapping[str, str]) -> tuple[str, int]:
    if i < len(word) and word[i] == "{":
        end = word.find("}", i)
        if end < 0:
            raise DockerfileError(f"unterminated ${{ in {word!r}")
        body = word[i + 1:end]
        match = _VAR.match(body)
        if not match:
            raise DockerfileError(f"bad substitution ${{{body}}} in {word!r}")
        name, rest = match.group(), body[match.end():]
        value = variables.get(name)
        for op in (":-", ":+", "-", "+"):
            if rest.startswith(op):
                alt = expand(rest[len(op):], variables)
                empty = value is None or (op.startswith(":") and value == "")
                if op.endswith("-"):
                    return (alt if empty else str(value)), end + 1
                return ("" if empty else alt), end + 1
        if rest:
            raise DockerfileError(f"unsupported substitution ${{{body}}} in {word!r}")
        return value or "", end + 1
    match = _VAR.match(word, i)
    if not match:
        return "$", i
    return variables.get(match.group(), ""), match.end()


def _instruction(command: dockerfile_parser.Command) -> Instruction:
    if command.heredocs:
        raise DockerfileError(f"line {command.start_line}: heredocs are not supported")
    return Instruction(cmd=command.cmd.upper(), args=tuple(command.value), flags=tuple(command.flags),
                       json=command.json, line=command.start_line)


def parse(path: Path, build_args: Mapping[str, str] | None = None) -> Parsed:
    """Parse ``path`` into stages. Global ARG defaults are overridden by
    ``build_args``; FROM lines are expanded with them. Raises DockerfileError
    (an instruction before the first FROM other than ARG, a FROM without
    image) or the parser's own error on bad syntax."""
    build_args = dict(build_args or {})
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for command in dockerfile_parser.parse_file(str(path)):
        ins = _instruction(command)
        if ins.cmd == "FROM":
            words = list(ins.args)
            name = None
            if len(words) == 3 and words[1].upper() == "AS":
                name = words[2].lower()
            elif len(words) != 1:
                raise DockerfileError(f"line {ins.line}: FROM takes an image and an optional AS name")
            if ins.flags:
                raise DockerfileError(f"line {ins.line}: FROM {' '.join(ins.flags)} is not supported")
            known = {k: v for k, v in global_args.items() if v is not None}
            stages.append(Stage(index=len(stages), base=expand(words[0], known), name=name))
        elif not stages:
            if ins.cmd != "ARG":
                raise DockerfileError(f"line {ins.line}: {ins.cmd} before the first FROM")
            for word in ins.args:
                key, value = _arg(word, {k: v for k, v in global_args.items() if v is not None})
                global_args[key] = build_args.get(key, value)
        else:
            stages[-1].instructions.append(ins)
    if not stages:
        raise DockerfileError(f"{path}: no FROM")
    return Parsed(global_args=global_args, stages=stages)


def _arg(word: str, variables: Mapping[str, str]) -> tuple[str, str | None]:
    if "=" in word:
        key, value = word.split("=", 1)
        return key, expand(value, variables)
    return word, None


# ---------------------------------------------------------------- build context

def _literal_prefix(pattern: str) -> str:
    match = re.search(r"[*?\[]", pattern)
    return pattern[:match.start()] if match else pattern


def read_dockerignore(path: Path | None) -> list[str]:
    """The patterns of a .dockerignore (comments and blank lines dropped,
    each cleaned of a leading ``/``)."""
    if path is None or not path.is_file():
        return []
    patterns = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        body = line[1:].strip() if negate else line
        body = os.path.normpath(body).lstrip("/") if body not in ("**", "*") else body
        patterns.append(("!" if negate else "") + body)
    return patterns


def context_files(context: Path, patterns: list[str]) -> list[str]:
    """Relative paths (``/`` separated, sorted) of the files and symbolic
    links of ``context`` that .dockerignore ``patterns`` keep."""
    spec = pathspec.PathSpec.from_lines(
        "gitignore", [("!/" + p[1:]) if p.startswith("!") else "/" + p for p in patterns])
    reincluding = [_literal_prefix(p[1:]) for p in patterns if p.startswith("!")]

    def may_keep_below(rel_dir: str) -> bool:
        if not spec.match_file(rel_dir + "/"):
            return True
        prefix = rel_dir + "/"
        return any(not lit or lit.startswith(prefix) or prefix.startswith(lit) for lit in reincluding)

    kept: list[str] = []
    for folder, dirs, files in os.walk(context):
        rel = os.path.relpath(folder, context)
        base = "" if rel == "." else rel + "/"
        dirs[:] = [d for d in dirs if may_keep_below(base + d)]
        for name in files:
            if not spec.match_file(base + name):
                kept.append(base + name)
        for name in dirs:
            if os.path.islink(os.path.join(folder, name)) and not spec.match_file(base + name):
                kept.append(base + name)
    return sorted(kept)


def context_digest(context: Path, files: list[str], *extra: Path) -> str:
    """sha256 (hex) over the names, executable bits and contents of
    ``files`` and the contents of ``extra`` files (the Dockerfile and its
    ignore file): what decides whether the image must be rebuilt."""
    sha = hashlib.sha256()
    for rel in files:
        path = context / rel
        sha.update(rel.encode() + b"\0")
        if path.is_symlink():
            sha.update(b"l" + os.readlink(path).encode())
        else:
            sha.update(b"x" if os.access(path, os.X_OK) else b"-")
            sha.update(hashlib.sha256(path.read_bytes()).digest())
    for path in extra:
        sha.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return sha.hexdigest()


# ---------------------------------------------------------------------- build

@dataclass
class StageState:
    root: Path
    config: ImageConfig
    args: dict[str, str] = field(default_factory=dict)

    def env_map(self) -> dict[str, str]:
        return dict(entry.split("=", 1) for entry in self.config.env)

    def variables(self) -> dict[str, str]:
        return {**self.args, **self.env_map()}

    def set_env(self, key: str, value: str) -> None:
        env = self.env_map()
        env[key] = value
        self.config.env = [f"{k}={v}" for k, v in env.items()]


#: ``resolve_base(reference, dest)`` fills ``dest`` with the root filesystem
#: of an external base image and returns its config.
BaseResolver = Callable[[str, Path], ImageConfig]


@dataclass
class Builder:
    """Builds a parsed Dockerfile. ``work`` holds one folder per stage
    (``stage-<n>``); RUN output goes to ``log_path`` (its end is shown when
    a RUN fails), or to our output without one; ``run_env`` is added to every RUN's environment (build
    only: proxies, CA bundle paths, SOURCE_DATE_EPOCH) and ``run_binds``
    bind-mounts host files into each RUN (``{host path: path in root}``)."""

    parsed: Parsed
    context: Path
    context_list: list[str]
    work: Path
    resolve_base: BaseResolver
    build_args: dict[str, str] = field(default_factory=dict)
    run_env: dict[str, str] = field(default_factory=dict)
    run_binds: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    states: dict[int, StageState] = field(default_factory=dict)

    def build(self) -> StageState:
        """Build every stage in order; returns the last stage's state."""
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        for stage in self.parsed.stages:
            self.states[stage.index] = self._stage(stage)
        return self.states[self.parsed.stages[-1].index]

    def _stage(self, stage: Stage) -> StageState:
        root = self.work / f"stage-{stage.index}"
        started = time.monotonic()
        parent = self.parsed.stage(stage.base)
        if parent is not None and parent.index < stage.index:
            before = self.states[parent.index]
            subprocess.run(["cp", "-a", "--reflink=auto", str(before.root), str(root)], check=True)
            config = copy.deepcopy(before.config)
        else:
            config = self.resolve_base(stage.base, root)
        state = StageState(root=root, config=config)
        log.info("stage %d%s: FROM %s", stage.index, f" ({stage.name})" if stage.name else "", stage.base)
        for ins in stage.instructions:
            self._instruction(state, ins)
        log.info("stage %d built in %.0f s", stage.index, time.monotonic() - started)
        return state

    def _words(self, state: StageState, ins: Instruction) -> list[str]:
        variables = state.variables()
        return [expand(word, variables) for word in ins.args]

    def _instruction(self, state: StageState, ins: Instruction) -> None:
        handler = getattr(self, f"_do_{ins.cmd.lower()}", None)
        if handler is None:
            raise DockerfileError(f"line {ins.line}: {ins.cmd} is not supported by this interpreter")
        unsupported = [f for f in ins.flags if not (ins.cmd == "COPY" and f.startswith("--from="))]
        if unsupported:
            raise DockerfileError(f"line {ins.line}: {ins.cmd} {' '.join(unsupported)} is not supported")
        handler(state, ins)

    def _do_arg(self, state: StageState, ins: Instruction) -> None:
        for word in ins.args:
            key, value = _arg(word, state.variables())
            if key in self.build_args:
                value = self.build_args[key]
            elif value is None:
                value = self.parsed.global_args.get(key)
            if value is not None:
                state.args[key] = value

    def _do_env(self, state: StageState, ins: Instruction) -> None:
        pairs = list(ins.args)
        if len(pairs) % 2:
            raise DockerfileError(f"line {ins.line}: ENV needs KEY=VALUE pairs")
        for key, value in zip(pairs[::2], pairs[1::2], strict=True):
            state.set_env(key, expand(value, state.variables()))

    def _do_label(self, state: StageState, ins: Instruction) -> None:
        pairs = list(ins.args)
        if len(pairs) % 2:
            raise DockerfileError(f"line {ins.line}: LABEL needs KEY=VALUE pairs")
        variables = state.variables()
        for key, value in zip(pairs[::2], pairs[1::2], strict=True):
            state.config.labels[expand(key, variables)] = expand(value, variables)

    def _do_workdir(self, state: StageState, ins: Instruction) -> None:
        (path,) = self._words(state, ins)
        workdir = str(PurePosixPath(state.config.working_dir or "/", path))
        state.config.working_dir = workdir
        (state.root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)

    def _do_user(self, state: StageState, ins: Instruction) -> None:
        (state.config.user,) = self._words(state, ins)

    def _do_expose(self, state: StageState, ins: Instruction) -> None:
        for port in self._words(state, ins):
            state.config.exposed_ports.append(port if "/" in port else f"{port}/tcp")

    def _command(self, ins: Instruction) -> list[str]:
        return list(ins.args) if ins.json else ["/bin/sh", "-c", " ".join(ins.args)]

    def _do_entrypoint(self, state: StageState, ins: Instruction) -> None:
        state.config.entrypoint = self._command(ins)
        state.config.cmd = None

    def _do_cmd(self, state: StageState, ins: Instruction) -> None:
        state.config.cmd = self._command(ins)

    def _do_run(self, state: StageState, ins: Instruction) -> None:
        argv = self._command(ins)
        env = {**state.args, **state.env_map(), **self.run_env}
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        shown = argv[-1] if len(argv[-1]) < 100 else argv[-1][:97] + "..."
        log.info("  RUN %s", shown)
        started = time.monotonic()
        with open(self.log_path, "ab") if self.log_path else contextlib.nullcontext() as output:
            try:
                chroot.run(state.root, argv, env=env, workdir=state.config.working_dir or "/",
                           binds=self.run_binds, output=output)
            except subprocess.CalledProcessError as exc:
                tail = ""
                if self.log_path:
                    lines = self.log_path.read_text(errors="replace").splitlines()[-30:]
                    tail = f"\n  last lines of {self.log_path}:\n" + "\n".join("    " + ln for ln in lines)
                raise DockerfileError(f"line {ins.line}: RUN failed with exit status {exc.returncode}: "
                                      f"{' '.join(argv)}{tail}") from exc
        log.info("  RUN done in %.0f s", time.monotonic() - started)

    def _do_copy(self, state: StageState, ins: Instruction) -> None:
        words = self._words(state, ins)
        if len(words) < 2:
            raise DockerfileError(f"line {ins.line}: COPY needs a source and a destination")
        *sources, dest = words
        source_stage = ins.flag("from")
        dest_path = str(PurePosixPath(state.config.working_dir or "/", dest))
        into_dir = dest.endswith("/") or len(sources) > 1
        target = state.root / dest_path.lstrip("/")
        log.info("  COPY %s%s -> %s", f"--from={source_stage} " if source_stage else "",
                 " ".join(sources), dest_path)
        for source in sources:
            matches = self._sources(source_stage, source, ins)
            if len(matches) > 1:
                into_dir = True
            for path, rel_files in matches:
                if path.is_dir() and not path.is_symlink():
                    target.mkdir(parents=True, exist_ok=True)
                    self._copy_tree(path, rel_files, target)
                else:
                    out = target / path.name if into_dir or target.is_dir() else target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    _copy_file(path, out)

    def _sources(self, stage_ref: str | None, source: str,
                 ins: Instruction) -> list[tuple[Path, list[str] | None]]:
        """(path, files to copy below it or None for all) for one COPY source."""
        rel = os.path.normpath(source).lstrip("/")
        if stage_ref is not None:
            stage = self.parsed.stage(stage_ref)
            if stage is None or stage.index not in self.states:
                raise DockerfileError(f"line {ins.line}: COPY --from={stage_ref}: no earlier stage of that name")
            base = self.states[stage.index].root
            found = sorted(glob.glob(str(base / rel))) if glob.has_magic(rel) else [str(base / rel)]
            paths = [Path(p) for p in found if os.path.lexists(p)]
            if not paths:
                raise DockerfileError(f"line {ins.line}: COPY --from={stage_ref} {source}: not found")
            return [(p, None) for p in paths]
        if rel == ".":
            return [(self.context, list(self.context_list))]
        if glob.has_magic(rel):
            pattern = pathspec.PathSpec.from_lines("gitignore", ["/" + rel])
            tops = sorted({"/".join(f.split("/")[:rel.count("/") + 1]) for f in self.context_list})
            chosen = [t for t in tops if pattern.match_file(t)]
        else:
            chosen = [rel]
        out: list[tuple[Path, list[str] | None]] = []
        for top in chosen:
            below = [f[len(top) + 1:] for f in self.context_list if f.startswith(top + "/")]
            if top in self.context_list:
                out.append((self.context / top, None))
            elif below:
                out.append((self.context / top, below))
        if not out:
            raise DockerfileError(f"line {ins.line}: COPY {source}: not in the build context "
                                  f"(missing, or excluded by the .dockerignore)")
        return out

    @staticmethod
    def _copy_tree(source: Path, rel_files: list[str] | None, target: Path) -> None:
        if rel_files is None:
            subprocess.run(["cp", "-a", "--reflink=auto", "--no-target-directory", str(source), str(target)],
                           check=True)
            return
        for rel in rel_files:
            out = target / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            _copy_file(source / rel, out)


def _copy_file(source: Path, out: Path) -> None:
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists() or out.is_symlink():
        out.unlink()
    if source.is_symlink():
        os.symlink(os.readlink(source), out)
    else:
        shutil.copy2(source, out)
    os.lchown(out, 0, 0)
