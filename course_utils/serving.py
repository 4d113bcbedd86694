"""An OpenAI-compatible model server: LMDeploy ``api_server`` on CUDA, ``transformers serve`` on the CPU.

``serve()`` starts the server as a child process, waits until it answers, keeps its log, and
stops it cleanly: on ``stop()``, at the end of a ``with`` block, at interpreter exit, and (on
Linux) when the process that started it dies, e.g. a restarted notebook kernel.
``benchmark_concurrency()`` load-tests any such server through its OpenAI client and keeps one
record per request, from which ``load_summary()`` recomputes latency and throughput.
"""

from __future__ import annotations

import atexit
import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .compat import has_serve_cli
from .env import thread_count
from .errors import CourseError, is_number, is_whole

BACKENDS = ("auto", "lmdeploy", "transformers")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_RUNNING: dict[int, "Server"] = {}  # port -> server this process started
# transformers serve flags for continuous batching on a CPU. Its defaults size the paged KV cache
# from free memory (about 11 GB of RAM for SmolLM2, enough to get killed on a shared machine);
# 64 pages x 32 tokens = 2048 tokens in flight is plenty for 8 short requests.
CPU_BATCHING_ARGS = ("--continuous-batching", "--cb-num-blocks", "64", "--cb-block-size", "32",
                     "--cb-max-batch-tokens", "256")


def _family(host: str) -> int:
    # The rule uvicorn uses (both backends bind through it), so a check here sees what the server
    # will: an address with a colon is IPv6. A plain socket() is IPv4 and cannot bind "::1" at all.
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bind_error(port: int, host: str) -> OSError | None:
    with socket.socket(_family(host)) as sock:
        # As servers do: connections of a stopped server lingering in TIME_WAIT don't count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def _check_port_number(port) -> None:
    if not is_whole(port) or not 0 <= port <= 65535:
        raise CourseError(f"port={port!r:.40}: use a whole number from 1 to 65535, or port=0 for any "
                          "free port (e.g. port=23333).")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for tests and a second server)."""
    with socket.socket(_family(host)) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` can not be bound (someone else is listening there)."""
    _check_port_number(port)
    return _bind_error(port, host) is not None


def _check_host(host) -> str:
    """``host`` as the servers take it (an IPv6 address without brackets), if this machine has it."""
    if not isinstance(host, str) or not host.strip():
        raise CourseError(f"host={host!r:.60}: use '127.0.0.1' (this machine only), '::1' (the same "
                          "over IPv6), or '0.0.0.0' with api_key= to let other machines in.")
    host = host.strip()
    if "/" in host:
        raise CourseError(f"host={host!r:.60} is a URL: pass only the address, e.g. "
                          "host='127.0.0.1' (the port goes in port=).")
    if host.count(":") == 1:
        raise CourseError(f"host={host!r:.60} includes a port: pass host={host.split(':')[0]!r} "
                          f"and port={host.split(':')[1]} separately.")
    if host.startswith("[") and host.endswith("]"):  # the URL spelling of an IPv6 address
        host = host[1:-1]
    err = _bind_error(0, host)
    if isinstance(err, socket.gaierror) or (err is not None and err.errno == errno.EADDRNOTAVAIL):
        raise CourseError(f"host={host!r:.60} is not an address of this machine ({err.strerror}): "
                          "use '127.0.0.1' (or '::1' where the machine has IPv6, or '0.0.0.0' for "
                          "all its addresses, with api_key=).")
    return host


def _check_extra_args(extra_args) -> list[str]:
    if isinstance(extra_args, (str, bytes)) or not isinstance(extra_args, (list, tuple)):
        raise CourseError(f"extra_args={extra_args!r:.60}: pass a list of words, e.g. "
                          "['--log-level', 'INFO'], not one string.")
    return [str(a) for a in extra_args]


def _check_lmdeploy_options(tp, quant_policy, cache_max_entry_count, model_format) -> None:
    if not is_whole(tp) or tp < 1:
        raise CourseError(f"tp={tp!r:.40}: the number of GPUs to split the model over, a whole number "
                          "1 or more (1 on InternStudio's single GPU).")
    if quant_policy not in (0, 4, 8) or isinstance(quant_policy, bool):
        raise CourseError(f"quant_policy={quant_policy!r:.40}: LMDeploy takes 0 (off), 4 or 8 "
                          "(KV-cache bits).")
    if not is_number(cache_max_entry_count) or not 0 < cache_max_entry_count <= 1:
        raise CourseError("cache_max_entry_count is the share of free GPU memory for the KV cache: "
                          f"use a number in (0, 1], not {cache_max_entry_count!r:.40}.")
    if model_format not in (None, "hf", "awq", "gptq"):
        raise CourseError(f"model_format={model_format!r}: use None, 'hf', 'awq' or 'gptq'.")


def _check_transformers_options(quantization) -> None:
    # load_model() spells these "4bit"/"8bit": the mix-up is likely, so the message names both.
    if quantization not in (None, "bnb-4bit", "bnb-8bit"):
        raise CourseError(f"quantization={quantization!r:.40}: transformers serve takes None, "
                          "'bnb-4bit' or 'bnb-8bit' (load_model's '4bit' is 'bnb-4bit' here).")


def _cli(name: str) -> str:
    """The console script of this Python's environment (venv/conda) if there, else from PATH."""
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def lmdeploy_command(model_path: str | Path, *, model_name: str, host: str = "127.0.0.1",
                     port: int = 23333, api_key: str | None = None, tp: int = 1,
                     quant_policy: int = 0, cache_max_entry_count: float = 0.8,
                     model_format: str | None = None, extra_args=()) -> list[str]:
    """The ``lmdeploy serve api_server`` command line for these settings."""
    _check_port_number(port)
    _check_lmdeploy_options(tp, quant_policy, cache_max_entry_count, model_format)
    extra_args = _check_extra_args(extra_args)
    cmd = [_cli("lmdeploy"), "serve", "api_server", str(model_path),
           "--server-name", host, "--server-port", str(port), "--model-name", model_name,
           "--backend", "turbomind", "--tp", str(tp), "--quant-policy", str(quant_policy),
           "--cache-max-entry-count", str(cache_max_entry_count)]
    if model_format:
        cmd += ["--model-format", model_format]
    if api_key:
        cmd += ["--api-keys", api_key]
    return cmd + extra_args


def transformers_command(model_name: str, *, host: str = "127.0.0.1", port: int = 23333,
                         device: str = "cpu", quantization: str | None = None,
                         extra_args=()) -> list[str]:
    """The ``transformers serve`` command line; ``model_name`` is a folder relative to its cwd."""
    _check_port_number(port)
    _check_transformers_options(quantization)
    extra_args = _check_extra_args(extra_args)
    cmd = [_cli("transformers"), "serve", model_name, "--host", host,
           "--port", str(port), "--device", device, "--log-level", "info"]
    if quantization:
        cmd += ["--quantization", quantization]
    return cmd + extra_args


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _has_lmdeploy() -> bool:
    import importlib.util

    return importlib.util.find_spec("lmdeploy") is not None


def choose_backend(backend: str = "auto") -> str:
    """``lmdeploy`` when asked or on CUDA with LMDeploy installed, else ``transformers``."""
    if backend not in BACKENDS:
        raise CourseError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}.")
    if backend == "auto":
        backend = "lmdeploy" if _has_cuda() and _has_lmdeploy() else "transformers"
    if backend == "lmdeploy" and not _has_cuda():
        raise CourseError("LMDeploy needs a CUDA GPU and this machine has none. Use "
                          "backend='transformers' (or 'auto'), or the tiny profile.")
    if backend == "lmdeploy" and not _has_lmdeploy():
        raise CourseError("LMDeploy is not installed: pip install -r requirements/gpu.txt "
                          "(on a CUDA machine), or use backend='transformers'.")
    if backend == "transformers" and not has_serve_cli():
        raise CourseError("No server for this machine: `transformers serve` needs transformers 5 "
                          "(the CPU env, `make setup`), and this env's LMDeploy needs a CUDA GPU. "
                          "Serve from the CPU env, or on InternStudio's GPU.")
    return backend


@dataclass
class Server:
    """A running server: where it listens, the model name clients send, its log and process."""

    backend: str
    model: str  # the name to put in requests' "model" field
    host: str
    port: int
    log_path: Path
    api_key: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    started_s: float = 0.0  # seconds from launch until the server answered

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 needs brackets in a URL
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI ``base_url`` (``.../v1``)."""
        return f"{self.url}/v1"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the server log."""
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 5) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL if it lingers)."""
        _RUNNING.pop(self.port, None)
        if not self.running:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child: get killed when the parent dies (a killed kernel leaves no orphan server)."""
    try:
        import ctypes

        # SIGKILL, not SIGTERM: uvicorn would wait for a running generation to finish first.
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:  # not Linux: atexit still stops it on a clean exit
        pass


def _check_port(host: str, port: int) -> int:
    """The port to pass to the server: ``port``, or for 0 a free one picked now."""
    if port == 0:
        # The server would pick one itself, but then nobody here knows where to wait for it.
        return free_port(host)
    if port in _RUNNING and _RUNNING[port].running:
        raise CourseError(f"Port {port} is taken by a server this kernel started "
                          f"({_RUNNING[port].model}): call .stop() on it or serving.stop_all(), "
                          "or pass port=serving.free_port().")
    err = _bind_error(port, host)
    if err is None:
        return port
    if err.errno == errno.EACCES:
        raise CourseError(f"Port {port} needs administrator rights (ports below 1024 do): pass a "
                          "port from 1024 to 65535, e.g. port=23333, or port=0 for any free port.")
    raise CourseError(f"Port {port} on {host} is already in use (another server, or one left "
                      "over from an earlier run). Stop it (e.g. `lsof -i :PORT`, then kill the "
                      "process), or pass another port, e.g. port=serving.free_port().")


def _check_exposure(backend: str, host: str, api_key: str | None) -> None:
    if backend == "transformers" and api_key:
        raise CourseError("transformers serve cannot check API keys: keep host='127.0.0.1' without "
                          "api_key, or use backend='lmdeploy' on a GPU machine.")
    if host not in LOOPBACK and not api_key:
        raise CourseError(f"host={host!r} exposes the model to everyone who can reach this machine: "
                          "pass api_key=... too (LMDeploy checks it), or keep host='127.0.0.1'.")


def _run_dir(name: str, port: int) -> Path:
    from .paths import outputs_dir

    folder = outputs_dir() / "serving" / f"{name}-{port}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _link_model(run_dir: Path, name: str, folder: Path) -> None:
    # transformers serve names the model by the path it was given; a link in its cwd makes that
    # path the short registry name, which is what clients then send as "model".
    link = run_dir / name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(folder.resolve(), target_is_directory=True)


def _launch(cmd: list[str], cwd: Path, log_path: Path, env: dict) -> subprocess.Popen:
    log = open(log_path, "w", encoding="utf-8")
    try:
        return subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent)
    except FileNotFoundError as exc:
        raise CourseError(f"{cmd[0]} was not found: install the course requirements "
                          "(make setup, or pip install -r requirements/gpu.txt for LMDeploy).") from exc
    finally:
        log.close()  # the child holds its own copy of the file descriptor


def _health_ok(server: Server) -> bool:
    path = "/health" if server.backend == "transformers" else "/v1/models"
    request = urllib.request.Request(server.url + path)
    if server.api_key:
        request.add_header("Authorization", f"Bearer {server.api_key}")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def wait_until_ready(server: Server, timeout: float) -> float:
    """Poll the server until it answers; seconds it took. Raises with the log if it dies or hangs."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if not server.running:
            raise CourseError(f"The {server.backend} server exited during start-up. Last log lines "
                              f"({server.log_path.name}):\n{server.log_tail()}")
        if _health_ok(server):
            return time.perf_counter() - start
        time.sleep(0.5)
    server.stop()
    raise CourseError(f"The {server.backend} server did not answer within {timeout:.0f} s; it was "
                      f"stopped. Pass a longer timeout=, or read {server.log_path}:\n{server.log_tail()}")


def serve(model=None, *, backend: str = "auto", port: int = 23333, host: str = "127.0.0.1",
          api_key: str | None = None, tp: int = 1, quant_policy: int = 0,
          cache_max_entry_count: float = 0.8, model_format: str | None = None,
          quantization: str | None = None, extra_args=(), timeout: float | None = None) -> Server:
    """Start an OpenAI-compatible server for ``model`` (registry name, folder, or the profile's).

    Returns a running ``Server`` (also a context manager). ``tp``, ``quant_policy``,
    ``cache_max_entry_count`` and ``model_format`` are LMDeploy's; ``quantization``
    ("bnb-4bit"/"bnb-8bit") is transformers serve's. ``port=0`` picks a free port (``.port`` says
    which); ``host='::1'`` serves on IPv6 loopback.
    """
    from .models import REGISTRY, default_name, resolve

    # Every argument is checked before the model is resolved (which may convert it) and long
    # before the server starts, whose own errors only show up in its log after the start-up wait.
    _check_port_number(port)
    host = _check_host(host)
    if timeout is not None and (not is_number(timeout) or timeout <= 0):
        raise CourseError(f"timeout={timeout!r:.40}: use the seconds to wait for the server, a number "
                          "above 0 (or None: 180 s for transformers, 600 s for LMDeploy).")
    if api_key is not None and not isinstance(api_key, str):  # no repr: it may be a secret
        raise CourseError(f"api_key is a {type(api_key).__name__}: use a string (the key clients "
                          "must send), or None.")
    _check_extra_args(extra_args)
    backend = choose_backend(backend)
    if backend == "lmdeploy":
        _check_lmdeploy_options(tp, quant_policy, cache_max_entry_count, model_format)
    else:
        _check_transformers_options(quantization)
    _check_exposure(backend, host, api_key)
    port = _check_port(host, port)
    # Not `model or default`: that served the default model for model="" without a word.
    name = default_name("chat") if model is None else model
    folder = resolve(name).resolve()  # the server runs in another folder: relative paths would break
    name = os.fspath(name)
    served_name = name if name in REGISTRY else Path(name).name
    run_dir = _run_dir(served_name, port)
    if backend == "lmdeploy":
        cmd = lmdeploy_command(folder, model_name=served_name, host=host, port=port,
                               api_key=api_key, tp=tp, quant_policy=quant_policy,
                               cache_max_entry_count=cache_max_entry_count,
                               model_format=model_format, extra_args=extra_args)
    else:
        _link_model(run_dir, served_name, folder)
        _ensure_hub_cache()
        cmd = transformers_command(served_name, host=host, port=port,
                                   device="cuda" if _has_cuda() else "cpu",
                                   quantization=quantization, extra_args=extra_args)
    server = Server(backend, served_name, host, port, run_dir / "server.log", api_key)
    env = dict(os.environ)
    if backend == "transformers" and not _has_cuda():  # its torch gets the CPUs no other job holds
        env["OMP_NUM_THREADS"] = str(thread_count())
    server.process = _launch(cmd, run_dir, server.log_path, env)
    _RUNNING[port] = server
    server.started_s = wait_until_ready(server, timeout or (600 if backend == "lmdeploy" else 180))
    return server


def _ensure_hub_cache() -> None:
    # transformers serve's /v1/models scans the hub cache and answers 500 if the folder is missing.
    from huggingface_hub import constants

    Path(constants.HF_HUB_CACHE).mkdir(parents=True, exist_ok=True)


def stop_all() -> None:
    """Stop every server this process started."""
    for server in list(_RUNNING.values()):
        server.stop()


atexit.register(stop_all)


def client(server: Server, **kwargs):
    """An ``openai.OpenAI`` client for ``server`` (the same code works against any backend)."""
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key or "EMPTY", **kwargs)


def benchmark_concurrency(client, model: str, prompts: list[str], *, concurrency: int = 8,
                          max_tokens: int = 32) -> dict:
    """Send ``prompts`` to an OpenAI-compatible server, ``concurrency`` at a time: latency, throughput.

    ``log`` keeps one record per request (start and end in seconds from the benchmark's start,
    tokens, reply), so every aggregate can be recomputed and the overlap of requests checked.
    """
    t0 = time.perf_counter()

    def one(prompt: str) -> dict:
        start = time.perf_counter() - t0
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0)
        end = time.perf_counter() - t0
        return {"prompt": prompt, "start_s": start, "end_s": end,
                "completion_tokens": reply.usage.completion_tokens if reply.usage else 0,
                "text": (reply.choices[0].message.content or "") if reply.choices else ""}

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        log = list(pool.map(one, prompts))
    return {**load_summary(log, wall=time.perf_counter() - t0), "concurrency": concurrency, "log": log}


def load_summary(log: list[dict], wall: float | None = None) -> dict:
    """Latency and throughput of a benchmark ``log``; ``wall`` defaults to the last reply's end."""
    latencies = sorted(r["end_s"] - r["start_s"] for r in log)
    wall = wall if wall is not None else max(r["end_s"] for r in log)
    tokens = sum(r["completion_tokens"] for r in log)
    return {"requests": len(log), "wall_s": wall, "latency_mean_s": sum(latencies) / len(latencies),
            "latency_p50_s": latencies[len(latencies) // 2], "latency_max_s": latencies[-1],
            "completion_tokens": tokens, "throughput_tok_s": tokens / wall,
            "requests_per_s": len(log) / wall, "max_in_flight": max_in_flight(log)}


def max_in_flight(log: list[dict]) -> int:
    """The most requests of ``log`` that were open at the same moment."""
    events = sorted([(r["start_s"], 1) for r in log] + [(r["end_s"], -1) for r in log],
                    key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    open_now = peak = 0
    for _, step in events:
        open_now += step
        peak = max(peak, open_now)
    return peak
