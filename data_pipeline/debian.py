"""Fetch Debian packages into a private cache without changing the system: `apt-get download` + `dpkg-deb -x`.

`apt-get install` would upgrade system packages (python3.11-doc pulled 8 of them); downloading and extracting
gives the same files under `<cache>/root/` and touches nothing else. When the machine's own package lists are
missing or stale (a clean CI image), apt is pointed at package lists kept inside the cache
(`-o Dir::State::Lists=<cache>/apt/lists`), refreshed with a private `apt-get update`, so even that leaves the
system's apt state alone. Every failure (no apt, no network, unknown package) is returned, not raised: the corpus
builder falls back to the pip-only sources and says so.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

log = logging.getLogger("data_pipeline")

_APT_TIMEOUT_S = 180


@dataclass
class FetchResult:
    root: Path  # extraction root: package files appear at root/usr/share/...
    extracted: list[str] = field(default_factory=list)  # packages available under root (fetched now or cached)
    errors: dict[str, str] = field(default_factory=dict)  # package -> why it is unavailable


def default_cache_dir() -> Path:
    env = os.environ.get("MINICPM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "minicpm-jax"


def _private_apt_opts(cache: Path) -> list[str]:
    lists = cache / "apt" / "lists"
    archives = cache / "apt" / "cache"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (archives / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    opts = ["-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={archives}", "-o", "Debug::NoLocking=1"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        opts += ["-o", "APT::Sandbox::User=root"]  # files in the cache are root's; apt's _apt user can't write
    return opts


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_APT_TIMEOUT_S,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"})


def _apt_download(pkgs: list[str], debs: Path, opts: list[str]) -> tuple[bool, str]:
    base = ["apt-get", "-q", "-o", "Acquire::Retries=1", "-o", "Acquire::http::Timeout=30"]
    try:
        r = _run(base + opts + ["download", *pkgs], debs)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"apt-get download failed: {e}"
    return r.returncode == 0, (r.stderr or r.stdout).strip()[-500:]


def fetch_packages(packages: Iterable[str], cache_dir: str | Path | None = None,
                   download: bool = True) -> FetchResult:
    """Make `packages` available under `<cache>/debian/root`; download only those not extracted before
    (with download=False, report the missing ones and touch nothing).

    Returns which packages are available and, for the others, why not. Never raises for apt/network trouble.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    base = cache / "debian"
    root, debs, stamps = base / "root", base / "debs", base / "stamps"
    wanted = sorted(set(packages))
    res = FetchResult(root=root, extracted=[p for p in wanted if (stamps / f"{p}.ok").exists()])
    todo = [p for p in wanted if p not in res.extracted]
    if not todo:
        return res
    if not download:
        res.errors = {p: "not in the cache and data.download is false" for p in todo}
        return res
    for d in (root, debs, stamps):
        d.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        for p in todo:
            res.errors[p] = "apt-get/dpkg-deb not found (not a Debian-based system)"
        return res

    t0 = time.time()
    ok, msg = _apt_download(todo, debs, [])  # the system's package lists, if present
    if not ok:
        log.info("apt-get download with the system lists failed (%s); using private package lists in %s",
                 msg.splitlines()[-1] if msg else "?", cache / "apt")
        opts = _private_apt_opts(cache)
        lists = cache / "apt" / "lists"
        fresh = any(lists.glob("*Packages*")) and time.time() - lists.stat().st_mtime < 86_400
        if not fresh:
            try:
                r = _run(["apt-get", "-q", *opts, "update"], debs)
                if r.returncode != 0:
                    raise OSError((r.stderr or r.stdout).strip()[-300:])
                lists.touch()
            except (OSError, subprocess.TimeoutExpired) as e:
                for p in todo:
                    res.errors[p] = f"private apt-get update failed: {e}"
                return res
        ok, msg = _apt_download(todo, debs, opts)
        if not ok:  # one bad name fails the batch: retry one by one to keep the good ones
            for p in todo:
                ok1, msg1 = _apt_download([p], debs, opts)
                if not ok1:
                    res.errors[p] = msg1.splitlines()[-1] if msg1 else "apt-get download failed"

    for p in todo:
        if p in res.errors:
            continue
        found = sorted(debs.glob(f"{p}_*.deb"))
        if not found:
            res.errors[p] = "downloaded .deb not found"
            continue
        try:
            r = subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(root)], capture_output=True, text=True,
                               timeout=_APT_TIMEOUT_S)
            if r.returncode != 0:
                raise OSError(r.stderr.strip()[-300:])
        except (OSError, subprocess.TimeoutExpired) as e:
            res.errors[p] = f"dpkg-deb -x failed: {e}"
            continue
        (stamps / f"{p}.ok").write_text(found[-1].name + "\n")
        res.extracted.append(p)
    log.info("Debian packages: %d available, %d unavailable (%.1f s)", len(res.extracted), len(res.errors),
             time.time() - t0)
    return res
