"""The guides say what the code does: their examples run, their source links point at the code, and
each Chinese guide and its English twin carry the same examples.

Conventions (for README*.md and docs/*.md):

- A fenced block whose info string is ``python runnable`` or ``bash runnable`` is run; one marked
  ``python runnable slow`` (or ``bash runnable slow``) only under ``pytest -m slow``. GitHub shows the
  first word as the language and ignores the rest.
- The runnable blocks of one document run in order in one fresh temporary directory, so a block may
  use the files an earlier block wrote (a fast block must not need a slow block's files). Each Python
  block is its own ``python`` process, so it has its own imports; a bash block runs under
  ``bash -euo pipefail`` with the virtual environment's ``bin/`` first on PATH. Both get
  ``OMP_NUM_THREADS=1``.
- A source link ``[`name`](../src/minillm/x.py#L10-L12)`` must point at an existing file and lines,
  and ``name`` (its last dotted part) must appear in those lines. Other relative links must lead to a
  file of the repository and, with a ``#anchor``, to one of its headings.
- docs/X.md (Chinese) and docs/X_en.md (English) come in pairs with the same number of code blocks
  and the same runnable blocks, which may differ in their comments only (Chinese comments in one,
  English in the other); so do README.md and README_en.md. Since the code is the same, a pair's
  examples run once, from the English document (whose first lines make readable test ids).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([p for p in (ROOT / "README.md", ROOT / "README_en.md") if p.is_file()]
                   + list((ROOT / "docs").glob("*.md")))
LANGUAGES = ("python", "bash")
FAST_TIMEOUT_S = 120
SLOW_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Block:
    document: Path
    line: int  # 1-based line of the opening fence
    info: str
    code: str

    @property
    def words(self) -> list[str]:
        return self.info.split()

    @property
    def runnable(self) -> bool:
        return "runnable" in self.words

    @property
    def language(self) -> str:
        return self.words[0] if self.words else ""

    @property
    def slow(self) -> bool:
        return self.runnable and "slow" in self.words

    @property
    def title(self) -> str:
        """The block's first non-blank line, for test ids and messages."""
        first = next((line.strip() for line in self.code.splitlines() if line.strip()), "")
        return first.lstrip("#").strip()

    def where(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def code_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a markdown file, indented ones (inside list items) included."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body, j = [], i + 1
        while j < len(lines) and not closing.match(lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        blocks.append(Block(path, i + 1, opening["info"].strip(), "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def runnable_blocks(path: Path) -> list[Block]:
    return [b for b in code_blocks(path) if b.runnable]


def english_twin(document: Path) -> Path | None:
    """README_en.md for README.md, docs/X_en.md for docs/X.md; None for an English document."""
    if document.stem.endswith("_en"):
        return None
    return document.with_name(document.stem + "_en.md")


def without_comments(block: Block) -> str:
    """The block's code with its comments removed: what the translations must have in common."""
    if block.language == "python":
        try:
            tokens = tokenize.generate_tokens(io.StringIO(block.code).readline)
            return repr([(t.type, t.string) for t in tokens if t.type not in (tokenize.COMMENT, tokenize.NL)])
        except (tokenize.TokenError, SyntaxError):
            return block.code
    lines = [re.sub(r"(^|\s+)#(\s.*)?$", "", line).rstrip() for line in block.code.splitlines()]
    return "\n".join(line for line in lines if line)


def _block_params() -> list:
    params = []
    for document in DOCUMENTS:
        twin = english_twin(document)
        if twin is not None and twin.is_file():
            continue  # the same code as its English twin's (test_translations_carry_the_same_examples)
        for index, block in enumerate(runnable_blocks(document)):
            title = re.sub(r"\s+", " ", block.title.encode("ascii", "ignore").decode()).strip()
            name = f"{document.relative_to(ROOT)}#{index}:{title[:40]}"
            params.append(pytest.param(document, index, id=name,
                                       marks=[pytest.mark.slow] if block.slow else []))
    return params


# ---------------------------------------------------------------------------------------- running
class _DocumentRun:
    """One document's working directory and which of its blocks have run there, and how."""

    def __init__(self, document: Path, factory: pytest.TempPathFactory) -> None:
        self.blocks = runnable_blocks(document)
        stem = document.stem.replace(".", "_")
        self.workdir = factory.mktemp(f"doc-{stem}")
        self.scripts = factory.mktemp(f"doc-{stem}-scripts")
        self.outcome: dict[int, str | None] = {}  # index -> None (passed) or the failure message

    def run_through(self, index: int) -> None:
        """Run block `index`, after the earlier blocks it may depend on (the fast ones, and for a slow
        block the slow ones too) if they have not run yet."""
        target = self.blocks[index]
        for i in range(index):
            if i not in self.outcome and (target.slow or not self.blocks[i].slow):
                self.outcome[i] = self._run(i)
            if self.outcome.get(i) is not None:
                pytest.fail(f"{target.where()} not run: the earlier block at {self.blocks[i].where()} failed",
                            pytrace=False)
        if index not in self.outcome:
            self.outcome[index] = self._run(index)
        if self.outcome[index] is not None:
            pytest.fail(self.outcome[index], pytrace=False)

    def _run(self, index: int) -> str | None:
        block = self.blocks[index]
        if block.language not in LANGUAGES:
            return f"{block.where()}: cannot run a {block.language!r} block (runnable languages: {LANGUAGES})"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8",
               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        script = self.scripts / f"block_{index:02d}.{'py' if block.language == 'python' else 'sh'}"
        script.write_text(block.code, encoding="utf-8")
        command = ([sys.executable, str(script)] if block.language == "python"
                   else ["bash", "-euo", "pipefail", str(script)])
        timeout = SLOW_TIMEOUT_S if block.slow else FAST_TIMEOUT_S
        try:
            result = subprocess.run(command, cwd=self.workdir, env=env, capture_output=True, text=True,
                                    timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"{block.where()}: timed out after {timeout} s\n{_excerpt(block)}"
        if result.returncode == 0:
            return None
        return (f"{block.where()}: exit status {result.returncode}\n{_excerpt(block)}\n"
                f"--- stdout (end) ---\n{result.stdout[-2000:]}\n--- stderr (end) ---\n{result.stderr[-4000:]}")


def _excerpt(block: Block, lines: int = 4) -> str:
    head = block.code.splitlines()[:lines]
    return "--- block ---\n" + textwrap.indent("\n".join(head) + "\n...", "    ")


class _DocumentRuns(dict):
    """One `_DocumentRun` per document, made on first use."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.factory = factory

    def __missing__(self, document: Path) -> _DocumentRun:
        self[document] = _DocumentRun(document, self.factory)
        return self[document]


@pytest.fixture(scope="session")
def document_runs(tmp_path_factory: pytest.TempPathFactory) -> _DocumentRuns:
    return _DocumentRuns(tmp_path_factory)


@pytest.mark.parametrize(("document", "index"), _block_params())
def test_runnable_block(document: Path, index: int, document_runs: _DocumentRuns) -> None:
    document_runs[document].run_through(index)


def test_runnable_markers_are_well_formed() -> None:
    """A block that mentions `runnable` is one the tests understand (no typo silently skips a block)."""
    problems = []
    for document in DOCUMENTS:
        for block in code_blocks(document):
            if "runnable" not in block.info:
                continue
            words = block.words
            if block.language not in LANGUAGES or words[1:2] != ["runnable"] or words[2:] not in ([], ["slow"]):
                problems.append(f"{block.where()}: info string {block.info!r}; expected "
                                f"'python|bash runnable' optionally followed by 'slow'")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------- source links
_LINK = re.compile(r"\[`(?P<symbol>[^`]+)`\]\((?P<target>[^)\s]*src/[^)\s]*)\)")
_TARGET = re.compile(r"^(?P<path>[^#]+\.py)#L(?P<start>\d+)(?:-L(?P<end>\d+))?$")


def _symbol_name(text: str) -> str:
    """`MiniGPTConfig.flops_per_token()` -> `flops_per_token`."""
    return re.sub(r"\(.*\)$", "", text.strip()).rsplit(".", 1)[-1]


def _where_defined(lines: list[str], symbol: str) -> str:
    word = re.escape(symbol)
    definition = re.compile(rf"^\s*(?:async\s+def|def|class)\s+{word}\b|^\s*{word}\s*[:=]|\bself\.{word}\s*=")
    found = [n for n, line in enumerate(lines, start=1) if definition.search(line)]
    if not found:
        found = [n for n, line in enumerate(lines, start=1) if re.search(rf"\b{word}\b", line)][:5]
        return f"`{symbol}` is mentioned at lines {found}" if found else f"`{symbol}` is not in this file"
    return f"`{symbol}` is defined at line{'s' if len(found) > 1 else ''} {', '.join(map(str, found))}"


def source_link_problems(document: Path) -> list[str]:
    problems = []
    text = document.read_text(encoding="utf-8")
    for match in _LINK.finditer(text):
        line_no = text.count("\n", 0, match.start()) + 1
        where = f"{document.relative_to(ROOT)}:{line_no}: [`{match['symbol']}`]({match['target']})"
        target = _TARGET.match(match["target"])
        if target is None:
            problems.append(f"{where}: expected a target like ../src/minillm/x.py#L10 or #L10-L12")
            continue
        path = (document.parent / target["path"]).resolve()
        if not path.is_file():
            problems.append(f"{where}: no such file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        start = int(target["start"])
        end = int(target["end"] or start)
        symbol = _symbol_name(match["symbol"])
        if not 1 <= start <= end <= len(lines):
            problems.append(f"{where}: lines {start}-{end} are outside the file ({len(lines)} lines); "
                            f"{_where_defined(lines, symbol)}")
            continue
        if not re.search(rf"\b{re.escape(symbol)}\b", "\n".join(lines[start - 1:end])):
            problems.append(f"{where}: `{symbol}` is not in lines {start}-{end}; {_where_defined(lines, symbol)}")
    return problems


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_source_links_point_at_the_code(document: Path) -> None:
    problems = source_link_problems(document)
    assert not problems, "source links that drifted from the code:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------- other links
_ANY_LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file: lower case, punctuation dropped, spaces to '-'."""
    anchors: set[str] = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_code = not in_code
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading and not in_code:
            base = re.sub(r"[^\w\- ]", "", heading[1].replace("`", "").lower()).replace(" ", "-")
            anchor, n = base, 0
            while anchor in anchors:
                n += 1
                anchor = f"{base}-{n}"
            anchors.add(anchor)
    return anchors


def local_link_problems(document: Path) -> list[str]:
    """Links to other files of the repository (and their #anchors) that lead nowhere."""
    problems = []
    text = document.read_text(encoding="utf-8")
    for match in _ANY_LINK.finditer(text):
        target = match["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or _LINK.fullmatch(match[0]):
            continue  # a URL, or a source link (checked above)
        path_part, _, anchor = target.partition("#")
        path = (document.parent / path_part).resolve() if path_part else document
        line_no = text.count("\n", 0, match.start()) + 1
        where = f"{document.relative_to(ROOT)}:{line_no}: ({target})"
        if not path.exists():
            problems.append(f"{where}: no such file")
        elif anchor and path.suffix == ".md" and anchor.lower() not in heading_anchors(path):
            problems.append(f"{where}: no heading with anchor #{anchor} in {path.name}")
    return problems


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_to_other_files_resolve(document: Path) -> None:
    problems = local_link_problems(document)
    assert not problems, "broken links:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------- translations
def _pairs() -> list[tuple[Path, Path]]:
    pairs = [(ROOT / "README.md", ROOT / "README_en.md")]
    for path in sorted((ROOT / "docs").glob("*.md")):
        if not path.stem.endswith("_en"):
            pairs.append((path, path.with_name(f"{path.stem}_en.md")))
    return pairs


def test_every_guide_has_its_translation() -> None:
    docs = ROOT / "docs"
    missing = [f"{p.relative_to(ROOT)} has no {p.with_name(p.stem + '_en.md').name}"
               for p in docs.glob("*.md") if not p.stem.endswith("_en") and not p.with_name(p.stem + "_en.md").is_file()]
    missing += [f"{p.relative_to(ROOT)} has no {p.with_name(p.stem.removesuffix('_en') + '.md').name}"
                for p in docs.glob("*_en.md") if not p.with_name(p.stem.removesuffix("_en") + ".md").is_file()]
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize(("chinese", "english"), [p for p in _pairs() if p[0].is_file() and p[1].is_file()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_translations_carry_the_same_examples(chinese: Path, english: Path) -> None:
    zh, en = code_blocks(chinese), code_blocks(english)
    assert len(zh) == len(en), (f"{chinese.name} has {len(zh)} code blocks, {english.name} {len(en)}: "
                                f"{[b.info for b in zh]} vs {[b.info for b in en]}")
    zh_run, en_run = [b for b in zh if b.runnable], [b for b in en if b.runnable]
    assert [b.info for b in zh_run] == [b.info for b in en_run], "the runnable blocks differ in kind or order"
    for a, b in zip(zh_run, en_run):
        assert without_comments(a) == without_comments(b), \
            f"runnable blocks differ in more than their comments: {a.where()} vs {b.where()}"
