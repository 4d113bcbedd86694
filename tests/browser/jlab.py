"""A JupyterLab server and a headless Chromium for the browser tests (and `make screenshots`).

The server runs from the course venv on 127.0.0.1 with a random token and a free port, in throw-away
config/data/runtime/settings folders so nothing from the user's own Jupyter set-up leaks in (and the
"news" toast is switched off in the temporary settings); its kernels write lesson outputs to a
throw-away ``COURSE_OUTPUT_DIR`` too. ``LabServer.stop()`` shuts the kernels down
through the REST API, then terminates the server, then kills anything it left behind.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("COURSE_CHROMIUM", "/usr/bin/chromium")
# Flags for a container without a GPU or a user namespace, and nothing phoning home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]

# Settings a student never needs to click away in a test: no news/update toasts.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
    # The extension manager would query PyPI when its panel opens; tests stay on localhost.
    "@jupyterlab/extensionmanager-extension/plugin.jupyterlab-settings": {"enabled": False},
    # Never write a lesson notebook back to the repo while a test runs cells in it.
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    # Render every cell, so DOM checks see the whole notebook rather than the cells in view.
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_settings(settings_dir: Path) -> None:
    for rel, value in LAB_SETTINGS.items():
        path = settings_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value), encoding="utf-8")


@dataclass
class LabServer:
    """A running ``jupyter lab``: its base URL, token, process and log file."""

    url: str
    token: str
    proc: subprocess.Popen
    log_path: Path
    env: dict  # the server's environment (its private Jupyter folders)
    root: Path  # what the Lab UI shows (notebook paths are relative to it)
    # pid -> start time of the server and every process it started (the time guards against pid reuse)
    procs: dict = field(default_factory=dict)
    stopped: bool = False

    def api(self, method: str, path: str, timeout: float = 30):
        """Call the Jupyter REST API; returns the decoded JSON body (or None)."""
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def lab_url(self, notebook: str | None = None) -> str:
        """The page a student opens: the Lab UI, on ``notebook`` (relative to the repo) if given."""
        tail = f"/tree/{notebook}" if notebook else ""
        return f"{self.url}/lab{tail}?reset&token={self.token}"

    def trust(self, notebook: str) -> None:
        """Sign ``notebook`` (relative to the root) in this server's private trust database, so its
        stored widget outputs render from the saved widget state as after a student trusts it."""
        subprocess.run([sys.executable, "-m", "jupyter", "trust", notebook], cwd=self.root,
                       env=self.env, check=True, capture_output=True, timeout=120)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server log, for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _remember_children(self) -> None:
        import psutil

        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.procs[child.pid] = child.create_time()
        except psutil.Error:
            pass

    def shutdown_kernels(self) -> None:
        """Shut every running kernel down (they are children of the server, in their own sessions)."""
        self._remember_children()
        try:
            for kernel in self.api("GET", "/api/kernels") or []:
                self.api("DELETE", f"/api/kernels/{kernel['id']}")
        except (OSError, urllib.error.URLError, ValueError):
            pass  # the server is already gone: the pid sweep below still runs

    def stop(self) -> None:
        """Stop kernels, then the server, then kill any process of ours that is still alive."""
        import psutil

        if self.stopped:
            return
        self.stopped = True
        if self.proc.poll() is None:
            self.shutdown_kernels()
            self._remember_children()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for pid, started in self.procs.items():
            try:
                proc = psutil.Process(pid)
                if abs(proc.create_time() - started) < 0.01:
                    proc.kill()
            except psutil.Error:
                pass


def _lab_dirs(workdir: Path) -> dict[str, Path]:
    dirs = {name: workdir / name
            for name in ("config", "data", "runtime", "settings", "workspaces", "checkpoints",
                         "outputs")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    _write_settings(dirs["settings"])
    return dirs


def _lab_env(dirs: dict[str, Path]) -> dict:
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(dirs["config"]), JUPYTER_DATA_DIR=str(dirs["data"]),
               JUPYTER_RUNTIME_DIR=str(dirs["runtime"]), JUPYTER_PLATFORM_DIRS="1",
               HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
               TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0",
               # What the lessons write (vector stores, runs) goes here, not to the repo's outputs/:
               # a test run never clobbers nbval or a student's run of the same lesson.
               COURSE_OUTPUT_DIR=str(dirs["outputs"]))
    env.pop("JUPYTER_PATH", None)  # kernels and lab extensions come from the venv only
    return env


def _lab_command(port: int, token: str, root: Path, dirs: dict[str, Path]) -> list[str]:
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           f"--LabApp.user_settings_dir={dirs['settings']}",
           f"--LabApp.workspaces_dir={dirs['workspaces']}",
           # Lab writes a checkpoint copy of every notebook it opens: keep them out of the repo.
           f"--FileCheckpoints.root_dir={dirs['checkpoints']}",
           "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run commands, read models
           "--ServerApp.terminals_enabled=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI runners often run as root
        cmd.append("--allow-root")
    return cmd


class PortTaken(RuntimeError):
    """Another process took the free port between our check and the server's bind."""


def start_lab(workdir: Path, *, root: Path = REPO_ROOT, timeout: float = 240,
              attempts: int = 3) -> LabServer:
    """Start JupyterLab on ``root`` with private Jupyter folders under ``workdir``; wait until it
    answers. A port grabbed by someone else in the meantime means a retry on another one."""
    dirs, token = _lab_dirs(workdir), secrets.token_hex(16)
    env = _lab_env(dirs)
    for attempt in range(1, attempts + 1):
        port, log_path = free_port(), workdir / f"jupyter-lab-{attempt}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(_lab_command(port, token, root, dirs), cwd=root, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        server = LabServer(f"http://127.0.0.1:{port}", token, proc, log_path, env, root)
        atexit.register(server.stop)  # also when pytest dies between set-up and tear-down
        try:
            _wait_ready(server, timeout)
            return server
        except PortTaken:
            if attempt == attempts:
                raise


def _wait_ready(server: LabServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            log = server.log_tail()
            if "already in use" in log:
                raise PortTaken(log)
            raise RuntimeError(f"jupyter lab exited with {server.proc.returncode}:\n{log}")
        try:
            server.api("GET", "/api/status", timeout=5)
            return
        except (OSError, urllib.error.URLError):
            time.sleep(0.5)
    server.stop()
    raise TimeoutError(f"jupyter lab did not answer within {timeout:.0f} s:\n{server.log_tail()}")


def launch_chromium(playwright):
    """Debian's Chromium through Playwright (never a downloaded browser)."""
    if not Path(CHROMIUM).is_file():
        raise RuntimeError(f"{CHROMIUM} not found: install it with `apt-get install -y chromium` "
                           "(or set COURSE_CHROMIUM to a Chromium binary).")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
