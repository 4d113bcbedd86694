"""docs/troubleshooting.md lists every CourseError message the code can raise (tools/error_catalog.py)."""

import importlib.util

from course_utils.paths import REPO_ROOT

spec = importlib.util.spec_from_file_location("error_catalog", REPO_ROOT / "tools" / "error_catalog.py")
catalog = importlib.util.module_from_spec(spec)
spec.loader.exec_module(catalog)


def test_the_troubleshooting_catalogue_matches_the_code():
    assert catalog.current() == catalog.catalogue(), (
        "docs/troubleshooting.md's error catalogue is out of date: run "
        "`python tools/error_catalog.py --write`")


def test_the_catalogue_reads_real_messages():
    text = catalog.catalogue()
    assert "| `run_python` | No operating-system sandbox on this machine ({why})" in text
    assert text.count("#### `course_utils.") >= 10
