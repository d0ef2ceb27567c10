"""Split test_lem_serve.py into files by surface (issue 27). Standard library only.

    python testing/split_tests.py [--root DIR]

Moves test_lem_serve.py's banner sections by SURFACES into testing/test_agents.py,
testing/test_page.py and testing/test_group.py (each marked with pytestmark), leaving
the core tests in test_lem_serve.py. Fixtures used by more than one file, and those
of the "Fixtures" section, go to conftest.py at the root (which also registers the
markers); helpers and constants used by more than one file, and those of the
"Helpers" section and the preamble, go to testing/checks.py, which the others import.
A section SURFACES does not name stays in test_lem_serve.py (and is printed). It
updates the test command in README.md, .ci/run and the test that compares them,
asserts every statement is kept exactly once, and refuses to run twice.
"""

from __future__ import annotations

import argparse
import ast
import collections
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layout import banners  # noqa: E402  (testing/layout.py, beside this file)

CORE = "test_lem_serve.py"
CONFTEST = "conftest.py"
CHECKS = "testing/checks.py"
OLD_COMMAND = "python -m pytest -q test_lem_serve.py"
NEW_COMMAND = "python -m pytest -q test_lem_serve.py testing/"

# Banner title prefix -> destination file. Titles not listed stay in CORE.
SURFACES = {
    "Fixtures": CONFTEST,
    "Helpers": CHECKS,
    "The agents' dialects": "testing/test_agents.py",
    "Agent fidelity": "testing/test_agents.py",
    "The real agents": "testing/test_agents.py",
    "The chat page": "testing/test_page.py",
    "Beyond one Mac": "testing/test_group.py",
}
MARKERS = {
    "testing/test_agents.py": ("agents", "the agents' dialects through their SDKs, and the "
                               "Claude Code and Codex CLIs"),
    "testing/test_page.py": ("page", "the chat page in Chromium"),
    "testing/test_group.py": ("group", "an mlx.launch group and replicas behind nginx"),
}
DOCSTRINGS = {
    CORE: "Core tests for lem_serve.py: the real server, on a real socket, with real clients.",
    CONFTEST: "Shared pytest fixtures for every test file: the tiny models, servers on port 0.",
    CHECKS: "Helpers the test files share: raw HTTP, SSE parsing, references and checks.",
    "testing/test_agents.py": "The agents' surface: Anthropic Messages and OpenAI Responses "
                              "through their SDKs, and Claude Code and Codex headless.",
    "testing/test_page.py": "The chat page (chat.html, chat.js) in a real browser.",
    "testing/test_group.py": "Beyond one Mac: an mlx.launch group, and replicas behind nginx.",
}
FILE_ORDER = [CHECKS, CONFTEST, CORE, "testing/test_agents.py", "testing/test_page.py",
              "testing/test_group.py"]


class Chunk:
    """One top-level statement with its leading comments, and where it goes."""

    def __init__(self, node, text: str, section: str, home: str):
        self.node, self.text, self.section, self.home = node, text, section, home
        self.dest = home
        self.name = getattr(node, "name", None)
        self.names = {self.name} if self.name else set()
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            self.names = {n.id for t in targets for n in ast.walk(t)
                          if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            self.name = min(self.names) if self.names else None
        self.base = None  # the name a nameless statement changes: X in X[k] = v, X.attr = v, X.update(...)
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "value", None)
        while isinstance(target, (ast.Subscript, ast.Attribute, ast.Call)) and not self.names:
            target = target.func if isinstance(target, ast.Call) else target.value
            if isinstance(target, ast.Name):
                self.base = target.id
        self.is_test = bool(self.name) and (self.name.startswith("test_") or
                                           (isinstance(node, ast.ClassDef) and self.name.startswith("Test")))
        self.is_fixture = any("fixture" in ast.unparse(d) for d in getattr(node, "decorator_list", []))
        self.loads = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        self.params = {a.arg for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for a in n.args.args + n.args.kwonlyargs}
        self.strings = {n.value for n in ast.walk(node) if isinstance(n, ast.Constant)
                        and isinstance(n.value, str)}


def read(source: str):
    """(docstring, import nodes with their text, [Chunk]) of the test file."""
    lines = source.splitlines()
    tree = ast.parse(source)
    banner_list = banners(lines)
    banner_lines = {b + k for b, _ in banner_list for k in range(3)}
    imports, chunks = [], []
    previous_end = tree.body[0].end_lineno
    for node in tree.body[1:]:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        title = next((t for b, t in reversed(banner_list) if b < start), "")
        lead = [lines[i] for i in range(previous_end, start) if i not in banner_lines]
        while lead and not lead[0].strip():
            lead.pop(0)
        text = "\n".join(lead + lines[start:node.end_lineno])
        previous_end = node.end_lineno
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append((node, text, not lines[node.lineno - 2].strip()))
            continue
        home = next((f for prefix, f in SURFACES.items() if title.startswith(prefix)), CORE)
        chunks.append(Chunk(node, text, title or "Helpers", CHECKS if not title else home))
    return ast.get_docstring(tree), imports, chunks


def place(chunks: list[Chunk]) -> None:
    """Set each chunk's dest: tests stay in their section's file; a fixture goes to
    CONFTEST, and a helper to CHECKS, when a file other than its own uses it."""
    for chunk in chunks:
        if chunk.is_fixture:
            chunk.dest = CONFTEST if chunk.home in (CONFTEST, CHECKS) else chunk.home
        elif not chunk.is_test and chunk.home == CONFTEST:
            chunk.dest = CHECKS
    defined = {name: c for c in chunks if not c.is_test for name in c.names}
    changed = True
    while changed:
        changed = False
        for chunk in chunks:
            owner = defined.get(chunk.base)
            if owner is not None and chunk.dest != owner.dest:  # a change to X goes where X is defined
                chunk.dest, changed = owner.dest, True
            for name in chunk.loads | chunk.params | chunk.strings:
                target = defined.get(name)
                if target is None or target is chunk or target.dest == chunk.dest:
                    continue
                if target.is_fixture:
                    if name in chunk.params | chunk.strings and target.dest != CONFTEST:
                        target.dest, changed = CONFTEST, True
                elif name in chunk.loads and target.dest != CHECKS:
                    target.dest, changed = CHECKS, True
    for chunk in chunks:
        assert not (chunk.dest == CHECKS and chunk.is_fixture), chunk.name


def relocate(text: str, dest: str) -> str:
    """A chunk's text fixed for a file under testing/ (paths relative to the file move up one)."""
    if dest.startswith("testing/"):
        text = text.replace("Path(__file__).resolve().parent", "Path(__file__).resolve().parent.parent")
        text = re.sub(r"Path\(__file__\)\.parent\b(?!\.parent)", "Path(__file__).parent.parent", text)
    return text


def import_lines(imports, used: set[str]) -> list[str]:
    """The original import statements, each cut to the names `used` needs."""
    out, pending = [], False
    for node, text, blank_before in imports:
        keep = [a for a in node.names if (a.asname or a.name).split(".")[0] in used]
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            keep = node.names
        pending = pending or blank_before
        if keep and pending and out:
            out.append("")
        pending = pending and not keep
        if len(keep) == len(node.names):
            out.append(text)
        elif keep:
            copy = ast.ImportFrom(node.module, keep, node.level) if isinstance(node, ast.ImportFrom) \
                else ast.Import(keep)
            line = ast.unparse(copy)
            if len(line) > 100 and isinstance(node, ast.ImportFrom):
                first, rest = line.split(" import ", 1)
                indent = " " * (len(first) + len(" import ("))
                wrapped = wrap(rest, 100 - len(indent))
                line = f"{first} import (" + ("\n" + indent).join(wrapped) + ")"
            out.append(line)
    return out


def render(dest: str, docstring: str, imports, chunks: list[Chunk], checks_names: set[str]) -> str:
    """The source of one destination file."""
    mine = [c for c in chunks if c.dest == dest]
    used = set().union(*(c.loads for c in mine)) if mine else set()
    if dest in MARKERS or dest == CONFTEST:
        used.add("pytest")
    head = [f'"""{docstring}\n\nRun everything: {NEW_COMMAND}\n"""', ""]
    head += import_lines(imports, used)
    wanted = sorted(n for n in used & checks_names if dest != CHECKS)
    if wanted:
        head += ["", "from testing.checks import (" + ", ".join(wanted) + ")"
                 if len(", ".join(wanted)) < 60 else "from testing.checks import ("]
        if len(", ".join(wanted)) >= 60:
            head += ["    " + line for line in wrap(", ".join(wanted) + ",", 96)] + [")"]
    if dest in MARKERS:
        head += ["", f"pytestmark = pytest.mark.{MARKERS[dest][0]}"]
    if dest == CONFTEST:
        head += ["", "", "def pytest_configure(config):",
                 '    """Register the markers that select a surface: pytest -m "not page" and so on."""']
        for marker, meaning in MARKERS.values():
            head.append(f'    config.addinivalue_line("markers", "{marker}: {meaning}")')
    body, section = [], None
    for chunk in mine:
        if chunk.section != section:
            section = chunk.section
            body += ["", "", "# " + "-" * 75, "# " + section, "# " + "-" * 75, ""]
        else:
            body += ["", ""] if isinstance(chunk.node, (ast.FunctionDef, ast.ClassDef)) or chunk.is_fixture \
                else [""]
        body.append(relocate(chunk.text, dest))
    return "\n".join(head + body) + "\n"


def wrap(text: str, width: int) -> list[str]:
    """text cut at spaces into lines of at most width characters."""
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + [line]


def statements(texts: list[str], relocated: bool) -> collections.Counter:
    """Multiset of non-import top-level statements (docstrings and pytest plumbing excluded)."""
    counter = collections.Counter()
    for text in texts:
        tree = ast.parse(text)
        for node in tree.body[1:]:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if getattr(node, "name", None) == "pytest_configure" or (
                    isinstance(node, ast.Assign) and ast.unparse(node).startswith("pytestmark")):
                continue
            dump = ast.unparse(node)
            if relocated:
                dump = dump.replace(".parent.parent", ".parent")
            counter[dump] += 1
    return counter


def update_command(root: Path) -> None:
    """Put NEW_COMMAND wherever OLD_COMMAND was: README.md, .ci/run and the test comparing them."""
    for rel in ("README.md", ".ci/run", CORE, "testing/test_agents.py", "testing/test_page.py",
                "testing/test_group.py", "testing/README.md"):
        path = root / rel
        if path.exists():
            text = path.read_text()
            fixed = re.sub(re.escape(OLD_COMMAND) + r"(?! testing/)", NEW_COMMAND, text)
            if fixed != text:
                path.write_text(fixed)
                print(f"test command updated in {rel}")


def collected(root: Path, paths: list[str]) -> list[str]:
    """The test names (without their file) that pytest collects from paths under root, sorted."""
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *paths], cwd=root, capture_output=True, text=True)
    names = sorted(line.split("::", 1)[1] for line in run.stdout.splitlines() if "::" in line)
    if run.returncode or not names:
        raise SystemExit(f"pytest could not collect {paths}:\n{run.stdout[-3000:]}{run.stderr[-2000:]}")
    return names


def main(argv: list[str] | None = None) -> int:
    """Split the tests under --root (default: this repository)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--verify", action="store_true",
                        help="collect the tests before and after; fail unless the same names are collected")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if (root / CONFTEST).exists() or (root / CHECKS).exists():
        raise SystemExit(f"{CONFTEST} or {CHECKS} already exists: the tests are split already")
    source = (root / CORE).read_text()
    before = collected(root, [CORE]) if args.verify else None
    docstring, imports, chunks = read(source)
    unknown = sorted({c.section for c in chunks if c.home == CORE} - {""})
    print("sections kept in test_lem_serve.py: " + "; ".join(unknown))
    place(chunks)
    checks_names = {name for c in chunks if c.dest == CHECKS for name in c.names}
    outputs = {dest: render(dest, DOCSTRINGS[dest], imports, chunks, checks_names)
               for dest in FILE_ORDER}
    kept, now = statements([source], False), statements(list(outputs.values()), True)
    assert kept == now, f"statements changed: lost {list(kept - now)[:2]}, gained {list(now - kept)[:2]}"
    for dest, text in outputs.items():
        (root / dest).write_text(text)
        tests = sum(1 for c in chunks if c.dest == dest and c.is_test)
        others = [c.name for c in chunks if c.dest == dest and not c.is_test and c.home != dest
                  and dest not in (CHECKS, CONFTEST)]
        print(f"{dest}: {len(text.splitlines())} lines, {tests} tests"
              + (f"; moved in: {', '.join(others)}" if others else ""))
    update_command(root)
    if before is not None:
        after = collected(root, [CORE, "testing/"])
        if after != before:
            lost, gained = sorted(set(before) - set(after)), sorted(set(after) - set(before))
            raise SystemExit(f"collected {len(after)} tests, was {len(before)}: lost {lost[:5]}, gained {gained[:5]}")
        print(f"verified: the same {len(after)} tests are collected, by the same names")
    return 0


if __name__ == "__main__":
    sys.exit(main())
