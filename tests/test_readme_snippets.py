"""Every ```python block of README.md runs as written (issue 22).

Each block runs alone in a fresh interpreter (``run_child``: the checkout importable, as
from its root) with a temporary directory as its working directory, so a block that
writes a file writes it there. A block may import an optional package (``OPTIONAL``): it
is skipped, saying which, where that package is missing, and skipped for no other
reason. ```bash blocks and unlabelled fences are not run.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from child_process import ROOT, run_child

README = ROOT / "README.md"
# the ```python blocks README.md holds now: a parser that finds fewer (or more) fails here
EXPECTED_BLOCKS = 6
FENCE_LANGUAGES = {"python", "bash", ""}  # a ```py or ```pycon block would go unrun
# optional packages a block may import: its test skips, saying so, without them
OPTIONAL = {
    "torchao": 'pip install "torchao==0.18.0"',
    "triton": "pip install triton",
    "torchvision": "pip install torchvision",
    "transformers": 'pip install "transformers==5.25.0" "accelerate==1.16.0"',
}
TIMEOUT_S = 120
# the blocks' ops are tiny: one thread each, so that on a busy machine OpenMP's threads
# do not wait on each other (about 2x the time with 2 threads at load 7 on 2 cores)
THREADS = {"OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Block:
    id: str  # the nearest heading above, as a slug (-2, -3 for later blocks under it)
    line: int  # README line of the block's first code line
    code: str


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def parse_fences(text: str) -> tuple[list[Block], list[str]]:
    """The ```python blocks of ``text`` and the language of every fence opened in it."""
    blocks, languages, ids = [], [], {}
    heading, fence, start, body = "top", None, 0, []
    for n, line in enumerate(text.splitlines(), start=1):
        if fence is None:
            if line.startswith("```"):
                fence, start, body = line[3:].strip(), n + 1, []
                languages.append(fence)
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.strip() == "```":
            if fence == "python":
                slug = _slug(heading)
                ids[slug] = ids.get(slug, 0) + 1
                name = slug if ids[slug] == 1 else f"{slug}-{ids[slug]}"
                blocks.append(Block(name, start, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"README.md: the ```{fence} fence at line {start - 1} is not closed"
    return blocks, languages


BLOCKS, LANGUAGES = parse_fences(README.read_text(encoding="utf-8"))


def test_blocks_found():
    assert len(BLOCKS) == EXPECTED_BLOCKS, (
        f"found {len(BLOCKS)} ```python blocks in README.md, expected {EXPECTED_BLOCKS}: "
        f"{[(b.id, b.line) for b in BLOCKS]}"
    )
    assert set(LANGUAGES) <= FENCE_LANGUAGES, f"fences of other languages: {set(LANGUAGES)}"
    indented = re.findall(r"^[ \t]+```.*$", README.read_text(encoding="utf-8"), re.M)
    assert not indented, f"indented fences, which the parser does not read: {indented}"


def test_parser():
    text = "# A b\n```python\nx = 1\n```\n```bash\nls\n```\n## A b\n```python\ny = 2\n```\n"
    blocks, languages = parse_fences(text)
    assert blocks == [Block("a-b", 3, "x = 1\n"), Block("a-b-2", 10, "y = 2\n")]
    assert languages == ["python", "bash", "python"]
    with pytest.raises(AssertionError, match="not closed"):
        parse_fences("```python\nx = 1\n")


def missing_optional(code: str) -> list[str]:
    """The packages of ``OPTIONAL`` that ``code`` imports and this interpreter lacks."""
    roots = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return sorted(r for r in roots & OPTIONAL.keys() if importlib.util.find_spec(r) is None)


def child_code(block: Block) -> str:
    """The block at its README line numbers (a traceback points into README.md), its prints
    sent to stderr, which ``run_child``'s failure message shows, in order with the error."""
    return "import sys; sys.stdout = sys.stderr" + "\n" * (block.line - 1) + block.code


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    missing = missing_optional(block.code)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} ({'; '.join(OPTIONAL[m] for m in missing)})")
    monkeypatch.chdir(tmp_path)  # the child's working directory
    try:
        run_child(child_code(block), timeout=TIMEOUT_S, **THREADS)
    except AssertionError as e:
        pytest.fail(f"README.md's ```python block at line {block.line} ({block.id}) failed "
                    f"(line numbers below are README.md's):\n{e}", pytrace=False)  # fmt: skip
