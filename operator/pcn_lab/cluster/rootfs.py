"""Debian root filesystems for the images, from the machine's own apt
sources, with mmdebstrap (installed with apt-get when missing).

``debian_rootfs(dest, packages)`` is the ``debian:12-slim`` of the official
image made locally: mmdebstrap's ``minbase`` variant of the pinned suite
(versions.toml ``[debian] suite``) with the same dpkg path excludes the
official slim images carry (no documentation but copyright files, no man
pages, locales or info) and its apt/dpkg configuration
(``DOCKER_IMAGE_FILES``), plus ``packages``. The host's apt sources decide
where packages come from: every deb822 (``*.sources``) or one-line
(``sources.list``) entry whose suite is the pinned one or one of its
``-updates``/``-security`` suites. Apt options the host needs to use its
mirror (``Acquire::Check-Valid-Until``, ``Acquire::Check-Date``) are passed
to mmdebstrap and to the builds' ``apt-get`` (``build_apt_conf``), never
kept in an image.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from pcn_lab.cluster import artifacts

log = logging.getLogger(__name__)

#: dpkg path filters of Debian's official ``-slim`` images.
SLIM_DPKG_OPTIONS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/linda/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)

#: Files Debian's official Docker images carry (debuerreotype's
#: minimizing config): apt drops downloaded packages and its binary caches
#: after each run, fetches no translations, keeps indexes compressed; dpkg
#: skips fsync; services are not started inside builds. Dockerfiles written
#: for ``debian:12-slim`` rely on these (their layers stay small).
DOCKER_IMAGE_FILES = {
    "etc/apt/apt.conf.d/docker-clean": (
        'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
        '/var/cache/apt/*.bin || true"; };\n'
        'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb '
        '/var/cache/apt/*.bin || true"; };\n'
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'),
    "etc/apt/apt.conf.d/docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
    "etc/apt/apt.conf.d/docker-gzip-indexes": 'Acquire::GzipIndexes "true";\n',
    "etc/apt/apt.conf.d/docker-no-languages": 'Acquire::Languages "none";\n',
    "etc/dpkg/dpkg.cfg.d/docker-apt-speedup": "force-unsafe-io\n",
    "usr/sbin/policy-rc.d": "#!/bin/sh\n# No service starts inside an image build.\nexit 101\n",
}

#: Host apt options carried into builds when the host sets them.
_CARRIED_APT_OPTIONS = ("Acquire::Check-Valid-Until", "Acquire::Check-Date")

#: What mmdebstrap leaves that an image must not carry (the host's files).
_HOST_LEFTOVERS = ("etc/resolv.conf", "etc/hostname", "etc/apt/apt.conf.d/99mmdebstrap")


def suite() -> str:
    return str(artifacts.versions()["debian"]["suite"])


def _suite_matches(candidate: str, wanted: str) -> bool:
    return candidate == wanted or candidate.startswith(wanted + "-") or candidate.startswith(wanted + "/")


def apt_sources(wanted: str | None = None, etc_apt: Path = Path("/etc/apt")) -> list[str]:
    """One-line ``deb URI SUITE COMPONENTS`` entries of the host's sources for
    ``wanted`` (default: the pinned suite), in file order. Raises
    RuntimeError naming the fix when there is none."""
    wanted = wanted or suite()
    lines: list[str] = []
    files = [etc_apt / "sources.list"] if (etc_apt / "sources.list").is_file() else []
    files += sorted((etc_apt / "sources.list.d").glob("*.list"))
    for path in files:
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) >= 4 and words[0] == "deb":
                if words[1].startswith("["):  # options: deb [signed-by=...] uri suite comps
                    while words and not words[1].endswith("]"):
                        words.pop(1)
                    words.pop(1)
                if len(words) >= 4 and _suite_matches(words[2], wanted):
                    lines.append(" ".join(["deb", *words[1:]]))
    for path in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
                continue
            for uri in fields.get("uris", "").split():
                for candidate in fields.get("suites", "").split():
                    if _suite_matches(candidate, wanted):
                        lines.append(f"deb {uri} {candidate} {fields.get('components', 'main')}")
    if not lines:
        raise RuntimeError(f"no apt source for Debian {wanted} in {etc_apt}/sources.list*: add one "
                           f"(e.g. 'deb http://deb.debian.org/debian {wanted} main')")
    return lines


def host_apt_options() -> list[str]:
    """``Key "value";`` lines of the host's apt options that builds need too."""
    options = []
    for key in _CARRIED_APT_OPTIONS:
        out = subprocess.run(["apt-config", "dump", key], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith(key + " "):
                options.append(line.strip())
    return options


def build_apt_conf() -> str:
    """An apt.conf for ``apt-get`` run inside a build (APT_CONFIG)."""
    return "".join(line + "\n" for line in host_apt_options())


def ensure_mmdebstrap() -> str:
    """Path of mmdebstrap, installed with apt-get if missing (idempotent)."""
    found = shutil.which("mmdebstrap")
    if found:
        return found
    log.info("installing mmdebstrap (apt-get install -y mmdebstrap)")
    subprocess.run(["apt-get", "install", "-y", "-q", "mmdebstrap"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)
    found = shutil.which("mmdebstrap")
    if not found:
        raise RuntimeError("apt-get installed mmdebstrap but it is not on PATH")
    return found


def debian_rootfs(dest: Path, packages: list[str] | tuple[str, ...] = (), *, epoch: int) -> None:
    """Build the slim minbase root filesystem plus ``packages`` into ``dest``
    (replaced if present). ``epoch`` is SOURCE_DATE_EPOCH for mmdebstrap.
    Takes ~25 s plus the packages; raises CalledProcessError on failure (its
    log is on stderr)."""
    mmdebstrap = ensure_mmdebstrap()
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    cmd = [mmdebstrap, "--mode=root", "--variant=minbase", "--quiet"]
    cmd += [f"--dpkgopt={opt}" for opt in SLIM_DPKG_OPTIONS]
    cmd += [f"--aptopt={opt}" for opt in host_apt_options()]
    if packages:
        cmd.append("--include=" + ",".join(packages))
    cmd += [suite(), str(dest), *apt_sources()]
    started = time.monotonic()
    log.info("mmdebstrap %s minbase%s -> %s", suite(), f" + {', '.join(packages)}" if packages else "", dest)
    subprocess.run(cmd, check=True, env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)},
                   stdin=subprocess.DEVNULL)
    for leftover in _HOST_LEFTOVERS:
        (dest / leftover).unlink(missing_ok=True)
    for name, text in DOCKER_IMAGE_FILES.items():
        (dest / name).write_text(text)
        os.chmod(dest / name, 0o755 if name.endswith("policy-rc.d") else 0o644)
    for cached in (dest / "var" / "cache" / "apt").glob("*.bin"):
        cached.unlink()
    log.info("root filesystem %s ready in %.0f s", dest, time.monotonic() - started)
