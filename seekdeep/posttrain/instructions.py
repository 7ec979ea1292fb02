"""The embedded instruction data: "write the body of this function" tasks cut from the standard
library itself, deterministically, on both sides of the default corpus split.

A task shows a real function's signature and docstring and asks for its body; the reference
answer is the body as written. Training pairs come from the split's training modules and the
evaluation / RL prompts from its held-out modules (``seekdeep.data.default_corpus()``), so a
model is never scored on functions it was tuned on.
"""

from __future__ import annotations

import ast
import functools
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

INSTRUCTION = "Write the body of this Python function from `{module}`. Answer with the body only."


@dataclass(frozen=True)
class FunctionTask:
    """One function: ``header`` (def line(s) + docstring, dedented to column 0), the reference
    ``body`` (dedented), the indent that puts a body back inside the header, and whether the
    docstring carries doctests (runnable only for top-level functions: a method needs its class)."""

    module: str  # dotted module name: "http.cookies"
    qualname: str  # "quote" or "Morsel.set"
    header: str
    body: str
    indent: str
    doctest: bool

    @property
    def prompt(self) -> str:
        return f"{INSTRUCTION.format(module=self.module)}\n\n{self.header}"

    def messages(self, with_answer: bool = True) -> list[dict[str, str]]:
        turns = [{"role": "user", "content": self.prompt}]
        if with_answer:
            turns.append({"role": "assistant", "content": self.body})
        return turns

    def assemble(self, body: str) -> str:
        """The function source with ``body`` (as a model wrote it) put under the header."""
        body = textwrap.dedent(body.strip("\n"))
        return self.header + textwrap.indent(body, self.indent, lambda line: True) + "\n"

    def to_dict(self) -> dict:
        return asdict(self)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def function_tasks(path: Path, root: Path, max_body_lines: int = 12, max_header_chars: int = 900) -> list[FunctionTask]:
    """Tasks of one module: top-level functions and methods with a docstring and a body of at
    most ``max_body_lines`` lines after it (in source order)."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines()
    module = module_name(path, root)
    tasks = []
    candidates = [(node, "", True) for node in tree.body]
    candidates += [(item, node.name + ".", False) for node in tree.body if isinstance(node, ast.ClassDef) for item in node.body]
    for node, prefix, top_level in candidates:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        doc = ast.get_docstring(node, clean=False)
        first = node.body[1]
        if doc is None or first.lineno <= node.body[0].end_lineno:
            continue  # no docstring, or the body shares a line with it
        col = node.col_offset
        header_lines = lines[node.lineno - 1:first.lineno - 1]
        body_lines = lines[first.lineno - 1:node.end_lineno]
        if len(body_lines) > max_body_lines or any("\t" in line for line in header_lines + body_lines):
            continue
        header = "\n".join(line[col:] for line in header_lines) + "\n"
        body_col = first.col_offset
        indent = " " * (body_col - col)
        if len(header) > max_header_chars or not indent or any(line.strip() and len(line) - len(line.lstrip()) < body_col
                                                                for line in body_lines):
            continue  # a continuation line left of the body (rare): dedenting would change it
        body = "\n".join(line[body_col:] for line in body_lines).strip("\n")
        tasks.append(FunctionTask(module, prefix + node.name, header, body, indent,
                                  doctest=top_level and ">>>" in doc))
    return tasks


@functools.lru_cache(maxsize=8)
def default_tasks(side: str, max_body_lines: int = 12) -> tuple[FunctionTask, ...]:
    """Every task of one side ("train" or "heldout") of the default corpus split."""
    from seekdeep.data import default_corpus

    if side not in ("train", "heldout"):
        raise ValueError(f"side: expected 'train' or 'heldout', got {side!r}")
    split = default_corpus()
    files = split.train_files if side == "train" else split.heldout_files
    return tuple(task for file in files for task in function_tasks(file, split.root, max_body_lines))
