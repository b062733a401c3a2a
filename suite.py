"""
What every capability suite shares (Command A, Cohere, arXiv 2504.00698: section 3 trains an expert per
domain and section 4 scores each domain; SPEC 5 makes every domain a verifiable task). An Example is a
chat-format prompt (tokenizer.py's format, SPEC 2) with its reference turns and what the verifier needs; a
Suite generates examples from a seed and scores any completion in [0, 1].

Also here, because every suite needs them: the train/test split (a hash of a split key, so no key, and so no
prompt, is in both), carve_val() for a validation set, reading a completion whatever arrived (bytes, None,
gigantic strings), and the small word lists the suites draw from. The suites live in tasks.py and agents.py;
tasks.py's docstring says which key each suite splits on, and why.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
import unicodedata
from dataclasses import dataclass, field

from chat import chat_segments, parse_completion

SPLITS = ("train", "test")
TEST_FRACTION = 0.2           # share of each suite's example space that belongs to "test"
MAX_COMPLETION_CHARS = 100_000  # longer completions are cut before parsing: gigantic outputs cost nothing

# -----------------------------------------------------------------------------------------------------------
# Examples, splits, and what every suite shares


@dataclass
class Example:
    suite: str
    id: str                      # stable: a hash of the content, so ids across seeds / splits compare
    messages: list               # the prompt: [{"role": "system"|"user", "content": ...}]
    reference: str               # the reference completion of the (last) assistant turn, as the model writes
                                 # it: "<|START_RESPONSE|>...<|END_RESPONSE|>" (thinking/action blocks before)
    turns: list                  # the reference assistant (and tool) messages: messages + turns is the whole
                                 # conversation for SFT (tools: action turn, tool results, final answer)
    documents: list | None = None
    tools: list | None = None
    safety_mode: str = "CONTEXTUAL"
    difficulty: int = 1
    check: dict = field(default_factory=dict)   # what the verifier needs (facts, tests, tables, ...)

    def prompt_ids(self, tokenizer) -> list:
        return tokenizer.render_chat(self.messages, self.documents, self.tools, self.safety_mode)

    def sft_messages(self) -> list:
        return self.messages + self.turns

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _unit_hash(text: str) -> float:
    """A deterministic number in [0, 1) from text (the same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 1000 / 1000


def split_of(suite: str, key: str) -> str:
    """A deterministic hash of the split key decides the split: no key, and so no prompt, can be in both.
    The key is the content, or for suites whose answers are facts to learn, the phrasing (tasks.py's docstring)."""
    return "test" if _unit_hash(f"{suite}\x00{key}") < TEST_FRACTION else "train"


def carve_val(examples: list, fraction: float = 0.2) -> tuple[list, list]:
    """(train, val): a validation set carved from train-split examples by a hash of each example's id, so the
    same examples land in val whatever the list's order or length, and repeats of an example stay together.
    Val shares the train split's phrasings: it measures fit, the test split measures generalisation."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    train, val = [], []
    for ex in examples:
        (val if _unit_hash(f"val\x00{ex.id}") < fraction else train).append(ex)
    return train, val


def assistant_text(msg: dict) -> str:
    """What the model writes for an assistant message (tokenizer.py renders it; no end-of-turn token)."""
    segs = chat_segments([{"role": "user", "content": "."}, msg], add_generation_prompt=False)
    body = [p for p, _, trained in segs if trained]
    return "".join(body[:-1])                 # the last trained piece is <|END_OF_TURN_TOKEN|>


def completion_text(completion) -> str:
    """Model output as text, whatever arrived: bytes (invalid UTF-8 replaced), None, huge strings."""
    if completion is None:
        return ""
    if isinstance(completion, (bytes, bytearray)):
        completion = bytes(completion).decode("utf-8", errors="replace")
    return str(completion)[:MAX_COMPLETION_CHARS]


def response_of(completion) -> tuple[str, dict]:
    parsed = parse_completion(completion_text(completion))
    return parsed["response"].strip(), parsed


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def numbers_in(text: str) -> list:
    out = []
    for m in _NUM.findall(text):
        try:
            out.append(float(m.replace(",", "")))
        except ValueError:
            pass
    return out


def words_of(text: str) -> list:
    """Lower-cased words: runs of letters, digits and combining marks (Devanagari vowel signs are marks)."""
    out, cur = [], []
    for ch in unicodedata.normalize("NFC", text).lower().replace("’", "'"):
        if unicodedata.category(ch)[0] in "LNM" or (ch == "'" and cur):
            cur.append(ch)
        elif cur:
            out.append("".join(cur).rstrip("'"))
            cur = []
    return out + (["".join(cur).rstrip("'")] if cur else [])


def strip_fence(text: str) -> str:
    """The inside of the first ``` fenced block, or the whole text."""
    m = re.search(r"```[a-zA-Z+#]*\n?(.*?)```", text, re.S)
    return (m.group(1) if m else text).strip()


class Suite:
    """generate(seed, n, split, difficulty) -> examples; score(example, completion) -> [0, 1]."""
    name = ""
    max_difficulty = 3
    multi_turn = False          # True: evaluation drives a tool loop (run_react) instead of one generation

    def make(self, rng: random.Random, difficulty: int) -> dict:
        """One candidate: {"key": content key, "messages", "turns" or "response", ...Example fields}, and
        optionally "split_key" (default: the key), what split_of hashes: the phrasing where the answer is a
        fact the model must learn, so that the fact is in train and test holds out the phrasing; or "split"
        itself, where a suite holds out phrasings by a rule rather than by chance."""
        raise NotImplementedError

    def verify(self, ex: Example, completion: str) -> float:
        raise NotImplementedError

    def generate(self, seed: int, n: int, split: str = "train", difficulty: int = 1) -> list:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        if not isinstance(difficulty, int) or not 1 <= difficulty <= self.max_difficulty:
            raise ValueError(f"{self.name}: difficulty must be an integer in 1..{self.max_difficulty}, "
                             f"got {difficulty!r}")
        # str seeds go through SHA-512 in random.seed: the same list on every machine and Python run
        rng = random.Random(f"{self.name}|{seed}|{split}|{difficulty}")
        out, seen, tries = [], set(), 0
        while len(out) < n:
            c = self.make(rng, difficulty)
            tries += 1
            # the suite's own holdout where it has one, else a hash of the split key (the content by default)
            if (c.get("split") or split_of(self.name, c.get("split_key", c["key"]))) != split:
                continue
            if c["key"] in seen and tries < 200 * (n + 10):   # a small space runs out: then repeats are allowed
                continue
            seen.add(c["key"])
            out.append(self._example(c, difficulty))
        return out

    def _example(self, c: dict, difficulty: int) -> Example:
        turns = c.get("turns") or [{"role": "assistant", "content": c["response"],
                                    **({"thinking": c["thinking"]} if c.get("thinking") else {})}]
        ex_id = f"{self.name}-{hashlib.sha1(c['key'].encode()).hexdigest()[:12]}"
        return Example(self.name, ex_id, c["messages"], assistant_text(turns[-1]), turns, c.get("documents"),
                       c.get("tools"), c.get("safety_mode", "CONTEXTUAL"), difficulty, c.get("check", {}))

    def score(self, example: Example, completion) -> float:
        """The model's output can be anything; its mistakes score 0. A wrong example is the caller's: raise."""
        if not isinstance(example, Example) or example.suite != self.name:
            raise ValueError(f"{self.name}.score got an example of suite "
                             f"{getattr(example, 'suite', type(example).__name__)!r}")
        try:
            s = float(self.verify(example, completion_text(completion)))
        except Exception:              # garbage that slipped past a verifier's parsing: the model's mistake
            return 0.0
        return min(max(s, 0.0), 1.0) if math.isfinite(s) else 0.0


# -----------------------------------------------------------------------------------------------------------
# Shared vocabularies (small on purpose: tiny models should be able to learn the easy end)

FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum", "kiwi",
          "lime", "melon", "fig", "apricot"]
COLORS = ["red", "blue", "green", "yellow", "purple", "black", "white", "pink", "brown", "gray"]
ANIMALS = ["cat", "dog", "horse", "cow", "sheep", "goat", "lion", "tiger", "bear", "wolf", "fox", "rabbit",
           "mouse", "eagle", "owl"]
COUNTRIES = ["France", "Spain", "Italy", "Germany", "Japan", "Brazil", "Canada", "Egypt", "India", "Mexico",
             "Norway", "Peru", "Kenya", "Chile", "Greece"]
CATEGORIES = {"fruits": FRUITS, "colors": COLORS, "animals": ANIMALS, "countries": COUNTRIES}
NAMES = ["Ana", "Ben", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lea", "Mira",
         "Noah", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Viktor", "Wen", "Yara", "Zoe"]
CITIES = ["Oslo", "Lima", "Cairo", "Lyon", "Osaka", "Porto", "Quito", "Riga", "Seoul", "Turin", "Accra", "Bern"]
JOBS = ["baker", "nurse", "pilot", "teacher", "farmer", "chemist", "lawyer", "painter"]
