"""
corpus.py — the documents Command A's pretraining data pipeline starts from, at laptop scale.

The report's pre-training "Data" paragraph (Cohere, "Command A: An Enterprise-Ready Large Language Model",
arXiv 2504.00698) names the sources: web text and code, plus internally generated synthetic data. Offline and at
toy scale they are stood in for by:

    stdlib_documents   Python's own standard library: its source (code), its docstrings and comment blocks
                       (prose), the language reference in pydoc_data (reference)
    load_user_data     your text / JSONL files or folders (--data), instead of the stdlib
    synthetic_*        seeded generators: worked math problems, documented code with passing asserts, computed
                       number facts, and (off by default) recall and copy exercises
    junk_documents     the web's junk, planted so every cleaning stage in data.py has something real to remove,
                       and the quality classifier's negatives
    unsafe_documents   the web's unsafe posts (tame, templated), some from blocklisted hosts; planted for the
                       safety stages, and the safety classifier's positives
    benign_lookalikes  safe pages with the same trigger words ("kill a process"): what the safety stages must keep

data.py cleans, scores, mixes and packs these; this file knows nothing of those stages.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import json
import os
import random
import re
import sysconfig
import textwrap
import tokenize
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# -----------------------------------------------------------------------------------------------
# Documents and sources

@dataclass
class Document:
    text: str
    domain: str                         # 'code', 'prose', 'reference', 'synthetic-math', 'junk', ...
    origin: str = ""                    # provenance: a path, 'pydoc:assert', 'synthetic-math:17'
    quality: float | None = None        # classifier score in [0, 1], set by data.py's quality stage
    weight: float = 1.0                 # sampling weight in the pretraining mix


CODE_EXTS = {".py", ".js", ".ts", ".c", ".h", ".cpp", ".cc", ".java", ".go", ".rs", ".sh", ".sql", ".rb"}
TEXT_EXTS = CODE_EXTS | {".txt", ".md", ".rst", ".jsonl", ".html", ".tex", ".csv", ".toml", ".yaml", ".yml"}


def _prose_from_source(src: str, module: str, min_chars: int) -> list[str]:
    """Docstrings and comment blocks of one module, as English prose documents.

    One tokenize pass instead of ast.parse: ast builds every node of the file and is ~2x slower on
    the stdlib. A docstring is a statement that is a lone string literal (after NEWLINE/INDENT)."""
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (tokenize.TokenError, SyntaxError):
        return []
    out, block, last = [], [], -2
    def flush():
        text = "\n".join(block).strip()
        if len(text) >= min_chars:
            out.append(text)
    for t in toks:                      # comment blocks: consecutive full-line comments
        if t.type == tokenize.COMMENT and t.line.lstrip().startswith("#"):
            line = t.string.lstrip("#").strip()
            if t.start[0] != last + 1:
                flush()
                block = []
            if not (t.string.startswith("#!") or re.fullmatch(r"[-=*~_# ]*|-\*-.*-\*-", line)):
                block.append(line)      # (shebangs, coding cookies and ruler lines are not prose)
            last = t.start[0]
    flush()
    sig = [t for t in toks if t.type not in (tokenize.NL, tokenize.COMMENT, tokenize.ENCODING)]
    name = module
    for j, t in enumerate(sig):
        if t.type == tokenize.NAME and t.string in ("def", "class") and j + 1 < len(sig):
            name = f"{module}.{sig[j + 1].string}"
        alone = ((j == 0 or sig[j - 1].type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT))
                 and j + 1 < len(sig) and sig[j + 1].type in (tokenize.NEWLINE, tokenize.ENDMARKER))
        if t.type == tokenize.STRING and alone:
            try:
                value = ast.literal_eval(t.string)
            except (ValueError, SyntaxError):
                continue
            value = inspect.cleandoc(value) if isinstance(value, str) else ""
            if len(value) >= min_chars:
                title = name if j > 0 and sig[j - 1].type == tokenize.INDENT else module
                out.append(f"{title}\n\n{value}")
    return out


def stdlib_documents(max_bytes: int = 8_000_000, min_prose_chars: int = 200) -> list[Document]:
    """The offline default corpus: Python's own standard library (code, docstrings, comments, docs)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload",
            "pydoc_data", "ensurepip"}
    topics = {}
    try:                                # the language reference as plain text: the best English here
        from pydoc_data.topics import topics
    except ImportError:                 # some distributions strip pydoc_data
        pass
    items = [(f"pydoc:{k}", None) for k in topics]
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in skip and not x.startswith("config-"))
        items += [(str((Path(d) / n).relative_to(root)), Path(d) / n) for n in names
                  if n.endswith((".py", ".txt", ".rst")) or n.startswith("README")]
    total, picked = 0, []
    # Visit sources in a hash order, so a cap below the full ~13 MB samples the whole tree (and the
    # reference) evenly instead of reading modules a-m; the result is then put back in sorted order.
    for key, f in sorted(items, key=lambda kv: hashlib.sha1(kv[0].encode()).hexdigest()):
        if total >= max_bytes:
            break
        if f is None:
            group = [Document(topics[key[6:]].strip(), "reference", key)]
        else:
            try:
                src = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if f.suffix == ".py":
                module = key[:-3].replace(os.sep, ".").removesuffix(".__init__")
                group = [Document(src, "code", key)]
                group += [Document(p, "prose", key) for p in _prose_from_source(src, module, min_prose_chars)]
            else:
                group = [Document(src, "reference", key)]
        total += sum(len(d.text.encode()) for d in group)
        picked.append((key, group))
    docs = []
    for _, group in sorted(picked, key=lambda x: x[0]):
        docs += group
    return docs


def load_user_data(path: str | os.PathLike, domain: str | None = None) -> list[Document]:
    """Text files and JSONL (one {"text": ...} per line; optional "domain", and "url", which becomes the origin
    that data.py's source blocklist reads), a file or a folder tree.

    Error policy: a missing path, a folder with no usable documents, a bad JSONL line (named
    file:line) raise. A file that is not UTF-8 raises when it was named explicitly, and is skipped
    with a warning inside a folder walk (one stray binary should not kill a run over thousands)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data path does not exist: {root}")
    if root.is_file():
        files, explicit = [root], True
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_EXTS)
        explicit = False
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as e:
            if explicit:
                raise ValueError(f"{f}: not readable as UTF-8 text ({e})") from e
            warnings.warn(f"skipping {f}: not readable as UTF-8 text")
            continue
        if f.suffix.lower() == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{n}: invalid JSON ({e.msg})") from e
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ValueError(f'{f}:{n}: expected an object with a string field "text"')
                url = rec.get("url") if isinstance(rec.get("url"), str) else None
                docs.append(Document(rec["text"], domain or rec.get("domain", "prose"), url or f"{f}:{n}"))
        elif text.strip():
            kind = "code" if f.suffix.lower() in CODE_EXTS else "prose"
            docs.append(Document(text, domain or kind, str(f)))
    if not docs:
        raise ValueError(f'no documents found under {root} (looked for {", ".join(sorted(TEXT_EXTS))})')
    return docs

# -----------------------------------------------------------------------------------------------
# Synthetic generators (the report uses internally generated data). Seeded, so reproducible.

NAMES = ["Ana", "Bo", "Chen", "Dara", "Eli", "Farah", "Goran", "Hana", "Ines", "Jomo", "Kai", "Lena"]
ITEMS = ["apple", "notebook", "pencil", "ticket", "book", "candle", "plant", "cup", "stamp", "marble"]


def _math_problem(rng: random.Random, kind: int) -> tuple[str, list[str], str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if kind == 0:
        a, p = rng.randint(2, 12), rng.randint(2, 15)
        bill = rng.choice([b for b in (20, 50, 100, 200) if b > a * p])
        return (f"{name} buys {a} {item}s at ${p} each and pays with a ${bill} bill. How much change does {name} get?",
                [f"The {item}s cost {a} x ${p} = ${a * p}.", f"The change is ${bill} - ${a * p} = ${bill - a * p}."],
                f"${bill - a * p}")
    if kind == 1:
        v1, h1, v2, h2 = rng.randint(40, 120), rng.randint(1, 5), rng.randint(40, 120), rng.randint(1, 5)
        hours = lambda h: f"{h} hour" + "s" * (h > 1)
        return (f"A train travels at {v1} km/h for {hours(h1)}, then at {v2} km/h for {hours(h2)}. How far does it go?",
                [f"First part: {v1} x {h1} = {v1 * h1} km.", f"Second part: {v2} x {h2} = {v2 * h2} km.",
                 f"Total distance: {v1 * h1} + {v2 * h2} = {v1 * h1 + v2 * h2} km."], f"{v1 * h1 + v2 * h2} km")
    if kind == 2:
        k, n = rng.randint(2, 9), rng.randint(10, 99)
        return (f"{name} shares {n} {item}s equally among {k} friends. How many does each get, and how many are left?",
                [f"Divide: {n} = {k} x {n // k} + {n % k}.", f"Each friend gets {n // k} and {n % k} remain."],
                f"{n // k} each, {n % k} left over")
    if kind == 3:
        p, d = 20 * rng.randint(1, 20), rng.choice([5, 10, 15, 20, 25, 30, 40, 50])
        off = p * d // 100
        return (f"A jacket costs ${p} and is discounted by {d}%. What is the sale price?",
                [f"The discount is {d}% of ${p} = ${p} x {d} / 100 = ${off}.",
                 f"The sale price is ${p} - ${off} = ${p - off}."],
                f"${p - off}")
    w, l = rng.randint(2, 30), rng.randint(2, 30)
    return (f"A rectangular garden is {w} m wide and {l} m long. What are its perimeter and its area?",
            [f"The perimeter is 2 x ({w} + {l}) = {2 * (w + l)} m.", f"The area is {w} x {l} = {w * l} square metres."],
            f"{2 * (w + l)} m and {w * l} m^2")


def synthetic_math(n: int, seed: int = 0) -> list[Document]:
    """Arithmetic word problems with worked, step-by-step solutions (2-4 per worksheet)."""
    rng, docs = random.Random(f"math:{seed}"), []
    for i in range(n):
        parts = ["Worked examples: arithmetic word problems, with the steps of each solution."]
        # distinct kinds per worksheet: one template twice reads as repetition to the n-gram filters
        for j, kind in enumerate(rng.sample(range(5), rng.randint(2, 4))):
            q, steps, ans = _math_problem(rng, kind)
            parts.append(f"Problem {j + 1}. {q}\nSolution. " + " ".join(steps) + f"\nAnswer: {ans}")
        docs.append(Document("\n\n".join(parts), "synthetic-math", f"synthetic-math:{i}"))
    return docs


def _code_functions(rng: random.Random, m: int) -> list[tuple[str, str]]:
    """m distinct small documented functions as (source, assert); the expected values come from a
    reference implementation run here, so every assert in the corpus passes."""
    k, c, p, b = rng.randint(2, 9), rng.randint(1, 20), rng.randint(1, 3), rng.choice([2, 8, 16])
    xs, n = [rng.randint(-9, 30) for _ in range(rng.randint(3, 6))], rng.randint(1, 60)
    lib = [  # (name, argument, docstring, body, reference implementation, example argument)
        ("scale_and_shift", "xs", f"Return every number in xs multiplied by {k} and increased by {c}.",
         f"return [x * {k} + {c} for x in xs]", lambda a: [x * k + c for x in a], xs),
        ("count_multiples", "n", f"Count the integers from 1 to n that are divisible by {k}.",
         f"return sum(1 for i in range(1, n + 1) if i % {k} == 0)", lambda a: a // k, n),
        ("sum_of_powers", "n", f"Return 1**{p} + 2**{p} + ... + n**{p}, the sum of the first n powers.",
         f"total = 0\nfor i in range(1, n + 1):\n    total += i ** {p}\nreturn total",
         lambda a: sum(i ** p for i in range(1, a + 1)), n),
        ("running_max", "xs", "Return the list of the maxima of the prefixes of xs.",
         "out, best = [], None\nfor x in xs:\n    best = x if best is None or x > best else best\n"
         "    out.append(best)\nreturn out", lambda a: [max(a[:i + 1]) for i in range(len(a))], xs),
        ("clip", "x", f"Limit x to the closed interval [{c}, {c + 10 * k}].",
         f"return max({c}, min({c + 10 * k}, x))", lambda a: max(c, min(c + 10 * k, a)), n),
        ("digit_sum", "n", f"Return the sum of the digits of a non-negative n written in base {b}.",
         f"total = 0\nwhile n:\n    n, d = divmod(n, {b})\n    total += d\nreturn total",
         lambda a: sum(int(ch, b) for ch in np.base_repr(a, b)), n * 97)]
    return [(f'def {name}({arg}):\n    """{doc}"""\n' + textwrap.indent(body, "    ") + "\n",
             f"assert {name}({x!r}) == {ref(x)!r}") for name, arg, doc, body, ref, x in rng.sample(lib, m)]


def synthetic_code(n: int, seed: int = 0) -> list[Document]:
    """Small documented Python functions followed by asserts that pass (textbook-style code)."""
    rng, docs = random.Random(f"code:{seed}"), []
    for i in range(n):
        funcs = _code_functions(rng, rng.randint(2, 4))
        text = "\n\n".join(f for f, _ in funcs) + "\n\n# tests\n" + "\n".join(a for _, a in funcs) + "\n"
        docs.append(Document(text, "synthetic-code", f"synthetic-code:{i}"))
    return docs


def synthetic_prose(n: int, seed: int = 0) -> list[Document]:
    """Fact paragraphs about numbers and units, each fact computed (never wrong)."""
    rng, docs = random.Random(f"prose:{seed}"), []
    for i, m in enumerate(rng.sample(range(12, 100_000), n)):
        divs = [d for d in range(2, int(m ** 0.5) + 1) if m % d == 0]
        r = int(m ** 0.5)
        facts = [f'The number {m} is {"even" if m % 2 == 0 else "odd"}.',
                 f"It is a prime number, since no integer between 2 and {r} divides it." if not divs else
                 f"It is not prime: it is divisible by {divs[0]}, because {m} = {divs[0]} x {m // divs[0]}.",
                 f"Its square is {m * m} and the sum of its decimal digits is {sum(map(int, str(m)))}.",
                 f"Written in binary it is {m:b}, and in hexadecimal it is {m:x}.",
                 f"It lies between the perfect squares {r * r} and {(r + 1) ** 2}."]
        km = rng.randint(2, 500)
        units = (f"A distance of {km} kilometres is {km * 1000} metres, which is about {km * 0.621371:.1f} miles. "
                 f"Walking at five kilometres per hour, covering it would take {km / 5:.1f} hours.")
        rng.shuffle(facts)
        text = f"Facts about {m}.\n\n" + " ".join(facts) + "\n\n" + units
        docs.append(Document(text, "synthetic-prose", f"synthetic-prose:{i}"))
    return docs


_RECALL_SYL = ["ba", "de", "fi", "go", "hu", "ja", "ke", "li", "mo", "nu", "pa", "re", "si", "to", "vu", "wen", "yar", "zel"]
# (attribute, record forms, value range): every line picks a form, so a register does not read as one repeated
# n-gram to the heuristic filters
_RECALL_ATTRS = [("room", ("{p} is in room {v}.", "Room {v}: {p}.", "{p} sleeps in room {v}."), 10, 99),
                 ("locker", ("{p} has locker number {v}.", "Locker {v} belongs to {p}.", "{p} uses locker {v}."), 10, 99),
                 ("badge", ("{p} wears badge {v}.", "Badge {v} went to {p}.", "{p} got badge {v}."), 100, 999),
                 ("score", ("{p} scored {v}.", "{p} finished with {v} points.", "A score of {v} for {p}."), 10, 99),
                 ("code", ("{p} has the code {v}.", "The code {v} was given to {p}.", "{p} keeps code {v}."), 1000, 9999)]
_RECALL_ASK = ("The {a} of {p}? {v}.", "What is the {a} of {p}? It is {v}.", "{p}: {a} {v}.", "For {p}, {v}.")


def synthetic_recall(n: int, seed: int = 0) -> list[Document]:
    """Records read back later in the same document: a register of people with numbers, then lookups that
    answer from it, a list copied out, and the register repeated word for word (so the repetition filters skip
    these documents). Answering from a prompt (RAG, long context, a name in a math problem) needs in-context
    copying (induction heads), and the tiny run's 1.6M tokens of real text hold too few repeats to grow them.
    These and synthetic_copy are that signal made dense; off by default (DataConfig.recall_ratio), because at
    ~48% of the tiny run's tokens they still did not grow induction heads there (measured; README)."""
    rng, docs = random.Random(f"recall:{seed}"), []
    for i in range(n):
        people, k = set(), rng.randint(3, 6)
        while len(people) < k:
            people.add("".join(rng.choice(_RECALL_SYL) for _ in range(rng.randint(2, 3))).capitalize())
        people = list(people)
        attr, forms, lo, hi = rng.choice(_RECALL_ATTRS)
        value = {p: rng.randint(lo, hi) for p in people}
        lines = [f"Register {rng.randint(1, 500)}."] + [rng.choice(forms).format(p=p, v=value[p]) for p in people]
        if rng.random() < 0.5:                      # a filler paragraph between the records and the lookups
            lines.append(" ".join(f'{rng.choice(people)} {rng.choice(["left early", "arrived late", "was busy", "took notes"])}.'
                                  for _ in range(rng.randint(2, 6))))
        asked = rng.sample(people, rng.randint(2, len(people)))
        lines.append("Lookups. " + " ".join(rng.choice(_RECALL_ASK).format(a=attr, p=p, v=value[p]) for p in asked))
        lines.append("Copied out: " + ", ".join(f"{p} {value[p]}" for p in people) + ".")
        lines.append("The register again, word for word: " + " ".join(lines[1:1 + len(people)]))
        docs.append(Document("\n".join(lines), "synthetic-recall", f"synthetic-recall:{i}"))
    return docs


def synthetic_copy(n: int, seed: int = 0, words: list[str] | None = None) -> list[Document]:
    """Copying exercises: a line of words drawn at random, then the same line again. The plainest in-context
    signal: a word drawn at random from thousands (`words`: build_corpus passes the corpus's own vocabulary)
    can only be predicted by finding it earlier in the document, so the copy is where induction heads pay.
    Made-up syllable words (the default) are too predictable on their own: with them a 20% share did not grow
    induction heads within the tiny budget, and neither did the recall documents (measured)."""
    rng, docs = random.Random(f"copy:{seed}"), []
    for i in range(n):
        k = rng.randint(8, 24)
        line = " ".join(rng.choice(words) if words else
                        "".join(rng.choice(_RECALL_SYL) for _ in range(rng.randint(1, 3))) for _ in range(k))
        docs.append(Document(f"Copy exercise {i + 1}.\nText: {line}.\nCopy: {line}.", "synthetic-copy",
                             f"synthetic-copy:{i}"))
    return docs

# -----------------------------------------------------------------------------------------------
# Junk: the web's low-quality pages, planted offline (and the quality classifier's negatives)

SPAM = "cheap best price buy online free shipping discount casino bonus deal sale win now".split()
BOILERPLATE = ["All rights reserved.", "This website uses cookies to improve your experience.", "Accept all cookies",
               "Click here to subscribe to our newsletter!", "Terms of use | Privacy policy | Cookie settings",
               "Copyright (c) 2021 Example Corp. All rights reserved.", "Sign in or create an account to continue."]
MENU = "Home About Contact Login Shop Blog FAQ Help Cart".split()
LOREM = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore "
         "magna aliqua").split()


def junk_documents(n: int, seed: int = 0, vocab: list[str] | None = None) -> list[Document]:
    """Low-quality documents: word salad, keyword spam, boilerplate, lorem ipsum, menus, symbol noise.

    The classifier's negatives, and (with another seed) the junk planted into the default corpus so
    that every filter stage has something real to remove offline."""
    rng, docs = random.Random(f"junk:{seed}"), []
    vocab = vocab or (LOREM + SPAM + ITEMS + "the of and to a in is it that for with as on be by this".split())
    for i in range(n):
        kind, L = i % 6, rng.randint(60, 300)
        if kind == 0:                   # word salad: real words, no grammar; passes most rules
            w = rng.choices(vocab, k=L)
            text = " ".join(x + ("." if rng.random() < 0.08 else "") for x in w)
        elif kind == 1:                 # keyword spam
            kw = rng.sample(SPAM, 5)
            text = " ".join(rng.choice(kw) for _ in range(L))
        elif kind == 2:                 # page chrome and legal boilerplate
            text = "\n".join(rng.choice(BOILERPLATE) for _ in range(L // 6))
        elif kind == 3:
            text = " ".join(rng.choice(LOREM) for _ in range(L))
        elif kind == 4:                 # navigation menus
            text = "\n".join(" | ".join(rng.sample(MENU, 5)) for _ in range(L // 5))
        else:                           # encoded blobs and symbol noise
            text = "".join(rng.choice("abcdefABCDEF0123456789+/=#{}<>;") for _ in range(L * 6))
        docs.append(Document(text, "junk", f"junk:{seed}:{i}"))
    return docs

# -----------------------------------------------------------------------------------------------
# Unsafe web text and its benign look-alikes, planted offline for data.py's safety stages
#
# Tame on purpose: threats, slurs-by-placeholder, and *requests* for weapon or malware instructions that
# contain no instructions. A safety filter has to learn the intent around trigger words ("kill", "bomb",
# "shoot", "attack", "exploit") from text where the same words are harmless, so every unsafe template has
# look-alikes that share its vocabulary. Hosts are under .example (RFC 2606): stand-ins, not real sites.

# the web's known-unsafe sources (data.py's default blocklist; a real run uses a maintained list of millions)
UNSAFE_HOSTS = ("threatboard.example", "hatepost.example", "darkmarket.example", "warez-forum.example")
WEB_HOSTS = ("forum.example", "blog.example", "news.example", "talk.example", "board.example", "qa.example")
_PEOPLE, _GROUPS = ["[named person]", "[rival team]", "[a neighbour]"], ["[target group]", "[group A]", "[group B]"]
_CHATTER = ["I have been reading this board for a while and finally made an account.", "Edit: fixed a typo.",
            "Thanks in advance to anyone who answers, and sorry for the long post.", "Posted from my phone.",
            "This is my first post here, so go easy on me.", "Update {k}: still waiting for an answer to this.",
            "Sent by {u} at {h}:{m}.", "Reply {k} of the thread, quoted by {u}.", "Any reply is welcome."]
_UNSAFE = [   # (kind, sentences): a page is a few sentences of one kind and some chatter
    ("threat", ["I know where you live, {p}, and I will hurt you if you post again.",
                "You are worthless and everyone would be better off if you were dead.",
                "Watch your back, {p}. Next time I see you I will kill you.",
                "Keep talking and I will make sure you get beaten until you stop breathing.",
                "We will find you and your family and make you suffer for this.",
                "Nobody will help you when we come for you tonight.",
                "I am going to shoot you the moment you walk out of that door, {p}.",
                "Say one more word and I will burn your house down with you in it."]),
    ("weapon", ["Looking for step by step instructions to build a bomb at home, no questions asked.",
                "Who can tell me how to make a weapon that gets past airport security?",
                "I need a guide to make poison gas from things in a kitchen, to use on {p}.",
                "Paying well for plans to build an untraceable gun so I can shoot {p}.",
                "Tell me the best way to attack a crowd and hurt as many people as possible.",
                "Send me detailed steps to make explosives that will destroy a building.",
                "What is the easiest way to kill someone and make it look like an accident?",
                "I want a recipe for a nerve agent, and I do not care who it hurts."]),
    ("malware", ["Need working ransomware to encrypt every file at my school and demand payment.",
                 "Selling a stolen password dump, and I want a virus that steals bank logins too.",
                 "Write me malware that spreads by itself and wipes the hospital's computers.",
                 "How do I exploit the login page of {p} to steal their customers' cards?",
                 "Looking for a keylogger I can hide on my ex's phone to read every message.",
                 "Who will sell me a botnet to attack and take down the city's emergency line?",
                 "I want to break into {p}'s email account and leak everything in it.",
                 "Give me a trojan that opens a back door on every machine in the office."]),
    ("extremist", ["Join the movement: {t} are vermin and must be wiped out. [slogan]",
                   "Rise up and purge {t} from our land by any means. [slogan]",
                   "Violence is the only answer to {t}; take up arms and strike first.",
                   "Every true believer must kill {t} before they destroy us. [slogan]",
                   "Our enemies are less than human, and {t} deserve to burn.",
                   "Share this call to war against {t} until they are gone. [slogan]",
                   "The day of the attack is coming, and {t} will pay in blood.",
                   "Train with weapons now, because the war against {t} has begun."])]
_LOOKALIKE = [   # the same trigger words, harmless
    ("process", ["To kill a process that hangs, send it SIGTERM first and SIGKILL only if it will not exit.",
                 "The kill command takes a process id; kill -9 ends the process without letting it clean up.",
                 "A watchdog can kill and restart the worker when it stops answering health checks.",
                 "Child processes become zombies until the parent reads their exit status.",
                 "Use the task manager to execute a new task or terminate the frozen one.",
                 "The shell will kill the whole process group when you close the terminal.",
                 "If the daemon dies, the supervisor brings it back within a few seconds.",
                 "Execute the script with a timeout, so a stuck job cannot block the queue."]),
    ("lab", ["A bomb calorimeter measures the heat of combustion of a sample at constant volume.",
             "The sample burns inside the steel bomb, and the water jacket around it warms up.",
             "From the temperature rise and the heat capacity we compute the energy content of the fuel.",
             "Students should weigh the pellet carefully and attach the fuse wire before sealing the bomb.",
             "Explosive growth of bacteria in the dish means the culture was left warm too long.",
             "Antibiotics kill the bacteria, but the spores can survive a short boil.",
             "The poison dart frog gets its toxins from the insects it eats.",
             "Nitrogen is inert, which is why it is used to flush oxygen out of the bomb."]),
    ("photo", ["We shoot the portraits at golden hour, when the light is soft and warm.",
               "To shoot a photo of a moving subject, raise the shutter speed and track it with the camera.",
               "The film crew will shoot the final scene at the harbour on Friday.",
               "Bracketing means you shoot the same frame at several exposures and merge them later.",
               "A wide lens lets you shoot the whole room without stepping back.",
               "The comedian killed it on stage, and the show was a bomb at the box office.",
               "Our striker had three shots on goal and scored with the last one.",
               "The new single is a killer track, and the video was shot in one take."]),
    ("security", ["The interpreter will execute the function each time the event fires.",
                  "A buffer overflow lets an attacker exploit the parser, so validate every length field.",
                  "The attack surface of the service is every port and endpoint it exposes.",
                  "Our threat model assumes the attacker can read network traffic but not the server's memory.",
                  "Patch the vulnerability and rotate the keys before the exploit is widely known.",
                  "Antivirus software quarantines malware before it can run.",
                  "A phishing test teaches staff to report emails that ask for passwords.",
                  "Penetration testers attack the system with permission and write up what they find."]),
    ("history", ["The war began in the spring, and the first attack came across the river at dawn.",
                 "Historians still debate why the army failed to defend the capital.",
                 "The treaty that ended the war redrew the borders of four countries.",
                 "Soldiers on both sides wrote letters home about the cold and the hunger.",
                 "The museum shows the weapons and uniforms of the period behind glass.",
                 "The bombing of the bridge cut the supply line for a month.",
                 "Many were killed in the siege, and the city took a generation to recover.",
                 "The rebels' slogans were painted on walls that still stand today."])]


def _web_page(rng: random.Random, kinds, titles) -> tuple[str, str]:
    """A title, 2-4 sentences of one kind, 1-2 of shared chatter (shuffled), with slots filled: varied enough
    that planted pages do not collapse under near dedup, and the chatter carries no label."""
    kind, pool = rng.choice(kinds)
    fill = dict(p=rng.choice(_PEOPLE), t=rng.choice(_GROUPS), k=rng.randint(2, 99), h=rng.randint(10, 23),
                m=rng.randint(10, 59), u="".join(rng.choice(_RECALL_SYL) for _ in range(3)))
    lines = rng.sample(pool, rng.randint(2, 4)) + rng.sample(_CHATTER, rng.randint(1, 2))
    rng.shuffle(lines)
    return f"{rng.choice(titles)}\n\n" + " ".join(s.format(**fill) for s in lines), kind


def unsafe_documents(n: int, seed: int = 0, blocked_fraction: float = 0.5) -> list[Document]:
    """Templated unsafe web posts (threats, weapon and malware requests, extremist placeholders), domain 'web'.
    About blocked_fraction of them come from UNSAFE_HOSTS (a domain blocklist catches those), the rest from
    ordinary hosts, where only a classifier reading the text can."""
    rng, docs = random.Random(f"unsafe:{seed}"), []
    for i in range(n):
        text, kind = _web_page(rng, _UNSAFE, ["Re: you", "Need help", "Anyone?", "Read this", "A question"])
        host = rng.choice(UNSAFE_HOSTS if rng.random() < blocked_fraction else WEB_HOSTS)
        docs.append(Document(text, "web", f"https://{host}/{kind}/{seed}-{i}"))
    return docs


def benign_lookalikes(n: int, seed: int = 0) -> list[Document]:
    """Safe web pages that share the unsafe posts' trigger words: kill a process, a bomb calorimeter, shoot a
    photo, an attack surface, the history of a war. What a safety filter must keep."""
    rng, docs = random.Random(f"lookalike:{seed}"), []
    for i in range(n):
        text, kind = _web_page(rng, _LOOKALIKE, ["Notes", "How to", "Question", "Guide", "A question"])
        docs.append(Document(text, "web", f"https://{rng.choice(WEB_HOSTS)}/{kind}/{seed}-{i}"))
    return docs
