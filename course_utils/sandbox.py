"""Run untrusted Python (an agent's tool call) in a separate, limited process.

Layers, strongest first; each one is used where the OS allows it:

1. a separate process with a wall-clock timeout and resource limits: CPU seconds (RLIMIT_CPU),
   address space (RLIMIT_AS), file size (RLIMIT_FSIZE), processes (RLIMIT_NPROC), open files;
2. when started as root: its own empty network namespace (no network at all) and an unprivileged
   user (``nobody``), so the OS itself refuses writes outside the scratch dir and reads of /root;
   as a normal user: an unprivileged user+network namespace if the kernel allows one;
3. always: an audit hook in the child that refuses writes outside the scratch directory, reads of
   the learner's files (home, the course folder, the working directory), new processes, sockets and dangerous libc calls through ctypes;
4. a fresh scratch directory as working directory and ``HOME``, and an environment rebuilt from
   a short allow-list (no tokens or keys), deleted afterwards.

Layer 3 is a guard against accidents and naive code, not a security boundary on its own.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CourseError

MAX_OUTPUT_CHARS = 20_000
ENV_ALLOW = ("LANG", "LC_ALL", "TZ")  # copied from the parent; nothing else is


@dataclass
class SandboxResult:
    ok: bool
    output: str  # stdout and stderr, interleaved as printed
    error: str | None = None  # one line saying what went wrong
    returncode: int | None = None
    seconds: float = field(default=0.0, repr=False)

    def __str__(self) -> str:
        return self.output if self.ok else (self.output + f"\n[error] {self.error}").strip()


# ---- code that runs inside the child (shipped as source: each function imports what it uses) ----

def _child_isolate_network() -> str:
    """Move into an empty network namespace if the OS lets us; which isolation we got."""
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    new_net, new_user = 0x40000000, 0x10000000  # CLONE_NEWNET, CLONE_NEWUSER
    if os.geteuid() == 0 and libc.unshare(new_net) == 0:
        return "network namespace"
    if os.geteuid() != 0 and libc.unshare(new_user | new_net) == 0:
        return "user+network namespace"
    return "audit hook only"


def _child_limits(cfg: dict) -> None:
    """Resource limits, and the switch to an unprivileged user when the parent chose one."""
    import os
    import resource

    mb = 2**20
    limits = [(resource.RLIMIT_AS, cfg["memory_mb"] * mb), (resource.RLIMIT_CPU, cfg["cpu_s"]),
              (resource.RLIMIT_FSIZE, cfg["file_mb"] * mb), (resource.RLIMIT_NOFILE, 256),
              (resource.RLIMIT_CORE, 0)]
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])  # from here on the OS refuses what `nobody` may not do
    if os.geteuid() != 0:  # root ignores RLIMIT_NPROC; anyone else is held to it
        limits.append((resource.RLIMIT_NPROC, cfg["nproc"]))
    for kind, value in limits:
        resource.setrlimit(kind, (value, value))


def _child_audit_hook(cfg: dict):
    """An audit hook refusing writes outside scratch, reads of the learner's files, processes, sockets, ctypes libc."""
    import os

    scratch, network = cfg["scratch"], cfg["network"]
    no_read, may_read = tuple(cfg["no_read"]), tuple(cfg["may_read"])
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    writes = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
              "os.utime", "os.symlink", "os.link", "shutil.rmtree", "os.setxattr", "os.removexattr"}
    two_paths = {"os.rename", "shutil.move", "shutil.copyfile", "shutil.copytree"}
    spawns = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
              "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg"}
    introspection = {"gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.setprofile",
                     "sys.settrace", "sys._current_frames"}
    libc_denied = {"fork", "vfork", "clone", "clone3", "system", "execv", "execve", "execvp",
                   "execl", "execlp", "posix_spawn", "posix_spawnp", "socket", "connect", "open",
                   "openat", "open64", "creat", "fopen", "unlink", "unlinkat", "rename", "mkdir",
                   "syscall", "prctl", "setrlimit", "prlimit", "ptrace", "unshare", "setns", "kill",
                   "chmod", "chown", "write", "pwrite", "setuid", "setgid", "mount"}

    def inside(path, roots):
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    def real(path):
        if isinstance(path, int):
            return None  # an already-open file descriptor
        return os.path.realpath(os.path.join(os.getcwd(), os.fsdecode(path)))

    def deny(why):
        raise PermissionError(f"sandbox: {why}")

    def check_write(path):
        p = real(path)
        if p is not None and not inside(p, (scratch, "/dev/null")):
            deny(f"writing outside the scratch directory is not allowed ({path})")

    def check_read(path):
        p = real(path)
        if p is not None and inside(p, no_read) and not inside(p, may_read):
            deny(f"reading the learner's files (home, course folder, working directory) is not "
                 f"allowed ({path})")

    def hook(event, args):
        if event == "open":
            path, mode, flags = (list(args) + [None, None])[:3]
            writing = (isinstance(flags, int) and flags & write_flags) or (
                isinstance(mode, str) and any(c in mode for c in "wax+"))
            check_write(path) if writing else check_read(path)
        elif event in ("os.listdir", "os.scandir") and args and args[0] is not None:
            check_read(args[0])
        elif event in writes and args:
            check_write(args[0])
        elif event in two_paths and len(args) >= 2:
            check_read(args[0])
            check_write(args[1])
        elif event in spawns:
            deny(f"starting or signalling processes is not allowed ({event})")
        elif event.startswith("socket.") and not network and event != "socket.__new__":
            deny(f"network access is not allowed ({event})")
        elif event in introspection:
            deny(f"{event} is not allowed")
        elif event == "ctypes.dlsym" and len(args) > 1 and str(args[1]) in libc_denied:
            deny(f"calling {args[1]}() through ctypes is not allowed")

    return hook


def _child_run_main() -> None:
    """Run scratch/main.py; on an exception print its traceback (learner frames only), exit 3."""
    import os
    import sys
    import traceback

    code = compile(open("main.py", encoding="utf-8").read(), "main.py", "exec")
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    except BaseException as exc:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "main.py"]
        print("Traceback (most recent call last):", file=sys.stderr)
        print("".join(traceback.format_list(frames)), end="", file=sys.stderr)
        line = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]
        print(line, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)  # 3 = the learner's code raised; the error line is the last output line


def _boot(config_json: str) -> None:
    """The child's entry point: isolate, limit, guard, then run the learner's code."""
    import json
    import os
    import sys

    cfg = json.loads(config_json)
    if not cfg["network"]:
        _child_isolate_network()
    _child_limits(cfg)
    os.chdir(cfg["scratch"])
    sys.path[:0] = [cfg["scratch"]]
    sys.addaudithook(_child_audit_hook(cfg))
    _child_run_main()


CHILD_CODE = (_child_isolate_network, _child_limits, _child_audit_hook, _child_run_main, _boot)


def _drop_to() -> tuple[int | None, int | None]:
    """``nobody``'s uid/gid when running as root and Python is readable by others; else no drop."""
    if os.geteuid() != 0:
        return None, None
    import pwd

    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        return None, None
    for folder in [Path(sys.executable).resolve().parent, Path(sys.prefix), Path(sys.base_prefix)]:
        for part in [folder, *folder.parents]:
            if part.exists() and not part.stat().st_mode & 0o001:  # others can't enter: keep root
                return None, None
    return user.pw_uid, user.pw_gid


def _child_env(scratch: str) -> dict:
    """A minimal environment: nothing of the parent's except a few locale variables."""
    env = {k: os.environ[k] for k in ENV_ALLOW if k in os.environ}
    env.update(PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin", HOME=scratch, TMPDIR=scratch,
               PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", MPLBACKEND="Agg", MPLCONFIGDIR=scratch)
    env.setdefault("LANG", "C.UTF-8")
    return env


def isolation() -> dict:
    """Which layers ``run_python`` gets on this machine (for the lesson to show)."""
    uid, _ = _drop_to()
    # In a fresh network namespace the only interface is the loopback one, and it is down.
    probe = run_python("print(' '.join(l.split(':')[0].strip() for l in "
                       "open('/proc/self/net/dev').read().splitlines()[2:]))", timeout=10)
    interfaces = probe.output.split()
    network = ("own empty namespace + audit hook" if interfaces == ["lo"]
               else "audit hook (no namespace here)")
    return {"separate process, time/CPU/memory/file/process limits": "yes",
            "runs as": "nobody" if uid else "the same user (the hook guards files)",
            "network": network, "audit hook (files, processes, sockets)": "yes",
            "environment": "rebuilt: no tokens or keys, HOME = scratch"}


def _describe_exit(code: int, timed_out: bool, timeout: float, memory_mb: int) -> str:
    if timed_out:
        return f"timed out after {timeout:g} s: the sandbox stopped it (infinite loop?)"
    if code < 0:
        sig = signal.Signals(-code).name
        why = {"SIGXCPU": "CPU time limit reached", "SIGXFSZ": "file size limit reached",
               "SIGKILL": f"killed (memory limit {memory_mb} MB?)",
               "SIGSEGV": f"crashed (often the {memory_mb} MB memory limit)"}.get(sig, "")
        return f"stopped by {sig}" + (f": {why}" if why else "")
    return f"exited with status {code}"


def learner_dirs() -> list[str]:
    """Folders holding the learner's files: home, the course checkout and the working directory.

    The sandbox may not read below them, except the Python installation (a venv inside the
    course folder) and its own scratch directory. "/" is never listed: it would hide the system.
    """
    from .paths import REPO_ROOT

    dirs = {str(Path.home()), os.path.expanduser("~"), str(REPO_ROOT), os.getcwd()}
    return sorted(os.path.realpath(d) for d in dirs if os.path.realpath(d) != "/")


def run_python(code: str, *, timeout: float = 10, memory_mb: int = 1024, file_mb: int = 50,
               network: bool = False) -> SandboxResult:
    """Run ``code`` in a sandboxed Python process; ``ok``, ``output`` and ``error`` tell the result."""
    if not isinstance(code, str) or not code.strip():
        raise CourseError("run_python needs the code as a non-empty string.")
    if memory_mb < 128:
        raise CourseError("memory_mb below 128 leaves no room for Python itself: use 128 or more.")
    scratch = tempfile.mkdtemp(prefix="sandbox-")
    logdir = tempfile.mkdtemp(prefix="sandbox-log-")  # outside scratch: the code can't touch it
    uid, gid = _drop_to()
    try:
        Path(scratch, "main.py").write_text(code, encoding="utf-8")
        if uid is not None:
            os.chown(scratch, uid, gid)
            os.chown(Path(scratch, "main.py"), uid, gid)
        python_dirs = sorted({sys.prefix, sys.base_prefix, sys.exec_prefix,
                              str(Path(sys.executable).resolve().parent.parent)})
        config = {"scratch": os.path.realpath(scratch), "memory_mb": memory_mb,
                  "cpu_s": int(timeout) + 2, "file_mb": file_mb, "nproc": 64, "network": network,
                  "uid": uid, "gid": gid, "may_read": python_dirs + [os.path.realpath(scratch)],
                  "no_read": learner_dirs()}
        return _run_child(config, scratch, logdir, timeout, memory_mb)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(logdir, ignore_errors=True)


def _run_child(config: dict, scratch: str, logdir: str, timeout: float,
               memory_mb: int) -> SandboxResult:
    boot = "\n\n".join(inspect.getsource(f) for f in CHILD_CODE)
    boot += f"\n\n_boot({json.dumps(json.dumps(config))})\n"
    log_path = Path(logdir, "output.txt")
    start, timed_out = time.perf_counter(), False
    with open(log_path, "w+b") as log:
        proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", boot], cwd=scratch,
                                env=_child_env(scratch), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        output = log.read(MAX_OUTPUT_CHARS * 4).decode("utf-8", errors="replace")
    if len(output) > MAX_OUTPUT_CHARS:
        output = output[:MAX_OUTPUT_CHARS] + "\n[output truncated]"
    seconds = time.perf_counter() - start
    code = proc.returncode
    if code == 0 and not timed_out:
        return SandboxResult(True, output, None, 0, seconds)
    if code == 3 and not timed_out:  # the learner's code raised: its last line says what
        lines = output.rstrip().splitlines()
        return SandboxResult(False, "\n".join(lines[:-1]), lines[-1] if lines else "error", 3, seconds)
    return SandboxResult(False, output, _describe_exit(code, timed_out, timeout, memory_mb),
                         code, seconds)
