"""serve.py: the engine's caches, batching and sampling, and the HTTP server end to end on loopback."""
import http.client
import json
import os
import socket
import threading
import time

import pytest
import torch

from model import CommandA, ModelConfig
from serve import ChatDecoder, ChatServer, Engine, WindowKVCache, sample_token
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W = 5


def micro(**kw):
    """3 sliding + 1 full layer, GQA, a window of 5 so short prompts already wrap the ring."""
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, sliding_window=W, max_position_embeddings=256, initializer_range=0.3)
    base.update(kw)
    return ModelConfig(**base)


def make(cfg=None, seed=0):
    torch.manual_seed(seed)
    m = CommandA(cfg or micro()).eval()
    with torch.no_grad():   # non-trivial norms; the large init spreads logits so argmax ties cannot happen
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core box: a second OpenMP thread only spins (10-20x slower tests)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return make()


@torch.no_grad()
def argmax_decode(model, prompt, n):
    """The reference: the uncached model, full recompute, argmax."""
    ids, out = torch.tensor([prompt]), []
    for _ in range(n):
        t = int(model(ids)[0, -1].argmax())
        out.append(t)
        ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return out


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (L,), generator=g).tolist() for L in lengths]


# ----------------------------------------------------------------------------------------------------------
# Engine


@pytest.mark.parametrize("lengths", [(3,), (12,), (1, 4, 5, 6, 13, 21)], ids=["short", "longer-than-W", "mixed"])
def test_greedy_equals_uncached_argmax(model, lengths):
    # max_batch=3 < 6 prompts: later prompts join while the first ones decode (continuous batching)
    engine = Engine(model, max_batch=3, max_len=64)
    prompts = prompts_of(lengths)
    got = engine.generate(prompts, 14)
    for p, g in zip(prompts, got):
        assert g == argmax_decode(model, p, 14), f"prompt of {len(p)} tokens (W={W})"
    assert engine.stats["max_active"] == min(3, len(lengths))


@torch.no_grad()
def test_chunked_prefill_wraps_ring_and_matches_uncached_logits(model):
    # chunks longer than W after the ring is full exercise the concat(old ring, chunk) path
    seq = prompts_of([30])[0]
    ref = model(torch.tensor([seq]))[0]
    cache = WindowKVCache(model.config, max_batch=2, max_len=40)
    start = 0
    for n in (7, 1, 3, 12, 1, 6):
        ids = torch.tensor([seq[start:start + n]])
        cache.begin(1, 2)          # slot 1: the cache must not assume slot 0
        logits = model(ids, position_ids=torch.arange(start, start + n)[None], cache=cache)[0]
        torch.testing.assert_close(logits, ref[start:start + n], atol=1e-4, rtol=1e-4)
        start += n
    assert int((cache.pos["sliding"][1] >= 0).sum()) == W      # the ring holds exactly W positions
    assert sorted(cache.pos["sliding"][1].tolist()) == list(range(30 - W, 30))


@pytest.mark.parametrize("T", [1, 4, 5, 6, 13, 40])
def test_kv_bytes_equal_formula(model, T):
    cfg = model.config
    # allocated for one sequence of capacity T, bf16 (the formula's default)
    assert WindowKVCache(cfg, 1, T, dtype=torch.bfloat16).nbytes() == cfg.kv_cache_bytes(T)
    # held by a sequence after generation: prompt + new - 1 positions went through the model
    engine = Engine(model, max_batch=1, max_len=64)
    n_new = 3 if T >= 3 else 1
    engine.generate(prompts_of([T - n_new + 1]), n_new, stop_tokens=[])
    assert engine.cache.held_bytes(0, bytes_per_el=2) == cfg.kv_cache_bytes(T)
    if T > W:
        assert cfg.kv_cache_bytes(T) < cfg.kv_cache_bytes(T, window_aware=False)


def test_seeded_sampling_is_deterministic(model):
    engine = Engine(model, max_batch=4, max_len=64)
    prompts = prompts_of([4, 9])
    a = engine.generate(prompts, 12, temperature=1.0, top_p=0.9, seed=7)
    b = engine.generate(prompts, 12, temperature=1.0, top_p=0.9, seed=7)
    c = engine.generate(prompts, 12, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a != c
    # prompt i uses seed + i: the same prompt alone with that seed gives the same tokens
    assert engine.generate(prompts[1:], 12, temperature=1.0, top_p=0.9, seed=9) == c[1:]
    # top_k=1 and a tiny top_p are greedy
    greedy = engine.generate(prompts, 8)
    assert engine.generate(prompts, 8, temperature=1.0, top_k=1, seed=3) == greedy
    assert engine.generate(prompts, 8, temperature=1.0, top_p=1e-6, seed=3) == greedy


def test_sample_token_respects_top_k_and_top_p():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0, -2.0])
    g = torch.Generator().manual_seed(0)
    assert {sample_token(logits, 2.0, 3, None, g) for _ in range(300)} == {0, 1, 2}
    # probabilities at T=1: 0.66, 0.24, 0.09, ...: top_p=0.8 keeps exactly the first two
    assert {sample_token(logits, 1.0, None, 0.8, g) for _ in range(300)} == {0, 1}


def test_request_joining_mid_decode_gets_same_tokens_as_alone(model):
    a, b = prompts_of([9, 3], seed=5)
    alone_a = Engine(model, max_batch=4, max_len=64).generate([a], 16)[0]
    alone_b = Engine(model, max_batch=4, max_len=64).generate([b], 10, temperature=0.8, seed=11)[0]
    engine = Engine(model, max_batch=4, max_len=64)
    ra = engine.submit(a, 16)
    for _ in range(5):
        engine.step()
    assert len(ra.out) == 6 and len(engine.active) == 1
    rb = engine.submit(b, 10, temperature=0.8, seed=11)
    engine.step()
    assert len(engine.active) == 2          # b joined a running batch
    while not (ra.done.is_set() and rb.done.is_set()):
        engine.step()
    assert ra.out == alone_a and rb.out == alone_b
    assert ra.finish_reason == rb.finish_reason == "length"


def test_stop_tokens_max_tokens_and_stream(model):
    engine = Engine(model, max_batch=4, max_len=64)
    p = prompts_of([6])[0]
    ref = argmax_decode(model, p, 10)
    stop = ref[4]
    k = ref.index(stop)
    r = engine.submit(p, 10, stop_tokens=[stop])
    while not r.done.is_set():
        engine.step()
    assert r.out == ref[:k] and r.finish_reason == "stop"    # the stop token is not returned
    assert engine.generate([p], 3) == [ref[:3]]
    prompts = prompts_of([2, 11, 7])
    streamed = [[] for _ in prompts]
    for i, t in engine.generate_stream(prompts, 9):
        streamed[i].append(t)
    assert streamed == engine.generate(prompts, 9)
    with pytest.raises(ValueError, match="exceeds the context"):
        engine.submit(p, 60)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit(p, 0)


def test_cancel_frees_the_slot(model):
    engine = Engine(model, max_batch=1, max_len=64)
    a, b = prompts_of([4, 4], seed=9)
    ra, rb = engine.submit(a, 30), engine.submit(b, 4)
    engine.step()
    assert engine.active == [ra] and rb in engine.waiting     # one slot: b waits
    engine.cancel(ra)
    while not rb.done.is_set():
        engine.step()
    assert ra.finish_reason == "cancelled" and rb.out == argmax_decode(model, b, 4)
