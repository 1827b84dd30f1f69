"""The user documents: a short README whose two set-up commands stay as they were, links
that lead somewhere, and no tracker numbers a user cannot look up."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
USER_DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

MAIN_JOB = (
    "python3 -m venv .venv && .venv/bin/pip install -e . && mkdir -p inbox && "
    ".venv/bin/cellwatch watch --config config.yaml --inbox inbox"
)
TESTS = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/pytest"


def test_the_readme_is_short_and_keeps_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    assert MAIN_JOB in text and TESTS in text
    assert text.index(MAIN_JOB) < text.index("## Where the counts are")


def test_every_local_link_of_the_user_documents_leads_to_a_file():
    broken = []
    for doc in USER_DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_no_user_document_names_an_issue_number():
    found = [
        f"{doc.relative_to(ROOT)}: {m.group(0)}"
        for doc in USER_DOCS
        for m in re.finditer(r"[Ii]ssue[s]? #?\d+", doc.read_text(encoding="utf-8"))
    ]
    assert not found, found
