"""Every document the repository cites is in the repository: a reader of the code, the
README or a config file can open each `*.md` path it names (and each heading a link
points to)."""
import os
import re
import subprocess

from tests.launch import ROOT

# A path ending in .md, not part of a longer word or path ("docs/design.md", "../README.md").
CITED = re.compile(r"(?<![\w./-])((?:\.{1,2}/|[\w-]+/)*[\w.-]*\w\.md)(#[\w-]+)?")
RESULTS = os.path.join(ROOT, "experiments", "results")


def repository_files() -> list[str]:
    """Tracked files and new ones git does not ignore (not runs/, caches, ...)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=True)
    return [path for path in listed.stdout.splitlines() if os.path.isfile(os.path.join(ROOT, path))]


def study_tables() -> set[str]:
    """Names of the tables the studies write (table.md, best_settings.md, ...), as committed."""
    return {name for _, _, files in os.walk(RESULTS) for name in files if name.endswith(".md")}


def heading_anchors(path: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (lower case, punctuation dropped, spaces to -)."""
    with open(path) as f:
        headings = [line.lstrip("#").strip() for line in f if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_cited_document_exists():
    missing, tables = [], study_tables()
    for path in repository_files():
        if not path.endswith((".py", ".md", ".yaml", ".yml")):
            continue
        with open(os.path.join(ROOT, path), errors="replace") as f:
            text = f.read()
        for match in CITED.finditer(text):
            cited, anchor = match.group(1), match.group(2)
            found = [os.path.join(ROOT, os.path.dirname(path), cited), os.path.join(ROOT, cited)]
            found = next((candidate for candidate in found if os.path.isfile(candidate)), None)
            if found is None and "/" not in cited and cited in tables:
                continue  # a table the studies write into their output folder (committed under experiments/results/)
            if found is None:
                missing.append(f"{path} cites {cited}, which is not in the repository")
            elif anchor and anchor[1:] not in heading_anchors(found):
                missing.append(f"{path} links to {cited}{anchor}, a heading {cited} does not have")
    assert not missing, "\n".join(missing)


def test_the_docs_are_there():
    for path in ("docs/algorithms.md", "docs/design.md", "docs/configuration.md"):
        assert os.path.getsize(os.path.join(ROOT, path)) > 1000
