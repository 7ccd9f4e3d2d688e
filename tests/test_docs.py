"""The documentation and the module layout: every relative link in the Markdown docs resolves, the
README stays short with the two commands near the top, and the project's modules import no cycle.

Fast (no imports of the project: files are read as text and parsed with ``ast``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
PACKAGES = ("dopr", "experiments")  # what counts as a project module (scripts/ import these via sys.path)
SOURCE_DIRS = ("dopr", "experiments", "scripts")


# --- links --------------------------------------------------------------------------------------

def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "tests" / "README.md", ROOT / "results" / "README.md"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    files += sorted((ROOT / "results").glob("*/*/*.md"))  # the per-task reports
    return [f for f in files if f.exists()]


FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?!`).+?(?<!`)\1", re.S)
INLINE_LINK = re.compile(r"\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
HTML_ATTR = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.I)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)  # http:, https:, mailto:, ...


def link_targets(text: str) -> list[str]:
    """The targets of Markdown links and images (inline and reference definitions) and of HTML
    ``href``/``src`` attributes, outside code blocks and code spans."""
    text = FENCE.sub("", text)
    text = INLINE_CODE.sub("code", text)  # keep "[`x`](y)" a link, drop "](" inside code spans
    found = INLINE_LINK.findall(text) + REFERENCE_DEF.findall(text) + HTML_ATTR.findall(text)
    return [t[1:-1] if t.startswith("<") else t for t in found]


def broken_links(md: Path) -> list[str]:
    """Relative links whose file does not exist, and #anchors into Markdown files that name no heading."""
    broken, anchors = [], {}
    for target in link_targets(md.read_text(encoding="utf-8")):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        path = unquote(path.split("?", 1)[0])
        if not path and not anchor:
            continue
        resolved = md if not path else (ROOT / path.lstrip("/")) if path.startswith("/") else (md.parent / path)
        if not resolved.exists():
            where = resolved.resolve()
            where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
            broken.append(f"{md.relative_to(ROOT)}: ({target}) -> {where} does not exist")
        elif anchor and resolved.suffix == ".md":
            if resolved not in anchors:
                anchors[resolved] = heading_anchors(resolved.read_text(encoding="utf-8"))
            if unquote(anchor) not in anchors[resolved]:
                broken.append(f"{md.relative_to(ROOT)}: ({target}) -> no heading '#{anchor}' in {resolved.resolve().relative_to(ROOT)}")
    return broken


HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$", re.M)


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped, spaces
    to hyphens, repeats numbered -1, -2, ..."""
    anchors, seen = set(), {}
    for heading in HEADING.findall(FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_link_parser_finds_links_and_skips_code():
    text = ("see [`a.md`](docs/a.md#part) and ![fig](img/b.png \"title\"), [web](https://x.org), [top](#top)\n"
            "`not [a](link)` and\n```\n[nor](this.md)\n```\n[ref]: ../c.md\n<img src=\"d.png\">\n")
    assert link_targets(text) == ["docs/a.md#part", "img/b.png", "https://x.org", "#top", "../c.md", "d.png"]


def test_heading_anchors_follow_github(tmp_path):
    text = "# The split gram (`_gram_sym`, commit 65dc7cc)\n## Notes\n```\n# not a heading\n```\n## Notes\n### What it found: 5 seeds #\n"
    assert heading_anchors(text) == {"the-split-gram-_gram_sym-commit-65dc7cc", "notes", "notes-1", "what-it-found-5-seeds"}
    (tmp_path / "a.md").write_text(text)
    (tmp_path / "b.md").write_text("[ok](a.md#notes-1) [ok](#here) [bad](a.md#notes-2) [bad](#nowhere)\n## Here\n")
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        assert broken_links(tmp_path / "b.md") == ["b.md: (a.md#notes-2) -> no heading '#notes-2' in a.md",
                                                   "b.md: (#nowhere) -> no heading '#nowhere' in b.md"]
    finally:
        ROOT = root


def test_every_relative_link_in_the_docs_resolves():
    files = markdown_files()
    names = {str(f.relative_to(ROOT)) for f in files}
    assert {"README.md", "results/README.md", "tests/README.md", "docs/dopr.md"} <= names, sorted(names)
    broken = [b for md in files for b in broken_links(md)]
    assert not broken, f"{len(broken)} broken link(s):\n" + "\n".join(broken)


# --- the README ---------------------------------------------------------------------------------

def test_readme_is_short_with_the_two_commands_near_the_top():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/"
    top = "\n".join(lines[:40])
    for command in ("make reproduce-lm", "make test"):
        assert command in top, f"{command!r} must appear in the first 40 lines of README.md"


# --- import cycles ------------------------------------------------------------------------------

def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))}


def is_project(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PACKAGES)


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its file (module level or inside functions:
    a lazy import still ties the two modules together). ``from P import x`` counts as an import of
    ``P.x`` when that is a module, else of ``P``; relative imports resolve against the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def nearest_known(mod: str) -> str | None:
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        return mod or None

    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            if is_project(target) and (resolved := nearest_known(target)) is not None and resolved != name:
                out.add(resolved)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path a -> ... -> a) per strongly connected component with more than one
    module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]

    def strongconnect(root):
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)

    cycles = []
    for component in components:  # a shortest path back to the start, inside the component
        start = min(component)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = [c for c in sorted(graph[path[-1]]) if c in component]
            if start in nxt:
                cycles.append(path + [start])
                break
            for c in nxt:
                if c not in seen:
                    seen.add(c)
                    paths.append(path + [c])
    return cycles


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_package_imports_resolve_to_project_modules():
    graph = import_graph()
    assert "experiments.checkpoint" in graph["experiments.tasks.control"]  # from ..checkpoint import ...
    assert "experiments.tasks" in graph["experiments.train"]  # from .tasks import build_task
    assert "dopr.chain" in graph["dopr"]  # from .chain import Chain, in dopr/__init__.py
    assert "experiments.tasks.flow" in graph["scripts.train_feature_classifier"]  # from experiments.tasks import flow
    assert "dopr" in graph["scripts.bench_optimizer"]  # import dopr


def test_no_import_cycles_among_the_project_modules():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (move what both sides need into a module both import):\n" + "\n".join(
        " -> ".join(c) for c in cycles)
