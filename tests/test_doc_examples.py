"""The ```python examples of README.md and docs/*.md run.

Every ```python fenced block is one test (its id: file:line of the fence). A block runs as a script in a fresh
Python process, in an empty temporary folder, with a time limit (TIMEOUT seconds), and must exit with status 0.

A block that cannot run here is marked on the line right above its fence with an HTML comment (invisible in
the rendered markdown):

    <!-- example: KIND optional reason -->

where KIND is one of
- `fragment`: not self-contained (it continues the block above, or uses a model, data or a process group that
  the surrounding text describes);
- `needs-gpu`: needs a CUDA device;
- `needs-data`: needs a real data set that is not in the repository;
- `slow`: runs, but takes longer than a test here should.
A marked block is still compiled and its import statements are run (so a renamed module or function fails the
test), then the test is skipped with the kind and the reason. An unknown KIND fails.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
KINDS = ("fragment", "needs-gpu", "needs-data", "slow")
MARKER = re.compile(r"^\s*<!--\s*example:\s*(\S+)\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```+\s*python\s*$")
TIMEOUT = 180  # seconds per block; a block that needs more is `slow`


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    code: str
    kind: str | None
    reason: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, start, body = fence.group(1), i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        marker = MARKER.match(lines[start - 1]) if start else None
        kind, reason = (marker.group(1), marker.group(2)) if marker else (None, "")
        found.append(Block(path, start + 1, "\n".join(body) + "\n", kind, reason))
        i += 1
    return found


BLOCKS = [block for path in DOCS for block in _blocks(path)]


def _run_imports(block: Block) -> None:
    """Run the block's top-level import statements in this process."""
    tree = ast.parse(block.code, block.id)
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    exec(compile(ast.Module(body=imports, type_ignores=[]), block.id, "exec"), {})


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_example(block: Block, tmp_path):
    compile(block.code, block.id, "exec")
    if block.kind is not None:
        assert block.kind in KINDS, f"{block.id}: unknown example marker {block.kind!r}, expected one of {KINDS}"
        _run_imports(block)
        pytest.skip(f"{block.kind}{': ' + block.reason.strip('()') if block.reason else ''}")
    script = tmp_path / "example.py"
    script.write_text(block.code)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, (
        f"{block.id} failed (fix the example, or mark it: see this test's docstring):\n"
        f"{block.code}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    )


def test_blocks_are_found():
    assert len(BLOCKS) >= 10 and any(b.path.name == "README.md" for b in BLOCKS)
