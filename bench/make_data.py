"""Offline prompt data sets, built from text already on this machine (no network, no model).

    python -m bench.make_data KIND [-o FILE]    # KIND: code, man, package or pydoc [bench/data/KIND.jsonl]
    python -m bench.make_data mixed             # bench/data/mixed_dev.jsonl and mixed_report.jsonl
    python -m bench.make_data all               # the four kinds, then the mixed logs, into bench/data/

Every row is a JSON object:
  prompt, reference   the full prompt text and the gold text (a metric compares with / scores its likelihood)
  kind, split         code | man | package | pydoc | xsum, and dev (choosing settings) | report (reporting only)
  source, group       where the row came from (`man:ls(1)`, `pypi:requests`, ...) and the unit of the split:
                      rows of one group are all in one split, so dev and report share no source and no group
  max_tokens, stop    64, and the stop strings that end the expected answer
Kinds: `code` maps bench/stdlib_functions.py (reference = body); `man` asks for a command's one-line NAME
description from its DESCRIPTION/OPTIONS text; `package` asks for an installed distribution's Summary from
its long description; `pydoc` asks for the next paragraph of Python's own documentation (pydoc_data.topics).
XSum stays in its own file (bench/data/xsum_dev.jsonl, rows 0-199 dev, 200-299 report) and joins the mixed
logs mapped as prompt = article, reference = summary_gt. Per-kind files hold their dev rows first.

The output is deterministic for a given machine and Python: inputs are read in sorted order, splits
follow module order (code) or a sha256 of the group (the others), samples use fixed seeds. `pydoc`
depends on the Python version only.
bench/data/README.md describes the files, their sources and licenses.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import os
import random
import re
import statistics
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Iterable, Iterator
from email.message import Message
from pathlib import Path

from bench import stdlib_functions

DATA_DIR = Path(__file__).resolve().parent / "data"
XSUM_FILE = DATA_DIR / "xsum_dev.jsonl"
XSUM_DEV_ROWS = 200  # rows 0-199 choose settings, 200-299 are for reporting only
KINDS = ("code", "man", "package", "pydoc")
MAX_PROMPT_CHARS = 4000  # ~1k tokens: the default model (SmolLM2-135M) runs on a slow CPU
MAX_REFERENCE_CHARS = 400
MIN_TEXT_CHARS = 400  # a man DESCRIPTION or package description shorter than this says too little
MAX_TOKENS = 64
REPORT_SHARE = 1 / 3  # of the groups (man, package) or rows (pydoc) that go to report
TARGET = {"dev": 200, "report": 100}  # rows per split of code and man (their sources have more)
MIXED_PER_KIND = {"dev": 100, "report": 50}
SEED = 0

# One shape for every instruction: the text, a blank line, the task, a cue line the answer follows.
MAN_TASK = "\n\nDescribe in one line what the command documented above does.\nOne-line description:"
PACKAGE_TASK = "\n\nSay in one sentence what the Python package described above is for.\nOne-sentence summary:"
PYDOC_TASK = "\n\nContinue the documentation above with its next paragraph.\nNext paragraph:"
ONE_LINE_STOP = ["\n"]
PARAGRAPH_STOP = ["\n\n"]


# -- common --------------------------------------------------------------------------------------


def make_row(kind: str, split: str, source: str, group: str, prompt: str, reference: str, stop: list[str],
             **extra: str) -> dict:
    return {"prompt": prompt, "reference": reference, "kind": kind, "split": split, "source": source,
            "group": group, "max_tokens": MAX_TOKENS, "stop": stop, **extra}


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def hash_split(group: str) -> str:
    """dev or report from the group's name alone, so adding inputs never moves a group."""
    fraction = int(hashlib.sha256(group.encode()).hexdigest()[:8], 16) / 2**32
    return "report" if fraction < REPORT_SHARE else "dev"


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, trailing spaces dropped."""
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return [p.strip("\n") for p in re.split(r"\n{2,}", text) if p.strip()]


def cut_paragraphs(text: str, budget: int) -> str:
    """The leading paragraphs of `text` that fit in `budget` characters; a first paragraph longer
    than that is cut at its last line break under the budget."""
    out: list[str] = []
    used = 0
    for p in paragraphs(text):
        size = used + 2 + len(p) if out else len(p)
        if size > budget:
            break
        out.append(p)
        used = size
    if out:
        return "\n\n".join(out)
    first = paragraphs(text)[0][:budget]
    return first[:first.rfind("\n")] if "\n" in first else ""


def cut_sentences(text: str, limit: int) -> str:
    """`text` if it fits in `limit` characters, else its sentences that do ("" if the first does not)."""
    if len(text) <= limit:
        return text
    ends = [m.end() for m in re.finditer(r"[.!?][\"')]?(?=\s)", text) if m.end() <= limit]
    return text[:ends[-1]] if ends else ""


def one_line(text: str) -> str:
    return " ".join(text.split())


# -- code: Python stdlib functions ---------------------------------------------------------------


def code_rows() -> list[dict]:
    """bench/stdlib_functions.py's rows in module order, cut at module boundaries: dev = the first modules
    (TARGET rows), report = the next ones (the script's own rows 0-199 / 200-299 when they align)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out: list[dict] = []
    split = "dev"
    for r in stdlib_functions.rows(stdlib, per_module=2, min_lines=3, max_lines=30, max_chars=3000):
        module = r["source"].split(":")[0]
        if out and out[-1]["group"] != f"stdlib:{module}":  # a module boundary
            done = sum(x["split"] == split for x in out)
            if done >= TARGET[split]:
                if split == "report":
                    break
                split = "report"
        out.append(make_row("code", split, f"stdlib:{r['source']}", f"stdlib:{module}", r["prompt"], r["body"],
                            r["stop"], python=r["python"]))
    return out


# -- man: manual pages, sections 1 and 8 -----------------------------------------------------------

MAN_DIRS = (Path("/usr/share/man/man1"), Path("/usr/share/man/man8"))  # English: no locale directory
FAMILY_CAP = 5  # pages per family (gcloud_*: 16k of 18k pages; git-*, llvm-*): one tool must not dominate
SECTION_HEADING = re.compile(r"^[A-Z][A-Z0-9 ,/&'()-]*$")
NAME_DASH = re.compile(r"\s[-\u2010\u2013\u2014]{1,2}\s")
NAME_LIST = re.compile(r"[\w.+-]+(,\s*[\w.+-]+)*")  # "gzip, gunzip, zcat"


def man_pages() -> list[tuple[str, str, Path]]:
    """(name, section, path) of the pages that are no symbolic links, in a fixed pseudo-random order
    (sha256 of the file name) so that the first pages taken are a sample, not the letter a."""
    pages = []
    for d in MAN_DIRS:
        for path in sorted(d.glob("*")) if d.is_dir() else []:
            m = re.fullmatch(r"(.+)\.([18][a-z]*)(\.gz)?", path.name)
            if m is None or path.is_symlink() or not path.is_file():
                continue
            pages.append((m[1], m[2], path))
    return sorted(pages, key=lambda p: hashlib.sha256(p[2].name.encode()).hexdigest())


def man_family(name: str) -> str:
    return re.split(r"[-_.]", name)[0].lower() or name


def is_alias(path: Path) -> bool:
    """A page that only includes another (`.so man1/other.1`)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return f.read(4) == b".so "


def render_man(path: Path) -> str | None:
    """The page as plain text, 80 columns, no hyphenation or justification, overstrikes removed."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MANWIDTH": "80", "LC_ALL": "C.UTF-8"}
    try:
        done = subprocess.run(["man", "--no-hyphenation", "--no-justification", "-P", "cat", "-l", str(path)],
                              capture_output=True, env=env, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    text = done.stdout.decode("utf-8", errors="replace")
    text = re.sub(r".\x08", "", text)  # bold (X\bX) and underline (_\bX)
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def man_sections(text: str) -> dict[str, str]:
    """Section name -> its body, dedented; the running header and footer lines are left out."""
    lines = text.strip("\n").split("\n")[1:-1]
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        if line and not line[0].isspace() and SECTION_HEADING.match(line):
            current = sections.setdefault(line.strip(), [])
        elif current is not None:
            current.append(line)
    return {k: textwrap.dedent("\n".join(v)).strip("\n") for k, v in sections.items()}


def name_description(name_section: str) -> str:
    """`ls - list directory contents` -> `list directory contents`, and a list of names that repeats
    the first goes too (`lz4 - lz4, unlz4, lz4cat - Compress ...`); "" without a description."""
    parts = NAME_DASH.split(one_line(name_section), maxsplit=1)
    if len(parts) < 2:
        return ""
    first, text = parts[0].split(",")[0], parts[1]
    while len(parts := NAME_DASH.split(text, maxsplit=1)) == 2 and NAME_LIST.fullmatch(parts[0]):
        if first not in re.split(r",\s*", parts[0]):
            break
        text = parts[1]
    return text.strip()


def man_row(name: str, section: str, path: Path, split: str) -> dict | None:
    text = render_man(path)
    if text is None:
        return None
    sections = man_sections(text)
    description = sections.get("DESCRIPTION", "")
    reference = cut_sentences(name_description(sections.get("NAME", "")), MAX_REFERENCE_CHARS)
    if not reference or len(description) < MIN_TEXT_CHARS:
        return None
    body = "DESCRIPTION\n" + description
    if sections.get("OPTIONS"):
        body += "\n\nOPTIONS\n" + sections["OPTIONS"]
    body = cut_paragraphs(body, MAX_PROMPT_CHARS - len(MAN_TASK))
    if len(body) < MIN_TEXT_CHARS:
        return None
    return make_row("man", split, f"man:{name}({section})", f"man:{man_family(name)}", body + MAN_TASK,
                    reference, ONE_LINE_STOP)


def man_rows() -> list[dict]:
    """Pages in hash order, at most FAMILY_CAP per family, until each split has its TARGET rows;
    a page whose NAME description another page already has is left out (tool aliases, versions)."""
    rows: dict[str, list[dict]] = {"dev": [], "report": []}
    per_family: dict[str, int] = {}
    seen: set[str] = set()
    for name, section, path in man_pages():
        family = man_family(name)
        split = hash_split(f"man:{family}")
        if per_family.get(family, 0) >= FAMILY_CAP or len(rows[split]) >= TARGET[split] or is_alias(path):
            continue
        row = man_row(name, section, path, split)
        if row is None or row["reference"].lower() in seen:
            continue
        seen.add(row["reference"].lower())
        per_family[family] = per_family.get(family, 0) + 1
        rows[split].append(row)
        if all(len(rows[s]) >= TARGET[s] for s in rows):
            break
    return rows["dev"] + rows["report"]


# -- package: installed distributions' metadata -----------------------------------------------------

OWN_PROJECT = "griffin-export"  # its description is this repository's README, which changes every commit
MAX_CODE_LINES = 10  # longer code blocks in a description are dropped: they are not prose about the package
MD_TARGET = r"(\([^)]*\)|\[[^\]]*\])"  # (url) or [reference]
MD_BADGE = re.compile(rf"\[!\[[^\]]*\]{MD_TARGET}\]{MD_TARGET}")
MD_IMAGE = re.compile(rf"!\[[^\]]*\]{MD_TARGET}")
MD_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_{1,2}")
HTML_TAG = re.compile(r"</?[A-Za-z][^>]*>")
LINK_DEF = re.compile(r"^\s*\[[^\]]+\]:\s*\S+")
BADGES = re.compile(r"(\s*\|[^|\s]([^|]*[^|\s])?\|_{0,2})+[\s|]*$")  # rst substitutions ending a line: |PyPI|
CODE_DIRECTIVE = re.compile(r"^\s*\.\. (code-block|code|sourcecode|highlight|doctest)::")
FENCE = re.compile(r"^\s*```")  # not ~~~: in rst that underlines a heading


def normal_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def metadata_description(md: Message) -> str:
    body = md.get_payload()
    if isinstance(body, str) and body.strip():
        return body
    # older metadata keeps it in a header, continuation lines indented by 8 spaces or "       |"
    return re.sub(r"\n(?: {7}\|| {8})", "\n", md.get("Description") or "")


def indented_block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the block of blank or more-than-`indent` indented lines that begins at `start`."""
    i = start
    while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
        i += 1
    while i > start and not lines[i - 1].strip():
        i -= 1  # its trailing blank lines separate it from what follows; keep them
    return i


def drop_blocks(lines: list[str]) -> list[str]:
    """Drops rst directives other than code (images, badges, raw HTML, comments, link targets) with
    their indented content, and code blocks (fenced or rst literal) longer than MAX_CODE_LINES."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        if FENCE.match(line):
            end = next((j for j in range(i + 1, len(lines)) if FENCE.match(lines[j])), len(lines) - 1)
            if end - i - 1 <= MAX_CODE_LINES:
                out.extend(lines[i:end + 1])
            i = end + 1
        elif line.lstrip().startswith(".. ") and not CODE_DIRECTIVE.match(line):
            i = indented_block_end(lines, i + 1, indent)
        elif CODE_DIRECTIVE.match(line) or (line.rstrip().endswith("::") and line.strip() != "::"):
            end = indented_block_end(lines, i + 1, indent)
            code = [x for x in lines[i + 1:end] if x.strip()]
            keep = len(code) <= MAX_CODE_LINES
            if not CODE_DIRECTIVE.match(line):
                out.append(line.rstrip()[:-1])  # "Example::" reads "Example:" in the rendered text
            out.extend(lines[i + 1:end] if keep else [])
            i = end
        else:
            out.append(line)
            i += 1
    return out


def clean_description(text: str) -> str:
    """Plain-ish text of a Markdown or reStructuredText long description: no badges or images, no raw
    HTML tags (their text stays), links as their text, no long code blocks."""
    text = re.sub(r"<!--.*?-->", "", text.replace("\r\n", "\n").replace("\t", "    "), flags=re.S)
    out = []
    for line in drop_blocks(text.split("\n")):
        markup = bool(MD_IMAGE.search(line) or HTML_TAG.search(line) or BADGES.search(line))
        line = BADGES.sub("", HTML_TAG.sub("", MD_IMAGE.sub("", MD_BADGE.sub("", line))))
        line = RST_LINK.sub(r"\1", MD_LINK.sub(r"\1", line)).rstrip()
        if markup and not re.search(r"\w", line) or LINK_DEF.match(line):
            continue  # a line that held only images, tags, a link definition or badge substitutions
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def license_of(md: Message) -> str:
    """The distribution's own statement: License-Expression, a one-line License field, the license
    classifiers, or the first line of a License field that holds the whole text."""
    if md.get("License-Expression"):
        return md["License-Expression"].strip()
    field = (md.get("License") or "").strip()
    if field and "\n" not in field and len(field) <= 80 and field.upper() != "UNKNOWN":
        return field
    classifiers = sorted(c.split(" :: ")[-1] for c in md.get_all("Classifier") or [] if c.startswith("License ::"))
    if classifiers:
        return " / ".join(classifiers)
    return field.split("\n")[0][:80] if field and field.upper() != "UNKNOWN" else "not stated in its metadata"


def package_rows() -> list[dict]:
    """One row per installed distribution (by normalized name; a repeated Summary counts once) with a
    Summary and a cleaned description of at least MIN_TEXT_CHARS; the split by a hash of the name."""
    dists = sorted(importlib.metadata.distributions(),
                   key=lambda d: (normal_name(d.metadata["Name"] or ""), d.metadata["Version"] or ""))
    rows: list[dict] = []
    names: set[str] = set()
    summaries: set[str] = set()
    for d in dists:
        md = d.metadata
        name = normal_name(md["Name"] or "")
        summary = one_line(md.get("Summary") or "")
        if not name or name == OWN_PROJECT or name in names or summary.upper() in ("", "UNKNOWN"):
            continue
        names.add(name)
        text = clean_description(metadata_description(md))
        reference = cut_sentences(summary, MAX_REFERENCE_CHARS)
        if len(text) < MIN_TEXT_CHARS or not reference or summary.lower() in summaries:
            continue
        summaries.add(summary.lower())
        source = f"pypi:{name}"
        body = cut_paragraphs(text, MAX_PROMPT_CHARS - len(PACKAGE_TASK))
        rows.append(make_row("package", hash_split(source), source, source, body + PACKAGE_TASK, reference,
                             ONE_LINE_STOP, version=md["Version"], license=license_of(md)))
    return [r for s in ("dev", "report") for r in rows if r["split"] == s]


# -- pydoc: Python's documentation topics ------------------------------------------------------------

PASSAGE_CHARS = 1600  # the passage before the gold next paragraph: ~400 tokens at most
MIN_PASSAGE_CHARS = 400
MIN_REFERENCE_CHARS = 100
SHARED_PARAGRAPH_CHARS = 40  # topics sharing a paragraph this long are one group


def is_prose(paragraph: str) -> bool:
    """A paragraph worth predicting: unindented text, no heading underline, a sentence long enough."""
    if not (paragraph[:1].isalpha() or paragraph[:1] == '"') or re.search(r"^[*=-]{3,}$", paragraph, re.M):
        return False
    return len(cut_sentences(paragraph, MAX_REFERENCE_CHARS)) >= MIN_REFERENCE_CHARS


def topic_runs(texts: dict[str, list[str]]) -> dict[str, list[list[str]]]:
    """Each topic's runs of paragraphs to cut passages from: the whole topic, but for an umbrella topic
    (one at least half of whose text is in the others: `compound` holds `for`, `while`, ...,
    `specialnames` holds `customization`, ...; taken largest first) only its runs of paragraphs found
    nowhere else. Whole, they would tie a third of all topics into one group of the split."""
    runs: dict[str, list[list[str]]] = {t: [paras] for t, paras in texts.items()}
    for topic in sorted(texts, key=lambda t: (-sum(map(len, texts[t])), t)):
        elsewhere = {p for t, r in runs.items() if t != topic for paras in r for p in paras
                     if len(p) >= SHARED_PARAGRAPH_CHARS}
        if sum(len(p) for p in texts[topic] if p in elsewhere) >= sum(map(len, texts[topic])) / 2:
            cut: list[list[str]] = [[]]
            for p in texts[topic]:
                if p in elsewhere:
                    cut.append([])
                else:
                    cut[-1].append(p)
            runs[topic] = [r for r in cut if r]
    return runs


def topic_groups(texts: dict[str, list[str]]) -> dict[str, str]:
    """Topic -> its group: the alphabetically first topic among those linked by shared paragraphs."""
    parent = {t: t for t in texts}

    def root(t: str) -> str:
        while parent[t] != t:
            t = parent[t]
        return t

    owner: dict[str, str] = {}
    for topic in sorted(texts):
        for p in texts[topic]:
            if len(p) >= SHARED_PARAGRAPH_CHARS:
                a, b = root(owner.setdefault(p, topic)), root(topic)
                parent[max(a, b)] = min(a, b)
    return {t: root(t) for t in texts}


def passages(paras: list[str]) -> Iterator[tuple[str, str]]:
    """(passage, next paragraph) windows over one topic: each passage the longest run of paragraphs
    under PASSAGE_CHARS that is followed by prose; the next window starts after that paragraph."""
    i = 0
    while i < len(paras):
        size, best = 0, None
        for j in range(i, len(paras)):
            size += len(paras[j]) + 2
            if size > PASSAGE_CHARS:
                break
            if size >= MIN_PASSAGE_CHARS and j + 1 < len(paras) and is_prose(paras[j + 1]):
                best = j + 1
        if best is None:
            i += 1
            continue
        yield "\n\n".join(paras[i:best]), cut_sentences(paras[best], MAX_REFERENCE_CHARS)
        i = best + 1


def balanced_split(rows: list[dict]) -> None:
    """Sets each row's split by its group: groups in hash order, each to report while report holds less
    than REPORT_SHARE of the rows so far. A plain hash split of pydoc's few, uneven groups (`types`
    alone has 18 rows) leaves report well under a third."""
    sizes: dict[str, int] = {}
    for r in rows:
        sizes[r["group"]] = sizes.get(r["group"], 0) + 1
    report: set[str] = set()
    done = in_report = 0
    for group in sorted(sizes, key=lambda g: hashlib.sha256(g.encode()).hexdigest()):
        if in_report + sizes[group] / 2 <= REPORT_SHARE * (done + sizes[group]):
            report.add(group)
            in_report += sizes[group]
        done += sizes[group]
    for r in rows:
        r["split"] = "report" if r["group"] in report else "dev"


def pydoc_rows() -> list[dict]:
    """Passages of every topic, sorted by topic; a reference another topic already used is skipped;
    topics that share text are one group, and a group's rows all go to one split."""
    import pydoc_data.topics

    runs = topic_runs({t: paragraphs(body) for t, body in sorted(pydoc_data.topics.topics.items())})
    groups = topic_groups({t: [p for run in r for p in run] for t, r in runs.items()})
    rows: list[dict] = []
    used: set[str] = set()
    for topic, topic_paras in runs.items():
        for passage, reference in (w for paras in topic_paras for w in passages(paras)):
            if reference not in used:
                used.add(reference)
                rows.append(make_row("pydoc", "", f"pydoc:{topic}", f"pydoc:{groups[topic]}", passage + PYDOC_TASK,
                                     reference, PARAGRAPH_STOP, python=python_version()))
    balanced_split(rows)
    return [r for s in ("dev", "report") for r in rows if r["split"] == s]


# -- mixed logs -----------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def xsum_rows(path: Path = XSUM_FILE) -> list[dict]:
    """The XSum file mapped to the common fields; `source` is the row in GRIFFIN's xsum_1shot.jsonl."""
    return [make_row("xsum", "dev" if i < XSUM_DEV_ROWS else "report", f"xsum_1shot:{i}", f"xsum_1shot:{i}",
                     r["article"], r["summary_gt"], r["stop"]) | {"max_tokens": r["max_tokens"]}
            for i, r in enumerate(read_jsonl(path))]


def mixed_rows(by_kind: dict[str, list[dict]], split: str) -> list[dict]:
    """MIXED_PER_KIND[split] rows of each kind drawn (seeded) from its `split` rows that fit the prompt
    limit (long XSum articles are left out), shuffled; `row` is the line in the kind's own file."""
    out = []
    for kind in sorted(by_kind):
        pool = [r | {"row": i} for i, r in enumerate(by_kind[kind])
                if r["split"] == split and len(r["prompt"]) <= MAX_PROMPT_CHARS]
        rng = random.Random(f"{SEED}:{kind}:{split}")
        out.extend(sorted(rng.sample(pool, min(MIXED_PER_KIND[split], len(pool))), key=lambda r: r["row"]))
    random.Random(f"{SEED}:{split}").shuffle(out)
    return out


# -- output ---------------------------------------------------------------------------------------------

BUILDERS = {"code": code_rows, "man": man_rows, "package": package_rows, "pydoc": pydoc_rows}


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    rows = list(rows)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path}: {describe(rows)}")


def describe(rows: list[dict]) -> str:
    """Rows per split and kind, and the mean/median/max characters of prompt and reference."""
    counts = {s: sum(r["split"] == s for r in rows) for s in ("dev", "report")}
    kinds = sorted({r["kind"] for r in rows})
    parts = [f"{counts['dev']} dev + {counts['report']} report rows" + (f", kinds {kinds}" if len(kinds) > 1 else "")]
    for field in ("prompt", "reference"):
        n = [len(r[field]) for r in rows]
        parts.append(f"{field} chars mean {statistics.mean(n):.0f} / median {statistics.median(n):.0f} / max {max(n)}")
    return "; ".join(parts)


def build_mixed() -> None:
    by_kind = {kind: read_jsonl(DATA_DIR / f"{kind}.jsonl") for kind in KINDS}
    by_kind["xsum"] = xsum_rows()
    for split in ("dev", "report"):
        write_jsonl(DATA_DIR / f"mixed_{split}.jsonl", mixed_rows(by_kind, split))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=[*KINDS, "mixed", "all"])
    p.add_argument("-o", "--output", type=Path, help="JSONL file for one kind [bench/data/KIND.jsonl]")
    args = p.parse_args(argv)
    if args.output is not None and args.kind not in KINDS:
        p.error(f"-o names one kind's file; `{args.kind}` writes into {DATA_DIR}")
    kinds = KINDS if args.kind == "all" else (args.kind,) if args.kind in KINDS else ()
    for kind in kinds:
        write_jsonl(args.output or DATA_DIR / f"{kind}.jsonl", BUILDERS[kind]())
    if args.kind in ("mixed", "all"):
        build_mixed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
