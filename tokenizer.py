"""
Byte-level BPE for Command A (report: pre-training data and tokenizer), and its Hugging Face files.

Command A (Cohere, arXiv 2504.00698) uses a 256K byte-level BPE vocabulary trained by Cohere, and a chat
format built from special tokens (chat.py). This file reimplements the tokenizer at small scale:

1. A BPE trainer (Sennrich et al. 2016, byte-level as in GPT-2) with GPT-4 style regex pre-tokenization
   (tiktoken's cl100k pattern): text is first split into chunks (words with their leading space, runs of at
   most 3 digits, punctuation runs, whitespace), merges never cross a chunk boundary. Training counts each
   unique chunk once with its frequency and updates pair counts incrementally, so it runs in seconds.
2. Encoding with tiktoken (github.com/openai/tiktoken): the merge ranks we learn are handed to
   `tiktoken.Encoding`, whose Rust core applies them. Every single byte is a token, so any byte string
   has an encoding (byte fallback) and decode(encode(s)) == s exactly. tiktoken's published encodings
   download from the internet; we never use them.
3. The checkpoint files are Hugging Face's: tokenizer.json in the `tokenizers` format and tokenizer_config.json
   with a chat template, which AutoTokenizer reads; and a Hugging Face tokenizer.json -- ours, or Cohere's own
   (NFC, a digit split, byte-level BPE, special tokens at ids 0-7 and 255000+) -- reads back with every id kept.
4. render_chat / parse: the chat format of chat.py, as ids.

Pre-tokenization: tiktoken runs the pattern with Rust's fancy-regex (where \\p{L} means "any letter"). For
training we need the same split in Python. Python's `re` has no \\p{L}, but the third-party `regex` module
does, and it is a hard requirement of tiktoken itself (its install_requires), so it is always present where
tiktoken is. If it were missing we translate the pattern for `re`, building the \\p{L}/\\p{N}/\\s classes
from `unicodedata`; the test suite checks that both splits agree. Only encoding efficiency depends on the
splits agreeing; round trips are exact either way.

Vocabulary layout of a trained tokenizer: ids 0..255 are bytes, 256..256+M-1 the M merges in training order
(rank == id), then the 16 special tokens at the top. `vocab_size` counts the special tokens, so
len(tok) == vocab_size. An imported one keeps its own ids: tiktoken merges by rank, and a rank is an id.

    tok = Tokenizer.train(texts, vocab_size=8192)
    ids = tok.render_chat([{"role": "user", "content": "Hi!"}])      # ends with the generation prompt
    tok.parse(generated_ids)   # -> {"thinking", "tool_calls", "response", "citations"}
"""

import argparse
import collections
import heapq
import json
import os
import random
import re
import sys
import time
import unicodedata
from functools import lru_cache
from pathlib import Path

import tiktoken
from tqdm import tqdm

from chat import PREAMBLES, SPECIAL_TOKENS, chat_segments, chat_template, chat_text, parse_completion

# -----------------------------------------------------------------------------------------------------------
# Special tokens and the pre-tokenizer pattern

# GPT-4's cl100k_base split, as tiktoken 0.7+ writes it (possessive quantifiers). Alternatives in order:
# English contractions; a letter run with one optional leading non-letter (" word", "_name"); 1-3 digits;
# a punctuation run with optional leading space; whitespace at the very end; whitespace ending in a newline;
# whitespace not followed by non-space (so " word" keeps its space); any other single whitespace.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")

TOKENIZER_FILE, CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"


@lru_cache(maxsize=None)
def _unicode_ranges(kind: str) -> str:
    """Character-class body (no brackets) for letters 'L', numbers 'N' or Unicode White_Space 'S'."""
    if kind == "S":  # White_Space, as Rust's \s; Python's \s would also take \x1c-\x1f
        cps = [9, 10, 11, 12, 13, 32, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
               0x205F, 0x3000]
    else:  # one pass over all code points (~0.3 s, once): general category L* or N*. Python 3.11 has
        # Unicode 14 tables, tiktoken/regex newer ones: they differ only on characters assigned since.
        cps = [c for c in range(0x110000) if unicodedata.category(chr(c))[0] == kind]
    runs, start = [], cps[0]
    for prev, nxt in zip(cps, cps[1:] + [-1]):
        if nxt != prev + 1:  # a run [start, prev] ends here
            runs.append(f"\\U{start:08x}" if start == prev else f"\\U{start:08x}-\\U{prev:08x}")
            start = nxt
    return "".join(runs)


def _pattern_for_re(pat: str) -> str:
    """Rewrite \\p{L}, \\p{N}, \\s, \\S and $ so Python's `re` (3.11+: possessive quantifiers) runs `pat`."""
    out, i, in_class = [], 0, False
    while i < len(pat):
        c = pat[i]
        if c == "\\":
            esc = pat[i:i + 5] if pat[i + 1] == "p" else pat[i:i + 2]
            body = {"\\p{L}": "L", "\\p{N}": "N", "\\s": "S"}.get(esc)
            if body:
                out.append(_unicode_ranges(body) if in_class else f"[{_unicode_ranges(body)}]")
            elif esc == "\\S" and not in_class:
                out.append(f"[^{_unicode_ranges('S')}]")
            else:
                out.append(esc)
            i += len(esc)
            continue
        in_class = (c == "[") or (in_class and c != "]")
        out.append("\\Z" if c == "$" and not in_class else c)  # re's $ also matches before a final \n
        i += 1
    return "".join(out)


@lru_cache(maxsize=None)
def compile_pattern(pat: str = GPT4_PATTERN, use_regex: bool = True):
    """The pre-tokenizer as a compiled Python pattern with .findall (see the module docstring)."""
    if use_regex:
        try:
            import regex  # tiktoken depends on it; \p{L} works as in Rust
            return regex.compile(pat)
        except ImportError:
            pass
    return re.compile(_pattern_for_re(pat))


# -----------------------------------------------------------------------------------------------------------
# BPE training

def _merge(word: list, a: int, b: int, c: int) -> list:
    out, i, n = [], 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(c)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(chunk_counts: dict, n_tokens: int, verbose: bool = False) -> list:
    """Learn merges until the vocabulary has n_tokens byte strings; returns them in rank order.

    chunk_counts maps each unique pre-token chunk to its frequency. Each merge rewrites only the chunks that
    contain the winning pair (pair -> set of chunk indices) and adjusts pair counts by the difference, so a
    merge costs time proportional to the chunks it touches, not to the corpus. The best pair comes from a
    max-heap with lazy deletion: stale entries (count changed since push) are skipped when popped.
    Ties break toward the smaller pair of ids, so training is deterministic.
    """
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    counts = collections.defaultdict(int)          # (a, b) -> occurrences in the corpus
    where = collections.defaultdict(set)           # (a, b) -> indices of words that (may) contain it
    for w, (word, f) in enumerate(zip(words, freqs)):
        for p in zip(word, word[1:]):
            counts[p] += f
            where[p].add(w)
    heap = [(-n, p) for p, n in counts.items()]
    heapq.heapify(heap)

    vocab = [bytes([i]) for i in range(256)]
    bar = tqdm(total=n_tokens - 256, desc="bpe merges", disable=not verbose, mininterval=1.0)
    while len(vocab) < n_tokens:
        while heap and counts.get(heap[0][1], 0) != -heap[0][0]:
            heapq.heappop(heap)                    # stale entry
        if not heap:
            raise ValueError(f"corpus too small: only {len(vocab)} tokens can be learned, {n_tokens} asked; "
                             "give more text or a smaller vocab_size")
        _, (a, b) = heapq.heappop(heap)
        # A later pair spelling an existing token's bytes ("a"+"bc" after "ab"+"c") would need an a-b
        # adjacency the earlier merge left alone; not seen in practice, and Tokenizer() rejects duplicates.
        c = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        bar.update()
        delta = collections.defaultdict(int)
        for w in where.pop((a, b)):
            word, f = words[w], freqs[w]
            merged = _merge(word, a, b, c)
            if len(merged) == len(word):
                continue                           # stale index entry: the pair left this word earlier
            for p in zip(word, word[1:]):
                delta[p] -= f
            for p in zip(merged, merged[1:]):
                delta[p] += f
                where[p].add(w)
            words[w] = merged
        for p, d in delta.items():
            if d:
                counts[p] += d
                if counts[p] > 0:
                    heapq.heappush(heap, (-counts[p], p))
                else:
                    del counts[p]
    bar.close()
    return vocab


# -----------------------------------------------------------------------------------------------------------
# The tokenizer

class Tokenizer:
    """Merge ranks + Cohere's special tokens, encoded by tiktoken. Build with train(), load() or from_hf()."""

    def __init__(self, ranks, special_tokens: dict | None = None, pattern: str = GPT4_PATTERN,
                 preamble: str = "full", normalizer: str | None = None):
        """ranks: the mergeable byte strings in rank order (our own: rank == id, the special tokens after them),
        or {bytes: id} for an imported vocabulary whose special tokens sit elsewhere (Cohere's: ids 0-7 and
        255000+). tiktoken merges by rank, so an id is also a merge priority. normalizer: None or "NFC"."""
        if isinstance(ranks, dict):
            vocab = dict(ranks)
        else:
            vocab = {b: i for i, b in enumerate(ranks)}
            if len(vocab) != len(ranks):
                raise ValueError("duplicate byte strings in ranks")
        if len(set(vocab.values())) != len(vocab):
            raise ValueError("two byte strings share an id")
        missing_bytes = [i for i in range(256) if bytes([i]) not in vocab]
        if missing_bytes:
            raise ValueError(f"{len(missing_bytes)} single bytes have no token (e.g. {missing_bytes[:4]}): byte "
                             "fallback needs all 256, or some text could not be encoded")
        if special_tokens is None:
            special_tokens = {s: len(vocab) + i for i, s in enumerate(SPECIAL_TOKENS)}
        missing = [s for s in SPECIAL_TOKENS if s not in special_tokens]
        if missing:
            raise ValueError(f"special tokens missing: {missing} (the Command A chat format needs all of them)")
        ids = sorted([*vocab.values(), *special_tokens.values()])
        if len(set(ids)) != len(ids) or ids[0] < 0:
            raise ValueError("special token ids must be distinct, non-negative and not ids of byte strings")
        if preamble not in PREAMBLES:
            raise ValueError(f"unknown preamble {preamble!r}: use one of {PREAMBLES}")
        if normalizer not in (None, "NFC"):
            raise ValueError(f"unknown normalizer {normalizer!r}: None or 'NFC'")
        self.vocab, self.pattern, self.normalizer = vocab, pattern, normalizer
        self.ranks = sorted(vocab, key=vocab.get)  # the byte strings in id order
        self.preamble = preamble                  # the chat format's system preamble: "full" or "compact"
        self.special_ids = dict(special_tokens)   # name -> id
        dense = ids == list(range(len(ids)))      # tiktoken checks the count when every id in 0..n-1 is used
        self.enc = tiktoken.Encoding("command-a-bpe", pat_str=pattern, mergeable_ranks=vocab,
                                     special_tokens=self.special_ids, explicit_n_vocab=len(ids) if dense else None)

    @classmethod
    def train(cls, texts, vocab_size: int, verbose: bool = False) -> "Tokenizer":
        """Train on an iterable of strings; vocab_size counts the 256 bytes, the merges and the specials."""
        n_tokens = vocab_size - len(SPECIAL_TOKENS)
        if n_tokens < 256:
            raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
        t0, pat, chunks, n_bytes = time.time(), compile_pattern(), collections.Counter(), 0
        for text in texts:
            chunks.update(pat.findall(text))
            n_bytes += len(text.encode("utf-8"))
        t1 = time.time()
        ranks = train_bpe(chunks, n_tokens, verbose)
        if verbose:
            print(f"tokenizer: {n_bytes / 1e6:.2f} MB, {len(chunks):,} unique chunks, pre-tokenize "
                  f"{t1 - t0:.1f}s, {n_tokens - 256} merges {time.time() - t1:.1f}s", file=sys.stderr)
        return cls(ranks)

    # -- encoding -------------------------------------------------------------------------------------------
    def normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", text) if self.normalizer == "NFC" else text

    def encode(self, text: str, allow_special: bool = False) -> list:
        # Default: a string that spells "<|END_OF_TURN_TOKEN|>" is just text (encode_ordinary ignores
        # specials entirely), so user-typed text can never become a control token.
        if allow_special:
            return self.enc.encode(self.normalize(text), allowed_special="all")
        return self.enc.encode_ordinary(self.normalize(text))

    def encode_batch(self, texts: list, allow_special: bool = False, num_threads: int = 8) -> list:
        texts = [self.normalize(t) for t in texts] if self.normalizer else texts
        if allow_special:
            return self.enc.encode_batch(texts, num_threads=num_threads, allowed_special="all")
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def encode_bytes(self, data: bytes) -> list:
        """Any byte string, valid UTF-8 or not: valid runs go through BPE, stray bytes become byte ids."""
        ids = []
        for piece in re.split("([\udc80-\udcff])", data.decode("utf-8", errors="surrogateescape")):
            if len(piece) == 1 and "\udc80" <= piece <= "\udcff":
                ids.append(ord(piece) - 0xDC00)    # surrogateescape maps byte x to U+DC00+x
            elif piece:
                ids.extend(self.encode(piece))
        return ids

    def decode_bytes(self, ids) -> bytes:
        return self.enc.decode_bytes(ids.tolist() if hasattr(ids, "tolist") else list(ids))

    def decode(self, ids) -> str:
        # errors="replace": a generation cut mid-character must still print; special tokens keep their names
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.ranks) - 256})"

    @property
    def vocab_size(self) -> int:  # ids 0..vocab_size-1 (an imported vocabulary may leave some unused)
        return max([*self.vocab.values(), *self.special_ids.values()]) + 1

    pad_id = property(lambda self: self.special_ids["<PAD>"])
    bos_id = property(lambda self: self.special_ids["<BOS_TOKEN>"])
    eos_id = property(lambda self: self.special_ids["<EOS_TOKEN>"])             # end of a document
    eot_id = property(lambda self: self.special_ids["<|END_OF_TURN_TOKEN|>"])   # end of a chat turn: stop

    # -- chat -----------------------------------------------------------------------------------------------
    def render_chat(self, messages, documents=None, tools=None, safety_mode="CONTEXTUAL",
                    add_generation_prompt=True, return_mask=False):
        """Token ids of a conversation; with return_mask, also 1 for tokens the assistant wrote, else 0.

        Special tokens are inserted by id and content is encoded as plain text, so nothing a user, tool or
        document writes can become a control token. For such content the ids equal
        encode(chat_text(...), allow_special=True): both split the text at the special tokens.
        """
        ids, mask = [], []
        for piece, is_special, trained in chat_segments(messages, documents, tools, safety_mode,
                                                        add_generation_prompt, self.preamble):
            new = [self.special_ids[piece]] if is_special else self.encode(piece)
            ids += new
            mask += [int(trained)] * len(new)
        return (ids, mask) if return_mask else ids

    def chat_text(self, messages, documents=None, tools=None, safety_mode="CONTEXTUAL",
                  add_generation_prompt=True) -> str:
        return chat_text(messages, documents, tools, safety_mode, add_generation_prompt, self.preamble)

    def parse(self, ids) -> dict:
        return parse_completion(self.decode(ids))

    # -- files: Hugging Face's format (see "Hugging Face files" below) -------------------------------------
    def save(self, directory) -> None:
        """tokenizer.json in the HF `tokenizers` format + tokenizer_config.json with the chat template, so that
        AutoTokenizer.from_pretrained(directory) encodes, decodes and renders chats as this tokenizer does."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(d / TOKENIZER_FILE, hf_tokenizer_json(self))
        _write_json_atomic(d / CONFIG_FILE, hf_tokenizer_config(self))

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        """A directory (or its tokenizer.json) holding a Hugging Face tokenizer: ours, or Cohere's."""
        return cls.from_hf(directory)

    @classmethod
    def from_hf(cls, directory) -> "Tokenizer":
        """A Hugging Face byte-level BPE tokenizer.json (+ tokenizer_config.json beside it) as tiktoken ranks,
        keeping every id. Plain JSON, no pickle. Components it cannot reproduce exactly are refused."""
        path = Path(directory)
        path = path / TOKENIZER_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} at {path}: save one with Tokenizer.save(dir)")
        data = _read_json(path)
        config = _read_json(path.with_name(CONFIG_FILE)) if path.with_name(CONFIG_FILE).is_file() else {}
        try:
            if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
                raise ValueError("no 'model' section: not a Hugging Face tokenizers file")
            return cls(**tokenizer_from_hf(data, config))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is malformed: {e!r}") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")   # same directory, so os.replace is atomic
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False, indent=1))
        f.flush()
        os.fsync(f.fileno())                                    # the bytes reach the disk before the rename
    os.replace(tmp, path)


# -----------------------------------------------------------------------------------------------------------
# Hugging Face files: tokenizer.json (the `tokenizers` library's format) and tokenizer_config.json with the
# chat template. Both directions keep every id; what this file cannot reproduce exactly is refused.

@lru_cache(maxsize=None)
def byte_chars() -> tuple:
    """GPT-2's printable stand-in for each byte, the alphabet HF byte-level vocabularies are spelled in: the
    printable Latin-1 bytes stand for themselves, the other 68 take U+0100, U+0101, ... in byte order."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, n = [], 0
    for b in range(256):
        out.append(chr(b) if b in keep else chr(0x100 + n))
        n += b not in keep
    return tuple(out)


# GPT-2's split, which HF's ByteLevel pre-tokenizer applies when use_regex is true
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Cohere's pre-tokenizer, Digits(individual_digits) then ByteLevel's GPT-2 split, as one pattern: every digit
# stands alone, and a whitespace run before a digit ends there (the digit split ended its segment)
COHERE_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


def _onig(pattern: str) -> str:
    """Our split pattern for HF's regex engine (Oniguruma): it reads `{1,3}+` as a repeated count, not as a
    possessive count. Nothing follows the count inside its alternative, so dropping the `+` changes nothing."""
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def hf_tokenizer_json(tok) -> dict:
    """The tokenizer as HF `tokenizers` JSON. Merges list every split of a token into two tokens, ordered by
    the token's rank: the pair HF merges first is the one tiktoken merges first (transformers' tiktoken
    converter does the same). ignore_merges: a chunk that is a whole token is taken whole, as tiktoken does."""
    chars = byte_chars()
    spell = {b: "".join(chars[x] for x in b) for b in tok.vocab}
    merges = []
    for b in tok.ranks:
        splits = [(b[:k], b[k:]) for k in range(1, len(b)) if b[:k] in tok.vocab and b[k:] in tok.vocab]
        merges += [[spell[x], spell[y]] for x, y in sorted(splits, key=lambda s: (tok.vocab[s[0]], tok.vocab[s[1]]))]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for s, i in sorted(tok.special_ids.items(), key=lambda kv: kv[1])],
        "normalizer": {"type": "NFC"} if tok.normalizer == "NFC" else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _onig(tok.pattern)}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,     # encode adds nothing; render_chat / the chat template write <BOS_TOKEN>
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {spell[b]: i for b, i in tok.vocab.items()}, "merges": merges}}


def hf_tokenizer_config(tok) -> dict:
    """tokenizer_config.json for transformers: a fast tokenizer over tokenizer.json, Cohere's token names, and
    a chat template that renders what render_chat renders. command_a_preamble is ours (ignored by others)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<BOS_TOKEN>",
            "eos_token": "<|END_OF_TURN_TOKEN|>", "pad_token": "<PAD>", "add_bos_token": False,
            "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "chat_template": chat_template(tok.preamble), "command_a_preamble": tok.preamble}


def _split_pattern(pre) -> str:
    """tokenizer.json's pre_tokenizer as one tiktoken split pattern, for the layouts whose split this
    reproduces exactly (tested against HF); anything else is refused rather than approximated."""
    parts = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [p.get("type") for p in parts]
    last = parts[-1] if parts else {}
    no_prefix = last.get("type") == "ByteLevel" and not last.get("add_prefix_space", True)
    if kinds == ["Split", "ByteLevel"] and no_prefix and not last.get("use_regex", True):
        split = parts[0]
        pattern = split.get("pattern", {}).get("Regex")
        if split.get("behavior") == "Isolated" and not split.get("invert") and isinstance(pattern, str):
            if re.search(r"\{\d+(?:,\d*)?\}\+", pattern):
                raise ValueError("its split regex has a possessive count ('}+'), which HF's Oniguruma and "
                                 "tiktoken's engine read differently")
            if re.search(r"(?<!\+\+)\$", pattern):
                raise ValueError("its split regex uses '$', which means end of line to HF and end of text to tiktoken")
            return GPT4_PATTERN if pattern == _onig(GPT4_PATTERN) else pattern
    if kinds == ["ByteLevel"] and no_prefix and last.get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and no_prefix and \
            last.get("use_regex", True):
        return COHERE_PATTERN
    raise ValueError(f"pre_tokenizer {json.dumps(pre)[:300]} is not one this loader reproduces exactly; it reads "
                     "Split(Regex, Isolated) + ByteLevel, ByteLevel (GPT-2 split) and Digits(individual) + ByteLevel")


def _normalizer(norm) -> str | None:
    steps = norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else [norm] if norm else []
    kinds = [n.get("type") for n in steps]
    if kinds == []:
        return None
    if kinds == ["NFC"]:
        return "NFC"
    raise ValueError(f"normalizer {kinds} is not supported (None or NFC)")


def _check_merge_order(model: dict, vocab: dict):
    """tiktoken merges the pair whose result has the lowest id, HF the earliest merge: the same order only if
    the merges' results have non-decreasing ids. A file whose merges disagree would encode differently."""
    last = -1
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is None:
            raise ValueError(f"merge {a!r} + {b!r} makes {a + b!r}, which is not in the vocabulary")
        if i < last:
            raise ValueError(f"merge {a!r} + {b!r} (id {i}) comes after a merge into id {last}: tiktoken "
                             "merges by id, so it would merge in another order than this file")
        last = i


def tokenizer_from_hf(data: dict, config: dict) -> dict:
    """Tokenizer(**kwargs) arguments from tokenizer.json (+ tokenizer_config.json)."""
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"model type {model.get('type')!r}: only byte-level BPE is read")
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError("BPE dropout, continuing_subword_prefix and end_of_word_suffix are not supported")
    decoder = data.get("decoder")
    if decoder is not None and decoder.get("type") != "ByteLevel":
        raise ValueError(f"decoder {decoder.get('type')!r}: only ByteLevel (or none) is read")
    post = data.get("post_processor") or {}
    for p in post.get("processors", [post]) if post else []:  # they only wrap an encode call's output
        if p.get("type") not in ("ByteLevel", "TemplateProcessing"):
            raise ValueError(f"post_processor {p.get('type')!r} is not supported")
    added = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
    unspell = {c: b for b, c in enumerate(byte_chars())}
    vocab = {}
    for text, i in model["vocab"].items():
        if added.get(text) == i:
            continue                    # an added token that the vocabulary lists too
        if any(c not in unspell for c in text):
            raise ValueError(f"vocabulary entry {text!r} is not spelled in the byte-level alphabet")
        vocab[bytes(unspell[c] for c in text)] = int(i)
    _check_merge_order(model, model["vocab"])
    return {"ranks": vocab, "special_tokens": added, "pattern": _split_pattern(data.get("pre_tokenizer")),
            "normalizer": _normalizer(data.get("normalizer")),
            "preamble": str(config.get("command_a_preamble", "full"))}


# -----------------------------------------------------------------------------------------------------------
# CLI: train on files (default: the Python standard library), show an example chat

def python_stdlib_files() -> list:
    """The standard library's own .py sources (no tests, no site-packages): code, docstrings, comments."""
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    return [p for p in sorted(root.rglob("*.py")) if not skip & set(p.relative_to(root).parts)]


def _read_texts(paths, max_bytes: int, holdout_every: int = 10):
    """(train, heldout) texts: every holdout_every-th file is held out; train stops at max_bytes."""
    files = []
    for p in map(Path, paths):
        files += sorted(f for f in p.rglob("*") if f.suffix in {".py", ".txt", ".md", ".rst"}) if p.is_dir() else [p]
    train, heldout, n = [], [], 0
    for i, f in enumerate(files):
        text = f.read_text(encoding="utf-8", errors="replace")
        if i % holdout_every == holdout_every - 1:
            heldout.append(text)
        elif n < max_bytes:
            train.append(text)
            n += len(text.encode("utf-8"))
    return train, heldout


def synthetic_vocab(n: int, seed: int = 0) -> list:
    """n distinct byte strings in which every one past the 256 bytes joins two earlier ones (a valid BPE
    vocabulary, as a trained one would be): Cohere's 256K size with no network to fetch theirs."""
    rng = random.Random(seed)
    ranks = [bytes([i]) for i in range(256)]
    seen = set(ranks)
    while len(ranks) < n:
        b = rng.choice(ranks[-4096:] if rng.random() < 0.5 else ranks) + rng.choice(ranks[:4096])
        if len(b) <= 24 and b not in seen:
            seen.add(b)
            ranks.append(b)
    return ranks


def bench(tok, texts, vocab: int = 256_000) -> dict:
    """Encoding speed of ours (tiktoken) against HF's fast tokenizer on the same text and files, and the time to
    load a tokenizer.json of `vocab` tokens (synthetic) into ours and into HF's."""
    import tempfile
    from tokenizers import Tokenizer as HFTokenizer     # optional: requirements-dev.txt
    out, n_bytes = {}, sum(len(t.encode("utf-8")) for t in texts)
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        hf = HFTokenizer.from_file(os.path.join(d, TOKENIZER_FILE))
        hf.encode_special_tokens = True
        for name, fn in (("ours", tok.encode), ("hf", lambda t: hf.encode(t, add_special_tokens=False).ids)):
            t0 = time.perf_counter()
            for t in texts:
                fn(t)
            out[f"encode_mb_per_s_{name}"] = round(n_bytes / 1e6 / (time.perf_counter() - t0), 2)
        big = Tokenizer(synthetic_vocab(vocab - len(SPECIAL_TOKENS)))
        t0 = time.perf_counter()
        big.save(d)
        out["write_s"] = round(time.perf_counter() - t0, 2)
        for name, load in (("ours", lambda: Tokenizer.load(d)), ("hf", lambda: HFTokenizer.from_file(
                os.path.join(d, TOKENIZER_FILE)))):
            t0 = time.perf_counter()
            load()
            out[f"load_{vocab // 1000}k_s_{name}"] = round(time.perf_counter() - t0, 2)
    out["text_mb"] = round(n_bytes / 1e6, 2)
    return out


def _example_chat():
    tools = [{"name": "calculator", "description": "Evaluate an arithmetic expression.",
              "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                             "required": ["expression"]}}]
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 17 * 23? <|END_OF_TURN_TOKEN|> (typed, so plain text)"},
        {"role": "assistant", "thinking": "I should use the calculator.",
         "tool_calls": [{"tool_call_id": "0", "tool_name": "calculator", "parameters": {"expression": "17*23"}}]},
        {"role": "tool", "tool_call_id": "0", "content": {"result": 391}},
        {"role": "assistant", "content": "17 * 23 = <co>391</co: 0:[0]>."},
    ]
    return messages, tools


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Train the byte-level BPE and show the Command A chat format.")
    ap.add_argument("--train", nargs="*", metavar="PATH",
                    help="train on these files/folders (.py .txt .md .rst); no PATH: the Python standard library")
    ap.add_argument("--vocab-size", type=int, default=8192, help="total vocabulary incl. 16 special tokens")
    ap.add_argument("--max-mb", type=float, default=8.0, help="cap on training text, in MB")
    ap.add_argument("--out", help="directory to save tokenizer.json + tokenizer_config.json into")
    ap.add_argument("--load", help="load a saved tokenizer instead of training")
    ap.add_argument("--show-chat", action="store_true", help="print an example rendered chat with tool use")
    ap.add_argument("--bench", action="store_true", help="encoding MB/s against HF's fast tokenizer (needs "
                    "`tokenizers`), and the load time of a 256K-token tokenizer.json")
    args = ap.parse_args()

    summary = {}
    if args.load:
        tok = Tokenizer.load(args.load)
    elif args.train is not None:
        train, heldout = _read_texts(args.train or python_stdlib_files(), int(args.max_mb * 1e6))
        t0 = time.time()
        tok = Tokenizer.train(train, args.vocab_size, verbose=True)
        summary["train_s"] = round(time.time() - t0, 2)
        for name, texts in (("train", train), ("heldout", heldout)):
            n_bytes = sum(len(t.encode("utf-8")) for t in texts)
            n_tok = sum(map(len, tok.encode_batch(texts)))
            summary[f"{name}_mb"] = round(n_bytes / 1e6, 2)
            summary[f"{name}_bytes_per_token"] = round(n_bytes / max(n_tok, 1), 3)
            print(f"{name}: {n_bytes / 1e6:.2f} MB -> {n_tok:,} tokens, {n_bytes / max(n_tok, 1):.2f} bytes/token")
    else:
        tok = Tokenizer.train([Path(__file__).read_text(encoding="utf-8")], 512)  # a quick self-trained demo
    if args.out:
        tok.save(args.out)
        summary["out"] = args.out
    if args.show_chat:
        messages, tools = _example_chat()
        ids, mask = tok.render_chat(messages, tools=tools, add_generation_prompt=False, return_mask=True)
        print(tok.chat_text(messages, tools=tools, add_generation_prompt=False))
        print("\n--- trained part (mask=1):\n" + tok.decode([t for t, m in zip(ids, mask) if m]))
        summary.update(chat_tokens=len(ids), trained_tokens=sum(mask))
    if args.bench:
        texts = _read_texts(python_stdlib_files(), int(4e6))[1]   # held-out stdlib files, ~4 MB
        summary["bench"] = bench(tok, texts)
        print("  ".join(f"{k}={v}" for k, v in summary["bench"].items()))
    print(json.dumps({"vocab_size": tok.vocab_size, **summary}))
