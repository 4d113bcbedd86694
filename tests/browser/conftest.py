"""Fixtures for the browser suite: one JupyterLab server and one headless Chromium per run.

Run with ``pytest tests/browser`` (the unit run ignores this folder). Screenshots go to
``build/screenshots/``; a failing test also leaves ``build/screenshots/failures/<test>.png`` and the
server log's tail in its report. ``COURSE_DOCS_IMAGES=docs/images`` (set by ``make screenshots``)
also copies the README screenshots there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from jlab import REPO_ROOT, launch_chromium, start_lab
from lab_page import SCREENSHOTS

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember each phase's report on the item, so fixtures can tell whether the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)
    lab = getattr(item, "funcargs", {}).get("lab")
    if report.failed and lab is not None:
        report.sections.append(("jupyter lab log (tail)", lab.log_tail()))


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """A JupyterLab server on the repo (127.0.0.1, free port, random token), stopped after the run."""
    server = start_lab(tmp_path_factory.mktemp("jupyter"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by Playwright; closed after the run even when tests fail."""
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    try:
        chromium = launch_chromium(playwright)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        playwright.stop()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """``build/screenshots/`` (created; failure shots of an earlier run are removed)."""
    shutil.rmtree(SCREENSHOTS / "failures", ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@pytest.fixture(scope="session")
def docs_images() -> Path | None:
    """Where README screenshots go when ``make screenshots`` runs (``COURSE_DOCS_IMAGES``), else None."""
    target = os.environ.get("COURSE_DOCS_IMAGES")
    if not target:
        return None
    path = (REPO_ROOT / target).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
