"""Run untrusted code behind an operating-system boundary: an agent's Python tool, a homework submission.

The boundary is bubblewrap (package ``bubblewrap``). The code gets its own pid, network, ipc, uts
and mount namespaces; it sees /usr and the Python installation read-only, a private working folder
and /tmp (both in memory, size-capped), and nothing else: not your home, the course folder, other
processes or their /proc entries. It runs as uid 65534 with no capabilities, also when the caller
is root, may not create namespaces of its own, and dies with its caller; when it ends, the kernel
kills everything it started (they all live in its pid namespace). Limits on wall time, CPU,
memory, file size, open files, processes and printed output come on top.

As root, an outer bwrap (which may mount) builds that view and runs ``setpriv`` to become a host
uid of the run's own (see HOST_UIDS), which starts an inner, unprivileged bwrap whose user
namespace shows it as 65534 and forbids new namespaces. A non-root caller
needs only the inner bwrap. Where neither works (no bwrap, no user namespaces), ``run_python``
refuses unless the caller passes ``unsandboxed=True``; ``isolation()`` says which case this is.
"""

from __future__ import annotations

import functools
import inspect
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CourseError

SANDBOX_UID = 65534  # the uid the code sees ("nobody")
# As root, each run gets its own host uid from this range: RLIMIT_NPROC counts per uid, so
# sandboxes running side by side (a grader's kernel, an agent's tool call) cannot starve each other.
HOST_UIDS = range(3_000_000, 3_900_000)
WORKDIR = "/sandbox"  # the code's working folder and HOME inside the boundary
INSIDE_ENV = "COURSE_SANDBOX"  # set inside: a nested run_python is already behind the boundary
MAX_OUTPUT_CHARS = 20_000
ENV_ALLOW = ("LANG", "LC_ALL", "TZ")  # copied from the parent; nothing else is
# Read-only system files a Python program may need; everything else in /etc stays hidden.
ETC_FILES = ("/etc/alternatives", "/etc/ld.so.cache", "/etc/localtime", "/etc/fonts", "/etc/mime.types")
MB = 2**20
INSTALL_HINT = ("install bubblewrap (`sudo apt-get install bubblewrap`, or `make sandbox`) on a "
                "kernel that allows user namespaces")


@dataclass
class SandboxResult:
    ok: bool
    output: str  # stdout and stderr, interleaved as printed
    error: str | None = None  # one line saying what went wrong
    returncode: int | None = None
    seconds: float = field(default=0.0, repr=False)

    def __str__(self) -> str:
        return self.output if self.ok else (self.output + f"\n[error] {self.error}").strip()


@dataclass(frozen=True)
class Limits:
    timeout: float = 10  # wall-clock seconds
    memory_mb: int = 1024  # address space of each process
    file_mb: int = 50  # largest file it may write
    nproc: int = 64  # processes and threads of the sandbox user at once
    workdir_mb: int = 256  # size of the in-memory working folder
    open_files: int = 256

    def apply(self) -> None:
        """Set the limits on this process (called in the child before exec; children inherit them).

        It runs between fork and exec, so it imports nothing (the import lock may be held there).
        """
        nproc = self.nproc + (_processes_of(os.getuid()) if os.getuid() != 0 else 0)  # see HOST_UIDS
        for kind, value in [(resource.RLIMIT_AS, self.memory_mb * MB),
                            (resource.RLIMIT_CPU, int(self.timeout) + 2),
                            (resource.RLIMIT_FSIZE, self.file_mb * MB),
                            (resource.RLIMIT_NOFILE, self.open_files), (resource.RLIMIT_CORE, 0),
                            (resource.RLIMIT_NPROC, nproc)]:  # root ignores NPROC: uid 65534 does not
            resource.setrlimit(kind, (value, value))


def _processes_of(uid: int) -> int:
    """How many processes ``uid`` runs now: RLIMIT_NPROC counts them all, so the limit adds to this."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                count += entry.stat().st_uid == uid
            except OSError:
                pass  # it exited meanwhile
    return count


# ---- the boundary --------------------------------------------------------------------------------

def python_dirs() -> list[str]:
    """The folders the interpreter and its packages live in (a venv and the Python it points to)."""
    dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    dirs.add(str(Path(sys.executable).resolve().parent.parent))
    return sorted(d for d in dirs if not any(d != o and d.startswith(o + "/") for o in dirs))


def _system_view() -> list[str]:
    """/usr read-only, the /bin and /lib links or folders next to it, a few /etc files."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("/bin", "/sbin", "/lib", "/lib64", "/lib32"):
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    return args + [a for path in ETC_FILES if os.path.exists(path) for a in ("--ro-bind", path, path)]


def _parents(path: str, made: set[str]) -> list[str]:
    """Create the folders above a bind 0755 (bwrap makes them 0700, closed to uid 65534)."""
    args = []
    for parent in reversed(Path(path).parents):
        if str(parent) != "/" and str(parent) not in made:
            made.add(str(parent))
            args += ["--perms", "0755", "--dir", str(parent)]
    return args


def host_uid() -> int:
    """A host uid no process uses now, for one run (as root); the caller's own uid otherwise."""
    import random

    if os.geteuid() != 0:
        return os.getuid()
    while True:
        uid = random.choice(HOST_UIDS)
        if _processes_of(uid) == 0:
            return uid


def boundary_argv(command: list[str], *, ro=(), rw=(), network: bool = False,
                  workdir_mb: int = 256, cwd: str = WORKDIR, uid: int | None = None) -> list[str]:
    """The command line that runs ``command`` behind the boundary (see the module docstring).

    ``ro`` and ``rw`` are host folders or files shown at the same path, read-only or writable
    (as root, chown ``rw`` ones to ``uid``, the host uid from ``host_uid()``); ``network=True``
    shares the host's network (nothing in the course needs it).
    """
    made: set[str] = set()
    view = ["--die-with-parent", "--new-session", *_system_view(), "--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(64 * MB), "--tmpfs", "/tmp",
            "--perms", "0777", "--size", str(workdir_mb * MB), "--tmpfs", WORKDIR]
    for path in [*python_dirs(), *map(str, ro)]:
        view += _parents(path, made) + ["--ro-bind", path, path]
    for path in map(str, rw):
        view += _parents(path, made) + ["--bind", path, path]
    namespaces = ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    namespaces += [] if network else ["--unshare-net"]
    inside, outside = str(SANDBOX_UID), str(uid if uid is not None else host_uid())
    inner = ["bwrap", "--unshare-user", "--disable-userns", "--uid", inside, "--gid", inside,
             "--die-with-parent", "--cap-drop", "ALL", "--chdir", cwd]
    if os.geteuid() != 0:
        return inner + namespaces + view + ["--", *command]
    outer = ["bwrap", *namespaces, *view, "--cap-drop", "ALL",  # keep only what setpriv needs
             *[a for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP") for a in ("--cap-add", cap)]]
    drop = ["setpriv", f"--reuid={outside}", f"--regid={outside}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--"]
    return outer + drop + inner + ["--dev-bind", "/", "/", "--", *command]  # /dev: the outer one


@functools.cache
def boundary_error() -> str | None:
    """Why no boundary can be made here (None: it works). Tried once per process."""
    if os.environ.get(INSIDE_ENV):
        return None  # already inside one
    missing = [tool for tool in ("bwrap", "setpriv") if shutil.which(tool) is None
               and (tool == "bwrap" or os.geteuid() == 0)]
    if missing:
        return f"{' and '.join(missing)} not found"
    probe = boundary_argv([sys.executable, "-I", "-S", "-c", "import os; print(os.getuid())"])
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30,
                              env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap could not start ({exc})"
    if done.stdout.strip() != str(SANDBOX_UID):
        return f"bwrap failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}"
    return None


def child_env(home: str, **extra: str) -> dict:
    """A minimal environment: a few locale variables of the parent's, no tokens or keys."""
    env = {k: os.environ[k] for k in ENV_ALLOW if k in os.environ}
    env.update(PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin", HOME=home, TMPDIR="/tmp",
               PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", MPLBACKEND="Agg", MPLCONFIGDIR=home, **{INSIDE_ENV: "1"})
    env.update(extra)
    env.setdefault("LANG", "C.UTF-8")
    return env


def isolation() -> dict:
    """What ``run_python`` gets on this machine, measured from inside (for the lessons to show)."""
    why = boundary_error()
    if why is not None:
        return {"level": "none", "why": why,
                "what to do": f"{INSTALL_HINT}; until then run_python refuses model code "
                              "unless you pass unsandboxed=True"}
    probe = run_python(
        "import os\nstatus = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
        "nics = [l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]]\n"
        "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "print(os.getuid(), int(status['CapEff'], 16), ','.join(nics), len(pids), sorted(os.listdir('/')))",
        timeout=20)
    uid, caps, nics, pids, root = probe.output.strip().split(" ", 4)
    nested = bool(os.environ.get(INSIDE_ENV))
    return {"level": "os",
            "boundary": "the course sandbox this code already runs in" if nested else
                        "bubblewrap: own pid, network, ipc, uts and mount namespaces",
            "runs as": f"uid {uid}, {'no' if caps == '0' else 'some'} capabilities",
            "network": "none (loopback only)" if nics in ("lo", "") else f"interfaces: {nics}",
            "processes it can see": f"{pids} (its own)",
            "files it can see": root,
            "limits": "wall time, CPU, memory, file size, processes, output",
            "environment": "rebuilt: no tokens or keys, HOME = its own folder"}


# ---- running Python ------------------------------------------------------------------------------

def _child_main() -> None:
    """Inside: save the code (from stdin) as main.py and run it; exit 3 with a learner-only traceback."""
    import os
    import sys
    import traceback

    source = sys.stdin.read()
    sys.stdin = open(os.devnull)
    with open("main.py", "w", encoding="utf-8") as f:
        f.write(source)
    sys.path.insert(0, os.getcwd())
    try:
        code = compile(source, "main.py", "exec")
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    except BaseException as exc:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "main.py"]
        if frames:
            print("Traceback (most recent call last):", file=sys.stderr)
            print("".join(traceback.format_list(frames)), end="", file=sys.stderr)
        print("".join(traceback.format_exception_only(type(exc), exc)).rstrip(), file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)  # 3 = the learner's code raised; the error line is the last output line


def _describe_exit(code: int, limits: Limits) -> str:
    if code < 0 or code > 128:  # a signal, seen directly or through bwrap's 128 + N
        sig = signal.Signals(-code if code < 0 else code - 128).name
        why = {"SIGXCPU": "CPU time limit reached",
               "SIGXFSZ": f"file size limit reached (files of at most {limits.file_mb} MB)",
               "SIGKILL": f"killed (memory limit {limits.memory_mb} MB?)",
               "SIGSEGV": f"crashed (often the {limits.memory_mb} MB memory limit)"}.get(sig, "")
        return f"stopped by {sig}" + (f": {why}" if why else "")
    return f"exited with status {code}"


def _read_bounded(stream, limit: int, overflow: threading.Event, stop) -> bytearray:
    """Read ``stream`` until EOF; past ``limit`` bytes set ``overflow`` and stop the code."""
    data = bytearray()
    while chunk := stream.read1(65536):
        data += chunk[: limit - len(data)]
        if len(data) >= limit:
            overflow.set()
            stop()
            break
    return data


def run_python(code: str, *, timeout: float = 10, memory_mb: int = 1024, file_mb: int = 50,
               network: bool = False, unsandboxed: bool = False) -> SandboxResult:
    """Run ``code`` behind the OS boundary; ``ok``, ``output`` and ``error`` tell the result.

    Without a boundary on this machine this raises a CourseError, unless ``unsandboxed=True``
    (then only the limits and a fresh folder apply: the code can read and change your files).
    """
    if not isinstance(code, str) or not code.strip():
        raise CourseError("run_python needs the code as a non-empty string.")
    if memory_mb < 128:
        raise CourseError("memory_mb below 128 leaves no room for Python itself: use 128 or more.")
    limits = Limits(timeout=timeout, memory_mb=memory_mb, file_mb=file_mb)
    python = [sys.executable, "-I", "-B", "-c", inspect.getsource(_child_main) + "\n_child_main()\n"]
    why = boundary_error()
    if why is None and not os.environ.get(INSIDE_ENV):
        return _run(boundary_argv(python, network=network, workdir_mb=limits.workdir_mb),
                    code, limits, cwd=None, home=WORKDIR)
    if why is not None and not unsandboxed:
        raise CourseError(f"No operating-system sandbox on this machine ({why}): {INSTALL_HINT}. "
                          "To run the code anyway, knowing it can read and change your files, pass "
                          "unsandboxed=True.")
    with tempfile.TemporaryDirectory(prefix="sandbox-") as scratch:  # inside the boundary, or opted out
        return _run(python, code, limits, cwd=scratch, home=scratch)


def _run(argv: list[str], code: str, limits: Limits, *, cwd: str | None, home: str) -> SandboxResult:
    start, overflow = time.perf_counter(), threading.Event()
    proc = subprocess.Popen(argv, cwd=cwd, env=child_env(home), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=limits.apply, start_new_session=True)

    def stop():
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # bwrap's pid namespace takes everything else down
        except ProcessLookupError:
            pass

    output: list[bytearray] = []
    reader = threading.Thread(target=lambda: output.append(
        _read_bounded(proc.stdout, MAX_OUTPUT_CHARS * 4, overflow, stop)), daemon=True)
    reader.start()
    try:
        proc.stdin.write(code.encode("utf-8"))
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it died before reading: the exit status says why
    timed_out = False
    try:
        proc.wait(limits.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        stop()
        proc.wait()
        reader.join(5)
        proc.stdout.close()
    text = bytes(output[0] if output else b"").decode("utf-8", errors="replace")
    if len(text) > MAX_OUTPUT_CHARS:
        text = text[:MAX_OUTPUT_CHARS] + "\n[output truncated]"
    seconds, rc = time.perf_counter() - start, proc.returncode
    if overflow.is_set():
        return SandboxResult(False, text, f"output limit reached: it printed more than "
                             f"{MAX_OUTPUT_CHARS:,} characters and was stopped (print a summary)", rc, seconds)
    if timed_out:
        return SandboxResult(False, text, f"timed out after {limits.timeout:g} s: the sandbox stopped "
                             "it (infinite loop?)", rc, seconds)
    if rc == 0:
        return SandboxResult(True, text, None, 0, seconds)
    if rc == 3:  # the learner's code raised: its last line says what
        return SandboxResult(False, *_split_error(text, limits), 3, seconds)
    return SandboxResult(False, text, _describe_exit(rc, limits), rc, seconds)


def _split_error(text: str, limits: Limits) -> tuple[str, str]:
    """(output, error line) of a run that raised; forked children may have printed after it."""
    lines = text.rstrip().splitlines()
    at = max((i for i, line in enumerate(lines) if line[:1].strip() and
              not line.startswith("Traceback (")), default=len(lines) - 1)
    error = lines[at] if lines else "error"
    if "[Errno 27]" in error:  # EFBIG: Python ignores SIGXFSZ, so the write fails instead
        error += f" (the sandbox's file size limit is {limits.file_mb} MB)"
    elif "[Errno 11]" in error and "fork" in text:
        error += f" (the sandbox's process limit is {limits.nproc})"
    return "\n".join(lines[:at] + lines[at + 1:]), error
