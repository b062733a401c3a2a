"""
data.py — Command A's pretraining data pipeline, at laptop scale: cleaning, scoring, mixing, packing.

Implements the report's pre-training "Data" paragraph and the data side of its cooldown (Cohere,
"Command A: An Enterprise-Ready Large Language Model", arXiv 2504.00698): web text and code, deduplicated,
cleaned by heuristic and ML-based quality filters, educational samples up-weighted, plus synthetic data;
a cooldown on high-quality data; context extended 8K -> 32K -> 128K -> 256K on a domain-balanced mix.

    sources -> exact dedup -> near dedup -> heuristic filters -> source blocklist -> safety classifier
            -> quality classifier -> up-weighting -> split by document -> tokenize -> pack with document ids -> Loader

The report's safety section adds that pretraining data is filtered for safety "domain-based and
classifier-based": here a blocklist of sources and a second hashed classifier, trained on planted unsafe posts.

The documents come from corpus.py: offline, Python's own standard library (code, docstrings and comments,
the language reference) plus seeded synthetic generators and planted junk standing in for the web's junk;
or the user's own files (--data). This file is the pipeline they go through.

References
- Broder 1997, "On the resemblance and containment of documents" (MinHash); Leskovec, Rajaraman,
  Ullman, "Mining of Massive Datasets" ch. 3 (LSH banding).
- Lee et al. 2022, "Deduplicating Training Data Makes Language Models Better", arXiv 2107.06499.
- Rae et al. 2021 (Gopher), arXiv 2112.11446, appendix A: the MassiveText quality rules used below.
- Raffel et al. 2020 (C4), arXiv 1910.10683: lorem ipsum and boilerplate rules.
- Penedo et al. 2024 (FineWeb-Edu), arXiv 2406.17557: an "educational" classifier to up-weight data.
- Weinberger et al. 2009, "Feature Hashing for Large Scale Multitask Learning".
- Penedo et al. 2023 (RefinedWeb), arXiv 2306.01116: URL filtering by a blocklist of 4.6M domains;
  Dubey et al. 2024 (Llama 3), arXiv 2407.21783, sec. 3.1.1: removing domains known for unsafe content.
- Krell et al. 2021, "Efficient Sequence Packing without Cross-contamination", arXiv 2107.02027.
- Shi et al. 2023, "In-Context Pretraining", arXiv 2310.10638 (concatenate related documents).
- Fu et al. 2024, "Data Engineering for Scaling Language Models to 128K Context", arXiv 2402.10171
  (per-domain balanced long-document upsampling).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from corpus import (UNSAFE_HOSTS, Document, benign_lookalikes, junk_documents, load_user_data, stdlib_documents,
                    synthetic_code, synthetic_copy, synthetic_math, synthetic_prose, synthetic_recall, unsafe_documents)
from model import attention_allowed, positions_from_doc_ids, pyplot, save_figure

# -----------------------------------------------------------------------------------------------
# Configuration

@dataclass
class FilterConfig:
    # prose rules (Gopher's MassiveText rules; thresholds from its appendix A unless noted)
    min_words: int = 30                 # Gopher says 50 for web pages; a good docstring is shorter
    max_words: int = 100_000
    mean_word_len: tuple = (3.0, 10.0)  # mean word length outside this -> not natural language
    max_symbol_ratio: float = 0.1       # ('#' + '...') per word
    min_alpha_words: float = 0.8        # fraction of words with a letter or digit (Gopher: a letter,
                                        # which throws away arithmetic: "12 x 3 = 36" is 1/5 alphabetic)
    min_stop_words: int = 2             # distinct of {the, be, to, of, and, that, have, with}
    max_dup_lines: float = 0.3          # chars in repeated copies of a line / all chars
    max_top_ngram: tuple = (0.20, 0.18, 0.16)  # chars covered by the top 2-, 3-, 4-gram
    max_dup_5gram: float = 0.15         # chars covered by repeated copies of 5-grams
    max_boilerplate_lines: float = 0.3  # lines with license/cookie/legal phrases (C4-like)
    # code rules (Codex / The Stack style): code is symbol-heavy and repeats short lines by nature,
    # so the prose ratios would throw most of it away
    code_min_chars: int = 200           # empty __init__.py files and one-liners
    code_max_chars: int = 1_000_000
    code_max_line_len: int = 1000       # minified or data-blob lines
    code_max_mean_line_len: float = 100.0
    code_min_alnum: float = 0.25        # alphanumeric fraction; lower = tables of escapes and bytes
    code_max_dup_lines: float = 0.5     # only lines of >= 10 chars count ("pass", "}" repeat legitimately)
    # safety, by source: hosts whose pages are dropped whole, subdomains included (stand-ins under .example; a
    # real run loads a maintained list of millions, as RefinedWeb does with the UT1 blocklist)
    blocklist: tuple = UNSAFE_HOSTS


@dataclass
class DataConfig:
    data: str | None = None             # user text/JSONL file or folder; None = the stdlib corpus
    max_bytes: int = 8_000_000          # cap on stdlib text read (~8 MB: the tiny run and tokenizer)
    synthetic_docs: int = 400           # documents per synthetic generator (math, code, prose)
    recall_ratio: int = 0               # synthetic_recall (x1) and synthetic_copy (x2) docs per synthetic_docs;
                                        # 0: at 8 (~48% of tokens) they did not grow induction heads in the
                                        # tiny run's 1.6M tokens and cost the other domains (README, Limits)
    junk_docs: int = 200                # planted junk (the web's, offline); stdlib corpus only
    unsafe_docs: int = 160              # planted unsafe web posts, ~half from blocklisted hosts; stdlib corpus only
    lookalike_docs: int = 160           # planted safe pages sharing their trigger words; stdlib corpus only
    safety_train_docs: int = 600        # generated unsafe positives for the safety classifier (as many negatives)
    safety_steps: int = 100             # full-batch Adam steps of its logistic regression
    max_unsafe: float = 0.5             # safety filter: drop documents scored above (the decision boundary)
    seed: int = 0
    shingle: int = 5                    # words per MinHash shingle
    num_perm: int = 128                 # MinHash permutations
    near_threshold: float = 0.8         # Jaccard at or above which two documents are near-duplicates
    quality_buckets: int = 2 ** 18      # hashed unigram+bigram feature buckets
    quality_train_docs: int = 1500      # positives sampled for the classifier (as many negatives)
    quality_steps: int = 150            # full-batch Adam steps of the logistic regression
    min_quality: float = 0.5            # ML filter: drop documents scored below (the decision boundary)
    upweight_alpha: float = 1.0         # sampling weight = 1 + alpha * percentile of the quality score
    hq_fraction: float = 0.3            # top fraction of each domain = the cooldown's high-quality subset
    filters: FilterConfig = field(default_factory=FilterConfig)


# the domains the quality classifier learns as "educational"
EDUCATIONAL = ("prose", "reference", "synthetic-math", "synthetic-code", "synthetic-prose", "synthetic-recall",
               "synthetic-copy")

# -----------------------------------------------------------------------------------------------
# Stage 1: exact dedup by normalized hash

_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def exact_dedup(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """Keep the first copy of each text up to case and whitespace; returns (kept, removed)."""
    seen, kept, removed = set(), [], []
    for d in docs:
        h = hashlib.sha1(normalize(d.text).encode()).digest()
        (removed if h in seen else kept).append(d)
        seen.add(h)
    return kept, removed

# -----------------------------------------------------------------------------------------------
# Stage 2: near dedup, MinHash + LSH (Broder 1997; MMDS ch. 3)

_P = np.uint64((1 << 31) - 1)           # Mersenne prime: a*x + b < 2^63 for 32-bit x, so uint64 never overflows


def shingle_hashes(text: str, k: int = 5) -> np.ndarray:
    """Unique 32-bit hashes of the word k-grams of text (the whole text if shorter than k words)."""
    h = np.array([zlib.crc32(w.encode()) for w in _WORD.findall(text.lower())], dtype=np.uint64)
    k = max(1, min(k, len(h)))
    s = np.zeros(len(h) - k + 1, dtype=np.uint64)
    for i in range(k):                  # polynomial roll over k consecutive word hashes (wraps mod 2^64)
        s = s * np.uint64(1_000_003) + h[i:len(h) - k + 1 + i]
    return np.unique(s & np.uint64(0xFFFFFFFF))


def minhash_signatures(shingles: list[np.ndarray], num_perm: int = 128, seed: int = 0,
                       chunk: int = 40_000) -> np.ndarray:
    """[N, num_perm] minimum of h_i(x) = (a_i x + b_i) mod p over each document's shingles."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(_P), num_perm, dtype=np.uint64)
    b = rng.integers(0, int(_P), num_perm, dtype=np.uint64)
    sig = np.full((len(shingles), num_perm), int(_P), dtype=np.uint64)   # empty doc: all "infinity"
    i = 0
    while i < len(shingles):            # a group of whole documents, ~chunk shingles at a time
        j, n = i, 0
        while j < len(shingles) and (n == 0 or n + len(shingles[j]) <= chunk):
            n += len(shingles[j])
            j += 1
        sizes = np.array([len(s) for s in shingles[i:j]])
        if n:
            x = np.concatenate(shingles[i:j])
            hv = (x[:, None] * a[None, :] + b[None, :]) % _P             # (n, num_perm)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            nz = sizes > 0                  # reduceat misreads empty segments; skip them
            sig[np.arange(i, j)[nz]] = np.minimum.reduceat(hv, starts[nz], axis=0)
        i = j
    return sig.astype(np.uint32)


def lsh_params(num_perm: int, threshold: float, fp_weight: float = 0.2) -> tuple[int, int]:
    """Bands x rows whose S-curve 1-(1-s^r)^b best separates Jaccard s around threshold.

    False negatives weigh more than false positives because every candidate pair is verified on
    its signatures afterwards (128 perms, 0.8 -> 12 bands x 10 rows, curve midpoint ~0.78)."""
    s, best = np.linspace(0, 1, 501), None
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            p = 1 - (1 - s ** rows) ** bands
            fp, fn = np.mean(np.where(s < threshold, p, 0)), np.mean(np.where(s >= threshold, 1 - p, 0))
            err = fp_weight * fp + (1 - fp_weight) * fn
            if best is None or err < best[0]:
                best = (err, bands, rows)
    return best[1], best[2]


def near_dedup(docs: list[Document], threshold: float = 0.8, k: int = 5, num_perm: int = 128,
               seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Cluster documents whose estimated Jaccard >= threshold; keep the first of each cluster."""
    if not docs:
        return [], []
    sig = minhash_signatures([shingle_hashes(d.text, k) for d in docs], num_perm, seed)
    bands, rows = lsh_params(num_perm, threshold)
    parent = list(range(len(docs)))
    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    checked = set()
    for band in range(bands):
        buckets = defaultdict(list)
        for i, key in enumerate(sig[:, band * rows:(band + 1) * rows]):
            buckets[key.tobytes()].append(i)
        for m in buckets.values():      # all pairs in small buckets, a star around the first in big ones
            pairs = ([(x, y) for n, x in enumerate(m) for y in m[n + 1:]] if len(m) <= 32
                     else [(m[0], y) for y in m[1:]])
            for x, y in pairs:
                if (x, y) in checked:
                    continue
                checked.add((x, y))
                if np.mean(sig[x] == sig[y]) >= threshold:   # verify: the LSH band is only a candidate
                    rx, ry = find(x), find(y)
                    parent[max(rx, ry)] = min(rx, ry)          # the root is the earliest document
    keep = [find(i) == i for i in range(len(docs))]
    return [d for d, k_ in zip(docs, keep) if k_], [d for d, k_ in zip(docs, keep) if not k_]

# -----------------------------------------------------------------------------------------------
# Stage 3: heuristic filters (Gopher appendix A; C4; The Stack for code)

STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
_BOILER = re.compile(r"all rights reserved|copyright|licen[cs]e|warrant|permission is hereby|liabilit|merchantab"
                     r"|redistribut|uses cookies|accept (all )?cookies|cookie (policy|settings)|privacy policy"
                     r"|terms of (use|service)|click here|subscribe|sign in", re.I)
_GENERATED = re.compile(r"generated (by|from)|auto-?generated|do not edit", re.I)


def _repeated_line_frac(lines: list[str]) -> float:
    counts, total = Counter(lines), sum(map(len, lines)) or 1
    return sum(len(l) * (c - 1) for l, c in counts.items()) / total


def _ngram_fracs(words: list[str]) -> tuple[list[float], float]:
    """(chars covered by the most frequent 2/3/4-gram, chars in repeated copies of 5-grams), as fractions."""
    total = sum(map(len, words)) or 1
    top = []
    for n in (2, 3, 4):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        g, c = grams.most_common(1)[0] if grams else ((), 0)
        top.append(sum(map(len, g)) * c / total if c > 1 else 0.0)
    seen, dup = set(), np.zeros(len(words), bool)
    for i in range(len(words) - 4):
        g = tuple(words[i:i + 5])
        if g in seen:
            dup[i:i + 5] = True
        seen.add(g)
    return top, sum(len(w) for w, d in zip(words, dup) if d) / total


def heuristic_reason(doc: Document, cfg: FilterConfig = FilterConfig()) -> str | None:
    """The name of the first rule the document fails, or None if it passes."""
    text = doc.text
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    if "lorem ipsum" in text.lower():
        return "lorem_ipsum"
    if lines and sum(bool(_BOILER.search(l)) for l in lines) / len(lines) > cfg.max_boilerplate_lines:
        return "boilerplate"
    if doc.domain.endswith("code"):    # 'code', 'synthetic-code': code rules
        if len(text) < cfg.code_min_chars:
            return "too_short"
        if len(text) > cfg.code_max_chars:
            return "too_long"
        if _GENERATED.search("\n".join(text.splitlines()[:10])):
            return "autogenerated"
        raw = text.splitlines() or [""]
        if max(map(len, raw)) > cfg.code_max_line_len or np.mean(list(map(len, raw))) > cfg.code_max_mean_line_len:
            return "long_lines"
        if sum(ch.isalnum() for ch in text) / len(text) < cfg.code_min_alnum:
            return "alnum_ratio"
        if _repeated_line_frac([l for l in lines if len(l) >= 10]) > cfg.code_max_dup_lines:
            return "duplicate_lines"
        return None
    if doc.domain in ("synthetic-recall", "synthetic-copy"):   # made here, and repetition is their point
        return None
    words = text.split()
    if len(words) < cfg.min_words:
        return "too_short"
    if len(words) > cfg.max_words:
        return "too_long"
    if not cfg.mean_word_len[0] <= np.mean([len(w) for w in words]) <= cfg.mean_word_len[1]:
        return "mean_word_length"
    if (text.count("#") + text.count("...") + text.count("\u2026")) / len(words) > cfg.max_symbol_ratio:
        return "symbol_ratio"
    if sum(any(c.isalnum() for c in w) for w in words) / len(words) < cfg.min_alpha_words:
        return "alpha_words"
    lw = [w.lower() for w in _WORD.findall(text)]
    if len(STOP_WORDS.intersection(lw)) < cfg.min_stop_words:
        return "stop_words"
    if _repeated_line_frac(lines) > cfg.max_dup_lines:
        return "duplicate_lines"
    top, dup5 = _ngram_fracs(lw)
    if any(t > m for t, m in zip(top, cfg.max_top_ngram)):
        return "top_ngram"
    if dup5 > cfg.max_dup_5gram:
        return "duplicate_ngrams"
    return None


def heuristic_filter(docs: list[Document], cfg: FilterConfig = FilterConfig()
                     ) -> tuple[list[Document], list[tuple[Document, str]]]:
    """Returns (kept, [(removed document, rule name), ...])."""
    kept, removed = [], []
    for d in docs:
        r = heuristic_reason(d, cfg)
        (kept.append(d) if r is None else removed.append((d, r)))
    return kept, removed

# -----------------------------------------------------------------------------------------------
# Stage 4: a learned quality classifier (FineWeb-Edu style, with hashed features; Weinberger 2009)

class QualityClassifier:
    """Logistic regression on hashed word unigrams + bigrams, trained with numpy Adam.

    Scores P(educational | text). Only the first max_chars of a document are read: the classifier
    judges the kind of text, and a long file's start says that as well as its whole."""

    def __init__(self, buckets: int = 2 ** 18, max_chars: int = 5000):
        self.buckets, self.max_chars = buckets, max_chars
        self.w = np.zeros(buckets + 1)  # the last weight is the bias, fed by a constant feature

    def features(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, value) of the sparse [N, buckets+1] matrix: log(1 + count), L2-normalized
        per row, plus the constant 1 of the bias."""
        rows, cols, vals = [], [], []
        for r, t in enumerate(texts):
            words = _WORD.findall(t[:self.max_chars].lower())
            h = np.array([zlib.crc32(w.encode()) for w in words], dtype=np.uint64)
            h = np.concatenate([h, (h[:-1] * np.uint64(1_000_003)) ^ h[1:]]) if len(h) else h  # uni + bigrams
            c, n = np.unique(h % np.uint64(self.buckets), return_counts=True)
            v = np.log1p(n)
            rows.append(np.full(len(c) + 1, r))
            cols.append(np.append(c.astype(np.int64), self.buckets))
            vals.append(np.append(v / (np.linalg.norm(v) or 1), 1.0))
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)

    def _logits(self, X, n):
        r, c, v = X                     # sparse matrix-vector product: sum over each row's entries
        return np.bincount(r, weights=self.w[c] * v, minlength=n)

    def fit(self, texts: list[str], labels, steps: int = 150, lr: float = 0.1, l2: float = 1e-5):
        X, y, n = self.features(texts), np.asarray(labels, float), len(texts)
        r, c, v = X
        m, s = np.zeros_like(self.w), np.zeros_like(self.w)
        for t in range(1, steps + 1):   # full-batch Adam on the mean log-loss + L2
            err = 1 / (1 + np.exp(-self._logits(X, n))) - y            # d loss / d logit
            g = np.bincount(c, weights=err[r] * v, minlength=len(self.w)) / n + l2 * self.w
            m, s = 0.9 * m + 0.1 * g, 0.999 * s + 0.001 * g ** 2
            self.w -= lr * (m / (1 - 0.9 ** t)) / (np.sqrt(s / (1 - 0.999 ** t)) + 1e-8)
        return self

    def predict(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        return 1 / (1 + np.exp(-self._logits(self.features(texts), len(texts))))


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting half."""
    pos, neg = np.asarray(pos), np.asarray(neg)
    return float(((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()))


def quality_filter(docs: list[Document], cfg: DataConfig) -> tuple[list[Document], Counter, float | None]:
    """Train the classifier, set every document's .quality, drop prose scored below cfg.min_quality.
    Returns (kept, removed per domain, held-out AUC; None when there is too little educational text to learn from).

    Positives are sampled from the educational domains that survived, negatives from a junk generator seeded
    apart from the planted junk; 20% of each is held out to measure AUC."""
    rng = random.Random(cfg.seed)
    pos = [d.text for d in docs if d.domain in EDUCATIONAL]
    if len(pos) < 10:
        return docs, Counter(), None
    pos = rng.sample(pos, min(len(pos), cfg.quality_train_docs))
    vocab = sorted({w for p in pos[:300] for w in p.split() if w.isalpha()})
    # word salad over the corpus's own words (hard: real unigrams) and over the generic junk words
    neg = [d.text for d in junk_documents(len(pos) // 2, seed=cfg.seed + 7, vocab=vocab)
           + junk_documents(len(pos) - len(pos) // 2, seed=cfg.seed + 8)]
    rng.shuffle(neg)
    cut_p, cut_n = int(0.8 * len(pos)), int(0.8 * len(neg))
    clf = QualityClassifier(cfg.quality_buckets).fit(pos[:cut_p] + neg[:cut_n], [1] * cut_p + [0] * cut_n,
                                                     cfg.quality_steps)
    heldout = round(auc(clf.predict(pos[cut_p:]), clf.predict(neg[cut_n:])), 4)
    # (the sampled positives are scored too, as FineWeb-Edu scores its annotated pages: their
    # scores run high, but they are educational by construction)
    for d, s in zip(docs, clf.predict([d.text for d in docs])):
        d.quality = float(s)
    # Code is scored (for its weight and the cooldown ranking) but not removed: the classifier
    # learned prose against junk, and code has its own heuristic rules.
    low = [d.quality < cfg.min_quality and not d.domain.endswith("code") for d in docs]
    kept = [d for d, x in zip(docs, low) if not x]
    return kept, Counter(d.domain for d, x in zip(docs, low) if x), heldout

# -----------------------------------------------------------------------------------------------
# Stage 5: safety filtering, by source and by classifier (report, Safety: "domain-based and
# classifier-based" filtering of pretraining data). build_corpus runs it before the quality stage.

def origin_source(origin: str) -> str:
    """The source part of an origin: a URL's host without 'www.' ('https://www.a.example/x' -> 'a.example'),
    else what precedes the first ':' ('synthetic-math:17' -> 'synthetic-math'; a path stays itself)."""
    m = re.match(r"[a-z][a-z0-9+.-]*://([^/:?#]+)", origin, re.I)
    return (m.group(1).lower() if m else origin.split(":")[0]).removeprefix("www.")


def blocked_by(origin: str, blocklist) -> str | None:
    """The blocklist entry an origin's source is, or is a subdomain of ('x.bad.example' -> 'bad.example'; a
    match is at a dot, so 'notbad.example' is not blocked by 'bad.example')."""
    src = origin_source(origin)
    return next((b for b in blocklist if src == b or src.endswith("." + b)), None)


def blocklist_filter(docs: list[Document], blocklist) -> tuple[list[Document], Counter]:
    """Returns (kept, removed per blocklist entry)."""
    kept, why = [], Counter()
    for d in docs:
        b = blocked_by(d.origin, blocklist)
        (why.update([b]) if b else kept.append(d))
    return kept, why


def safety_filter(docs: list[Document], cfg: DataConfig) -> tuple[list[Document], list[Document], float]:
    """Train the safety classifier (QualityClassifier's hashed logistic regression, label 1 = unsafe) and drop
    documents scored above cfg.max_unsafe. Returns (kept, removed, held-out AUC).

    Positives come from the unsafe generator seeded apart from the planted posts. Negatives are half the corpus's
    own text outside the planted web pages (the stdlib and synthetic documents, or the user's --data), half
    benign look-alikes seeded apart: without them "kill" and "bomb" alone would read as unsafe, and a docs page
    on killing a process would go. 20% of each side is held out to measure AUC."""
    rng, n = random.Random(f"safety:{cfg.seed}"), cfg.safety_train_docs
    own = [d.text for d in docs if d.domain != "web"]
    neg = rng.sample(own, min(len(own), n // 2))
    neg += [d.text for d in benign_lookalikes(n - len(neg), seed=cfg.seed + 3)]
    pos = [d.text for d in unsafe_documents(n, seed=cfg.seed + 3)]
    rng.shuffle(neg)
    cut_p, cut_n = int(0.8 * len(pos)), int(0.8 * len(neg))
    clf = QualityClassifier(cfg.quality_buckets).fit(pos[:cut_p] + neg[:cut_n], [1] * cut_p + [0] * cut_n,
                                                     cfg.safety_steps)
    heldout = round(auc(clf.predict(pos[cut_p:]), clf.predict(neg[cut_n:])), 4)
    unsafe = clf.predict([d.text for d in docs]) > cfg.max_unsafe
    return ([d for d, u in zip(docs, unsafe) if not u], [d for d, u in zip(docs, unsafe) if u], heldout)


def safety_stages(docs: list[Document], cfg: DataConfig, card: "DataCard", planted: dict[int, str]) -> list[Document]:
    """The blocklist, then the classifier, each a row of the card; planted = {id(document): 'unsafe' or
    'lookalike'} for the documents build_corpus planted, whose fate goes into card.info.

    The blocklist goes first: a lookup needs no model, and the classifier is then left the unsafe text that
    ordinary-looking sources carry (the card credits each removal to one stage)."""
    count = lambda ds, kind: sum(planted.get(id(d)) == kind for d in ds)
    t, before = time.time(), docs
    kept, why = blocklist_filter(docs, cfg.filters.blocklist)
    card.add_stage("blocklist", docs, kept, why, time.time() - t)
    t, docs = time.time(), kept
    kept, rem, heldout = safety_filter(docs, cfg)
    card.add_stage("safety", docs, kept, Counter({"unsafe-classifier": len(rem)}) if rem else None, time.time() - t)
    # planted posts reaching these stages (dedup and heuristics take a few), and what became of them
    card.info.update(safety_auc_heldout=heldout, safety_removed_domains=dict(Counter(d.domain for d in rem)),
                     planted_unsafe_total=count(before, "unsafe"),
                     planted_unsafe_blocked=count(before, "unsafe") - count(docs, "unsafe"),
                     planted_unsafe_classified=count(docs, "unsafe"),
                     planted_unsafe_removed=count(docs, "unsafe") - count(kept, "unsafe"),
                     lookalikes_total=count(docs, "lookalike"), lookalikes_kept=count(kept, "lookalike"))
    return kept

# -----------------------------------------------------------------------------------------------
# The data card: what each stage kept and removed

@dataclass
class DataCard:
    stages: list[dict] = field(default_factory=list)   # per stage: docs/chars in and out, reasons
    mix: dict = field(default_factory=dict)            # per domain: docs, chars, weighted share, hq docs
    tokens: dict = field(default_factory=dict)         # name -> token count, once a tokenizer has run
    info: dict = field(default_factory=dict)           # config, timings, classifier metrics

    def add_stage(self, name, before, after, reasons: Counter | None = None, seconds: float = 0.0):
        chars = lambda ds: sum(len(d.text) for d in ds)
        self.stages.append(dict(stage=name, docs_in=len(before), docs_out=len(after), chars_in=chars(before),
                                chars_out=chars(after), removed_by=dict(reasons or {}), seconds=round(seconds, 2),
                                domains_out=dict(Counter(d.domain for d in after))))

    def set_mix(self, docs: list[Document], hq: list[Document]):
        wsum = sum(d.weight * len(d.text) for d in docs) or 1
        hqc = Counter(d.domain for d in hq)
        for dom in sorted({d.domain for d in docs}):
            ds = [d for d in docs if d.domain == dom]
            self.mix[dom] = dict(docs=len(ds), chars=sum(len(d.text) for d in ds), hq_docs=hqc[dom],
                                 weighted_share=round(sum(d.weight * len(d.text) for d in ds) / wsum, 4),
                                 mean_quality=round(float(np.mean([d.quality or 0 for d in ds])), 3))

    def record_tokens(self, name: str, token_docs: list[list[int]]):
        self.tokens[name] = int(sum(map(len, token_docs)))

    def summary(self) -> str:
        out = [f'{"stage":<12}{"docs in":>9}{"docs out":>9}{"MB out":>8}{"s":>6}  removed by']
        for s in self.stages:
            why = ", ".join(f"{k} {v}" for k, v in sorted(s["removed_by"].items(), key=lambda kv: -kv[1]))
            out.append(f'{s["stage"]:<12}{s["docs_in"]:>9}{s["docs_out"]:>9}{s["chars_out"] / 1e6:>8.2f}'
                       f'{s["seconds"]:>6.1f}  {why}')
        out.append(f'{"domain":<16}{"docs":>7}{"MB":>7}{"weighted":>10}{"quality":>9}{"hq docs":>9}')
        for dom, m in self.mix.items():
            out.append(f'{dom:<16}{m["docs"]:>7}{m["chars"] / 1e6:>7.2f}{m["weighted_share"]:>10.1%}'
                       f'{m["mean_quality"]:>9.2f}{m["hq_docs"]:>9}')
        if "safety_auc_heldout" in self.info:
            i = self.info
            out.append(f'safety: classifier held-out AUC {i["safety_auc_heldout"]}; planted unsafe posts '
                       f'{i["planted_unsafe_total"]}: {i["planted_unsafe_blocked"]} blocked by source, '
                       f'{i["planted_unsafe_removed"]}/{i["planted_unsafe_classified"]} of the rest removed by '
                       f'the classifier; look-alikes kept {i["lookalikes_kept"]}/{i["lookalikes_total"]}; '
                       f'classifier removals by domain {i["safety_removed_domains"]}')
        out += [f"tokens[{k}] = {v}" for k, v in self.tokens.items()]
        return "\n".join(out)

    def save(self, out_dir: str | os.PathLike) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        from model import atomic_write_json, pyplot, save_figure   # lazily: data.py needs them only here
        atomic_write_json(str(out / "data_card.json"), asdict(self))
        plt = pyplot()
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        names = [s["stage"] for s in self.stages]
        kept = [s["docs_out"] for s in self.stages]
        ax1.bar(names, kept, label="kept")
        ax1.bar(names, [s["docs_in"] - s["docs_out"] for s in self.stages], bottom=kept, label="removed")
        ax1.set_ylabel("documents")
        ax1.set_title("documents per stage")
        ax1.legend()
        doms = list(self.mix)
        x = np.arange(len(doms))
        total = sum(m["chars"] for m in self.mix.values()) or 1
        ax2.bar(x - 0.2, [self.mix[d]["chars"] / total for d in doms], 0.4, label="unique text")
        ax2.bar(x + 0.2, [self.mix[d]["weighted_share"] for d in doms], 0.4, label="after up-weighting")
        ax2.set_xticks(x, doms, rotation=30, ha="right")
        ax2.set_ylabel("share of characters")
        ax2.set_title("final mix by source")
        ax2.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        fig.tight_layout()
        save_figure(fig, str(out / "data_card.png"), dpi=100)
        return out

# -----------------------------------------------------------------------------------------------
# The pipeline

def build_corpus(cfg: DataConfig | None = None, verbose: bool = True) -> tuple[list[Document], DataCard]:
    """Sources -> dedup -> filters -> quality score and weight. Returns the kept documents (with
    .quality and .weight set) and the data card. Next: split_documents, then the mixes, then pack."""
    cfg, card, t0 = cfg or DataConfig(), DataCard(), time.time()
    card.info["config"] = asdict(cfg)
    t = time.time()
    docs = load_user_data(cfg.data) if cfg.data else stdlib_documents(cfg.max_bytes)
    bar = tqdm(total=6, desc="data", disable=not verbose)
    def step(name):
        bar.set_postfix_str(name)
        bar.update(1)
    n = cfg.synthetic_docs
    docs += synthetic_math(n, cfg.seed) + synthetic_code(n, cfg.seed) + synthetic_prose(n, cfg.seed)
    # the copy exercises draw from the corpus's own words (sorted: the same set gives the same documents)
    if cfg.recall_ratio:
        vocab = sorted({w for d in docs if d.domain in ("prose", "reference")
                        for w in re.findall(r"\b[a-z]{3,10}\b", d.text)})
        docs += synthetic_recall(cfg.recall_ratio * n, cfg.seed)
        docs += synthetic_copy(2 * cfg.recall_ratio * n, cfg.seed, vocab or None)
    docs += junk_documents(0 if cfg.data else cfg.junk_docs, seed=cfg.seed + 1000)
    # the web's unsafe posts and their safe look-alikes, planted like the junk and remembered by identity so the
    # card can say what became of them
    unsafe = unsafe_documents(0 if cfg.data else cfg.unsafe_docs, seed=cfg.seed + 2000)
    alike = benign_lookalikes(0 if cfg.data else cfg.lookalike_docs, seed=cfg.seed + 2000)
    planted = {**{id(d): "unsafe" for d in unsafe}, **{id(d): "lookalike" for d in alike}}
    docs += unsafe + alike
    card.add_stage("sources", docs, docs, seconds=time.time() - t)
    step("exact dedup")

    t = time.time()
    kept, rem = exact_dedup(docs)
    card.add_stage("exact_dedup", docs, kept, Counter(d.domain for d in rem), time.time() - t)
    step("near dedup")

    t, docs = time.time(), kept
    kept, rem = near_dedup(docs, cfg.near_threshold, cfg.shingle, cfg.num_perm, cfg.seed)
    card.add_stage("near_dedup", docs, kept, Counter(d.domain for d in rem), time.time() - t)
    step("heuristics")

    t = time.time()
    docs, (kept, rem) = kept, heuristic_filter(kept, cfg.filters)
    card.add_stage("heuristics", docs, kept, Counter(r for _, r in rem), time.time() - t)
    step("safety")

    # Safety after the cleaning: the classifier then reads fewer documents, and the corpus text it samples as
    # negatives has passed the heuristics. Before the quality stage: unsafe text must not become a quality
    # positive nor be up-weighted, and the quality card row must not take credit for removing it.
    kept = safety_stages(kept, cfg, card, planted)
    step("quality")

    t, docs = time.time(), kept
    kept, rem, heldout_auc = quality_filter(docs, cfg)
    card.info["quality_auc_heldout"] = heldout_auc
    card.add_stage("quality", docs, kept, rem, time.time() - t)
    step("mix")

    # Report: up-weight educational samples. Weight = 1 + alpha * (percentile rank of the score):
    # the logistic scores of real text crowd near 1, where 1 + alpha * score would weigh all alike.
    docs = kept
    if docs and docs[0].quality is not None:
        rank = np.argsort(np.argsort([d.quality for d in docs], kind="stable"))
        for d, r in zip(docs, rank):
            d.weight = 1.0 + cfg.upweight_alpha * r / max(1, len(docs) - 1)
    card.set_mix(docs, high_quality_subset(docs, cfg.hq_fraction))
    card.info["seconds"] = round(time.time() - t0, 2)
    card.info["mb"] = round(sum(len(d.text.encode()) for d in docs) / 1e6, 3)
    bar.close()
    if verbose:
        print(card.summary())
        print(f'quality classifier held-out AUC: {card.info["quality_auc_heldout"]}; {card.info["seconds"]} s')
    return docs, card

# -----------------------------------------------------------------------------------------------
# Mixtures for the schedule: pretraining (up-weighted), cooldown (high quality), long context

def high_quality_subset(docs: list[Document], fraction: float = 0.3) -> list[Document]:
    """The top `fraction` of each domain by quality score. Per domain, because a score learned on
    prose vs junk is comparable within a domain, not between code and prose."""
    out = []
    for dom in sorted({d.domain for d in docs}):
        ds = sorted((d for d in docs if d.domain == dom), key=lambda d: -(d.quality or 0.0))
        out += ds[:max(1, round(fraction * len(ds)))]
    return out


def pretrain_mix(docs: list[Document], seed: int = 0) -> list[Document]:
    """Each document repeated ~weight times (stochastic rounding), shuffled: the up-weighted mix."""
    rng, out = random.Random(f"mix:{seed}"), []
    for d in docs:
        out += [d] * (int(d.weight) + (rng.random() < d.weight - int(d.weight)))
    rng.shuffle(out)
    return out


def cooldown_mix(docs: list[Document], hq_fraction: float = 0.3, rest_fraction: float = 0.1,
                 seed: int = 0) -> list[Document]:
    """The cooldown's data: the high-quality subset, plus a small sample of the rest so the final
    phase does not drift far from the pretraining distribution. Shuffled."""
    rng = random.Random(f"cooldown:{seed}")
    hq = high_quality_subset(docs, hq_fraction)
    ids = {id(d) for d in hq}
    rest = [d for d in docs if id(d) not in ids]
    out = hq + rng.sample(rest, round(rest_fraction * len(rest)))
    rng.shuffle(out)
    return out


def long_context_mix(docs: list[Document], encode: Callable[[str], list[int]], min_tokens: int,
                     bos_id: int | None = None, tokens_per_domain: int | None = None,
                     max_repeat: int = 4, seed: int = 0) -> list[list[int]]:
    """Long documents for a context-extension stage, balanced across domains.

    Within a domain, documents sorted by origin (files of one package, docstrings of one module) are
    concatenated into one document of >= min_tokens (repository-level concatenation; In-Context
    Pretraining), so attention has real long-range structure to use. Then every domain is brought to
    the same token budget (default: the median domain): large domains subsampled, small ones
    repeated at most max_repeat times (Fu et al. 2024: balance per source when upsampling length)."""
    sep = encode("\n\n")
    by_domain: dict[str, list[list[int]]] = {}
    for dom in sorted({d.domain for d in docs}):
        longs, cur = [], []
        for d in sorted((d for d in docs if d.domain == dom), key=lambda d: d.origin):
            if cur:
                cur += sep
            elif bos_id is not None:
                cur = [bos_id]
            cur += encode(d.text)       # in place: a long group is never copied
            if len(cur) >= min_tokens:
                longs.append(cur)
                cur = []
        if longs:                       # a trailing partial group shorter than min_tokens is dropped
            by_domain[dom] = longs
    if not by_domain:
        return []
    totals = {dom: sum(map(len, ls)) for dom, ls in by_domain.items()}
    budget = tokens_per_domain or int(np.median(list(totals.values())))
    rng, out = random.Random(f"long:{seed}"), []
    for dom, longs in by_domain.items():
        picked, n = [], 0
        for _ in range(max_repeat):     # shuffled passes until the budget is met
            for x in rng.sample(longs, len(longs)):
                if n >= budget:
                    break
                picked.append(x)
                n += len(x)
        out += picked
    rng.shuffle(out)
    return out

# -----------------------------------------------------------------------------------------------
# Split, tokenize, pack (document masking), load

def split_documents(docs: list[Document], val_fraction: float = 0.01, seed: int = 0
                    ) -> tuple[list[Document], list[Document]]:
    """Hold out documents by a hash of their normalized text: stable under reordering, and copies of
    one text always land on the same side, so no validation document leaks into training."""
    def u(d):
        return int(hashlib.sha1(f"{seed}:{normalize(d.text)}".encode()).hexdigest()[:12], 16) / 16 ** 12
    us = [u(d) for d in docs]
    train = [d for d, x in zip(docs, us) if x >= val_fraction]
    val = [d for d, x in zip(docs, us) if x < val_fraction]
    if not val and val_fraction > 0 and len(docs) > 1:    # tiny corpora: still hold out one document
        j = int(np.argmin(us))
        val, train = [docs[j]], [d for i, d in enumerate(docs) if i != j]
    return train, val


def tokenize_documents(docs: list[Document], encode: Callable[[str], list[int]], bos_id: int | None = None,
                       verbose: bool = False) -> list[list[int]]:
    """[bos_id] + encode(text) per document (the BOS marks each document start)."""
    pre = [bos_id] if bos_id is not None else []
    return [pre + list(encode(d.text)) for d in tqdm(docs, desc="tokenize", disable=not verbose)]


@dataclass
class PackedData:
    """Documents packed end to end into rows of T+1 tokens.

    Row r holds stream[r*T : r*T+T+1], so consecutive rows overlap by one token and every stream
    token after the first is a target exactly once. A document that crosses a row boundary goes on
    in the next row as a new document for masking purposes (positions restart at 0 there): each row
    stands alone, as Krell et al. 2021 pack, at the cost of a little context at the cut."""
    ids: np.ndarray                     # [N, T+1] int32 tokens (pad_id after the stream ends)
    doc_ids: np.ndarray                 # [N, T+1] int32 index of the source document; -1 = padding
    pad_id: int = 0
    loss_mask: np.ndarray | None = None  # [N, T+1] uint8, 1 = this token is a target (post-training: what the
                                         # assistant wrote); None = every token is (pretraining)

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1] - 1

    def __len__(self) -> int:
        return self.ids.shape[0]

    def batch(self, rows) -> dict[str, torch.Tensor]:
        """input_ids, targets (-100 where the next token starts another document or is padding),
        doc_ids and position_ids of the inputs, all [B, T] int64."""
        ids, doc = self.ids[rows].astype(np.int64), self.doc_ids[rows].astype(np.int64)
        x, y, dx = ids[:, :-1], ids[:, 1:].copy(), doc[:, :-1]
        y[(doc[:, 1:] != dx) | (doc[:, 1:] < 0)] = -100     # never predict across a document boundary
        if self.loss_mask is not None:                       # completion-only: prompts carry no loss
            y[self.loss_mask[rows][:, 1:] == 0] = -100
        doc_ids = torch.from_numpy(dx.copy())
        return dict(input_ids=torch.from_numpy(x.copy()), targets=torch.from_numpy(y), doc_ids=doc_ids,
                    position_ids=positions_from_doc_ids(doc_ids))   # restart at 0 in each document


def pack(token_docs: list[list[int]], seq_len: int, pad_id: int = 0,
         loss_masks: list[list[int]] | None = None) -> PackedData:
    """Concatenate documents into one stream and cut rows of seq_len+1 tokens (see PackedData).
    loss_masks (one 0/1 list per document) mark which tokens are targets; the mask travels with its tokens."""
    keep = [i for i, d in enumerate(token_docs) if len(d)]
    if not keep:
        raise ValueError("pack: no tokens to pack")
    token_docs = [token_docs[i] for i in keep]
    T = seq_len
    stream = np.concatenate([np.asarray(d, dtype=np.int32) for d in token_docs])
    doc = np.repeat(np.arange(len(token_docs), dtype=np.int32), [len(d) for d in token_docs])
    N = max(1, -(-(len(stream) - 1) // T))                   # ceil((L-1)/T) rows cover every target
    total = N * T + 1
    stream = np.concatenate([stream, np.full(total - len(stream), pad_id, np.int32)])
    doc = np.concatenate([doc, np.full(total - len(doc), -1, np.int32)])
    idx = np.arange(N)[:, None] * T + np.arange(T + 1)[None, :]   # (N, T+1)
    mask = None
    if loss_masks is not None:
        mask = np.concatenate([_mask_of(loss_masks[i], token_docs[j]) for j, i in enumerate(keep)])
        mask = np.concatenate([mask, np.zeros(total - len(mask), np.uint8)])[idx]
    return PackedData(stream[idx], doc[idx], pad_id, mask)


def _mask_of(mask, doc) -> np.ndarray:
    if len(mask) != len(doc):
        raise ValueError(f"a loss mask has {len(mask)} entries for a document of {len(doc)} tokens")
    return np.asarray(mask, dtype=np.uint8)


def pack_whole(token_docs: list[list[int]], seq_len: int, pad_id: int = 0,
               loss_masks: list[list[int]] | None = None) -> PackedData:
    """Pack documents into rows WITHOUT cutting any (first-fit, longest first): a chat example split across rows
    would lose its prompt, so post-training packs whole conversations and pads the rest of each row. A
    document longer than seq_len tokens is an error (the caller decides to truncate or drop). doc_ids keep
    each document's index in token_docs, so per-sequence sums (log-probs of a completion) can be gathered."""
    T1 = seq_len + 1
    lens = [len(d) for d in token_docs]
    if not token_docs or min(lens) == 0:
        raise ValueError("pack_whole: need at least one document and no empty ones")
    if max(lens) > seq_len:
        raise ValueError(f"pack_whole: a document of {max(lens)} tokens does not fit a row of {seq_len}")
    # each row holds at most seq_len tokens of documents: the (T+1)-th slot is a target only, never an input, and
    # a reward model reads its score AT a sequence's last token, which must therefore be an input
    rows, free = [], []                       # rows[r] = document indices; free[r] = slots left
    for i in sorted(range(len(token_docs)), key=lambda i: -lens[i]):
        r = next((r for r, f in enumerate(free) if f >= lens[i]), None)
        if r is None:
            rows.append([]), free.append(seq_len)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lens[i]
    ids = np.full((len(rows), T1), pad_id, np.int32)
    doc = np.full((len(rows), T1), -1, np.int32)
    mask = np.zeros((len(rows), T1), np.uint8) if loss_masks is not None else None
    for r, members in enumerate(rows):
        t = 0
        for i in sorted(members):
            ids[r, t:t + lens[i]], doc[r, t:t + lens[i]] = token_docs[i], i
            if mask is not None:
                mask[r, t:t + lens[i]] = _mask_of(loss_masks[i], token_docs[i])
            t += lens[i]
    return PackedData(ids, doc, pad_id, mask)


def pack_documents(docs: list[Document], encode: Callable[[str], list[int]], bos_id: int | None,
                   seq_len: int, pad_id: int = 0) -> PackedData:
    return pack(tokenize_documents(docs, encode, bos_id), seq_len, pad_id)


class Loader:
    """Shuffled rows, epoch after epoch, forever; exactly resumable from a small JSON-able state.

    The row order is one long stream: epoch e's permutation comes from the seed and e alone, so the
    state is just (epoch, position). With world_size > 1 each step takes batch_size*world_size rows
    of the stream and rank r gets its slice, so ranks never see the same row in one step."""

    def __init__(self, packed: PackedData, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.packed, self.batch_size, self.seed = packed, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position, self._perm = 0, 0, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.packed)))
        return self._perm[1]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        need, rows = self.batch_size * self.world_size, []
        while len(rows) < need:
            perm = self._permutation(self.epoch)
            take = perm[self.position:self.position + need - len(rows)]
            rows.extend(take.tolist())
            self.position += len(take)
            if self.position >= len(perm):
                self.epoch, self.position = self.epoch + 1, 0
        return self.packed.batch(rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, position=self.position, seed=self.seed, batch_size=self.batch_size,
                    world_size=self.world_size, rows=len(self.packed))

    def load_state_dict(self, state: dict):
        for k in ("seed", "batch_size", "world_size", "rows"):
            mine = self.state_dict()[k]
            if state.get(k, mine) != mine:
                raise ValueError(f"loader state has {k}={state[k]}, this loader has {mine}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

# -----------------------------------------------------------------------------------------------
# What packing means for attention: the masks over one packed row (model.attention_allowed)


def plot_masks(out_file: str, doc_lens=(11, 7, 14), window=4):
    """Draw the masks of a sliding and a full layer over one packed row of several documents."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    plt = pyplot()

    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(doc_lens)])[None]
    pos = positions_from_doc_ids(doc_ids)
    q, k = (pos[:, :, None], pos[:, None, :])
    dq, dk = doc_ids[:, :, None], doc_ids[:, None, :]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    for ax, (title, W) in zip(axes, [(f"sliding layer (RoPE), W={window} keys incl. self", window),
                                     ("full layer (NoPE)", None)]):
        ax.imshow(attention_allowed(q, k, dq, dk, W)[0].numpy(), cmap="Blues", interpolation="nearest")
        ax.set_title(title)
        ax.set_xlabel("key index")
        ax.set_ylabel("query index")
        for b in torch.tensor(doc_lens).cumsum(0)[:-1].tolist():
            ax.axhline(b - 0.5, color="tab:red", lw=0.8)
            ax.axvline(b - 0.5, color="tab:red", lw=0.8)
    fig.suptitle(f"Document-masked attention over one packed row (documents of {list(doc_lens)} tokens)")
    fig.legend(handles=[Patch(color=plt.get_cmap("Blues")(1.0), label="query may attend to key"),
                        Patch(facecolor="white", edgecolor="0.6", label="blocked"),
                        Line2D([], [], color="tab:red", lw=0.8, label="document boundary")],
               loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, out_file)
    return out_file


# -----------------------------------------------------------------------------------------------

if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Build the pretraining corpus (dedup, filters, quality "
                                "classifier, mix) and write its data card.")
    p.add_argument("--data", default=None, help="your text/JSONL file or folder (default: the stdlib corpus)")
    p.add_argument("--max-mb", type=float, default=8.0, help="cap on stdlib text read, in MB")
    p.add_argument("--synthetic", type=int, default=DataConfig.synthetic_docs, help="documents per generator")
    p.add_argument("--junk", type=int, default=DataConfig.junk_docs, help="planted low-quality documents")
    p.add_argument("--min-quality", type=float, default=DataConfig.min_quality, help="ML filter threshold")
    p.add_argument("--alpha", type=float, default=DataConfig.upweight_alpha, help="weight = 1 + alpha * score percentile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/data", help="folder for data_card.json and data_card.png")
    p.add_argument("--plot-masks", metavar="FILE", help="only draw the sliding/full attention masks of a packed row "
                   "of three documents to a PNG")
    a = p.parse_args()
    if a.plot_masks:
        print(f"wrote {plot_masks(a.plot_masks)}")
        raise SystemExit(0)
    cfg = DataConfig(data=a.data, max_bytes=int(a.max_mb * 1e6), synthetic_docs=a.synthetic, junk_docs=a.junk,
                     min_quality=a.min_quality, upweight_alpha=a.alpha, seed=a.seed)
    try:
        docs, card = build_corpus(cfg)
    except (FileNotFoundError, ValueError) as e:    # bad --data: a message, not a traceback
        p.error(str(e))
    out = card.save(a.out)
    print(f'wrote {out / "data_card.json"} and {out / "data_card.png"}')
    print(json.dumps(dict(docs=len(docs), mb=card.info["mb"], seconds=card.info["seconds"],
                          domains={k: v["docs"] for k, v in card.mix.items()},
                          quality_auc=card.info["quality_auc_heldout"], safety_auc=card.info["safety_auc_heldout"],
                          out=str(out))))
