"""The package map in docs/architecture.md, read from the code: layers, purposes, who imports whom.

A module may import modules of its own layer or of a lower one, never a higher one, and no chain of
imports (at the top of a file or inside a function) may come back to where it started.
``python tools/module_map.py --write`` rewrites the map; tests/test_layers.py fails when the code and
the map disagree, when a module is missing from LAYERS, or when an import breaks the layering.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "course_utils"
DOC = ROOT / "docs" / "architecture.md"
START, END = "<!-- module-map:start -->", "<!-- module-map:end -->"

# Lowest layer first. "homework" is a subpackage; its files count as one module here.
LAYERS = [
    ("foundation", "imports nothing of ours", ["__init__", "errors", "paths", "progress"]),
    ("platform", "the machine, the libraries' versions, arithmetic, running things",
     ["env", "compat", "memory", "sandbox", "toolchain", "notebooks"]),
    ("models", "where a model comes from and how it is loaded", ["hub", "models"]),
    ("lessons", "one or two modules per lesson; a lesson module may build on an earlier lesson's",
     ["stack", "chat", "agent", "serving", "knowledge", "rag", "sft_data", "finetune", "quantize", "kvcache",
      "tradeoffs", "lmdeploy_awq", "lmdeploy_lite", "eval_data", "evaluate"]),
    ("grading", "answers as data, the checks, the grader", ["evidence", "homework", "grading"]),
    ("entry point", "python -m course_utils", ["__main__"]),
]
LAYER_OF = {module: i for i, (_, _, modules) in enumerate(LAYERS) for module in modules}


def module_files() -> dict[str, list[Path]]:
    """Each module's source files: one file, or every file of a subpackage."""
    files = {p.stem: [p] for p in sorted(PACKAGE.glob("*.py"))}
    for pkg in sorted(p.parent for p in PACKAGE.glob("*/__init__.py")):
        files[pkg.name] = sorted(pkg.glob("*.py"))
    return files


def _targets(node: ast.AST, in_subpackage: bool, modules: set[str]) -> set[str]:
    """The course_utils modules one import statement reaches (a name from the package itself: __init__)."""
    if isinstance(node, ast.Import):
        return {a.name.split(".")[1] for a in node.names if a.name.startswith("course_utils.")}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level == 0:  # absolute: only course_utils counts
        if node.module == "course_utils":
            return {a.name if a.name in modules else "__init__" for a in node.names}
        return {node.module.split(".")[1]} if (node.module or "").startswith("course_utils.") else set()
    if in_subpackage and node.level == 1:
        return set()  # a file of the subpackage importing its sibling
    if node.module:
        return {node.module.split(".")[0]}
    return {a.name if a.name in modules else "__init__" for a in node.names}


def imports() -> dict[str, set[str]]:
    """Module -> the course_utils modules it imports anywhere in its code (lazy imports too)."""
    graph, files = {}, module_files()
    for module, paths in files.items():
        found = set()
        for path in paths:
            in_subpackage = path.parent != PACKAGE
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                found |= _targets(node, in_subpackage, set(files))
        graph[module] = found - {module}
    return graph


def problems(graph: dict[str, set[str]] | None = None) -> list[str]:
    """Modules missing from LAYERS, imports of a higher layer, and import cycles."""
    graph = imports() if graph is None else graph
    found = [f"{m} is in no layer of tools/module_map.py LAYERS" for m in graph if m not in LAYER_OF]
    found += [f"{m} is in LAYERS but has no file" for m in LAYER_OF if m not in graph]
    for module, targets in graph.items():
        for target in sorted(targets):
            if module in LAYER_OF and target in LAYER_OF and LAYER_OF[target] > LAYER_OF[module]:
                found.append(f"{module} ({LAYERS[LAYER_OF[module]][0]}) imports {target} "
                             f"({LAYERS[LAYER_OF[target]][0]}), a higher layer")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (depth-first search)."""
    found, done = [], set()

    def visit(node, path):
        if node in path:
            found.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for target in sorted(graph.get(node, ())):
            visit(target, path + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return found


def purpose(paths: list[Path]) -> str:
    """The first line of the module's (or subpackage's) docstring."""
    doc = ast.get_docstring(ast.parse(paths[0].read_text(encoding="utf-8"))) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def render() -> str:
    graph, files = imports(), module_files()
    lines = [START, "<!-- generated by `python tools/module_map.py --write`; tests/test_layers.py checks it -->", ""]
    for name, rule, modules in LAYERS:
        lines += [f"**{name}** ({rule})", "", "| module | what it is for | imports (ours) |", "| --- | --- | --- |"]
        for module in modules:
            shown = f"`{module}/`" if len(files[module]) > 1 else f"`{module}`"
            deps = ", ".join(f"`{t}`" for t in sorted(graph[module], key=lambda t: (LAYER_OF.get(t, 99), t)))
            lines.append(f"| {shown} | {purpose(files[module]).replace('|', '/')} | {deps or '-'} |")
        lines.append("")
    return "\n".join(lines + [END])


def current() -> str:
    text = DOC.read_text(encoding="utf-8")
    return text[text.index(START):text.index(END) + len(END)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the map in docs/architecture.md")
    args = parser.parse_args()
    for problem in problems():
        print("problem:", problem)
    if args.write:
        DOC.write_text(DOC.read_text(encoding="utf-8").replace(current(), render()), encoding="utf-8")
    else:
        print(render())


if __name__ == "__main__":
    main()
