"""The package's layering and its map in docs/architecture.md, read from the code (tools/module_map.py)."""

import importlib.util
import subprocess
import sys

import pytest

from course_utils.paths import REPO_ROOT

spec = importlib.util.spec_from_file_location("module_map", REPO_ROOT / "tools" / "module_map.py")
module_map = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module_map)


def test_no_module_imports_a_higher_layer_and_no_import_cycles():
    assert module_map.problems() == []


def test_layer_check_sees_a_lazy_import_that_closes_a_cycle():
    graph = module_map.imports()
    graph["env"] = graph["env"] | {"models"}  # e.g. `from .models import REGISTRY` inside env.doctor()
    found = module_map.problems(graph)
    assert "env (platform) imports models (models), a higher layer" in found
    assert any(p.startswith("import cycle:") and "env" in p and "models" in p for p in found)


def test_the_architecture_map_is_the_code_s():
    assert module_map.current() == module_map.render(), "run: python tools/module_map.py --write"


@pytest.mark.parametrize("layer", [name for name, _, _ in module_map.LAYERS])
def test_each_module_imports_on_its_own(layer):
    """Every module in a fresh interpreter: an import-time cycle or a missing name shows up here."""
    modules = next(m for name, _, m in module_map.LAYERS if name == layer)
    for module in modules:
        name = "course_utils" if module == "__init__" else f"course_utils.{module}"
        run = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
        assert run.returncode == 0, f"import {name} failed:\n{run.stderr[-2000:]}"
