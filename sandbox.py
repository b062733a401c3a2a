"""
Where model-written code runs (Command A, Cohere, arXiv 2504.00698: section 3's Code expert is trained and
scored on programs it writes and executes; SPEC 4). tasks.py's code verifier calls run_python_tests and
run_sql, agents.py's SQL tool calls run_sql; nothing else in the project executes model output.

The sandbox: a separate Python process with CPU-time, address-space, file-size, open-file and process-count
limits (setrlimit), an empty environment, a fresh temporary working directory, a wall-clock timeout that kills
its whole process group, and output read back from size-capped files. When we run as root, the child drops to
`nobody` after importing a fixed set of modules (root ignores RLIMIT_NPROC and may write anywhere). Inside, a
PEP 578 audit hook refuses process creation, sockets, ctypes, file writes outside the working directory and
reads outside it and the interpreter's own files (so no /proc/<pid>/environ of other processes): a second
layer, not a kernel boundary (the rlimits are). POSIX only (resource, setsid). A hostile program can still
forge its own test report (the tests run in its process): the sandbox protects the machine, not the score.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


@dataclass
class SandboxConfig:
    timeout: float = 5.0        # wall-clock seconds before the process group is killed
    cpu_s: int = 1              # RLIMIT_CPU: SIGXCPU after this many CPU seconds (tests need ~0.1)
    mem_mb: int = 256           # RLIMIT_AS: address space (a memory bomb gets MemoryError)
    fsize_kb: int = 1024        # RLIMIT_FSIZE: largest file it may write, stdout/stderr included
    nproc: int = 1              # RLIMIT_NPROC for its user: 1 = no new processes or threads at all
    nofile: int = 64            # RLIMIT_NOFILE
    max_output: int = 65536     # bytes of stdout / stderr read back
    guard: bool = True          # the audit-hook layer (off only to test the kernel limits alone)


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    signal: str | None          # e.g. SIGXCPU, SIGKILL when the process was killed
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# Imported before the root -> nobody drop: afterwards the interpreter cannot read its own stdlib (it lives
# under /root here), so these are the modules sandboxed code can use in that case.
_PRELOAD = ("math", "re", "json", "collections", "itertools", "functools", "string", "heapq", "bisect",
            "random", "statistics", "fractions", "decimal", "datetime", "typing", "dataclasses", "operator",
            "copy", "sqlite3", "traceback", "linecache", "textwrap", "unicodedata", "array", "enum", "time")

# Runs as `python -I -S -B -c _WRAPPER` in the temporary directory; main.py there holds the code.
_WRAPPER = r'''
import os, sys, resource
for _m in __PRELOAD__:
    __import__(_m)
_src = open("main.py", encoding="utf-8").read()
_root = os.path.realpath(os.getcwd())
if os.geteuid() == 0:                       # root: RLIMIT_NPROC would not apply, and root writes anywhere
    try:
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
    except OSError:                         # a container without CAP_SETUID: the audit hook still guards
        pass
resource.setrlimit(resource.RLIMIT_NPROC, (__NPROC__, __NPROC__))   # after setuid: it counts that user's processes

def _install(root, guard):
    if not guard:
        return
    reads = tuple(os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, root})
    reads += ("/dev/null", "/dev/urandom", "/dev/zero")
    W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    deny = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
            "os.killpg", "subprocess.", "pty.", "socket.", "ctypes.", "_posixsubprocess", "signal.pthread_kill",
            "os.setuid", "winreg.", "urllib.", "ftplib.", "smtplib.", "http.", "webbrowser.")
    paths = ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
             "os.symlink", "os.link", "os.rename", "shutil.", "os.listdir", "os.scandir", "os.chdir")
    def under(p, roots):
        try:
            p = os.path.realpath(os.fsdecode(p))
        except Exception:
            return False
        return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)
    def hook(event, args):
        if event.startswith(deny):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            writing = bool((flags or 0) & W) or (mode is not None and any(c in str(mode) for c in "wax+"))
            if not under(path, (root,) if writing else reads):
                raise PermissionError(f"sandbox: open {path!r} outside the sandbox")
        elif event.startswith(paths):
            for a in args:
                if isinstance(a, (str, bytes, os.PathLike)) and not under(a, (root,) if event not in
                        ("os.listdir", "os.scandir") else reads):
                    raise PermissionError(f"sandbox: {event} {a!r} outside the sandbox")
        elif event == "object.__setattr__" and args[1] in ("__code__", "__closure__"):
            raise PermissionError("sandbox: rewriting code objects is not allowed")
    sys.addaudithook(hook)

_install(_root, __GUARD__)
del _install
exec(compile(_src, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


def _limits(cfg: SandboxConfig):
    """preexec_fn: runs in the child between fork and exec (the interpreter is not yet ours to trust)."""
    def apply():
        for res, val in ((resource.RLIMIT_CPU, (cfg.cpu_s, cfg.cpu_s + 1)),   # hard + 1 s: SIGKILL backstop
                         (resource.RLIMIT_AS, (cfg.mem_mb << 20,) * 2),
                         (resource.RLIMIT_FSIZE, (cfg.fsize_kb << 10,) * 2),
                         (resource.RLIMIT_NOFILE, (cfg.nofile,) * 2),
                         (resource.RLIMIT_CORE, (0, 0))):
            resource.setrlimit(res, val)
    return apply


def run_sandboxed(code: str, timeout: float | None = None, config: SandboxConfig | None = None,
                  files: dict | None = None) -> SandboxResult:
    """Run Python source in the sandbox; returns its exit status and (capped) output. Never raises for
    anything the code does; raises TypeError/ValueError only for a caller's bad arguments."""
    if isinstance(code, bytes):
        code = code.decode("utf-8", errors="replace")
    if not isinstance(code, str):
        raise TypeError(f"code must be a string, got {type(code).__name__}")
    cfg = dataclasses.replace(config or SandboxConfig(), **({"timeout": timeout} if timeout is not None else {}))
    if cfg.timeout <= 0 or cfg.cpu_s < 1 or cfg.mem_mb < 32:
        raise ValueError("sandbox needs timeout > 0, cpu_s >= 1 and mem_mb >= 32")
    code = code.replace("\x00", "")                 # a NUL byte would make compile() raise in the child anyway
    work = tempfile.mkdtemp(prefix="sandbox-")
    t0 = time.monotonic()
    try:
        with open(os.path.join(work, "main.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(code)
        for name, text in (files or {}).items():
            if os.path.basename(name) != name or name in ("main.py", ".stdout", ".stderr"):
                raise ValueError(f"sandbox file names must be plain names, got {name!r}")
            with open(os.path.join(work, name), "w", encoding="utf-8") as f:
                f.write(text)
        if os.geteuid() == 0:                       # the child becomes nobody: give it its own directory
            for p in [work] + [os.path.join(work, n) for n in os.listdir(work)]:
                os.chown(p, 65534, 65534)
        wrapper = (_WRAPPER.replace("__PRELOAD__", repr(_PRELOAD)).replace("__NPROC__", str(int(cfg.nproc)))
                   .replace("__GUARD__", str(bool(cfg.guard))))
        out_path, err_path = os.path.join(work, ".stdout"), os.path.join(work, ".stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", wrapper], cwd=work, env={},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, preexec_fn=_limits(cfg),
                                    start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=cfg.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            try:                                    # the whole session: anything it managed to start dies too
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()

        def read(p):
            with open(p, "rb") as f:
                return f.read(cfg.max_output).decode("utf-8", errors="replace")
        rc = proc.returncode
        try:
            sig = signal.Signals(-rc).name if rc is not None and rc < 0 else None
        except ValueError:
            sig = f"signal {-rc}"
        return SandboxResult(rc, read(out_path), read(err_path), timed_out, sig, time.monotonic() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# The harness for unit tests and SQL checks prints one marked JSON line; the last such line is the report.
_MARK = "@@RESULT@@"


def _last_report(res: SandboxResult):
    for line in reversed(res.stdout.splitlines()):
        if line.startswith(_MARK):
            try:
                return json.loads(line[len(_MARK):])
            except ValueError:
                return None
    return None


_PY_TESTS = r'''
import json
SRC, FN, CASES = {src!r}, {fn!r}, {cases!r}
ns = {{"__name__": "solution"}}
try:
    exec(compile(SRC, "solution.py", "exec"), ns)
    f = ns[FN]
except BaseException as e:
    print("{mark}" + json.dumps({{"passed": 0, "total": len(CASES), "error": repr(e)[:300]}}))
    raise SystemExit(0)
passed = 0
for args, want in CASES:
    try:
        passed += f(*json.loads(args)) == json.loads(want)
    except BaseException:
        pass
print("{mark}" + json.dumps({{"passed": int(passed), "total": len(CASES)}}))
'''

_SQL_RUN = r'''
import json, sqlite3
SCHEMA, ROWS, QUERIES, LIMIT = {schema!r}, {rows!r}, {queries!r}, {limit!r}
db = sqlite3.connect(":memory:")
db.executescript(SCHEMA)
for table, rows in json.loads(ROWS).items():
    if rows:
        db.executemany(f"INSERT INTO {{table}} VALUES ({{','.join('?' * len(rows[0]))}})", rows)
ALLOWED = {{sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, 33}}   # 33: RECURSIVE
db.set_authorizer(lambda action, *a: sqlite3.SQLITE_OK if action in ALLOWED else sqlite3.SQLITE_DENY)
db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 100000)
out = []
for q in QUERIES:
    try:
        rows = db.execute(q).fetchmany(LIMIT)
        out.append({{"rows": [[round(v, 2) if isinstance(v, float) else v for v in r] for r in rows]}})
    except Exception as e:
        out.append({{"error": f"{{type(e).__name__}}: {{e}}"[:300]}})
print("{mark}" + json.dumps(out))
'''


def run_python_tests(src: str, fn: str, cases: list, timeout: float = 5.0) -> tuple[float, dict]:
    """Fraction of (args, expected) cases the function `fn` defined by `src` passes, in the sandbox."""
    cases = [(json.dumps(a), json.dumps(w)) for a, w in cases]
    res = run_sandboxed(_PY_TESTS.format(src=src, fn=fn, cases=cases, mark=_MARK), timeout=timeout)
    rep = _last_report(res)
    if not isinstance(rep, dict) or not isinstance(rep.get("passed"), int):
        return 0.0, {"error": (res.stderr or "no report")[-300:], "signal": res.signal, "timed_out": res.timed_out}
    return min(max(rep["passed"], 0), len(cases)) / max(len(cases), 1), rep


def run_sql(schema: str, rows: dict, queries: list, limit: int = 1000, timeout: float = 5.0) -> list:
    """Execute read-only queries against an in-memory SQLite database, in the sandbox: one dict per query,
    {"rows": [...]} or {"error": "..."}; everything an error if the sandbox itself failed."""
    res = run_sandboxed(_SQL_RUN.format(schema=schema, rows=json.dumps(rows), queries=list(queries), limit=limit,
                                        mark=_MARK), timeout=timeout)
    rep = _last_report(res)
    if not isinstance(rep, list) or len(rep) != len(queries):
        why = "timed out" if res.timed_out else (res.stderr.strip().splitlines() or ["no result"])[-1][:200]
        return [{"error": f"sandbox: {why}"}] * len(queries)
    return rep
