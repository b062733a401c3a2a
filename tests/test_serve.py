"""serve.py: the engine's caches, batching and sampling; api.py: the HTTP server end to end on loopback."""
import http.client
import json
import os
import socket
import threading
import time

import pytest
import torch

from model import CommandA, ModelConfig
from api import ChatDecoder, ChatServer
from serve import Engine, WindowKVCache, sample_token
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


@pytest.mark.parametrize("fused", [True, False], ids=["fused-decode", "model-forward-decode"])
@pytest.mark.parametrize("lengths", [(3,), (12,), (1, 4, 5, 6, 13, 21)], ids=["short", "longer-than-W", "mixed"])
def test_greedy_equals_uncached_argmax(model, lengths, fused):
    # max_batch=3 < 6 prompts: later prompts join while the first ones decode (continuous batching)
    engine = Engine(model, max_batch=3, max_len=64, fused=fused)
    assert (engine.fused is not None) == fused
    prompts = prompts_of(lengths)
    got = engine.generate(prompts, 14)
    for p, g in zip(prompts, got):
        assert g == argmax_decode(model, p, 14), f"prompt of {len(p)} tokens (W={W})"
    assert engine.stats["max_active"] == min(3, len(lengths))


@torch.no_grad()
def test_fused_decode_logits_match_the_model_and_follow_weight_updates():
    """FusedDecode's logits for a mixed batch (one row past W, one short) equal model.py's cached forward; after
    an in-place weight update (an optimizer step in posttrain.py) it decodes with the new weights, not a stale
    copy of the old ones."""
    model = make(seed=3)
    prompts = prompts_of([13, 3], seed=4)
    for step in range(2):
        outs = []
        for fused in (True, False):
            engine = Engine(model, max_batch=2, max_len=64, fused=fused)
            logits = []
            engine._sample = lambda lg, reqs, keep=logits: (keep.append(lg.clone()), lg.argmax(-1).tolist())[1]
            engine.generate(prompts, 6, stop_tokens=[])
            outs.append(logits)
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        engine = Engine(model, max_batch=2, max_len=64)            # built before the update below
        before = engine.generate(prompts, 6)
        for p in model.parameters():
            p.mul_(1.1)                                            # in place: bumps tensor._version
        after = engine.generate(prompts, 6)
        assert after == [argmax_decode(model, p, 6) for p in prompts] and after != before


@torch.no_grad()
def test_packed_weights_decode_like_the_model_and_follow_weight_updates(monkeypatch):
    """Batches of PACKED_MIN_BATCH+ rows decode on oneDNN-packed weights (CPU fp32): the same logits as the
    unpacked fused step, the tokens of the uncached model, and the new weights after an in-place update."""
    import serve
    from serve import PACKED_MIN_BATCH
    rows, real = [], serve.packed_linear                               # the packed path must actually run
    monkeypatch.setattr(serve, "packed_linear", lambda x, w: (rows.append(x.shape[0]), real(x, w))[1])
    model = make(seed=5)
    prompts = prompts_of((13, 3, 1, 7, 9, 2, 12, 5, 4, 8), seed=6)      # 10 rows: packed from 8 live rows up
    got = {}
    for pack in (True, False):
        engine = Engine(model, max_batch=len(prompts), max_len=64, pack_weights=pack)
        assert (engine.fused.packed is not None) == (pack and torch.backends.mkldnn.is_available())
        logits = []
        engine._sample = lambda lg, reqs, keep=logits: (keep.append(lg.clone()), lg.argmax(-1).tolist())[1]
        engine.generate(prompts, 5, stop_tokens=[])
        got[pack] = logits
    assert max(lg.shape[0] for lg in got[True]) >= PACKED_MIN_BATCH
    if torch.backends.mkldnn.is_available():
        assert rows and min(rows) >= PACKED_MIN_BATCH                 # it ran, on the batches
    for a, b in zip(got[True], got[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    engine = Engine(model, max_batch=len(prompts), max_len=64)
    before = engine.generate(prompts, 4)
    assert before == [argmax_decode(model, p, 4) for p in prompts]
    for p in model.parameters():
        p.mul_(1.1)                                                    # an optimizer step, in place
    after = engine.generate(prompts, 4)
    assert after == [argmax_decode(model, p, 4) for p in prompts] and after != before


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs a torch built with oneDNN")
def test_packed_linear_ops_match_matmul_eager_and_compiled():
    """The two custom ops over a packed weight equal x @ W^T (+ h), and torch.compile calls them as they are."""
    from serve import pack_weight, packed_linear, packed_linear_add
    g = torch.Generator().manual_seed(0)
    w, x, h = torch.randn(48, 40, generator=g), torch.randn(9, 40, generator=g), torch.randn(9, 48, generator=g)
    p = pack_weight(w)
    assert p is not None and pack_weight(w.double()) is None          # fp32 only
    torch.testing.assert_close(packed_linear(x, p), x @ w.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_linear_add(x, h, p), h + x @ w.T, atol=1e-5, rtol=1e-5)
    step = torch.compile(lambda x, h: packed_linear_add(torch.relu(x), h, p) * 2, dynamic=False)
    torch.testing.assert_close(step(x, h), 2 * (h + torch.relu(x) @ w.T), atol=1e-5, rtol=1e-5)


def test_static_decode_padding_buckets_match_uncached_argmax(model):
    """StaticDecode (the CUDA-graph form, run eagerly here): batches padded to 1/2/4 rows, full layers over all
    max_len slots under a mask; requests of mixed lengths join and leave; tokens equal the uncached model's."""
    from serve import StaticDecode
    engine = Engine(model, max_batch=4, max_len=64)
    engine.fused = StaticDecode(engine.fused, engine.cache, graphs=False)
    assert engine.fused.buckets == [1, 2, 4]
    prompts = prompts_of((3, 12, 7, 1, 9))
    got = engine.generate(prompts, 11)
    assert got == [argmax_decode(model, p, 11) for p in prompts]
    with pytest.raises(ValueError, match="CUDA"):
        Engine(model, max_batch=2, max_len=64, cuda_graphs=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_eager_on_gpu():
    m = make().cuda()
    prompts = prompts_of((3, 12, 7, 1, 9))
    eager = Engine(m, max_batch=4, max_len=64).generate(prompts, 11)
    graphed = Engine(m, max_batch=4, max_len=64, cuda_graphs=True)
    assert graphed.generate(prompts, 11) == eager
    assert set(graphed.fused.captured) <= {1, 2, 4}


@pytest.mark.slow
def test_compiled_engine_gives_the_same_greedy_tokens(model):
    """torch.compile(dynamic=True) over the changing batch and cache shapes: same tokens as eager."""
    prompts = prompts_of((3, 12, 7))
    eager = Engine(model, max_batch=2, max_len=64).generate(prompts, 10)
    assert Engine(model, max_batch=2, max_len=64, compile=True).generate(prompts, 10) == eager


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


# ----------------------------------------------------------------------------------------------------------
# HTTP server on loopback


@pytest.fixture(scope="module")
def tok():
    texts = [open(os.path.join(ROOT, f), encoding="utf-8").read() for f in ("tokenizer.py", "model.py")]
    return Tokenizer.train(texts, vocab_size=512)


@pytest.fixture(scope="module")
def chat_model(tok):
    # the chat template's preamble is ~700-1500 tokens: a micro model with room for it
    return make(micro(vocab_size=tok.vocab_size, sliding_window=16, max_position_embeddings=2048))


def serve(model, tok, **kw):
    server = ChatServer(Engine(model, tok, max_batch=8, max_len=2048), tok, port=0, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def serving(model, tok, **kw):
    """A running server for a module's tests (yield from it in a fixture), shut down after them."""
    s = serve(model, tok, **kw)
    yield s
    s.shutdown()
    s.server_close()
    s.engine.stop()


@pytest.fixture(scope="module")
def server(chat_model, tok):
    yield from serving(chat_model, tok)


def post(server, path, body, headers=None):
    """-> (status, parsed JSON or the list of SSE events (event, data))."""
    conn = http.client.HTTPConnection(*server.server_address, timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    if resp.getheader("Content-Type") == "text/event-stream":
        events = []
        for block in raw.decode("utf-8").split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if "data" in lines:
                events.append((lines.get("event"), lines["data"] if lines["data"] == "[DONE]"
                               else json.loads(lines["data"])))
        return resp.status, events
    return resp.status, json.loads(raw)


def solo_text(model, tok, messages, n, **kw):
    ids = tok.render_chat(messages, **kw)
    out = Engine(model, tok, max_batch=1, max_len=2048).generate([ids], n)[0]
    return tok.parse(out)["response"], len(ids)


HI = [{"role": "user", "content": "Say something about <|END_OF_TURN_TOKEN|> tokens."}]


def test_both_apis_non_streaming_match_the_engine(server, chat_model, tok):
    text, n_prompt = solo_text(chat_model, tok, HI, 12)
    assert tok.render_chat(HI).count(tok.eot_id) == 2      # the user's "<|END_OF_TURN_TOKEN|>" stayed text
    status, r = post(server, "/v1/chat/completions", {"model": "x", "messages": HI, "max_tokens": 12,
                                                      "temperature": 0})
    assert status == 200 and r["object"] == "chat.completion"
    assert r["choices"][0]["message"]["content"] == text
    assert r["usage"]["prompt_tokens"] == n_prompt and 1 <= r["usage"]["completion_tokens"] <= 12
    status, r = post(server, "/v2/chat", {"messages": HI, "max_tokens": 12, "temperature": 0})
    assert status == 200 and r["message"]["content"][0]["text"] == text
    assert r["finish_reason"] in ("COMPLETE", "MAX_TOKENS") and r["usage"]["tokens"]["input_tokens"] == n_prompt
    conn = http.client.HTTPConnection(*server.server_address, timeout=10)
    conn.request("GET", "/v1/models")
    models = json.loads(conn.getresponse().read())
    assert models["object"] == "list" and models["data"][0]["id"] == "command-a-local"


def test_streaming_terminates_and_deltas_add_up(server, chat_model, tok):
    text, _ = solo_text(chat_model, tok, HI, 20)
    status, ev = post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 20, "temperature": 0,
                                                       "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and ev[-1] == (None, "[DONE]")
    chunks = [d for _, d in ev[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == text
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["usage"]
    status, ev = post(server, "/v2/chat", {"messages": HI, "max_tokens": 20, "temperature": 0, "stream": True})
    names = [e for e, _ in ev]
    assert status == 200 and names[0] == "message-start" and names[-1] == "message-end"
    assert "".join(d["delta"]["message"]["content"]["text"] for e, d in ev if e == "content-delta") == text


def test_concurrent_clients_are_batched(server, chat_model, tok):
    convs = [[{"role": "user", "content": f"question number {i}" * (i + 1)}] for i in range(5)]
    want = [solo_text(chat_model, tok, c, 16)[0] for c in convs]
    got = [None] * len(convs)

    def client(i):
        stream = i % 2 == 1
        status, r = post(server, "/v1/chat/completions", {"messages": convs[i], "max_tokens": 16,
                                                          "temperature": 0, "stream": stream})
        assert status == 200
        got[i] = ("".join(d["choices"][0]["delta"].get("content", "") for _, d in r[:-1] if d["choices"])
                  if stream else r["choices"][0]["message"]["content"])
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(convs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    assert server.engine.stats["max_active"] > 1       # several requests shared decode steps


BAD = [
    (b"{not json", 400), (b"[1, 2]", 400), ({"messages": []}, 400), ({"messages": "hi"}, 400),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400), ({"messages": [{"role": "user", "content": 5}]}, 400),
    ({"messages": [{"role": "user"}]}, 400),
    ({"messages": HI, "max_tokens": 10**9}, 400), ({"messages": HI, "max_tokens": "10"}, 400),
    ({"messages": HI, "max_tokens": 0}, 400), ({"messages": HI, "temperature": "hot"}, 400),
    ({"messages": HI, "top_p": 2}, 400), ({"messages": HI, "stream": "yes"}, 400),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400),
    ({"messages": HI, "tools": "search"}, 400),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     400),
    ({"messages": HI, "safety_mode": "OFF"}, 400), ({"messages": HI, "documents": "doc"}, 400),
    ({"messages": [{"role": "user", "content": [{"type": "document", "document": 3}]}]}, 400),
    ({"messages": HI + [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]}, 400),
]


@pytest.mark.parametrize("api", ["/v2/chat", "/v1/chat/completions"])
def test_bad_requests_get_4xx_json_and_server_keeps_serving(server, api):
    for body, code in BAD:
        status, r = post(server, api, body)
        assert status == code, body
        msg = r["error"]["message"] if api.startswith("/v1") else r["message"]
        assert isinstance(msg, str) and msg
    assert post(server, "/v3/nothing", {"messages": HI})[0] == 404
    # a body larger than the limit is refused from its Content-Length, without reading it
    conn = http.client.HTTPConnection(*server.server_address, timeout=10)
    conn.putrequest("POST", api)
    conn.putheader("Content-Length", str(server.max_body + 1))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())
    assert post(server, api, {"messages": HI, "max_tokens": 2})[0] == 200


class Scripted(torch.nn.Module):
    """A stand-in model that writes a fixed completion after a prompt of P tokens (so tests can check
    parsing of citations and tool calls end to end); it still drives the cache protocol."""

    def __init__(self, cfg, script, eot, P=0, delay=0.0):
        super().__init__()
        self.config, self.script, self.eot, self.P, self.delay = cfg, script, eot, P, delay
        self.fail = False

    def forward(self, input_ids, position_ids=None, cache=None, logits_index=None):
        if self.fail:
            raise RuntimeError("simulated engine failure")
        cache.reserve(position_ids)
        B, T = input_ids.shape
        z = torch.zeros(B, self.config.num_key_value_heads, T, self.config.head_dim)
        for i in range(self.config.num_hidden_layers):
            cache.update(i, z, z)
        time.sleep(self.delay)
        script = torch.tensor(self.script + [self.eot])
        nxt = script[(position_ids - self.P + 1).clamp(0, len(self.script))]
        logits = torch.zeros(B, T, self.config.vocab_size).scatter_(2, nxt[..., None], 1e4)  # certain when sampled
        return logits if logits_index is None else logits[torch.arange(B), logits_index][:, None]


DOCS = [{"id": "grass", "data": {"text": "Grass is green."}}, {"id": "sky", "data": {"text": "The sky is blue."}}]
CITED = ("<|START_RESPONSE|>The sky is <co>blue</co: 0:[1]> and grass is <co>green</co: 0:[0]> (ça 日本)."
         "<|END_RESPONSE|>")
ACTION = ('<|START_THINKING|>I will search.<|END_THINKING|><|START_ACTION|>[{"tool_call_id": "0", "tool_name": '
          '"search", "parameters": {"q": "sky"}}]<|END_ACTION|>')
TOOLS = [{"type": "function", "function": {"name": "search", "description": "web search", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]


def test_citations_tool_calls_and_utf8_streaming(chat_model, tok):
    msgs = [{"role": "user", "content": "What colour is the sky?"}]
    scripted = Scripted(chat_model.config, tok.encode(CITED, allow_special=True), tok.eot_id)
    srv = serve(scripted, tok)
    try:
        scripted.P = len(tok.render_chat(msgs, documents=[d["data"] for d in DOCS]))
        status, r = post(srv, "/v2/chat", {"messages": msgs, "documents": DOCS})
        assert status == 200 and r["finish_reason"] == "COMPLETE"
        clean = "The sky is blue and grass is green (ça 日本)."
        assert r["message"]["content"][0]["text"] == clean
        cites = r["message"]["citations"]
        assert [(c["text"], c["sources"][0]["id"]) for c in cites] == [("blue", "sky"), ("green", "grass")]
        assert clean[cites[0]["start"]:cites[0]["end"]] == "blue"
        status, ev = post(srv, "/v2/chat", {"messages": msgs, "documents": DOCS, "stream": True})
        deltas = [d["delta"]["message"]["content"]["text"] for e, d in ev if e == "content-delta"]
        assert "".join(deltas) == clean and len(deltas) > 5 and not any("\ufffd" in x for x in deltas)
        assert [d["delta"]["message"]["citations"]["text"] for e, d in ev if e == "citation-start"] == ["blue", "green"]
        assert ev[-1][0] == "message-end" and ev[-1][1]["delta"]["finish_reason"] == "COMPLETE"

        scripted.script = tok.encode(ACTION, allow_special=True)
        scripted.P = len(tok.render_chat(msgs, tools=[t["function"] for t in TOOLS]))
        status, r = post(srv, "/v2/chat", {"messages": msgs, "tools": TOOLS})
        assert status == 200 and r["finish_reason"] == "TOOL_CALL" and r["message"]["tool_plan"] == "I will search."
        call = r["message"]["tool_calls"][0]
        assert call["function"]["name"] == "search" and json.loads(call["function"]["arguments"]) == {"q": "sky"}
        status, r = post(srv, "/v1/chat/completions", {"messages": msgs, "tools": TOOLS})
        assert r["choices"][0]["finish_reason"] == "tool_calls"
        assert r["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "search"
        status, ev = post(srv, "/v1/chat/completions", {"messages": msgs, "tools": TOOLS, "stream": True})
        assert ev[-1][1] == "[DONE]" and ev[-2][1]["choices"][0]["finish_reason"] == "tool_calls"
    finally:
        srv.shutdown()
        srv.server_close()
        srv.engine.stop()


def test_client_disconnect_frees_the_slot(chat_model, tok):
    scripted = Scripted(chat_model.config, [ord("a")] * 4000, tok.eot_id, delay=0.01)
    srv = serve(scripted, tok)
    try:
        for stream in (True, False):
            body = json.dumps({"messages": HI, "max_tokens": 1000, "stream": stream}).encode()
            s = socket.create_connection(srv.server_address)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            deadline = time.time() + 10
            while not srv.engine.active and time.time() < deadline:
                time.sleep(0.01)
            assert srv.engine.active
            s.close()
            while srv.engine.active and time.time() < deadline:
                time.sleep(0.02)
            assert not srv.engine.active, f"slot still held after disconnect (stream={stream})"
        assert post(srv, "/v2/chat", {"messages": HI, "max_tokens": 3})[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
        srv.engine.stop()


def test_chat_decoder_never_splits_utf8(tok):
    text = "<|START_RESPONSE|>naïve 日本語 🙂 done<|END_RESPONSE|>"
    dec, out = ChatDecoder(tok), ""
    for t in tok.encode(text, allow_special=True):
        d = dec.feed(t).get("response", "")
        assert "\ufffd" not in d
        out += d
    out += dec.feed(None).get("response", "")
    assert out == "naïve 日本語 🙂 done"


def test_engine_failure_ends_every_stream_and_server_recovers(chat_model, tok):
    scripted = Scripted(chat_model.config, [ord("a")] * 50, tok.eot_id)
    srv = serve(scripted, tok)
    try:
        scripted.fail = True
        status, r = post(srv, "/v2/chat", {"messages": HI, "max_tokens": 5})
        assert status == 500 and "simulated" in r["message"]
        status, ev = post(srv, "/v2/chat", {"messages": HI, "max_tokens": 5, "stream": True})
        assert ev[-1][0] == "message-end" and ev[-1][1]["delta"]["finish_reason"] == "ERROR"
        status, ev = post(srv, "/v1/chat/completions", {"messages": HI, "max_tokens": 5, "stream": True})
        assert ev[-1][1] == "[DONE]" and any("error" in d for _, d in ev[:-1])
        scripted.fail = False
        assert post(srv, "/v1/chat/completions", {"messages": HI, "max_tokens": 5})[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
        srv.engine.stop()


# ----------------------------------------------------------------------------------------------------------
# CLI and benchmark


def test_bench_reports_baselines_and_kv_bytes():
    import bench
    race = dict(cfg=bench.PRESETS["micro"], prompt_len=6, new_tokens=4, batches=(1, 3))
    r = bench.bench(("micro",), batches=(1, 2), prompt_len=20, new_tokens=4, long_ctx=64, reps=1, decode_config=race)
    assert {row["method"] for row in r["rows"]} == {"engine", "engine-unpacked", "engine-unfused"}
    assert {(row["method"], row["batch"]) for row in r["rows"]} >= {("engine", 1), ("engine", 2)}
    methods = {row["method"] for row in r["batch1"]}
    try:
        import transformers  # noqa: F401  (the HF yardstick row appears only where transformers is installed)
        hf = {"hf-generate"}
    except ImportError:
        hf = set()
    assert methods == {"engine", "engine-unpacked", "engine-unfused", "naive-recompute", "model.KVCache"} | hf
    assert all(row["same_tokens_as_engine"] for row in r["batch1"])
    # the decode race: every method at batch 1 and 3, the same tokens; the batch-1 bound from measured bandwidth
    assert {(row["batch"], row["method"]) for row in r["decode_race"]} == \
        {(b, m) for b in (1, 3) for m in {"engine", "engine-unpacked"} | hf}
    assert all(row["same_tokens"] for row in r["decode_race"])
    assert r["bandwidth_bytes_s"] > 1e8
    for row in r["batch1_bound"]:
        assert row["bound_tok_s"] == pytest.approx(r["bandwidth_bytes_s"] / bench.decode_bytes_per_token(
            bench.CommandA(bench.PRESETS["micro"])), rel=1e-2) and row["of_bound"] > 0
    micro_kv = r["kv"][0]
    assert micro_kv["allocated"] == micro_kv["formula"] < micro_kv["all_full"]


@pytest.mark.slow
def test_cli_serves_a_saved_checkpoint(tmp_path, chat_model, tok):
    import signal
    import subprocess
    import sys
    chat_model.save_pretrained(str(tmp_path))
    tok.save(str(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    # start it the way a script's background job starts: with SIGINT ignored (a non-interactive shell does
    # that, and Python keeps an inherited ignore); api.py must still stop on Ctrl-C / `kill -INT`
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "api.py"), "--ckpt", str(tmp_path), "--port", "0",
                             "--max-len", "2048"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = proc.stderr.readline()
        host, port = line.split("http://")[1].split()[0].split(":")
        assert host == "127.0.0.1"                    # loopback unless --host says otherwise
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/v2/chat", json.dumps({"messages": HI, "max_tokens": 4, "temperature": 0}))
        r = json.loads(conn.getresponse().read())
        conn.close()                                  # no idle keep-alive connection left behind
        assert r["message"]["content"][0]["text"] == solo_text(chat_model, tok, HI, 4)[0]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)              # PYTHONFAULTHANDLER: every thread's stack to stderr
            out, err = proc.communicate()
            pytest.fail(f"api.py did not exit on SIGINT; stdout:\n{out[-1000:]}\nstderr:\n{err[-4000:]}")
    assert json.loads(out.strip().splitlines()[-1])["mode"] == "server"


def test_serve_cli_hands_serving_to_api_and_keeps_bench():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--bench" in r.stdout and "api.py" in r.stdout
    r = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--port", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "--ckpt" in r.stderr and "api.py" in r.stderr         # api.py's own argparse
    r = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--bench", "--bench-new", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--bench-new" in r.stderr


# ----------------------------------------------------------------------------------------------------------
# Prefix cache: a shared prompt prefix is prefilled once; outputs must not change

BLOCK = 4           # < W = 5: prefixes of one block sit inside the window, longer ones wrap the ring


def run_with_logprobs(engine, prompts, n=8):
    """Greedy tokens and each token's (log-prob, top-3) for prompts submitted together (one batch)."""
    reqs = [engine.submit(p, n, logprobs=3) for p in prompts]
    engine._run(reqs)
    return [r.out for r in reqs], [r.token_logprobs for r in reqs]


def assert_same_as_uncached(model, engine, prompts):
    toks, lps = run_with_logprobs(engine, prompts)
    ref_toks, ref_lps = run_with_logprobs(Engine(model, max_batch=8, max_len=64, prefix_cache_mb=0), prompts)
    assert toks == ref_toks
    for lp, ref in zip(lps, ref_lps):   # prefill in two pieces: same math, summed in another order
        torch.testing.assert_close([x for x, _ in lp], [x for x, _ in ref], atol=1e-5, rtol=0)
        torch.testing.assert_close([dict(t) for _, t in lp], [dict(t) for _, t in ref], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-decode", "model-forward-decode"])
def test_prefix_cache_hits_give_the_same_tokens_as_no_cache(model, fused):
    pre = prompts_of([13], seed=5)[0]                 # 3 blocks, longer than the window
    tails = prompts_of([1, 3, 4, 7, 9], seed=6)
    engine = Engine(model, max_batch=8, max_len=64, fused=fused, prefix_block=BLOCK)
    assert_same_as_uncached(model, engine, [pre + tails[0]])            # a miss: fills the cache
    assert engine.stats["prefix_hits"] == 0 and engine.stats["prefix_bytes"] > 0
    for t in tails[1:]:                                                  # one at a time: P = 12
        assert_same_as_uncached(model, engine, [pre + t])
    assert engine.stats["prefix_hits"] == 4 and engine.stats["prefix_tokens"] == 4 * 12
    # the same 16-token prompt again: the hit stops one block short, so a token is left to prefill
    assert_same_as_uncached(model, engine, [pre + tails[1]])
    assert engine.stats["prefix_tokens"] == 5 * 12
    assert_same_as_uncached(model, engine, [pre + tails[2]])            # 17 tokens again: all 4 blocks
    assert engine.stats["prefix_tokens"] == 5 * 12 + 16
    # sharing only 6 tokens: a one-block hit, shorter than the window (the ring not yet full)
    assert_same_as_uncached(model, engine, [pre[:6] + tails[4]])
    assert engine.stats["prefix_tokens"] == 5 * 12 + 16 + 4


def test_prefix_cache_mixed_batch_of_hits_and_misses(model):
    pre = prompts_of([21], seed=5)[0]
    engine = Engine(model, max_batch=8, max_len=64, prefix_block=BLOCK)
    assert_same_as_uncached(model, engine, [pre + [1, 2]])
    others = prompts_of([3, 17, 30], seed=8)                             # misses: short, long, longer than pre
    batch = [others[0], pre + [5], others[1], pre[:9] + [7, 7], pre + others[0], others[2]]
    hits = engine.stats["prefix_hits"]
    assert_same_as_uncached(model, engine, batch)                        # one padded prefill, starts 0..20
    assert engine.stats["prefix_hits"] - hits == 3
    assert_same_as_uncached(model, engine, batch)                        # now every row of 4+ tokens hits


def test_prefix_cache_evicts_least_recently_used_blocks_within_its_bound(model):
    cfg = model.config
    block_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * BLOCK * cfg.head_dim * 4   # k + v, fp32
    engine = Engine(model, max_batch=4, max_len=64, prefix_block=BLOCK, prefix_cache_mb=5 * block_bytes / 2**20)
    a, b, c = prompts_of([9, 9, 9], seed=11)                             # 2 blocks each
    ka, kb, kc = (engine.prefix.keys(p) for p in (a, b, c))
    for p in (a, b, a, c):      # a's second use (a hit) makes b the least recently used; c needs one block
        assert_same_as_uncached(model, engine, [p])
    held = set(engine.prefix.blocks)
    assert kb[1] not in held and kb[0] in held                           # the leaf goes first, never its parent
    assert set(ka + kc) <= held and engine.stats["prefix_bytes"] == 5 * block_bytes
    tokens = engine.stats["prefix_tokens"]
    assert_same_as_uncached(model, engine, [b])                          # what is left of b still hits
    assert engine.stats["prefix_tokens"] - tokens == BLOCK
    assert engine.prefix.nbytes <= 5 * block_bytes
    tiny = Engine(model, max_batch=4, max_len=64, prefix_block=BLOCK, prefix_cache_mb=block_bytes / 2 / 2**20)
    assert_same_as_uncached(model, tiny, [a, a])                         # a bound below one block holds nothing
    assert tiny.prefix.nbytes == 0 and not tiny.prefix.blocks


def test_concurrent_requests_sharing_a_prefix_match_uncached(model):
    pre = prompts_of([14], seed=12)[0]
    prompts = [pre + t for t in prompts_of([2, 5, 1, 8, 3, 6], seed=13)]
    ref = Engine(model, max_batch=8, max_len=64, prefix_cache_mb=0).generate(prompts, 8)
    engine = Engine(model, max_batch=8, max_len=64, prefix_block=BLOCK).start()
    try:
        assert engine.generate(prompts[:1], 8) == ref[:1]                # fills the cache
        out = [None] * len(prompts)

        def client(i):
            out[i] = engine.generate([prompts[i]], 8)[0]
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert out == ref
        assert engine.stats["prefix_hits"] >= len(prompts)
    finally:
        engine.stop()


def test_prefix_cache_is_emptied_when_the_weights_change():
    m = make(seed=3)
    p = prompts_of([15], seed=14)[0]
    engine = Engine(m, max_batch=2, max_len=64, prefix_block=BLOCK)
    before = engine.generate([p], 6)[0]
    with torch.no_grad():                 # an optimizer step, in place (posttrain.py samples from the policy)
        m.model.layers[0].self_attn.v_proj.weight.mul_(-2.0)
    assert engine.generate([p], 6)[0] == argmax_decode(m, p, 6) != before
    assert engine.stats["prefix_hits"] == 0


def test_bench_reports_cached_preamble_ttft(model):
    import bench
    row = bench._bench_prefix("micro", model, model.config.vocab_size, prefix_len=140, suffix_len=8, reps=1, mb=16)
    assert row["same_tokens"] and row["hits"] >= 1
    assert row["ttft_cached_s"] > 0 and row["ttft_uncached_s"] > 0 and row["speedup"] > 0   # timing: not asserted
