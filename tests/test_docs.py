"""The documentation points at things that exist: README.md stays short, and every relative link, repository
path and module named in README.md and docs/*.md resolves in this checkout.

Fast and without Ray: it reads Markdown files and checks paths, so it belongs to `make test-fast`.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_BYTES = 12_000
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCED_BLOCK = re.compile(r"^[ \t]*```.*?^[ \t]*```", re.S | re.M)
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)

FILE_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".json", ".png", ".toml", ".txt")
TOP_FOLDERS = ("engine/", "actors/", "jobs/", "configs/", "tests/", "k8s/", "benchmarks/", "docs/")
MODULE_PACKAGES = ("engine", "actors", "jobs", "benchmarks", "tests")
# Not repository paths: templates and globs (`<out>/data`, `configs/unidiffda_*.yaml`, `{md,json}`), prose
# with spaces, absolute and home paths, URIs, and what a run generates under the git-ignored outputs/ and
# .cache/ folders.
NOT_REPO_PATH = re.compile(r"[<>*{}\s]|^(/|~|s3:|gs:|outputs/|\.cache/|\.venv)")
# Files that a generation run writes inside its own output folder (docs/pipeline.md lists them as such):
# generated output, not files of this repository.
RUN_OUTPUT_PATHS = {"gallery/index.html", "gallery/contact_sheet.png"}


def prose(document: Path) -> str:
    """The document without its fenced code blocks (commands and config examples, not references)."""
    return FENCED_BLOCK.sub("", document.read_text())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(document: Path) -> set[str]:
    return {slug(heading) for heading in HEADING.findall(prose(document))}


def relative_links(document: Path) -> list[str]:
    return [target for target in LINK.findall(prose(document)) if not re.match(r"^(https?:|mailto:)", target)]


def path_candidates(document: Path) -> list[tuple[str, bool]]:
    """(token, whole) pairs: each backticked token, or the words of one that holds a command, and the words of
    the fenced code blocks (the commands and configs the documents show)."""
    text = document.read_text()
    candidates = []
    for token in INLINE_CODE.findall(FENCED_BLOCK.sub("", text)):
        if re.search(r"\s", token):
            candidates += [(word, False) for word in token.split()]
        else:
            candidates.append((token, True))
    for block in FENCED_BLOCK.findall(text):
        candidates += [(word.strip("\"',;()[]"), False) for word in block.split()]
    return candidates


def repo_paths(document: Path) -> list[str]:
    """Tokens that name a file of this repository (`engine/stages/loop.py`, `configs/aga_tiny_cpu.yaml`) or a
    folder under one of its top-level folders (`engine/readers/`). Words taken out of commands and code blocks
    count only when they start with a top-level folder of the repository."""
    paths = []
    for token, whole in path_candidates(document):
        if "/" not in token or NOT_REPO_PATH.search(token) or token in RUN_OUTPUT_PATHS:
            continue
        if not whole and not token.startswith(TOP_FOLDERS):
            continue
        if token.endswith(FILE_SUFFIXES) or (token.endswith("/") and token.startswith(TOP_FOLDERS)):
            paths.append(token)
    return paths


def module_names(document: Path) -> list[str]:
    """Backticked dotted names of this project's modules (`engine.readers.inspect_source`, `jobs.generate`)."""
    pattern = re.compile(rf"^(?:{'|'.join(MODULE_PACKAGES)})(?:\.\w+)+$")
    return [token for token in INLINE_CODE.findall(prose(document)) if pattern.match(token)]


def module_resolves(name: str) -> bool:
    """The longest prefix of `name` that is a module or package exists, and at most one attribute follows it,
    defined or imported in that module's source."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:end])
        source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if not source.is_file():
            continue
        rest = parts[end:]
        if not rest:
            return True
        return len(rest) == 1 and re.search(rf"\b{re.escape(rest[0])}\b", source.read_text()) is not None
    return False


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes (at most {README_MAX_BYTES}): move depth to docs/"
    )


def test_documents_exist():
    assert (ROOT / "docs" / "README.md").is_file()
    assert len(DOCUMENTS) > 2


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(document):
    broken = []
    for target in relative_links(document):
        path_part, _, anchor = target.partition("#")
        linked = (document.parent / path_part).resolve() if path_part else document
        if not linked.exists():
            broken.append(f"{target}: no such file or folder")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, f"{document.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_repository_paths_exist(document):
    missing = [path for path in repo_paths(document) if not (ROOT / path).exists()]
    assert not missing, f"{document.relative_to(ROOT)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_module_names_resolve(document):
    unresolved = [name for name in module_names(document) if not module_resolves(name)]
    assert not unresolved, f"{document.relative_to(ROOT)} names modules that do not exist: {unresolved}"


def test_the_checks_see_what_they_check():
    """The extractors find the kinds of references the documents hold (a regex that matched nothing would
    pass every test above)."""
    pipeline = ROOT / "docs" / "pipeline.md"
    assert "engine/stages/loop.py" in repo_paths(pipeline)
    assert "engine.readers.inspect_source" in module_names(pipeline)
    assert any(target.startswith("resume-and-failures.md") for target in relative_links(pipeline))
    assert "docs/performance.md" in relative_links(README)
    assert not module_resolves("engine.stages.no_such_module")
    assert not module_resolves("engine.readers.no_such_function_anywhere")
