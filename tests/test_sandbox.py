"""sandbox.py: ordinary code runs; infinite loops, sleepers, fork and memory bombs, escapes, secrets, processes,
sockets and ctypes are contained."""
import dataclasses
import time

from sandbox import SandboxConfig, run_sandboxed

FAST = SandboxConfig(timeout=3.0, cpu_s=1)


def test_sandbox_runs_ordinary_code():
    r = run_sandboxed("import math, json\nopen('f.txt', 'w').write('ok')\nprint(open('f.txt').read(), math.isqrt(49))",
                      config=FAST)
    assert r.ok and r.stdout.split() == ["ok", "7"]


def test_sandbox_kills_infinite_loop_and_sleeper():
    t0 = time.time()
    r = run_sandboxed("while True:\n    pass", config=FAST)
    assert not r.ok and r.signal in ("SIGXCPU", "SIGKILL") and time.time() - t0 < 5
    t0 = time.time()
    r = run_sandboxed("import time\ntime.sleep(60)", config=dataclasses.replace(FAST, timeout=1.0))
    assert r.timed_out and not r.ok and time.time() - t0 < 4


def test_sandbox_contains_fork_bomb():
    t0 = time.time()
    r = run_sandboxed("import os\nwhile True:\n    os.fork()", config=FAST)
    assert not r.ok and "not allowed" in r.stderr and time.time() - t0 < 5
    # the kernel layer alone (audit hook off): RLIMIT_NPROC refuses the very first fork. Bounded on purpose.
    probe = ("import os, time\nn = 0\nfor i in range(20):\n    try:\n        pid = os.fork()\n    except OSError:\n"
             "        break\n    if pid == 0:\n        time.sleep(2)\n        os._exit(0)\n    n += 1\nprint('forked', n)")
    r = run_sandboxed(probe, config=dataclasses.replace(FAST, guard=False))
    assert r.stdout.split() == ["forked", "0"], (r.stdout, r.stderr)


def test_sandbox_contains_memory_bomb():
    r = run_sandboxed("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))", config=FAST)
    assert not r.ok and ("MemoryError" in r.stderr or r.signal)


def test_sandbox_blocks_writes_outside_its_directory(tmp_path):
    target = tmp_path / "escaped.txt"
    for code in (f"open({str(target)!r}, 'w').write('x')", "open('../escaped.txt', 'w').write('x')",
                 f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')",
                 f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')"):
        r = run_sandboxed(code, config=FAST)
        assert not r.ok and not target.exists(), code
    r = run_sandboxed("print('y' * 10 ** 9)", config=FAST)                             # gigantic output
    assert not r.ok and len(r.stdout) <= FAST.max_output


def test_sandbox_hides_environment_secrets(monkeypatch, tmp_path):
    monkeypatch.setenv("TASKS_TEST_SECRET", "hunter2-s3cret")
    (tmp_path / "key.txt").write_text("hunter2-file")
    code = ("import os\nprint(dict(os.environ))\n"
            f"for p in ('/proc/%d/environ' % os.getppid(), '/proc/1/environ', '/proc/self/environ', {str(tmp_path / 'key.txt')!r}):\n"
            "    try:\n        print(open(p, 'rb').read())\n    except Exception as e:\n        print('denied', e)")
    r = run_sandboxed(code, config=FAST)
    assert "hunter2" not in r.stdout + r.stderr and "TASKS_TEST_SECRET" not in r.stdout
    assert r.stdout.count("denied") >= 3                                     # other processes' env, files


def test_sandbox_blocks_processes_sockets_and_ctypes():
    for code in ("import os\nos.system('echo pwned')", "import subprocess\nsubprocess.run(['echo', 'pwned'])",
                 "import socket\nsocket.create_connection(('127.0.0.1', 22))", "import ctypes\nctypes.CDLL(None)"):
        r = run_sandboxed(code, config=FAST)
        assert not r.ok and "pwned" not in r.stdout, code
