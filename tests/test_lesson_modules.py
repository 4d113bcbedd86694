"""Lessons 3, 4 and 6 each have a data half and a model half; the lesson module is the whole lesson.

The rule: the data module lists its public API in ``__all__`` and the lesson module re-exports exactly
that, so ``from course_utils import rag`` (``finetune``, ``evaluate``) is the one import a notebook needs.
No course_utils module reaches into another's private names.
"""

import ast
import importlib
import inspect

import pytest

from course_utils.paths import REPO_ROOT

PAIRS = [("knowledge", "rag"), ("sft_data", "finetune"), ("eval_data", "evaluate")]
PACKAGE = REPO_ROOT / "course_utils"


def defined_names(module) -> set[str]:
    """Public names a module's own top level defines (functions, classes, assigned constants)."""
    tree = ast.parse(inspect.getsource(module))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return {name for name in names if not name.startswith("_")}


@pytest.mark.parametrize("data, lesson", PAIRS)
def test_the_data_module_lists_every_public_name_it_defines(data, lesson):
    module = importlib.import_module(f"course_utils.{data}")
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"course_utils.{data} has no __all__"
    assert len(exported) == len(set(exported)), f"course_utils.{data}.__all__ repeats a name"
    assert not set(exported) - set(vars(module)), f"__all__ names what course_utils.{data} lacks"
    assert defined_names(module) == set(exported), (
        f"course_utils.{data}.__all__ differs from what it defines: "
        f"missing {sorted(defined_names(module) - set(exported))}, extra {sorted(set(exported) - defined_names(module))}")


@pytest.mark.parametrize("data, lesson", PAIRS)
def test_the_lesson_module_re_exports_the_data_module(data, lesson):
    source = importlib.import_module(f"course_utils.{data}")
    target = importlib.import_module(f"course_utils.{lesson}")
    differ = [name for name in source.__all__
              if getattr(target, name, None) is not getattr(source, name)]
    assert not differ, f"course_utils.{lesson} does not re-export course_utils.{data}'s {differ}"


def _module_aliases(tree, modules: set[str]) -> set[str]:
    """Local names bound to a course_utils module: ``from . import rag``, ``import course_utils.quantize as q``."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or node.module == "course_utils") and not node.module:
            aliases |= {a.asname or a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module == "course_utils":
            aliases |= {a.asname or a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name.startswith("course_utils.") and a.asname}
    return aliases


def private_imports() -> list[str]:
    """Every ``from .x import _name`` and every ``module._name`` of another course_utils module."""
    modules = {p.stem for p in PACKAGE.rglob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = _module_aliases(tree, modules)
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO_ROOT)}:{getattr(node, 'lineno', 0)}"
            ours = isinstance(node, ast.ImportFrom) and (
                node.level > 0 or (node.module or "").split(".")[0] == "course_utils")
            if ours:
                found += [f"{where} imports {alias.name}"
                          for alias in node.names if alias.name.startswith("_") and alias.name != "__version__"]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                  and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{where} reads {node.value.id}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_names():
    assert private_imports() == []

