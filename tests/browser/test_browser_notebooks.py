"""Every lesson notebook, as stored (executed), opens in JupyterLab without a front-end error."""

from __future__ import annotations

import json

import pytest

from jlab import REPO_ROOT
from lab_page import WIDGET_MIME, NotebookPage, close_page, failure_shot, front_end_errors, new_page

LESSONS = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "notebooks").glob("*.ipynb"))


def stored_widget_views(path: str) -> tuple[int, list[str]]:
    """How many widget outputs the file has, and the ids among them missing from its saved state."""
    nb = json.loads((REPO_ROOT / path).read_text(encoding="utf-8"))
    state = nb.get("metadata", {}).get("widgets", {}).get(
        "application/vnd.jupyter.widget-state+json", {}).get("state", {})
    ids = [o["data"][WIDGET_MIME]["model_id"] for c in nb["cells"] for o in c.get("outputs", [])
           if WIDGET_MIME in o.get("data", {})]
    return len(ids), [i for i in ids if i not in state]


@pytest.fixture(scope="module")
def lab_page(browser, lab, request, screenshots):
    """One page with the Lab UI loaded; each test opens its notebooks in it (no page reload)."""
    context, page = new_page(browser)
    yield page
    close_page(context, page, lab, request.node, screenshots)


@pytest.fixture
def show(lab_page, lab, request, screenshots):
    """``show(path)`` -> the notebook open (trusted) in ``lab_page``; closed (kernel shut down) after."""
    shown = []

    def _show(path: str) -> NotebookPage:
        lab.trust(path)
        lab_page.console_errors.clear()
        shown.append(NotebookPage(lab_page, lab, path).open())
        return shown[-1]

    yield _show
    failure_shot(lab_page, request.node, screenshots)
    for nb in shown:
        nb.close()


def test_lessons_found():
    assert len(LESSONS) >= 6, f"the course has six lessons; found {LESSONS}"


@pytest.mark.parametrize("path", LESSONS)
def test_notebook_opens_without_front_end_error(show, path):
    count, missing = stored_widget_views(path)
    assert not missing, (f"{path}: widget outputs without saved widget state, shown as 'Error "
                         "displaying widget' (re-execute with `python -m course_utils run --inplace`, "
                         f"which keeps the state; or a widget was closed before the end): {missing}")
    nb = show(path)
    report = nb.widget_report(count)
    assert report["outputs"] == count, f"{path}: {count} widget outputs stored, {report} on the page"
    assert not report["errors"], f"{path}: broken widgets: {report['errors']}"
    assert report["pending"] == report["as_text"] == 0, f"{path}: widgets not rendered: {report}"
    assert report["views"] == count
    assert nb.page.get_by_text("Error displaying widget").count() == 0
    dialogs = nb.page.locator(".jp-Dialog").all_inner_texts()
    assert not dialogs, f"{path}: JupyterLab opened a dialog: {dialogs}"
    toasts = nb.page.locator(".Toastify__toast").all_inner_texts()
    assert not toasts, f"{path}: JupyterLab showed notifications: {toasts}"
    errors = front_end_errors(nb.page)
    assert not errors, f"{path}: front-end errors in the browser console: {errors}"


@pytest.fixture(scope="module")
def widget_fixtures():
    """An executed notebook with a saved slider widget, and a copy whose widget state was lost."""
    import nbformat

    from course_utils.notebooks import execute_notebook

    folder = REPO_ROOT / "build" / "browser-fixtures"
    folder.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"}})
    nb.cells = [nbformat.v4.new_code_cell("import ipywidgets\nipywidgets.IntSlider(value=7)")]
    good, broken = folder / "widget_ok.ipynb", folder / "widget_state_lost.ipynb"
    nbformat.write(nb, good)
    assert execute_notebook(good, out=good).status == "ok"
    executed = nbformat.read(good, as_version=4)
    executed.metadata.pop("widgets")
    nbformat.write(executed, broken)
    return [p.relative_to(REPO_ROOT).as_posix() for p in (good, broken)]


def test_front_end_check_sees_broken_widgets(show, widget_fixtures):
    """The check above is not vacuous: it passes a saved widget and flags one whose state is gone."""
    good, broken = widget_fixtures
    report = show(good).widget_report(1)
    assert report == {"outputs": 1, "views": 1, "errors": [], "pending": 0, "as_text": 0}
    assert stored_widget_views(broken)[1], "the broken fixture should miss its widget state"
    report = show(broken).widget_report(1)
    assert report["views"] == 0 and report["errors"], report
    assert "Error displaying widget" in report["errors"][0]
