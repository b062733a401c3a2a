"""model.py: every architectural property of SPEC section 1 has a test here that fails if it is broken."""
import json
import math
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import model as M
from model import CommandA, ModelConfig, PRESETS, attention_allowed
from serve import KVCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def micro(**kw):
    """A micro config with everything switched on: GQA (4 heads / 2 KV), 3 sliding + 1 full layer, small W."""
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, sliding_window=5, max_position_embeddings=256)
    base.update(kw)
    return ModelConfig(**base)


def make(cfg=None, seed=0, **kw):
    torch.manual_seed(seed)
    m = CommandA(cfg or micro(**kw))
    with torch.no_grad():  # non-trivial norm weights so norm/tie bugs cannot hide behind ones
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m.eval()


# ---------------------------------------------------------------------------------------------------- config


def test_param_counts_exact_without_allocating():
    assert PRESETS["command-a"].num_params() == 111_057_580_032
    assert PRESETS["command-r7b"].num_params() == 8_028_033_024
    for name in ("tiny", "small"):
        m = CommandA(PRESETS[name])
        assert sum(p.numel() for p in m.parameters()) == PRESETS[name].num_params()


def test_layer_pattern_is_data_three_sliding_then_full():
    assert PRESETS["command-a"].layer_types[:8] == ["sliding"] * 3 + ["full"] + ["sliding"] * 3 + ["full"]
    assert PRESETS["command-a"].layer_types.count("full") == 16
    cfg = micro(layer_types=["full", "sliding", "full", "sliding"])
    assert [l.self_attn.kind for l in CommandA(cfg).model.layers] == cfg.layer_types


def test_kv_cache_bytes_match_the_report():
    a = PRESETS["command-a"]
    assert a.kv_bytes_per_token_per_layer() == 4096
    assert a.kv_cache_bytes(131072) == int(8.75 * 2**30)
    assert a.kv_cache_bytes(262144) == int(16.75 * 2**30)
    assert a.kv_cache_bytes(131072, window_aware=False) == 32 * 2**30


@pytest.mark.parametrize("kw, field", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=30), "hidden_size"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(layer_types=["sliding", "global", "sliding", "full"]), "layer_types"),
    (dict(layer_types=["sliding", "full"]), "layer_types"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(attn_backend="xla"), "attn_backend"),
    (dict(fp8=True, intermediate_size=40), "intermediate_size"),
])
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        micro(**kw)


# ---------------------------------------------------------------------------------------------------- masks


def test_window_boundary_is_W_keys_including_self():
    W, T = 4, 12
    pos = torch.arange(T)
    ok = attention_allowed(pos[:, None], pos[None, :], 0, 0, W)
    for q in range(T):
        visible = ok[q].nonzero().flatten().tolist()
        assert visible == list(range(max(0, q - W + 1), q + 1))  # exactly W keys, the query included
    assert ok.sum(1).max() == W


def test_window_boundary_in_the_model():
    """One sliding layer, W=5: the token W-1 back still influences the last query, the token W back does not."""
    cfg = micro(num_hidden_layers=1, layer_types=["sliding"], sliding_window=5)
    m = make(cfg)
    ids = torch.randint(0, 97, (1, 12))
    base = m(ids)[0, -1]
    for back, changes in ((4, True), (5, False), (8, False)):
        ids2 = ids.clone()
        ids2[0, -1 - back] = (ids2[0, -1 - back] + 1) % 97
        assert (not torch.allclose(m(ids2)[0, -1], base, atol=1e-6)) == changes, back


def test_document_masking_packed_equals_separate():
    m = make()
    docs = [torch.randint(0, 97, (n,)) for n in (9, 3, 14)]  # longer and shorter than W=5
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    out = m(packed, doc_ids=doc_ids)
    alone = torch.cat([m(d[None]) for d in docs], dim=1)
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
    # positions restarting per document imply the same documents, without doc_ids
    torch.testing.assert_close(m(packed, position_ids=M.positions_from_doc_ids(doc_ids)), alone,
                               atol=1e-5, rtol=1e-5)
    # and without any masking the first document's continuation would leak into the next one
    assert not torch.allclose(m(packed)[:, 9:], alone[:, 9:], atol=1e-4)


# ---------------------------------------------------------------------------------------------------- RoPE / NoPE


def test_rope_is_interleaved_pairs():
    T, dh, theta = 7, 8, 50000.0
    x = torch.randn(1, 1, T, dh)
    pos = torch.arange(T)[None]
    cos, sin = M.rope_cos_sin(pos, dh, theta, torch.float32)
    out = M.apply_rope(x, cos, sin)
    # independent reference: pair (2i, 2i+1) as one complex number, rotated by angle t * theta^(-2i/dh)
    z = torch.view_as_complex(x.reshape(1, 1, T, dh // 2, 2).contiguous())
    ang = pos[0, :, None].float() * theta ** (-torch.arange(0, dh, 2).float() / dh)
    ref = torch.view_as_real(z * torch.polar(torch.ones_like(ang), ang)).reshape(1, 1, T, dh)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # and it is not Llama's rotate-half form
    half = torch.cat([-x[..., dh // 2:], x[..., :dh // 2]], -1)
    llama_cos = torch.cat([cos[..., 0::2], cos[..., 0::2]], -1)
    llama_sin = torch.cat([sin[..., 0::2], sin[..., 0::2]], -1)
    assert not torch.allclose(out, x * llama_cos + half * llama_sin, atol=1e-3)
    # under torch.compile (inductor has no complex codegen) the same rotation runs in real arithmetic
    with mock.patch("torch.compiler.is_compiling", return_value=True):
        torch.testing.assert_close(M.apply_rope(x, cos, sin), out, atol=1e-6, rtol=1e-6)


def test_rope_on_sliding_layers_only_nope_on_full():
    """Layer 1 of a full (NoPE) model: the last token's output ignores the ORDER of earlier tokens;
    a sliding (RoPE) layer with W >= T sees the same keys but depends on their order."""
    ids = torch.randint(0, 97, (1, 8))
    perm = torch.cat([torch.randperm(7), torch.tensor([7])])
    full = make(micro(num_hidden_layers=1, layer_types=["full"], initializer_range=0.3))
    torch.testing.assert_close(full(ids)[0, -1], full(ids[:, perm])[0, -1], atol=1e-5, rtol=1e-5)
    sliding = make(micro(num_hidden_layers=1, layer_types=["sliding"], sliding_window=64, initializer_range=0.3))
    assert not torch.allclose(sliding(ids)[0, -1], sliding(ids[:, perm])[0, -1], atol=1e-3)


# ---------------------------------------------------------------------------------------------------- blocks


def test_gqa_grouping_query_head_h_reads_kv_head_h_div_g():
    cfg = micro(num_attention_heads=4, num_key_value_heads=2, layer_types=["full"] * 4)
    attn = make(cfg).model.layers[0].self_attn
    B, T, dh = 1, 6, cfg.head_dim
    x = torch.randn(B, T, cfg.hidden_size)
    pos = torch.arange(T)[None]
    mask = attention_allowed(pos[:, None, :, None], pos[:, None, None, :], 0, 0, None)
    y = attn(x, None, mask)
    q = (x @ attn.q_proj.weight.T).view(B, T, 4, dh)
    k = (x @ attn.k_proj.weight.T).view(B, T, 2, dh)
    v = (x @ attn.v_proj.weight.T).view(B, T, 2, dh)
    heads = []
    for h in range(4):
        j = h // 2  # g = 2 query heads per KV head, contiguous
        s = (q[:, :, h] @ k[:, :, j].transpose(1, 2)) / math.sqrt(dh)
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        heads.append(torch.softmax(s, -1) @ v[:, :, j])
    ref = torch.cat(heads, -1) @ attn.o_proj.weight.T
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_parallel_block_one_norm_both_branches():
    m = make()
    layer = m.model.layers[3]
    h = torch.randn(2, 6, 32)
    pos = torch.arange(6).expand(2, 6)
    mask = attention_allowed(pos[:, None, :, None], pos[:, None, None, :], 0, 0, None)
    n = layer.input_layernorm(h)
    ref = h + layer.self_attn(n, None, mask) + layer.mlp(n)
    torch.testing.assert_close(layer(h, None, mask), ref)
    # the MLP is SwiGLU with no bias
    x = torch.randn(3, 32)
    mlp = layer.mlp
    torch.testing.assert_close(mlp(x), (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T))
                               @ mlp.down_proj.weight.T)
    assert not any(n.endswith("bias") for n, _ in m.named_parameters())


def test_cohere_layernorm_mean_subtracted_weight_only_fp32():
    ln = M.LayerNorm(32)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 32) * 3 + 5
    torch.testing.assert_close(ln(x), F.layer_norm(x, (32,), ln.weight, None, 1e-5))
    xb = x.bfloat16()
    yb = ln(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, F.layer_norm(xb.float(), (32,), ln.weight, None, 1e-5).bfloat16())


def test_tied_embeddings_and_logit_scale():
    m = make()
    names = [n for n, _ in m.named_parameters()]
    assert not any("lm_head" in n for n in names)
    ids = torch.randint(0, 97, (1, 6))
    h = {}
    m.model.norm.register_forward_hook(lambda mod, i, o: h.setdefault("n", o))
    logits = m(ids)
    torch.testing.assert_close(logits, h["n"] @ m.model.embed_tokens.weight.T * 0.25)
    m.config.logit_scale = 0.5
    torch.testing.assert_close(m(ids), 2 * logits)


def test_loss_ignores_minus_100_and_is_fp32():
    m = make()
    ids = torch.randint(0, 97, (2, 9))
    tgt = ids[:, 1:].clone()
    tgt[:, :3] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(ids[:, :-1], targets=tgt)
    assert loss.dtype == torch.float32
    logits = m(ids[:, :-1])
    ref = F.cross_entropy(logits[:, 3:].reshape(-1, 97), tgt[:, 3:].reshape(-1))
    assert abs(loss.item() - ref.item()) < 0.02  # bf16 matmuls vs fp32


def test_loss_token_mean_is_exact_in_any_order():
    """The token mean is an fp64 sum of fp32 per-token losses: exact, so reordering the rows (as a split over
    ranks or micro-batches does) gives the same loss to the last bit; a plain fp32 mean would not."""
    m = make()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (64, 33), generator=g)
    tgt = ids[:, 1:].clone()
    tgt[::3, :4] = -100
    with torch.no_grad():
        loss = m(ids[:, :-1], targets=tgt)
        perm = torch.randperm(64, generator=g)
        assert m(ids[perm, :-1], targets=tgt[perm]).item() == loss.item()
        nll = F.cross_entropy(m(ids[:, :-1]).reshape(-1, 97), tgt.reshape(-1), ignore_index=-100, reduction="none")
    assert loss.item() == (nll.double().sum() / (tgt != -100).sum()).float().item()


def test_mup_width_mult_scales_init_and_logits_and_exports_as_plain_cohere2(tmp_path):
    cfg = micro(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, mup_base_hidden_size=16)
    assert cfg.width_mult == 4
    torch.manual_seed(0)
    m = CommandA(cfg)
    assert abs(m.model.layers[0].mlp.up_proj.weight.std().item() - 0.02 / 2) < 2e-3  # sigma / sqrt(m)
    assert abs(m.model.embed_tokens.weight.std().item() - 0.02) < 2e-3               # embeddings unchanged
    ids = torch.randint(0, 97, (1, 7))
    m.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["logit_scale"] == 0.25 / 4
    torch.testing.assert_close(CommandA.from_pretrained(tmp_path)(ids), m(ids))


# ---------------------------------------------------------------------------------------------------- cache


def test_incremental_decoding_matches_full_forward_past_the_window():
    m = make()
    ids = torch.randint(0, 97, (2, 16))  # 16 > W = 5
    full = m(ids)
    cache = KVCache(m.config, batch_size=2, max_len=16)
    outs = [m(ids[:, :7], cache=cache)]              # prefill
    for t in range(7, 16):                           # then one token at a time
        outs.append(m(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KVCache full"):
        m(ids[:, :1], cache=cache)
    with pytest.raises(ValueError, match="doc_ids .* cannot be combined with a KV cache"):
        m(ids[:, :1], cache=KVCache(m.config, 2, 4), doc_ids=torch.zeros(2, 1, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip_single_and_sharded(tmp_path):
    m = make()
    ids = torch.randint(0, 97, (2, 11))
    m.save_pretrained(tmp_path / "one")
    assert sorted(os.listdir(tmp_path / "one")) == ["config.json", "model.safetensors"]
    m.save_pretrained(tmp_path / "many", max_shard_bytes=20_000)
    index = json.load(open(tmp_path / "many" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2
    for d in ("one", "many"):
        torch.testing.assert_close(CommandA.from_pretrained(tmp_path / d)(ids), m(ids), atol=0, rtol=0)
    # re-saving unsharded over a sharded directory removes the stale shards and index
    m.save_pretrained(tmp_path / "many")
    assert sorted(os.listdir(tmp_path / "many")) == ["config.json", "model.safetensors"]


def _ckpt(tmp_path, m=None):
    m = m or make()
    m.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    return load_file(tmp_path / "model.safetensors")


def _write(tmp_path, sd):
    from safetensors.torch import save_file
    save_file(sd, tmp_path / "model.safetensors")


def test_bad_checkpoints_raise_naming_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        CommandA.from_pretrained(tmp_path / "nope")
    sd = _ckpt(tmp_path)
    good = dict(sd)

    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(47, 32)
    _write(tmp_path, sd)
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight has shape"):
        CommandA.from_pretrained(tmp_path)

    sd = dict(good)
    sd["model.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    _write(tmp_path, sd)
    with pytest.raises(ValueError, match="unexpected tensor model.layers.0.self_attn.rotary.weight"):
        CommandA.from_pretrained(tmp_path)

    sd = dict(good)
    del sd["model.layers.2.self_attn.k_proj.weight"]
    _write(tmp_path, sd)
    with pytest.raises(ValueError, match="missing 1 tensor.*layers.2.self_attn.k_proj"):
        CommandA.from_pretrained(tmp_path)

    sd = dict(good)
    sd["model.layers.1.self_attn.q_proj.bias"] = torch.ones(32)
    _write(tmp_path, sd)
    with pytest.raises(ValueError, match="NONZERO bias"):
        CommandA.from_pretrained(tmp_path)

    sd = dict(good)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 1
    _write(tmp_path, sd)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        CommandA.from_pretrained(tmp_path)

    _write(tmp_path, good)
    data = open(tmp_path / "model.safetensors", "rb").read()
    open(tmp_path / "model.safetensors", "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        CommandA.from_pretrained(tmp_path)

    _write(tmp_path, good)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="index.json is malformed"):
        CommandA.from_pretrained(tmp_path)
    from safetensors.torch import save_file
    names = sorted(good)
    save_file({n: good[n] for n in names[:5]}, tmp_path / "a.safetensors")
    save_file({n: good[n] for n in names[4:]}, tmp_path / "b.safetensors")
    json.dump({"weight_map": {**{n: "a.safetensors" for n in names[:5]}, **{n: "b.safetensors" for n in names[5:]}}},
              open(tmp_path / "model.safetensors.index.json", "w"))
    with pytest.raises(ValueError, match="appears in more than one shard"):
        CommandA.from_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors.index.json")
    cfg = json.load(open(tmp_path / "config.json"))
    json.dump({**cfg, "model_type": "llama"}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="model_type='llama'"):
        CommandA.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CommandA.from_pretrained(tmp_path)


def test_zero_biases_and_tied_lm_head_are_accepted(tmp_path):
    m = make()
    sd = _ckpt(tmp_path, m)
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    _write(tmp_path, sd)
    ids = torch.randint(0, 97, (1, 5))
    torch.testing.assert_close(CommandA.from_pretrained(tmp_path)(ids), m(ids))


def test_loading_never_unpickles(tmp_path):
    """A pickle-based 'pytorch_model.bin' is ignored: only safetensors are read."""
    _ckpt(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        CommandA.from_pretrained(tmp_path)


@pytest.mark.slow
def test_parity_with_transformers_cohere2_both_directions(tmp_path):
    tf = pytest.importorskip("transformers")
    m = make()
    m.save_pretrained(tmp_path / "ours")
    hf = tf.Cohere2ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32,
                                               attn_implementation="eager").eval()
    ids = torch.randint(0, 97, (2, 13))  # 13 > W = 5: the window matters
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, m(ids), atol=1e-5, rtol=1e-4)
        m.config.attn_backend = "band"   # the band path (auto picks it at longer T), forced here: HF's logits too
        torch.testing.assert_close(hf(ids).logits, m(ids), atol=1e-5, rtol=1e-4)
    # an HF-made checkpoint (random init, HF's own save) loads into ours with the same logits
    hcfg = tf.Cohere2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, sliding_window=5, logit_scale=0.25,
                            rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    torch.manual_seed(1)
    hf2 = tf.Cohere2ForCausalLM(hcfg).eval()
    with torch.no_grad():
        for n, p in hf2.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf2.save_pretrained(tmp_path / "theirs")
    ours = CommandA.from_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf2(ids).logits, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ speed paths


def _qkv_docs(T, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, T, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, T, 8, generator=g, requires_grad=True) for _ in range(2))
    doc = torch.zeros(2, T, dtype=torch.long)
    doc[0, T // 3:] = 1                       # row 0: two packed documents; row 1: one
    return q, k, v, doc, M.positions_from_doc_ids(doc)


@pytest.mark.parametrize("W", [3, 16, 40])    # window smaller than, equal to and larger than T = 16
@pytest.mark.parametrize("block", [4, 5, 32])  # blocks that divide T, that don't, and one past T
def test_band_attention_equals_the_masked_path(W, block):
    q, k, v, doc, pos = _qkv_docs(16)
    mask = attention_allowed(pos[:, None, :, None], pos[:, None, None, :], doc[:, None, :, None],
                             doc[:, None, None, :], W)
    ref, out = M.attend(q, k, v, mask), M.band_attend(q, k, v, M.band_bias(pos, doc, W, block))
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    go = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, atol=5e-6, rtol=1e-5)
    if W < 16:   # the band's key span: P + 1 blocks of keys, not all T
        assert M.band_bias(pos, doc, W, block).shape[-1] == (-(-(W - 1) // block) + 1) * block


@pytest.mark.parametrize("W", [5, 24, 40])
def test_model_band_backend_equals_sdpa_losses_and_grads(W):
    """The whole model, packed rows and plain rows, fp32: the band backend changes no loss and no gradient."""
    m = make(sliding_window=W)
    ids = torch.randint(0, 97, (2, 25), generator=torch.Generator().manual_seed(3))
    doc = torch.zeros(2, 24, dtype=torch.long)
    doc[0, 10:] = 1
    res = {}
    for backend in ("sdpa", "band"):
        m.config.attn_backend = backend
        for packed in (True, False):
            m.zero_grad()
            loss = m(ids[:, :-1], targets=ids[:, 1:], doc_ids=doc if packed else None)
            loss.backward()
            res[backend, packed] = loss.item(), [p.grad.clone() for p in m.parameters()]
    for packed in (True, False):
        assert abs(res["band", packed][0] - res["sdpa", packed][0]) < 1e-6
        for a, b in zip(res["band", packed][1], res["sdpa", packed][1]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    m.config.attn_backend = "auto"       # auto on CPU: the band wherever it skips keys, dense otherwise
    pos = torch.arange(24).expand(2, 24)
    assert callable(m._masks(2, 24, torch.device("cpu"), pos, doc, None)["sliding"]) == (2 * (W + M.BAND_BLOCK) <= 24)
    assert callable(m._masks(2, 96, torch.device("cpu"), torch.arange(96).expand(2, 96), torch.zeros(2, 96),
                             None)["sliding"]) == (2 * (W + M.BAND_BLOCK) <= 96)


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_loss_equals_plain_cross_entropy(autocast):
    """linear_nll_sum (the model's loss) against nll_sum of the materialized logits: value and both gradients,
    fp32 and bf16 autocast, chunks that divide the rows and that don't, -100 targets included."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 32, generator=g, requires_grad=True)
    w = torch.randn(97, 32, generator=g, requires_grad=True)
    y = torch.randint(0, 97, (50,), generator=g)
    y[::7] = -100
    cfg = micro(logit_scale=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref = M.nll_sum(M.output_logits(h, w, cfg), y)
    g_ref = torch.autograd.grad(ref, (h, w))
    tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-6)
    for chunk in (1, 7, 50, 4096):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = M.linear_nll_sum(h, w, y, 0.5, chunk=chunk)
        assert out.dtype == torch.float64 and abs(out.item() - ref.item()) < 1e-4 * abs(ref.item())
        for a, b in zip(torch.autograd.grad(out, (h, w)), g_ref):
            torch.testing.assert_close(a, b, **tol)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):   # no gradient work
        assert M.linear_nll_sum(h, w, y, 0.5, chunk=7).item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-4)


def test_masks_of_plain_rows_are_built_once_per_shape():
    m = make(sliding_window=5).train()
    ids = torch.randint(0, 97, (2, 12))
    m(ids)
    built = m._by_shape
    m(ids)
    assert m._by_shape is built                                     # same shape: nothing rebuilt
    with torch.inference_mode():                                    # inference tensors never reach autograd
        m(ids)
    m(ids, targets=ids).backward()
    m(ids[:, :7])
    assert m._by_shape is not built and len(m._by_shape) == 1       # a new shape replaces the old one
    torch.testing.assert_close(m(ids), make(sliding_window=5)(ids))  # and the results are a fresh model's


# ---------------------------------------------------------------------------------------------------- precision


def test_fp8_emulation_error_within_bound():
    torch.manual_seed(0)
    x = torch.randn(40, 64, requires_grad=True)   # 40 tokens: not a multiple of 16, padded inside
    w = torch.randn(48, 64, requires_grad=True)
    y = M.fp8_linear(x, w)
    g = torch.randn_like(y.float())
    y.float().backward(g)
    ref_y = x.detach() @ w.detach().T

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()
    assert y.dtype == torch.bfloat16 and y.shape == (40, 48)
    assert rel(y, ref_y) < 0.06                      # e4m3 x e4m3: ~4% on random data
    assert rel(x.grad, g @ w.detach()) < 0.10        # e5m2 gradient: ~6%
    assert rel(w.grad, g.T @ x.detach()) < 0.10
    assert rel(y, ref_y) > 1e-3                      # it really is quantized (not a silent bf16 path)


def test_fp8_clamps_before_cast_no_inf():
    q, s = M.fp8_quantize(torch.tensor([1e30, -3.0, 0.0]), torch.float8_e5m2)
    assert torch.isfinite(q.float()).all()
    q, s = M.fp8_quantize(torch.zeros(4), torch.float8_e4m3fn)  # amax 0 must not divide by zero
    assert torch.isfinite(q.float()).all()


def test_scaled_mm_enforces_cuda_constraints_on_cpu():
    a = torch.randn(16, 32).to(torch.float8_e4m3fn)
    w = torch.randn(16, 32).to(torch.float8_e4m3fn)
    one = torch.tensor(1.0)
    assert M.scaled_mm(a, w.t(), one, one).shape == (16, 16)
    with pytest.raises(ValueError, match="column-major"):
        M.scaled_mm(a, w.t().contiguous(), one, one)
    with pytest.raises(ValueError, match="multiples of 16"):
        M.scaled_mm(torch.randn(16, 24).to(torch.float8_e4m3fn), torch.randn(16, 24).to(torch.float8_e4m3fn).t(),
                    one, one)
    with pytest.raises(ValueError, match="e5m2 x e5m2"):
        M.scaled_mm(a.to(torch.float8_e5m2), w.t().to(torch.float8_e5m2), one, one)


def test_fp8_model_trains():
    cfg = micro(hidden_size=32, intermediate_size=64, fp8=True)
    m = make(cfg)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    ids = torch.randint(0, 97, (4, 17))
    losses = []
    for _ in range(15):
        loss = m(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(l) for l in losses) and losses[-1] < losses[0] - 0.3


def test_bf16_autocast_close_to_fp32():
    m = make()
    ids = torch.randint(0, 97, (2, 10))
    seen = {}
    m.model.layers[0].self_attn.q_proj.register_forward_hook(lambda mod, i, o: seen.__setitem__("q", o.dtype))
    m.model.layers[0].input_layernorm.register_forward_hook(lambda mod, i, o: seen.__setitem__("norm", o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lb = m(ids[:, :-1], targets=ids[:, 1:])
    assert seen == {"q": torch.bfloat16, "norm": torch.float32}  # bf16 matmuls, fp32 norm and residual stream
    lf = m(ids[:, :-1], targets=ids[:, 1:])
    assert abs(lb.item() - lf.item()) < 0.02 and m.model.embed_tokens.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------- CLI / CUDA


def test_cli_prints_presets_and_data_plots_masks(tmp_path):
    out = subprocess.run([sys.executable, "model.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["command-a"]["params"] == 111_057_580_032
    out = subprocess.run([sys.executable, "data.py", "--plot-masks", str(tmp_path / "m.png")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m.png").stat().st_size > 10_000


def cuda(test):   # `pytest -m cuda` selects these on a GPU machine; elsewhere they skip
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


@cuda
def test_flex_attention_matches_sdpa_on_cuda():
    m = make(micro(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)).cuda()  # head_dim 16
    docs = torch.tensor([[0] * 40 + [1] * 50 + [2] * 38])
    ids = torch.randint(0, 97, (1, 128), device="cuda")
    m.config.attn_backend = "flex"
    a = m(ids, doc_ids=docs.cuda())
    m.config.attn_backend = "sdpa"
    b = m(ids, doc_ids=docs.cuda())
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@cuda
def test_fp8_scaled_mm_on_cuda():
    x = torch.randn(64, 128, device="cuda", requires_grad=True)
    w = torch.randn(96, 128, device="cuda", requires_grad=True)
    y = M.fp8_linear(x, w)
    g = torch.randn(64, 96, device="cuda")
    y.float().backward(g)
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    assert rel(y, x.detach() @ w.detach().T) < 0.06
    assert rel(x.grad, g @ w.detach()) < 0.10 and rel(w.grad, g.T @ x.detach()) < 0.10


def test_logits_index_returns_only_the_requested_positions():
    m = make()
    ids = torch.randint(0, 97, (3, 9))
    idx = torch.tensor([8, 2, 5])
    full = m(ids)
    torch.testing.assert_close(m(ids, logits_index=idx)[:, 0], full[torch.arange(3), idx])
