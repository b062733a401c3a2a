"""Tests for data.py and corpus.py (its sources): dedup, filters, quality classifier, safety filters, packing,
splits, loader, sources, mixes."""

import json
from collections import Counter
import random
import re

import numpy as np
import pytest
import torch

import corpus
import data
from data import Document

ENC = lambda s: list(s.encode('utf-8'))     # byte-level stand-in for the tokenizer
BOS = 256

GOOD_PROSE = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch. "
              "It is a sentence that has been used to test typewriters and fonts for a long time, and "
              "it contains every letter of the English alphabet at least once. Teachers like it because "
              "students can practise their handwriting with a single memorable line of text.")
GOOD_CODE = '''def mean(xs):
    """Return the arithmetic mean of a non-empty list of numbers."""
    total = 0.0
    for x in xs:
        total += x
    return total / len(xs)


def variance(xs):
    """Return the population variance of xs."""
    m = mean(xs)
    return sum((x - m) ** 2 for x in xs) / len(xs)
'''
TERSE_CODE = '''import os
import sys


def walk(root):
    out = []
    for d, dirs, files in os.walk(root):
        for f in files:
            if f.endswith('.py'):
                out.append(os.path.join(d, f))
    return sorted(out)


if __name__ == '__main__':
    print(len(walk(sys.argv[1])))
'''


_rng = random.Random(1234)
VOCAB = [''.join(_rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(_rng.randint(3, 9))) for _ in range(3000)]


def words(n, seed):
    """n random made-up words (no English stop words), reproducible by seed."""
    rng = random.Random(seed)
    return [rng.choice(VOCAB) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# dedup

def test_exact_dedup_removes_case_and_whitespace_variants():
    docs = [Document('Hello World.\nThis is a test.', 'prose'),
            Document('hello   world.  this IS a test.', 'prose'),       # same text up to case/space
            Document('  HELLO WORLD. THIS IS A TEST.\n\n', 'prose'),
            Document('Hello World. This is another test.', 'prose')]
    kept, removed = data.exact_dedup(docs)
    assert kept == [docs[0], docs[3]]                                  # the first copy survives
    assert removed == [docs[1], docs[2]]


def test_minhash_signature_agreement_estimates_jaccard():
    a = ' '.join(words(400, 0))
    w = a.split()
    b = ' '.join(w[:300] + words(100, 1))                               # shares ~3/4 of its text
    sa, sb = data.shingle_hashes(a), data.shingle_hashes(b)
    true = len(np.intersect1d(sa, sb)) / len(np.union1d(sa, sb))
    sig = data.minhash_signatures([sa, sb], num_perm=256)
    est = np.mean(sig[0] == sig[1])
    assert 0.3 < true < 0.9 and abs(est - true) < 0.1


def test_lsh_params_put_the_s_curve_near_the_threshold():
    b, r = data.lsh_params(128, 0.8)
    assert b * r <= 128
    midpoint = (1 / b) ** (1 / r)                                      # where P(candidate) ~ 1/2
    assert 0.7 < midpoint < 0.85


def test_near_dedup_removes_edited_copy_and_keeps_distinct_documents():
    base = words(300, 2)
    edited = list(base)
    for i in (17, 151, 280):                                           # a few words changed (Jaccard ~0.9)
        edited[i] = 'changed'
    header = words(120, 3)                                             # a long common header...
    doc_a = ' '.join(header + words(500, 4))                           # ...but mostly different bodies
    doc_b = ' '.join(header + words(500, 5))
    docs = [Document(' '.join(base), 'prose', 'orig'), Document(' '.join(words(300, 6)), 'prose', 'other'),
            Document(' '.join(edited), 'prose', 'edited'), Document(doc_a, 'prose', 'a'), Document(doc_b, 'prose', 'b')]
    kept, removed = data.near_dedup(docs, threshold=0.8)
    assert [d.origin for d in removed] == ['edited']
    assert [d.origin for d in kept] == ['orig', 'other', 'a', 'b']


def test_near_dedup_verifies_lsh_candidates():
    # 30 pairs at Jaccard ~0.67: about 1 in 5 shares an LSH band by chance (a candidate), but the
    # signature check must reject every one of them, since 0.67 < 0.8.
    docs = []
    for j in range(30):
        w = words(300, 100 + j)
        docs += [Document(' '.join(w), 'prose'), Document(' '.join(words(55, 200 + j) + w[55:]), 'prose')]
    sig = data.minhash_signatures([data.shingle_hashes(d.text) for d in docs])
    b, r = data.lsh_params(128, 0.8)
    bands = lambda i: {sig[i, k * r:(k + 1) * r].tobytes() for k in range(b)}
    assert sum(bool(bands(2 * j) & bands(2 * j + 1)) for j in range(30)) >= 2   # candidates do occur
    kept, removed = data.near_dedup(docs)
    assert removed == []


def test_near_dedup_clusters_keep_the_earliest_member():
    base = words(300, 7)
    copies = []
    for j in range(4):                                                 # 4 light edits of one text
        w = list(base)
        w[20 + 50 * j] = f'edit{j}'
        copies.append(Document(' '.join(w), 'prose', f'copy{j}'))
    kept, removed = data.near_dedup(copies + [Document(' '.join(words(300, 8)), 'prose', 'x')])
    assert [d.origin for d in kept] == ['copy0', 'x'] and len(removed) == 3


# ------------------------------------------------------------------------------------------------
# heuristic filters

PLANTED = {
    'lorem_ipsum': Document('Lorem ipsum dolor sit amet. ' + GOOD_PROSE, 'prose'),
    'boilerplate': Document('\n'.join(['Copyright (c) 2020 ACME. All rights reserved.', 'Licensed under the MIT license.',
                                       'Permission is hereby granted, free of charge.', GOOD_PROSE]), 'prose'),
    'too_short': Document('The cat sat on the mat with the hat.', 'prose'),
    'mean_word_length': Document(' '.join(['supercalifragilisticexpialidocious'] * 40 + ['the', 'of', 'and']), 'prose'),
    'symbol_ratio': Document(' '.join(f'#tag{i} the of and word' for i in range(30)) + ' ### ' * 20, 'prose'),
    'alpha_words': Document(' '.join(words(20, 14) + ['-----', '=====', '|||||', '<<>>', '~~~~'] * 10), 'prose'),
    'stop_words': Document(' '.join(words(80, 9)), 'prose'),
    'duplicate_lines': Document('\n'.join(['Read more about the offer and the terms here.'] * 12 + [GOOD_PROSE]), 'prose'),
    'top_ngram': Document(' '.join(['the', 'big', 'dog'] * 10) + ' ' + ' '.join(words(60, 10)) + ' of and', 'prose'),
    'duplicate_ngrams': Document(' '.join(words(40, 11) + ['of', 'the', 'and']) + ' ' + ' '.join(words(12, 12)) * 4
                                 + ' ' + ' '.join(words(30, 13)), 'prose'),
    # code rules
    'autogenerated': Document('# This file was generated by gencodec.py. DO NOT EDIT.\n' + GOOD_CODE, 'code'),
    'long_lines': Document(GOOD_CODE + 'TABLE = "' + 'x' * 2000 + '"\n', 'code'),
    'alnum_ratio': Document(GOOD_CODE[:60] + '\n' + '\n'.join('    (-1, +1, -2, +2), # ;;; ==' for _ in range(60)), 'code'),
}


@pytest.mark.parametrize('rule', sorted(PLANTED))
def test_each_heuristic_rule_fires_on_its_planted_document(rule):
    assert data.heuristic_reason(PLANTED[rule]) == rule


def test_heuristics_keep_good_prose_code_and_synthetic_data():
    good = [Document(GOOD_PROSE, 'prose'), Document(GOOD_CODE, 'code')]
    good += data.synthetic_math(20, 0) + data.synthetic_prose(20, 0) + data.synthetic_code(20, 0)
    assert [data.heuristic_reason(d) for d in good] == [None] * len(good)
    kept, removed = data.heuristic_filter(good + [PLANTED['stop_words'], PLANTED['long_lines']])
    assert kept == good and [r for _, r in removed] == ['stop_words', 'long_lines']


def test_code_uses_code_thresholds():
    # The same terse text is fine as code and fails as prose (no English stop words, short tokens).
    assert data.heuristic_reason(Document(TERSE_CODE, 'code')) is None
    assert data.heuristic_reason(Document(TERSE_CODE, 'prose')) is not None
    assert data.heuristic_reason(Document(TERSE_CODE, 'synthetic-code')) is None
    assert data.heuristic_reason(Document('x = 1\n', 'code')) == 'too_short'


# ------------------------------------------------------------------------------------------------
# quality classifier

def test_quality_classifier_ranks_heldout_educational_above_junk():
    pos = [d.text for d in data.synthetic_math(120, 1) + data.synthetic_prose(120, 1)]
    random.Random(0).shuffle(pos)
    vocab = sorted({w for p in pos for w in p.split() if w.isalpha()})
    neg = [d.text for d in data.junk_documents(240, seed=3, vocab=vocab)]
    clf = data.QualityClassifier(buckets=2 ** 16).fit(pos[:180] + neg[:180], [1] * 180 + [0] * 180, steps=80)
    sp, sn = clf.predict(pos[180:]), clf.predict(neg[180:])
    assert data.auc(sp, sn) > 0.95
    assert sp.mean() - sn.mean() > 0.5
    # word salad shares the positives' unigrams: it is the bigrams that separate it
    salad = [t for i, t in enumerate(neg[180:]) if (180 + i) % 6 == 0]
    assert clf.predict(salad).max() < sp.min() + 0.2


def test_quality_classifier_uses_word_order_through_bigrams():
    # A document and its own shuffled words have identical unigram features: only bigrams tell them apart.
    rng = random.Random(0)
    pos = [d.text for d in data.synthetic_prose(150, 2) + data.synthetic_math(150, 2)]
    rng.shuffle(pos)
    shuffled = [' '.join(rng.sample(t.split(), len(t.split()))) for t in pos]
    clf = data.QualityClassifier(buckets=2 ** 16).fit(pos[:240] + shuffled[:240], [1] * 240 + [0] * 240, steps=80)
    assert data.auc(clf.predict(pos[240:]), clf.predict(shuffled[240:])) > 0.9


def test_auc_is_the_ranking_probability():
    assert data.auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert data.auc([0.1], [0.9]) == 0.0
    assert data.auc([0.5], [0.5]) == 0.5


# ------------------------------------------------------------------------------------------------
# safety: source blocklist and classifier

def test_origin_source_and_blocklist_match_hosts_at_a_dot():
    assert data.origin_source('https://www.A.example:8080/x?q=1') == 'a.example'
    assert data.origin_source('synthetic-math:17') == 'synthetic-math'
    assert data.origin_source('json/decoder.py') == 'json/decoder.py'
    bl = ('bad.example', 'pydoc')
    assert data.blocked_by('http://forum.bad.example/t/1', bl) == 'bad.example'     # a subdomain is blocked
    assert data.blocked_by('https://notbad.example/t/1', bl) is None               # a longer name is not
    assert data.blocked_by('https://blog.example/bad.example', bl) is None         # nor a path that names it
    assert data.blocked_by('pydoc:assert', bl) == 'pydoc'


def test_blocklist_removes_blocked_sources_and_nothing_else():
    blocked = corpus.UNSAFE_HOSTS[:2]
    origins = [f'https://{blocked[0]}/a', f'https://www.{blocked[0]}/b', f'https://m.{blocked[1]}/c',
               'https://blog.example/d', f'https://not{blocked[0]}/e', 'pydoc:assert', 'json/decoder.py',
               f'https://{corpus.UNSAFE_HOSTS[2]}/f']                          # blocked in general, not by this list
    docs = [Document(GOOD_PROSE, 'web', o) for o in origins]                    # same safe text: only the source counts
    kept, why = data.blocklist_filter(docs, blocked)
    assert [d.origin for d in kept] == origins[3:]
    assert why == Counter({blocked[0]: 2, blocked[1]: 1})
    assert data.blocklist_filter(docs, ())[0] == docs


def test_unsafe_and_lookalike_generators_are_seeded_and_pass_the_heuristics():
    u, b = corpus.unsafe_documents(200, seed=5), corpus.benign_lookalikes(200, seed=5)
    assert [d.text for d in u] == [d.text for d in corpus.unsafe_documents(200, seed=5)]
    assert [d.text for d in b] == [d.text for d in corpus.benign_lookalikes(200, seed=5)]
    assert not {d.text for d in u} & {d.text for d in corpus.unsafe_documents(200, seed=6)}
    n_blocked = sum(data.blocked_by(d.origin, corpus.UNSAFE_HOSTS) is not None for d in u)
    assert 70 < n_blocked < 130                                                 # about half from blocked hosts
    assert not any(data.blocked_by(d.origin, corpus.UNSAFE_HOSTS) for d in b)
    assert sum(data.heuristic_reason(d) is None for d in u + b) > 0.9 * 400  # they reach the safety stages
    shared = {'kill', 'bomb', 'shoot', 'attack', 'exploit', 'weapons', 'malware', 'war'}
    vocab = lambda ds: {w for d in ds for w in re.findall(r'[a-z]+', d.text.lower())}
    assert shared <= vocab(u) & vocab(b)                                        # the trigger words are shared


def safety_corpus():
    own = data.synthetic_prose(80, 1) + data.synthetic_math(80, 1) + data.synthetic_code(80, 1)
    own += [Document(GOOD_PROSE, 'prose', 'p'), Document(GOOD_CODE, 'code', 'c')]
    unsafe = corpus.unsafe_documents(60, seed=50, blocked_fraction=0.0)     # ordinary hosts: only the classifier
    alike = corpus.benign_lookalikes(60, seed=50)
    return own, unsafe, alike


SAFETY_CFG = data.DataConfig(safety_train_docs=200, safety_steps=60, quality_buckets=2 ** 16)


def test_safety_classifier_removes_unsafe_and_keeps_lookalikes_and_clean_text():
    own, unsafe, alike = safety_corpus()
    kept, removed, heldout = data.safety_filter(own + unsafe + alike, SAFETY_CFG)
    gone = {id(d) for d in removed}
    assert sum(id(d) in gone for d in unsafe) >= 0.9 * len(unsafe)
    assert sum(id(d) not in gone for d in alike) >= 0.9 * len(alike)
    assert sum(id(d) not in gone for d in own) >= 0.99 * len(own)
    assert len(kept) + len(removed) == len(own + unsafe + alike) and heldout > 0.95
    again = data.safety_filter(own + unsafe + alike, SAFETY_CFG)                # same seed, same result
    assert [d.text for d in again[0]] == [d.text for d in kept] and again[2] == heldout


def test_lookalike_negatives_are_what_keep_the_lookalikes():
    # the same classifier trained without look-alike negatives reads "kill"/"bomb"/"shoot" as unsafe: the
    # property the test above checks is not one any classifier has for free
    own, unsafe, alike = safety_corpus()
    pos = [d.text for d in corpus.unsafe_documents(160, seed=3)]
    clf = data.QualityClassifier(2 ** 16).fit(pos + [d.text for d in own[:160]], [1] * 160 + [0] * 160, 60)
    assert (clf.predict([d.text for d in alike]) > 0.5).mean() > 0.5


# ------------------------------------------------------------------------------------------------
# packing

def make_token_docs(seed=0, n=40, bos=BOS):
    rng = random.Random(seed)
    return [[bos] + [rng.randrange(256) for _ in range(rng.choice([0, 1, 3, 7, 20, 33, 70]))] for _ in range(n)]


def test_pack_rows_doc_ids_positions_and_no_cross_document_targets():
    T = 16
    docs = make_token_docs()
    p = data.pack(docs, T)
    L = sum(map(len, docs))
    assert p.ids.shape == p.doc_ids.shape == (-(-(L - 1) // T), T + 1) and p.ids.dtype == np.int32
    b = p.batch(np.arange(len(p)))
    x, y, d, pos = b['input_ids'].numpy(), b['targets'].numpy(), b['doc_ids'].numpy(), b['position_ids'].numpy()
    assert x.shape == y.shape == d.shape == pos.shape == (len(p), T)
    assert all(t.dtype == torch.int64 for t in b.values())
    # every non-first token of every document is a target exactly once; nothing else is
    want = Counter((i, j) for i, doc in enumerate(docs) for j in range(1, len(doc)))
    got = []
    flat_doc, flat_off = doc_offsets(docs)
    for r in range(len(p)):
        for t in range(T):
            if y[r, t] != -100:
                s = r * T + t + 1                                     # stream index of the target
                assert y[r, t] == p.ids[r, t + 1] and flat_doc[s] == d[r, t]
                got.append((flat_doc[s], flat_off[s]))
    assert Counter(got) == want
    # -100 at every boundary: where the next token starts another document (its BOS) or is padding
    nxt = p.doc_ids[:, 1:]
    assert ((y == -100) == ((nxt != d) | (nxt < 0))).all()
    bos_targets = (p.ids[:, 1:] == BOS) & (y != -100)
    assert not bos_targets.any()                                       # BOS is never predicted
    # positions restart at 0 at each document start and at each row start, and count up within
    for r in range(len(p)):
        for t in range(T):
            if t == 0 or d[r, t] != d[r, t - 1]:
                assert pos[r, t] == 0
            else:
                assert pos[r, t] == pos[r, t - 1] + 1


def doc_offsets(docs):
    flat_doc = [i for i, doc in enumerate(docs) for _ in doc]
    flat_off = [j for doc in docs for j in range(len(doc))]
    return flat_doc, flat_off


def test_pack_splits_long_documents_and_pads_the_last_row():
    p = data.pack([[BOS] + list(range(1, 40))], seq_len=8, pad_id=0)   # one 40-token document
    assert len(p) == 5                                                 # ceil(39 / 8)
    assert (p.ids[:, 1:].ravel()[:39] == np.arange(1, 40)).all()       # rows overlap by one token
    assert (p.doc_ids[-1] == [0] * 8 + [-1]).all()                     # one pad, doc id -1
    b = p.batch([4])
    assert b['targets'][0, -1] == -100                                 # never learn to predict padding
    assert b['position_ids'][0, 0] == 0                                # a continuation chunk restarts
    with pytest.raises(ValueError):
        data.pack([[], []], 8)


def test_split_documents_is_disjoint_deterministic_and_order_free():
    docs = [Document(f'document number {i} ' + ' '.join(words(20, i)), 'prose') for i in range(500)]
    train, val = data.split_documents(docs, 0.1, seed=0)
    assert 20 < len(val) < 80 and len(train) + len(val) == 500
    assert not {d.text for d in train} & {d.text for d in val}
    train2, val2 = data.split_documents(list(reversed(docs)), 0.1, seed=0)
    assert {d.text for d in val2} == {d.text for d in val}
    assert {d.text for d in data.split_documents(docs, 0.1, seed=1)[1]} != {d.text for d in val}
    # a case/whitespace variant of a validation document goes to validation too
    variant = Document(val[0].text.upper() + '  ', 'prose')
    assert data.split_documents(docs + [variant], 0.1, seed=0)[1][-1] is variant
    # tiny corpora still hold out one document
    assert len(data.split_documents(docs[:3], 0.01)[1]) == 1


# ------------------------------------------------------------------------------------------------
# loader

def test_loader_is_deterministic_covers_each_epoch_and_resumes_exactly():
    p = data.pack(make_token_docs(n=60), 8)
    N = len(p)
    ref = data.Loader(p, batch_size=5, seed=3)
    batches = [next(ref) for _ in range(3 * N // 5 + 2)]               # crosses epoch boundaries
    again = data.Loader(p, batch_size=5, seed=3)
    assert all(torch.equal(a['input_ids'], next(again)['input_ids']) for a in batches)
    other = data.Loader(p, batch_size=5, seed=4)
    assert not all(torch.equal(a['input_ids'], next(other)['input_ids']) for a in batches[:3])
    # the first epoch visits every row exactly once
    rows = data.Loader(p, batch_size=1, seed=3)
    first = [next(rows)['input_ids'][0] for _ in range(N)]
    assert len({tuple(r.tolist()) for r in first}) == len({tuple(r.tolist()) for r in p.ids[:, :-1]})
    # stop at k, save (JSON round trip), resume in a fresh loader: the same batches follow
    for k in (0, 1, N // 5, N // 5 + 1, 7):
        l1 = data.Loader(p, batch_size=5, seed=3)
        for _ in range(k):
            next(l1)
        state = json.loads(json.dumps(l1.state_dict()))
        l2 = data.Loader(p, batch_size=5, seed=3)
        l2.load_state_dict(state)
        for j in range(k, k + 6):
            b = next(l2)
            assert all(torch.equal(b[key], batches[j][key]) for key in b)
    with pytest.raises(ValueError):
        data.Loader(p, batch_size=4, seed=3).load_state_dict(state)


def test_loader_ranks_get_disjoint_slices_of_one_global_batch():
    p = data.pack([[BOS] + [i % 200 + 1] * 1 for i in range(400)], 4)  # distinct rows
    ranks = [data.Loader(p, 3, seed=0, rank=r, world_size=2) for r in range(2)]
    single = data.Loader(p, 6, seed=0)
    for _ in range(5):
        a, b, s = next(ranks[0]), next(ranks[1]), next(single)
        assert torch.equal(torch.cat([a['input_ids'], b['input_ids']]), s['input_ids'])


# ------------------------------------------------------------------------------------------------
# sources

def test_load_user_data_txt_jsonl_and_folder(tmp_path):
    (tmp_path / 'a.txt').write_text('A plain text document.')
    (tmp_path / 'sub').mkdir()
    (tmp_path / 'sub' / 'b.py').write_text('print("hi")\n')
    (tmp_path / 'sub' / 'c.jsonl').write_text('{"text": "first"}\n\n{"text": "second", "domain": "math"}\n')
    (tmp_path / 'image.png').write_bytes(b'\x89PNG\x00\xff')           # not a text extension: ignored
    docs = data.load_user_data(tmp_path)
    assert [(d.text, d.domain) for d in docs] == [('A plain text document.', 'prose'), ('print("hi")\n', 'code'),
                                                  ('first', 'prose'), ('second', 'math')]
    assert docs[3].origin.endswith('c.jsonl:3')
    (tmp_path / 'w.jsonl').write_text('{"text": "a page", "url": "https://x.example/p"}\n')
    assert data.load_user_data(tmp_path / 'w.jsonl')[0].origin == 'https://x.example/p'   # what the blocklist reads
    assert [d.text for d in data.load_user_data(tmp_path / 'sub' / 'c.jsonl')] == ['first', 'second']
    assert data.load_user_data(tmp_path / 'a.txt', domain='web')[0].domain == 'web'


def test_load_user_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope'):
        data.load_user_data(tmp_path / 'nope')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no documents'):
        data.load_user_data(tmp_path / 'empty')
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r'bad\.jsonl:2'):
        data.load_user_data(bad)
    nofield = tmp_path / 'nofield.jsonl'
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r'nofield\.jsonl:1.*text'):
        data.load_user_data(nofield)
    # non-UTF-8: an error when named, a warning and a skip inside a folder
    d = tmp_path / 'mixed'
    d.mkdir()
    (d / 'latin1.txt').write_bytes('caf\xe9'.encode('latin-1'))
    (d / 'good.txt').write_text('fine')
    with pytest.raises(ValueError, match='latin1.txt'):
        data.load_user_data(d / 'latin1.txt')
    with pytest.warns(UserWarning, match='latin1.txt'):
        docs = data.load_user_data(d)
    assert [x.text for x in docs] == ['fine']


def test_synthetic_generators_are_seeded_and_correct():
    for gen in (data.synthetic_math, data.synthetic_code, data.synthetic_prose, data.synthetic_recall,
                data.junk_documents):
        a, b, c = gen(30, seed=1), gen(30, seed=1), gen(30, seed=2)
        assert [d.text for d in a] == [d.text for d in b]
        assert [d.text for d in a] != [d.text for d in c]
        assert len(a) == 30 and len({d.text for d in a}) > 20
    for d in data.synthetic_code(40, seed=5):                          # the asserts in the corpus pass
        exec(compile(d.text, d.origin, 'exec'), {})
    arith = 0
    for d in data.synthetic_math(40, seed=5):                          # every worked step is true
        for a, op, b, c in re.findall(r'\$?(\d+) ([x+-]) \$?(\d+) = \$?(\d+)', d.text):
            a, b, c = int(a), int(b), int(c)
            assert {'x': a * b, '+': a + b, '-': a - b}[op] == c
            arith += 1
    assert arith > 40
    for d in data.synthetic_recall(40, seed=5):         # every lookup and copy answers from the register
        lines = d.text.splitlines()
        register = ' '.join(l for l in lines[1:] if not l.startswith(('Lookups', 'Copied', 'The register')))
        copied = next(l for l in lines if l.startswith('Copied out: '))[len('Copied out: '):-1].split(', ')
        for name, value in (c.rsplit(' ', 1) for c in copied):
            assert re.search(rf'\b{name}\b[^.]*\b{value}\b|\b{value}\b[^.]*\b{name}\b', register)
        again = next(l for l in lines if l.startswith('The register again'))
        assert again.endswith(' '.join(lines[1:1 + len(copied)]))          # word for word
        assert data.heuristic_reason(d) is None                           # the repetition filters skip them
    pool = ['alpha', 'beta', 'gamma', 'delta', 'omega']
    for words in (None, pool):                          # copy exercises: the line, then the same line
        a, b = data.synthetic_copy(20, seed=3, words=words), data.synthetic_copy(20, seed=3, words=words)
        assert [d.text for d in a] == [d.text for d in b] != [d.text for d in data.synthetic_copy(20, 4, words)]
        for d in a:
            _, text, copy = d.text.splitlines()
            assert text.startswith('Text: ') and copy == 'Copy: ' + text[len('Text: '):]
            assert words is None or set(text[6:-1].split()) <= set(pool)
            assert data.heuristic_reason(d) is None


def test_stdlib_documents_small_cap():
    docs = data.stdlib_documents(max_bytes=400_000)
    domains = {d.domain for d in docs}
    assert {'code', 'prose', 'reference'} <= domains
    assert not any(part in ('test', 'tests', 'site-packages') for d in docs for part in re.split(r'[/\\]', d.origin))
    code = [d for d in docs if d.domain == 'code']
    assert all(d.origin.endswith('.py') for d in code)
    total = sum(len(d.text.encode()) for d in docs)
    assert 400_000 <= total < 1_000_000                                # the cap, overshot by at most one file
    assert len(data.stdlib_documents(max_bytes=800_000)) > len(docs)
    assert [d.text for d in data.stdlib_documents(max_bytes=400_000)] == [d.text for d in docs]
    prose = [d for d in docs if d.domain == 'prose']
    assert prose and all(len(d.text) >= 200 for d in prose)


def test_prose_extraction_finds_docstrings_and_comment_blocks():
    src = '''"""Module docstring that is long enough to be kept as prose, because it is a full sentence or two.
It keeps going on a second line so that it passes the minimum length of the extractor."""

# A block of comments that explains why the code does what it does, over
# several lines, so that it is long enough to become a prose document of its
# own when the extractor gathers consecutive full-line comments together.
x = 1  # an inline comment is not prose

def f():
    """Function docstring that also explains a thing at length, with enough words to pass the bar,
    and a second line to be sure it is over the minimum number of characters for prose."""
    s = "a string that is not a docstring because it is assigned to a variable, even if very long..."
    return s
'''
    out = corpus._prose_from_source(src, 'mod', min_chars=150)
    assert len(out) == 3
    assert any(o.startswith('mod\n\nModule docstring') for o in out)
    assert any(o.startswith('mod.f\n\nFunction docstring') for o in out)
    assert any(o.startswith('A block of comments') and 'inline' not in o for o in out)


# ------------------------------------------------------------------------------------------------
# mixes and the pipeline

def test_cooldown_mix_takes_the_top_of_each_domain():
    docs = [Document(f'{dom} {i}', dom, quality=i / 10) for dom in ('code', 'prose') for i in range(10)]
    hq = data.high_quality_subset(docs, 0.3)
    assert sorted((d.domain, d.quality) for d in hq) == [('code', 0.7), ('code', 0.8), ('code', 0.9),
                                                         ('prose', 0.7), ('prose', 0.8), ('prose', 0.9)]
    mix = data.cooldown_mix(docs, hq_fraction=0.3, rest_fraction=0.5, seed=0)
    assert all(d in mix for d in hq) and len(mix) == 6 + 7
    assert [d.text for d in mix] == [d.text for d in data.cooldown_mix(docs, 0.3, 0.5, seed=0)]


def test_pretrain_mix_repeats_by_weight():
    docs = [Document('a', 'x', weight=2.0), Document('b', 'x', weight=1.0), Document('c', 'x', weight=1.5)]
    counts = {t: 0 for t in 'abc'}
    for s in range(200):
        for d in data.pretrain_mix(docs, seed=s):
            counts[d.text] += 1
    assert counts['a'] == 400 and counts['b'] == 200 and 260 < counts['c'] < 340


def test_long_context_mix_is_long_balanced_and_grouped():
    docs = [Document(f'code file {i} ' + 'x = 1\n' * 30, 'code', f'pkg/mod{i:03d}.py') for i in range(200)]   # big
    docs += [Document(f'prose {i} ' + 'word ' * 40, 'prose', f'doc{i:03d}') for i in range(40)]             # small
    docs += [Document('tiny', 'math', 'm')]                                                   # too little to go long
    out = data.long_context_mix(docs, ENC, min_tokens=1000, bos_id=BOS, seed=0)
    assert out and all(len(x) >= 1000 and x[0] == BOS for x in out)
    assert sum(x.count(BOS) for x in out) == len(out)                  # a concatenated group is ONE document
    code = sum(len(x) for x in out if bytes(x[1:5]) == b'code')
    prose = sum(len(x) for x in out if bytes(x[1:6]) == b'prose')
    assert code + prose == sum(map(len, out))                          # 'math' never reached 1000 tokens
    assert 0.6 < code / prose < 1.6                                    # balanced, not 6:1 as in the input
    assert out == data.long_context_mix(docs, ENC, min_tokens=1000, bos_id=BOS, seed=0)


def test_build_corpus_small_and_data_card(tmp_path):
    cfg = data.DataConfig(max_bytes=300_000, synthetic_docs=60, junk_docs=60, quality_train_docs=200,
                          quality_steps=60, unsafe_docs=60, lookalike_docs=40, safety_train_docs=200, safety_steps=60)
    docs, card = data.build_corpus(cfg, verbose=False)
    assert [s['stage'] for s in card.stages] == ['sources', 'exact_dedup', 'near_dedup', 'heuristics', 'blocklist',
                                                 'safety', 'quality']
    for a, b in zip(card.stages, card.stages[1:]):
        assert b['docs_in'] == a['docs_out'] and b['docs_out'] <= b['docs_in']
    assert card.stages[-1]['docs_out'] == len(docs)
    assert sum(1 for d in docs if d.domain == 'junk') <= 3             # planted junk is (nearly) all removed
    assert {'code', 'prose', 'synthetic-math'} <= set(card.mix)
    assert all(0 <= d.quality <= 1 and 1 <= d.weight <= 2 for d in docs)
    by_quality = sorted(docs, key=lambda d: d.quality)                 # weight rises with the score
    assert [d.weight for d in by_quality] == sorted(d.weight for d in docs)
    assert by_quality[0].weight == 1 and by_quality[-1].weight == 2
    assert card.info['quality_auc_heldout'] > 0.9
    # the safety rows: blocked hosts named in the card, the classifier catching the rest, look-alikes kept
    stage = {s['stage']: s for s in card.stages}
    assert set(stage['blocklist']['removed_by']) <= set(corpus.UNSAFE_HOSTS) and stage['blocklist']['removed_by']
    i = card.info
    assert sum(stage['blocklist']['removed_by'].values()) == i['planted_unsafe_blocked'] > 10
    assert stage['safety']['removed_by'] == {'unsafe-classifier': stage['safety']['docs_in'] - stage['safety']['docs_out']}
    assert i['planted_unsafe_removed'] >= 0.9 * i['planted_unsafe_classified'] > 10
    assert i['lookalikes_kept'] >= 0.9 * i['lookalikes_total'] > 10 and i['safety_auc_heldout'] > 0.95
    assert i['planted_unsafe_blocked'] + i['planted_unsafe_classified'] == i['planted_unsafe_total']
    assert 'safety: classifier held-out AUC' in card.summary()
    assert not any(data.blocked_by(d.origin, cfg.filters.blocklist) for d in docs)
    card.record_tokens('train', data.tokenize_documents(docs[:5], ENC, BOS))
    out = card.save(tmp_path)
    saved = json.loads((out / 'data_card.json').read_text())
    assert saved['stages'][0]['docs_in'] == card.stages[0]['docs_in'] and saved['tokens']['train'] > 0
    assert (out / 'data_card.png').stat().st_size > 1000
