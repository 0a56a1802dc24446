"""The README and the pages of docs/ link to each other: every relative link names a file that exists and, where it
names a section (`page.md#section`), a heading of that page (GitHub's anchor rule)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a '#' line inside a code block is no heading
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_anchor_follows_githubs_rule():
    assert anchor("Capture: observing and sparsifying without patching") == \
        "capture-observing-and-sparsifying-without-patching"
    assert anchor("`--method marginal`") == "--method-marginal"
    assert anchor("Scale-out") == "scale-out"


def test_every_relative_link_of_the_readme_and_docs_resolves():
    broken = []
    for page in DOCUMENTS:
        for target in relative_links(page):
            path, _, section = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif section and file.suffix == ".md" and section not in anchors(file):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such section)")
    assert not broken, "\n".join(broken)


def test_every_page_of_docs_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in relative_links(REPO / "README.md")}
    pages = set(p.resolve() for p in (REPO / "docs").glob("*.md"))
    assert pages - linked == set(), f"pages the README does not link: {sorted(p.name for p in pages - linked)}"
