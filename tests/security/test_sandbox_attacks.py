"""Attacks on ``course_utils.sandbox.run_python``: the code a model writes must stay contained.

Every test runs attack code through ``run_python`` and asserts containment, so each one fails on a
sandbox that lets the attack through. The attack code prints ``ESCAPED <what>`` only when an
attack got through (the word is assembled at run time, so a traceback that quotes the source never
carries it); the tests assert it is absent, and where possible check the consequence on the host
too: a canary file unchanged, a host process still alive and untraced, a planted secret absent,
no process left behind.

The attacks try hard: where an audit hook refuses the plain call (``open``, ``os.kill``,
``ctypes`` look-ups of denied libc names) they go around it (``dir_fd``-relative paths,
``_posixsubprocess.fork_exec``, libc functions found through ``dlsym``), because only an OS
boundary (namespaces, an unprivileged uid, no capabilities, resource limits) holds against them.

Nothing here relies on the sandbox's internals, only on the public ``run_python`` contract:
``SandboxResult(ok, output, error, returncode)``. Starting a process inside the sandbox may be
allowed; the tests assert what such a process can see and do, not that it is refused.

Host side: every process an attack starts carries ``MARK`` in its command line or name; a
finalizer kills any that are left (by pid) and removes marked files in /dev/shm and marked mounts,
so the suite leaves nothing behind even on a sandbox that contains nothing.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from course_utils.sandbox import run_python

REPO_ROOT = Path(__file__).resolve().parents[2]
MARK = "sbxatk" + secrets.token_hex(4)  # 14 characters: fits a process name (comm, 15 max)
DECOY_MARK = "sbxdecoy" + secrets.token_hex(3)
SLEEP = "/usr/bin/sleep"  # inside the sandbox: /usr is what it may see
ESC = "ESCAPED"

# ---- the attacker's kit: prepended to every attack (keeps each attack short and bounded) ----

KIT = r'''
import ctypes, hashlib, json, os, sys, time
from ctypes import c_int, c_uint, c_long, c_char_p, c_void_p, c_size_t, c_ssize_t
P = json.loads(PARAMS_JSON)
M = "ESC" + "APED"  # assembled at run time: a traceback quoting a source line never shows it

def say(*a):
    print(*a, flush=True)

def attempt(label, fn):
    """Run one attack; it returns something true when it got through (then the marker)."""
    try:
        got = fn()
    except BaseException as exc:
        say("contained", label, type(exc).__name__, str(exc)[:150].replace("\n", " "))
        return False
    if got:
        say(M, label)
        return True
    say("contained", label, "(no effect)")
    return False

try:
    _libc = ctypes.CDLL(None, use_errno=True)
except BaseException as exc:  # the attacks that need libc then report themselves contained
    _libc = None
    say("no libc handle:", type(exc).__name__, exc)
_dlsym = []

def cfn(name, restype, *argtypes):
    """libc's `name`: looked up directly, else through dlsym (no ctypes.dlsym audit event)."""
    if _libc is None:
        raise OSError("no libc handle")
    proto = ctypes.CFUNCTYPE(restype, *argtypes, use_errno=True)
    try:
        return proto((name, _libc))
    except Exception:
        pass
    if not _dlsym:
        _dlsym.append(ctypes.CFUNCTYPE(c_void_p, c_void_p, c_char_p)(("dlsym", _libc)))
    addr = _dlsym[0](_libc._handle, name.encode())
    if not addr:
        raise OSError("no libc symbol " + name)
    return proto(addr)

def ok(ret, what):
    if ret is None or ret == -1:
        e = ctypes.get_errno()
        raise OSError(e, what + ": " + os.strerror(e))
    return ret

def sha(data):
    return hashlib.sha256(data).hexdigest()

def read_all(fd):
    chunks = []
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            os.close(fd)
            return b"".join(chunks)
        chunks.append(b)

def dirfd(path):
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)

def copen(path, flags, mode=0o644):
    return ok(cfn("open", c_int, c_char_p, c_int, c_uint)(path.encode(), flags, mode), "open")

def cwrite_file(path, data):
    fd = copen(path, os.O_WRONLY)
    ok(cfn("write", c_ssize_t, c_int, c_char_p, c_size_t)(fd, data, len(data)), "write")
    os.close(fd)

def name_me(name):
    """Set this process's name (/proc/<pid>/comm) so the host can find it."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name)
    except BaseException:
        cfn("prctl", c_int, c_int, c_char_p, c_long, c_long, c_long)(15, name.encode(), 0, 0, 0)

def fork_exec(exe, argv, setsid=False):
    """Start a process through _posixsubprocess directly (below subprocess.Popen's audit event)."""
    import _posixsubprocess
    r, w = os.pipe()
    a = [os.fsencode(x) for x in argv]
    head = (a, [os.fsencode(exe)], False, (), None, None, -1, -1, -1, -1, -1, -1, r, w, True, setsid)
    try:
        try:
            pid = _posixsubprocess.fork_exec(*head, -1, None, None, None, -1, None, True)  # 3.11
        except TypeError:
            pid = _posixsubprocess.fork_exec(*head, None, None, None, -1, None)  # 3.10
    finally:
        os.close(w)
    err = os.read(r, 200)
    os.close(r)
    if err:
        os.waitpid(pid, 0)
        raise OSError("exec failed: " + err.decode(errors="replace"))
    return pid

def pyfork():
    try:
        return os.fork()
    except BaseException:
        return ok(cfn("fork", c_int)(), "fork")

def _spawn_one(how, exe, argv, setsid):
    if how == "popen":
        import subprocess
        return subprocess.Popen(argv, executable=exe, start_new_session=setsid).pid
    if how == "fork_exec":
        return fork_exec(exe, argv, setsid)
    if how == "posix_spawn":
        return os.posix_spawn(exe, argv, dict(os.environ), setsid=setsid)
    if how == "fork":
        pid = pyfork()
        if pid == 0:
            try:
                if setsid:
                    os.setsid()
                try:
                    os.execv(exe, argv)
                except BaseException:
                    arr = (c_char_p * (len(argv) + 1))(*[x.encode() for x in argv], None)
                    cfn("execv", c_int, c_char_p, c_void_p)(exe.encode(), arr)
            finally:
                os._exit(127)
        return pid
    raise ValueError(how)

_works = []

def spawn(exe, argv, how="any", setsid=False):
    """Start `exe` with `argv` (argv[0] may carry a marker); the first way that works, its pid."""
    if how != "any":
        return _spawn_one(how, exe, argv, setsid)
    last = None
    for h in _works or ["popen", "fork_exec", "posix_spawn", "fork"]:
        try:
            pid = _spawn_one(h, exe, argv, setsid)
            _works[:] = [h]
            return pid
        except BaseException as exc:
            last = exc
    raise last

def wait_exit(pid, secs):
    """The exit status of child `pid`, or None (and it is killed) after `secs`."""
    end = time.monotonic() + secs
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    try:
        os.kill(pid, 9)
    except BaseException:
        pass
    return None

class _SockaddrIn(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("port", ctypes.c_ubyte * 2),
                ("addr", ctypes.c_ubyte * 4), ("zero", ctypes.c_ubyte * 8)]

def tcp_connect(host, port, secs=2):
    """Connect to host:port (through libc if the socket module is refused); True if connected."""
    import socket, struct
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            s.settimeout(secs)
            s.connect((host, port))
            return True
        except PermissionError as exc:
            say("socket.connect refused:", exc, "- trying libc connect")
        s.settimeout(None)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", secs, 0))
        sa = _SockaddrIn(socket.AF_INET, (ctypes.c_ubyte * 2)(*struct.pack("!H", port)),
                         (ctypes.c_ubyte * 4)(*socket.inet_aton(host)))
        ok(cfn("connect", c_int, c_int, c_void_p, c_int)(s.fileno(), ctypes.byref(sa),
                                                         ctypes.sizeof(sa)), "connect")
        return True
    finally:
        s.close()

say("KIT-READY")
'''


def attack(code: str, params: dict | None = None, **kwargs):
    """Run the kit plus `code` in the sandbox; `params` reach the code as the dict ``P``."""
    p = {"mark": MARK, **(params or {})}
    source = KIT.replace("PARAMS_JSON", repr(json.dumps(p))) + "\n" + textwrap.dedent(code)
    kwargs.setdefault("timeout", 10)
    return run_python(source, **kwargs)


def describe(res) -> str:
    return (f"ok={res.ok} returncode={res.returncode} error={res.error!r}\n"
            f"--- output (last 3000 chars) ---\n{res.output[-3000:]}")


def escapes(res) -> list[str]:
    return [line.strip() for line in res.output.splitlines() if ESC in line]


def assert_ran(res):
    """The attack code did start: a sandbox that runs nothing would pass every test vacuously."""
    assert "KIT-READY" in res.output, f"the attack code did not even start\n{describe(res)}"


def assert_contained(res):
    """No attack got through, and the attack did run."""
    hits = escapes(res)
    assert not hits, f"attack got through: {hits}\n{describe(res)}"
    assert_ran(res)


def sha_file(path) -> str:
    """The file's sha256 as the test sees it ("unreadable" when the test cannot read it)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


# ---- the host's process table ----

def marked_processes(*marks: str) -> dict[int, str]:
    """Live (non-zombie) processes, other than this one, whose command line or name has a mark."""
    wanted = [m.encode() for m in (marks or (MARK,))]
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{name}/comm", "rb") as f:
                comm = f.read()
        except (OSError, IndexError):
            continue
        if state != b"Z" and any(m in cmdline or m in comm for m in wanted):
            found[int(name)] = (cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
                                or comm.decode(errors="replace").strip())[:100]
    return found


def leftovers(wait_s: float = 3.0) -> dict[int, str]:
    """Marked processes still alive after up to `wait_s` seconds (the sandbox may be reaping)."""
    end = time.monotonic() + wait_s
    while True:
        left = marked_processes(MARK)
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.1)


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0].decode()


@pytest.fixture(autouse=True, scope="module")
def reap_at_the_end():
    """Once more when the module is done (after an interrupted test, say)."""
    yield
    _reap()


@pytest.fixture(autouse=True)
def reap():
    """After each test: kill marked processes (by pid), drop marked /dev/shm files and mounts."""
    yield
    _reap()


def _reap():
    for pid in marked_processes(MARK, DECOY_MARK):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if os.path.isdir("/dev/shm"):
        for name in os.listdir("/dev/shm"):
            if MARK in name:
                Path("/dev/shm", name).unlink(missing_ok=True)
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        mounts = []
    umount2 = ctypes.CDLL(None, use_errno=True).umount2
    for line in mounts:
        point = line.split()[4]
        if MARK in point:
            umount2(point.encode(), 2)  # MNT_DETACH


# ---- host-side fixtures: canaries, a planted secret, a decoy process, a listening socket ----

def _token() -> str:
    return "canary-" + secrets.token_hex(16)


@pytest.fixture
def open_canary():
    """A canary file (0o666) in a world-writable (0o777) folder in /tmp: every user may read,
    write, rename and delete it, so only the sandbox boundary can stop an attack on it."""
    folder = Path(tempfile.mkdtemp(prefix=f"{MARK}-canary-", dir="/tmp"))
    folder.chmod(0o777)
    path = folder / "canary.txt"
    token = _token()
    path.write_text(token)
    path.chmod(0o666)
    yield path, token
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def tmp_canary(tmp_path):
    path = tmp_path / "canary.txt"
    token = _token()
    path.write_text(token)
    return path, token


@pytest.fixture
def home_canary():
    path = Path(os.path.expanduser("~")) / f".{MARK}-canary"
    token = _token()
    path.write_text(token)
    yield path, token
    path.unlink(missing_ok=True)


@pytest.fixture
def secret(monkeypatch):
    """A secret planted in the parent's environment before run_python starts the sandbox."""
    value = "s3cr3t-" + secrets.token_hex(12)
    monkeypatch.setenv("COURSE_TEST_SECRET", value)
    return value


@pytest.fixture
def decoy(secret):
    """A host process of the test's user, started with the secret in its environment."""
    proc = subprocess.Popen([DECOY_MARK, "120"], executable=shutil.which("sleep") or SLEEP,
                            env={"PATH": "/usr/bin:/bin", "COURSE_TEST_SECRET": secret},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    yield proc
    proc.kill()
    proc.wait(10)


@pytest.fixture
def listener():
    """A TCP server on the host's 127.0.0.1; connections land in its backlog (no accept needed)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.setblocking(False)
    yield srv
    srv.close()


def accepted(srv) -> list:
    """Connections that reached the host listener (polled for a moment)."""
    got = []
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        try:
            conn, addr = srv.accept()
        except BlockingIOError:
            time.sleep(0.05)
            continue
        got.append(addr)
        conn.close()
    return got


# ==== 1. reading host files ====

READ_METHODS = ["open", "dir_fd_parent", "dir_fd_root", "scandir_fd", "ctypes_open"]
READ_TARGETS = ["repo_readme", "home_bashrc", "home_canary", "etc_shadow", "tmp_path_canary",
                "world_open_canary"]

READ_ATTACK = """
path, want = P["path"], P["sha"]
folder, name = os.path.split(path)

def open_():
    with open(path, "rb") as f:
        return sha(f.read()) == want

def dir_fd_parent():
    fd = dirfd(folder)
    return sha(read_all(os.open(name, os.O_RDONLY, dir_fd=fd))) == want

def dir_fd_root():  # relative to "/": the whole path never reaches an audit hook
    fd = dirfd("/")
    return sha(read_all(os.open(path.lstrip("/"), os.O_RDONLY, dir_fd=fd))) == want

def scandir_fd():
    fd = dirfd(folder)
    names = [e.name for e in os.scandir(fd)]
    if name not in names:
        return False
    if P["unique"]:  # a random name: seeing it at all is seeing the host's folder
        return "listed"
    return sha(read_all(os.open(name, os.O_RDONLY, dir_fd=fd))) == want

def ctypes_open():
    return sha(read_all(copen(path, os.O_RDONLY))) == want

attempt(P["method"], {"open": open_, "dir_fd_parent": dir_fd_parent, "dir_fd_root": dir_fd_root,
                      "scandir_fd": scandir_fd, "ctypes_open": ctypes_open}[P["method"]])
"""


@pytest.fixture
def read_target(request):
    """(path, content token or None, unique name?) for each host file an attack tries to read."""
    kind = request.param
    if kind == "repo_readme":
        return REPO_ROOT / "README.md", None, False
    if kind == "home_bashrc":
        path = Path(os.path.expanduser("~/.bashrc"))
        if not path.is_file():
            pytest.skip("no ~/.bashrc on this machine (home_canary covers home)")
        return path, None, False
    if kind == "etc_shadow":
        path = Path("/etc/shadow")
        if not os.access(path, os.R_OK):
            pytest.skip("the test itself cannot read /etc/shadow")
        return path, None, False
    fixture = {"home_canary": "home_canary", "tmp_path_canary": "tmp_canary",
               "world_open_canary": "open_canary"}[kind]
    path, token = request.getfixturevalue(fixture)
    return path, token, True


@pytest.mark.parametrize("method", READ_METHODS)
@pytest.mark.parametrize("read_target", READ_TARGETS, indirect=True)
def test_host_files_cannot_be_read(read_target, method):
    path, token, unique = read_target
    res = attack(READ_ATTACK, {"path": str(path), "sha": sha_file(path), "unique": unique,
                               "method": method})
    assert_contained(res)
    if token:
        assert token not in res.output, describe(res)
    assert "contained" in res.output or not res.ok, describe(res)  # the attack did run


# ==== 2. writing, deleting, renaming, chmod-ing host files ====

WRITE_METHODS = ["open_write", "dir_fd_write", "dir_fd_unlink", "dir_fd_rename", "dir_fd_chmod",
                 "ctypes_write", "ctypes_unlink", "ctypes_chmod"]

WRITE_ATTACK = """
path = P["path"]
folder, name = os.path.split(path)

def open_write():
    with open(path, "w") as f:
        f.write("pwned")
    return True

def dir_fd_write():
    f = os.open(name, os.O_WRONLY | os.O_TRUNC, dir_fd=dirfd(folder))
    os.write(f, b"pwned")
    return True

def dir_fd_unlink():
    os.unlink(name, dir_fd=dirfd(folder))
    return True

def dir_fd_rename():
    fd = dirfd(folder)
    os.rename(name, name + ".moved", src_dir_fd=fd, dst_dir_fd=fd)
    return True

def dir_fd_chmod():
    os.chmod(name, 0o600, dir_fd=dirfd(folder))
    return True

def ctypes_write():
    cwrite_file(path, b"pwned")
    return True

def ctypes_unlink():
    ok(cfn("unlink", c_int, c_char_p)(path.encode()), "unlink")
    return True

def ctypes_chmod():
    ok(cfn("chmod", c_int, c_char_p, c_uint)(path.encode(), 0o600), "chmod")
    return True

attempt(P["method"], globals()[P["method"]])
"""


def assert_canary_intact(path: Path, token: str, res):
    assert sorted(os.listdir(path.parent)) == [path.name], describe(res)
    assert path.read_text() == token, describe(res)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666, describe(res)


@pytest.mark.parametrize("method", WRITE_METHODS)
def test_host_files_cannot_be_changed(open_canary, method):
    path, token = open_canary
    res = attack(WRITE_ATTACK, {"path": str(path), "method": method})
    assert_contained(res)
    assert_canary_intact(path, token, res)


# ==== 3. a shell started from inside sees only the sandbox ====

SHELL_METHODS = ["ctypes_system", "ctypes_popen", "fork_exec", "os_system", "subprocess_run",
                 "posix_spawn"]

SHELL_ATTACK = """
cmd = P["cmd"]
say("starting a shell via", P["method"])

def ctypes_system():
    say("system() returned", cfn("system", c_int, c_char_p)(cmd.encode()))

def ctypes_popen():
    fp = cfn("popen", c_void_p, c_char_p, c_char_p)(cmd.encode(), b"r")
    if not fp:
        raise OSError(ctypes.get_errno(), "popen")
    data = read_all(os.dup(cfn("fileno", c_int, c_void_p)(fp)))
    cfn("pclose", c_int, c_void_p)(fp)
    say(data.decode(errors="replace"))

def fork_exec_():
    say("shell exit", wait_exit(fork_exec("/bin/sh", ["sh", "-c", cmd]), 8))

def os_system():
    say("os.system returned", os.system(cmd))

def subprocess_run():
    import subprocess
    r = subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, timeout=8)
    say(r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace"))

def posix_spawn():
    say("shell exit", wait_exit(os.posix_spawn("/bin/sh", ["sh", "-c", cmd], dict(os.environ)), 8))

try:
    {"ctypes_system": ctypes_system, "ctypes_popen": ctypes_popen, "fork_exec": fork_exec_,
     "os_system": os_system, "subprocess_run": subprocess_run,
     "posix_spawn": posix_spawn}[P["method"]]()
except BaseException as exc:
    say("no shell:", type(exc).__name__, exc)
"""


@pytest.mark.parametrize("method", SHELL_METHODS)
def test_a_shell_sees_only_the_sandbox(open_canary, decoy, secret, method):
    path, token = open_canary
    host_pid1 = Path("/proc/1/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    cmd = (f"cat {path}; echo; echo PID1=$(tr '\\0' ' ' < /proc/1/cmdline | head -c 60); "
           f"echo UIDIS=$(id -u); echo ENVHITS=$(tr '\\0' '\\n' < /proc/{decoy.pid}/environ "
           f"| grep -c ^COURSE_TEST_SECRET=)")
    res = attack(SHELL_ATTACK, {"cmd": cmd, "method": method})
    assert_ran(res)
    out = res.output
    assert token not in out, f"the shell read the host canary\n{describe(res)}"
    assert not re.search(r"^UIDIS=0\s*$", out, re.M), f"the shell runs as root\n{describe(res)}"
    assert f"PID1={host_pid1}" not in out, f"the shell sees the host's pid 1\n{describe(res)}"
    assert secret not in out and not re.search(r"^ENVHITS=[1-9]", out, re.M), (
        f"the shell read a host process's environment\n{describe(res)}")
    assert path.read_text() == token
    assert decoy.poll() is None


# ==== 4. network ====

def test_internet_is_unreachable():
    res = attack("""
attempt("tcp 1.1.1.1:53", lambda: tcp_connect("1.1.1.1", 53, 2))
attempt("tcp 8.8.8.8:443", lambda: tcp_connect("8.8.8.8", 443, 2))
""", timeout=15)
    assert_contained(res)


def test_host_loopback_is_not_reachable(listener):
    port = listener.getsockname()[1]
    res = attack("""attempt("connect 127.0.0.1", lambda: tcp_connect("127.0.0.1", P["port"], 2))""",
                 {"port": port}, timeout=15)
    assert_contained(res)
    assert not accepted(listener), f"the host's listener got a connection\n{describe(res)}"


def test_raw_sockets_are_refused():
    res = attack("""
import socket
def raw(family, kind, proto):
    def go():
        socket.socket(family, kind, proto).close()
        return True
    return go
attempt("raw icmp", raw(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("raw packet", raw(socket.AF_PACKET, socket.SOCK_RAW, 0x0300))
attempt("libc raw icmp", lambda: ok(cfn("socket", c_int, c_int, c_int, c_int)(2, 3, 1), "socket") >= 0)
""")
    assert_contained(res)


NSENTER_ATTACK = """
host_pid, port = P["host_pid"], P["port"]
probe = ("import socket, sys\\n"
         "socket.create_connection(('127.0.0.1', int(sys.argv[1])), 2).close()\\n")

def via_nsenter():
    pid = spawn("/usr/bin/nsenter", ["nsenter", "-t", str(host_pid), "-n", "--",
                                     sys.executable, "-I", "-c", probe, str(port)])
    return wait_exit(pid, 8) == 0

def via_setns():
    fd = os.open(f"/proc/{host_pid}/ns/net", os.O_RDONLY)
    ok(cfn("setns", c_int, c_int, c_int)(fd, 0x40000000), "setns")
    return tcp_connect("127.0.0.1", port, 2)

attempt(P["method"], via_nsenter if P["method"] == "nsenter" else via_setns)
"""


@pytest.mark.parametrize("method", ["nsenter", "setns"])
def test_entering_the_hosts_network_namespace_fails(listener, method):
    res = attack(NSENTER_ATTACK, {"host_pid": os.getpid(), "port": listener.getsockname()[1],
                                  "method": method}, timeout=15)
    assert_contained(res)
    assert not accepted(listener), f"the host's listener got a connection\n{describe(res)}"


# ==== 5. other processes ====

def test_host_process_environments_cannot_be_read(decoy, secret):
    me = os.getpid()
    res = attack("""
def environ_of(pid, how):
    def go():
        if how == "open":
            with open(f"/proc/{pid}/environ", "rb") as f:
                data = f.read()
        else:
            data = read_all(os.open(f"{pid}/environ", os.O_RDONLY, dir_fd=dirfd("/proc")))
        if pid == P["decoy"]:
            return b"COURSE_TEST_SECRET=" in data
        return sha(data) == P["test_environ_sha"]
    return go
for pid in (P["test"], P["decoy"]):
    for how in ("open", "dir_fd"):
        attempt(f"environ of {pid} via {how}", environ_of(pid, how))
""", {"test": me, "decoy": decoy.pid, "test_environ_sha": sha_file(f"/proc/{me}/environ")})
    assert_contained(res)
    assert secret not in res.output, describe(res)


def test_environment_is_rebuilt_without_the_parents_secrets(secret):
    res = attack("""
def leaked():
    keys = sorted(k for k, v in os.environ.items() if k == "COURSE_TEST_SECRET" or "s3cr3t" in v)
    with open("/proc/self/environ", "rb") as f:
        raw = f.read()
    return keys or (b"s3cr3t" in raw and "in /proc/self/environ")
attempt("secret in os.environ", leaked)
say("env keys:", sorted(os.environ))
""")
    assert res.ok, describe(res)
    assert_contained(res)
    assert secret not in res.output, describe(res)


def test_host_processes_are_invisible(decoy):
    me = os.getpid()
    res = attack("""
pids = [n for n in os.listdir("/proc") if n.isdigit()]
say("visible processes:", len(pids))
def seen(pid, want):
    def go():
        if str(pid) in pids:  # a pid this high is never the sandbox's own (it has a handful)
            return "listed"
        if not os.path.exists(f"/proc/{pid}"):
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return sha(f.read()) == want
    return go
attempt("the test process in /proc", seen(P["test"], P["test_sha"]))
attempt("the decoy in /proc", seen(P["decoy"], P["decoy_sha"]))
""", {"test": me, "test_sha": sha_file(f"/proc/{me}/cmdline"), "decoy": decoy.pid,
      "decoy_sha": sha_file(f"/proc/{decoy.pid}/cmdline")})
    assert_contained(res)


SIGNAL_ATTACK = """
import signal
pid, sig = P["pid"], P["sig"]

def kill():
    try:
        os.kill(pid, sig)
    except PermissionError:
        ok(cfn("kill", c_int, c_int, c_int)(pid, sig), "kill")  # around an audit hook
    return True

def pidfd():
    signal.pidfd_send_signal(os.pidfd_open(pid), sig)
    return True

def ctypes_kill():
    ok(cfn("kill", c_int, c_int, c_int)(pid, sig), "kill")
    return True

attempt(f"{P['method']}({pid}, {sig})", {"kill": kill, "pidfd": pidfd, "ctypes_kill": ctypes_kill}[P["method"]])
"""


@pytest.mark.parametrize("method, whom, sig", [
    ("kill", "test", 0), ("pidfd", "test", 0),  # signal 0: a probe, harmless to pytest
    ("kill", "decoy", signal.SIGKILL), ("pidfd", "decoy", signal.SIGKILL),
    ("ctypes_kill", "decoy", signal.SIGKILL)])
def test_host_processes_cannot_be_signalled(decoy, method, whom, sig):
    pid = os.getpid() if whom == "test" else decoy.pid
    res = attack(SIGNAL_ATTACK, {"pid": pid, "sig": int(sig), "method": method})
    assert_contained(res)
    assert decoy.poll() is None, f"the decoy host process was killed\n{describe(res)}"


def test_host_processes_cannot_be_ptraced(decoy):
    # PTRACE_ATTACH stops its target: the target is the decoy (a host process of the test's own
    # user, so the same privilege question as the test process) so that pytest can never hang.
    res = attack("""
def attach():
    ptrace = cfn("ptrace", c_long, c_long, c_int, c_void_p, c_void_p)
    ok(ptrace(16, P["decoy"], None, None), "PTRACE_ATTACH")
    try:
        os.waitpid(P["decoy"], 0x40000000)  # __WALL: wait for the attach stop
    finally:
        ptrace(17, P["decoy"], None, None)  # PTRACE_DETACH, no signal: let it run on
    return True
attempt("PTRACE_ATTACH decoy", attach)
def seize():
    ok(cfn("ptrace", c_long, c_long, c_int, c_void_p, c_void_p)(0x4206, P["decoy"], None, None),
       "PTRACE_SEIZE")
    return True
attempt("PTRACE_SEIZE decoy", seize)
""", {"decoy": decoy.pid})
    assert_contained(res)
    time.sleep(0.2)
    assert decoy.poll() is None, describe(res)
    assert process_state(decoy.pid) not in ("t", "T"), f"the decoy is left stopped\n{describe(res)}"


# ==== 6. privilege ====

def test_code_does_not_run_as_root():
    res = attack("""
say("IDS", os.getuid(), os.geteuid(), os.getgid(), os.getegid())
attempt("uid or euid is 0", lambda: os.getuid() == 0 or os.geteuid() == 0)
""")
    assert_contained(res)
    ids = re.search(r"^IDS (\d+) (\d+) (\d+) (\d+)$", res.output, re.M)
    assert ids and int(ids[1]) != 0 and int(ids[2]) != 0, describe(res)


def test_no_capabilities():
    res = attack("""
caps = {}
for line in open("/proc/self/status"):
    if line.startswith(("CapEff", "CapPrm", "CapAmb")):
        key, value = line.split(":")
        caps[key] = int(value, 16)
say("CAPS", caps)
attempt("effective or permitted capabilities", lambda: caps.get("CapEff", 1) or caps.get("CapPrm", 1))
""")
    assert_contained(res)
    assert re.search(r"'CapEff': 0\b", res.output), describe(res)


def test_mount_is_refused():
    res = attack("""
target = os.path.abspath(P["mark"] + "-mnt")
os.mkdir(target)
def mount():
    ok(cfn("mount", c_int, c_char_p, c_char_p, c_char_p, ctypes.c_ulong, c_void_p)(
        b"none", target.encode(), b"tmpfs", 0, None), "mount")
    cfn("umount2", c_int, c_char_p, c_int)(target.encode(), 2)
    return True
attempt("mount tmpfs", mount)
""")
    assert_contained(res)


def test_a_new_user_namespace_gives_no_power_over_host_files(open_canary):
    path, token = open_canary
    res = attack("""
def unshare():
    uid, gid = os.geteuid(), os.getegid()
    ok(cfn("unshare", c_int, c_int)(0x10000000), "unshare(CLONE_NEWUSER)")
    for file, data in (("setgroups", b"deny"), ("uid_map", f"0 {uid} 1".encode()),
                       ("gid_map", f"0 {gid} 1".encode())):
        try:
            cwrite_file("/proc/self/" + file, data)
        except BaseException as exc:
            say("map", file, exc)
    return False
attempt("unshare", unshare)
say("now uid", os.getuid())

def read_shadow():
    return sha(read_all(copen("/etc/shadow", os.O_RDONLY))) == P["shadow_sha"]
def write_canary():
    cwrite_file(P["canary"], b"pwned")
    return True
def chmod_canary():
    ok(cfn("chmod", c_int, c_char_p, c_uint)(P["canary"].encode(), 0o600), "chmod")
    return True
attempt("read /etc/shadow after unshare", read_shadow)
attempt("write the canary after unshare", write_canary)
attempt("chmod the canary after unshare", chmod_canary)
""", {"canary": str(path), "shadow_sha": sha_file("/etc/shadow")})
    assert_contained(res)
    assert_canary_intact(path, token, res)


def test_setuid_root_fails():
    res = attack("""
def py_setuid():
    os.setuid(0)
    return os.getuid() == 0
def libc_setresuid():
    cfn("setresuid", c_int, c_uint, c_uint, c_uint)(0, 0, 0)
    return os.getuid() == 0 or os.geteuid() == 0
attempt("os.setuid(0)", py_setuid)
attempt("setresuid(0, 0, 0)", libc_setresuid)
""")
    assert_contained(res)


# ==== 7. /dev/shm ====

@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this host")
def test_dev_shm_is_not_the_hosts():
    before = set(os.listdir("/dev/shm"))
    res = attack("""
mark = P["mark"]
def plain():
    with open(f"/dev/shm/{mark}-open", "w") as f:
        f.write("x")
    return "created"
def dir_fd():
    os.close(os.open(f"{mark}-dirfd", os.O_WRONLY | os.O_CREAT, dir_fd=dirfd("/dev/shm")))
    return "created"
def shm_open():
    import _posixshmem
    os.close(_posixshmem.shm_open(f"/{mark}-shm", os.O_CREAT | os.O_RDWR, mode=0o600))
    return "created"
for label, fn in (("open", plain), ("dir_fd", dir_fd), ("shm_open", shm_open)):
    try:
        say(label, fn(), "(inside the sandbox: fine if it is the sandbox's own /dev/shm)")
    except BaseException as exc:
        say(label, "refused", type(exc).__name__, exc)
""")
    assert_ran(res)
    after = set(os.listdir("/dev/shm"))
    appeared = sorted(n for n in after - before if MARK in n)
    assert not appeared, f"files appeared in the host's /dev/shm: {appeared}\n{describe(res)}"


# ==== 8. disk ====

def test_file_size_limit_stops_a_200_mb_file():
    res = attack("""
block = b"z" * (1 << 20)
with open("big.bin", "wb") as f:
    for i in range(200):
        f.write(block)
say("wrote 200 MB")
""", file_mb=50, timeout=30)
    assert_ran(res)
    assert not res.ok, describe(res)
    assert "wrote 200 MB" not in res.output, describe(res)
    err = (res.error or "").lower()  # "File too large" alone does not tell the learner why
    assert "limit" in err and any(w in err for w in ("file size", "file_mb", "50 mb")), (
        f"the error should name the file size limit\n{describe(res)}")


def test_many_files_leave_no_trace_on_the_host_disk():
    """100 files of 10 MB (each under the 50 MB per-file limit). The scratch must be gone
    afterwards; the peak use during the run is measured and shown (-s), not asserted: the
    contract limits the size of each file, not the total."""
    folders = {os.path.realpath(tempfile.gettempdir()), "/"}
    free_before = {d: shutil.disk_usage(d).free for d in folders}
    lowest = dict(free_before)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for d in folders:
                lowest[d] = min(lowest[d], shutil.disk_usage(d).free)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        res = attack("""
block = b"q" * (10 << 20)
written = 0
try:
    for i in range(100):
        with open(f"f{i:03d}.bin", "wb") as f:
            f.write(block)
        written += 1
finally:
    say("WROTE", written, "files of 10 MB")
""", file_mb=50, timeout=30)
    finally:
        stop.set()
        sampler.join()
    seconds = time.monotonic() - started
    assert_ran(res)
    peak = {d: (free_before[d] - lowest[d]) >> 20 for d in folders}
    print(f"\n[many files] ok={res.ok} error={res.error!r} {seconds:.1f} s, "
          f"peak host disk use during the run (MB): {peak}; {res.output.strip()[-200:]}")
    assert seconds < 30 + 10, f"the run was not bounded in time\n{describe(res)}"
    for d in folders:
        lost = (free_before[d] - shutil.disk_usage(d).free) >> 20
        assert lost < 64, f"{lost} MB of {d} still used after the run\n{describe(res)}"


# ==== 9. leftover processes ====

LEFTOVER_ATTACK = """
mark, how = P["mark"], P["method"]

def detached_python_child():
    pid = pyfork()
    if pid == 0:
        try:
            os.setsid()
            name_me(mark)
            time.sleep(30)
        finally:
            os._exit(0)
    return pid

try:
    if how == "fork":
        pid = detached_python_child()
    else:
        pid = spawn("/usr/bin/sleep", [mark + "-child", "30"], how=how, setsid=True)
    say("started a detached grandchild", pid)
except BaseException as exc:
    say("could not start a grandchild:", type(exc).__name__, exc)
time.sleep(0.3)
if P["loop"]:
    while True:
        pass
"""


@pytest.mark.parametrize("method, loop", [
    ("popen", False), ("fork_exec", False), ("fork", False), ("any", True)],
    ids=["popen-exit", "fork_exec-exit", "fork-setsid-exit", "timeout"])
def test_no_process_outlives_the_run(method, loop):
    res = attack(LEFTOVER_ATTACK, {"method": method, "loop": loop}, timeout=3 if loop else 10)
    assert_ran(res)
    if loop:
        assert not res.ok and res.error and "time" in res.error.lower(), describe(res)
    left = leftovers()
    assert not left, f"processes left on the host after the run: {left}\n{describe(res)}"


def test_fork_bomb_is_bounded_and_cleaned_up():
    res = attack("""
started, errors = 0, {}
t0 = time.monotonic()
for i in range(2000):
    if time.monotonic() - t0 > 6:
        break
    try:
        spawn("/usr/bin/sleep", [P["mark"] + "-bomb", "20"])
        started += 1
    except BaseException as exc:
        errors[type(exc).__name__] = str(exc)[:100]
        if len(errors) > 3 and not started:
            break
say("STARTED", started, errors)
""", timeout=15)
    m = re.search(r"^STARTED (\d+)", res.output, re.M)
    started = int(m[1]) if m else 0
    print(f"\n[fork bomb] started {started} of 2000; {describe(res)[:300]}")
    left = leftovers()
    assert_ran(res)
    assert started < 300, f"{started} processes started\n{describe(res)}"
    assert not left, f"{len(left)} processes left on the host after the run\n{describe(res)}"


# ==== 10. output limit ====

def test_output_limit_is_reported():
    res = run_python('line = "y" * 99\nfor _ in range(100_000):  # 10 MB\n    print(line)\n',
                     timeout=30)
    assert len(res.output) <= 25_000, f"{len(res.output)} characters of output came back"
    assert res.error and "output" in res.error.lower() and "limit" in res.error.lower(), (
        f"the error should say the output limit was hit\n{describe(res)[:800]}")


# ==== 11. a learner's SyntaxError ====

def test_syntax_error_shows_the_learners_line_not_the_sandbox():
    res = run_python("total = 0\nfor i in range(3)\n    total += i\nprint(total)\n")
    text = f"{res.output}\n{res.error or ''}"
    assert not res.ok, describe(res)
    assert "SyntaxError" in text, describe(res)
    assert "for i in range(3)" in text, describe(res)
    internal = [line for line in text.splitlines()
                if re.search(r"_boot|_child_run_main|sandbox\.py|File \"<string>\"", line)]
    assert not internal, f"the sandbox's own frames are shown: {internal}\n{describe(res)}"


# ==== 12. memory ====

@pytest.mark.parametrize("how", ["one_block", "touched_chunks"])
def test_allocating_4_gb_with_a_256_mb_limit_fails(how):
    code = {"one_block": "x = bytearray(4 << 30)\nprint('ALLOCATED')\n",
            "touched_chunks": "chunks = []\nfor i in range(64):\n"
                              "    chunks.append(b'm' * (64 << 20))\nprint('ALLOCATED')\n"}[how]
    res = run_python(code, memory_mb=256, timeout=30)
    assert not res.ok and res.error, describe(res)
    assert "ALLOCATED" not in res.output, describe(res)
    after = run_python("print(6 * 7)")  # the host (and the sandbox) are fine afterwards
    assert after.ok and after.output.strip() == "42", describe(after)


# ==== 13. normal programs still work ====

def test_a_normal_program_works():
    res = run_python("""
import os
import numpy as np
a = np.arange(1, 11)
print("DOT", int(a @ a))
with open("notes.txt", "w") as f:
    f.write("hello sandbox")
print("READ", open("notes.txt").read())
print("HOME", os.environ.get("HOME") == os.getcwd(), os.path.expanduser("~") == os.getcwd())
print("CWD", os.getcwd())
""", timeout=60)
    assert res.ok, describe(res)
    assert "DOT 385" in res.output, describe(res)
    assert "READ hello sandbox" in res.output, describe(res)
    assert "HOME True True" in res.output, describe(res)
    cwd = re.search(r"^CWD (.+)$", res.output, re.M)[1]
    assert os.path.realpath(cwd) not in {os.path.realpath(os.path.expanduser("~")),
                                         str(REPO_ROOT), os.path.realpath(os.getcwd())}
