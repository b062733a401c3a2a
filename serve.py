"""
Serving Command A (Cohere, arXiv 2504.00698, "Efficiency" and the serving claim of the introduction: 156
tokens/s for the 111B model on two GPUs), at our scale: an inference engine with window-aware KV caches and
continuous batching. api.py puts a Cohere-v2 and an OpenAI-compatible HTTP API in front of it.

What the report says, and where it lives below:
  - 3 of 4 layers are sliding-window (W keys incl. the query): their cache is a ring of W positions, so
    KV memory grows only on the 1-in-4 full layers, L_full*T + L_sliding*min(T, W) tokens  -> WindowKVCache
  - grouped-query attention: the cache stores nkv heads, not nh                             -> WindowKVCache
  - high-throughput serving: batched prefill, continuous batching, sampling with a seed   -> Engine
  - chat format with tools, documents/citations and safety modes (tokenizer.py renders and parses it)
    exposed as Cohere's v2 Chat API and as OpenAI's chat completions, with SSE streaming   -> api.py

Design notes (traps other engines fell into, SPEC 8):
  - the ring buffer stores the key for position p at slot p % W. A decode step writes in place (the slot it
    overwrites holds position p - W, just outside the window). A multi-token chunk instead attends over
    concat(old ring, chunk) and only then stores its last W tokens: writing first would evict keys that the
    chunk's own early queries still need.
  - the mask is model.py's attention_allowed() on explicit positions, so the window off-by-one and "global
    layers inheriting the window" cannot differ between training and serving.
  - batched prefill pads prompts on the right; pad keys get position -1 (never attended), pad queries reuse
    the last real position so no query row is fully masked (SDPA would return NaN for it).
  - prefix cache: a prompt that starts with cached blocks (the chat preamble) copies their K/V into its row
    (full layers: positions 0..P-1; sliding layers: the ring as it stood after P tokens) and prefills only the
    rest; at least one token is always prefilled, since its logits give the first new token. -> PrefixCache
  - continuous batching keeps the live requests in cache rows 0..n-1 (a finished request's row is filled by
    moving the last one in), so every decode step attends over slices of the cache, never gathered copies.
  - tensor parallelism (`torchrun --nproc_per_node N serve.py --tp N`, parallel.shard_for_decode): every rank
    holds its heads, KV heads and MLP columns; rank 0 schedules and sends each model call to the other ranks,
    which replay it (Engine.follow), so all run the same collectives: one all-reduce per layer.

Measured figures (`python serve.py --bench`: TTFT, tok/s against a naive loop and transformers' generate, KV
bytes, the prefix cache's TTFT) are in README's Serving section, with their conditions.

Prefill asks model.py for the last prompt token's logits only (logits_index), so its memory does not grow
with B x T x V. Limits: the CUDA path (bf16 / --fp8 weights, --cuda-graphs) is written but has not run on a GPU.

References: karpathy/nanochat (engine.py: KV cache + per-row state), pytorch-labs/gpt-fast (static cache,
tokens/s with conditions), vLLM / Orca (Yu et al. 2022, iteration-level scheduling = continuous batching),
Holtzman et al. 2020 (top-p), Cohere v2 Chat API and OpenAI Chat Completions API references (shapes).

    engine = Engine(CommandA.from_pretrained(d), Tokenizer.load(d))
    engine.generate([ids_a, ids_b], max_new_tokens=64)            # -> new tokens per prompt
    python serve.py --ckpt DIR --port 8000  |  --chat    (api.py's CLI: the process becomes python api.py)
    python serve.py --bench
"""
from __future__ import annotations

import collections
import hashlib
import os
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import CommandA, ModelConfig, apply_rope, attend, output_logits, residual_add, rope_cos_sin

# ----------------------------------------------------------------------------------------------------------
# KV caches. model.py's forward calls two methods: reserve(position_ids) once per forward, then update() per
# layer. KVCache is the simple reference; WindowKVCache is the engine's.


class KVCache:
    """A contiguous cache that keeps every position for every layer (the simple reference).

    The model calls `reserve(position_ids)` once per forward: it records where the new tokens go and returns,
    per layer kind, the positions of all keys the layers will attend over (-1 = empty slot). Each layer then
    calls `update(layer_idx, k, v)` and gets back the keys/values to attend over."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.pos = torch.full((batch_size, max_len), -1, dtype=torch.long, device=device)
        self.length, self.max_len = 0, max_len

    def reserve(self, position_ids: torch.Tensor) -> dict:
        T = position_ids.shape[1]
        if self.length + T > self.max_len:
            raise ValueError(f"KVCache full: {self.length} + {T} tokens > max_len={self.max_len}")
        self.start, self.length = self.length, self.length + T
        self.pos[:, self.start:self.length] = position_ids
        kv_pos = self.pos[:, :self.length]
        return {"sliding": kv_pos, "full": kv_pos}

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        self.k[layer_idx][:, :, self.start:self.length] = k
        self.v[layer_idx][:, :, self.start:self.length] = v
        return self.k[layer_idx][:, :, :self.length], self.v[layer_idx][:, :, :self.length]


class WindowKVCache:
    """Per-layer caches for up to `max_batch` sequences ("slots"): sliding layers keep a ring of W positions,
    full layers keep all `max_len`. Speaks model.py's cache protocol (reserve once per forward, update per
    layer) for a contiguous range of slots chosen with begin()."""

    def __init__(self, cfg: ModelConfig, max_batch: int, max_len: int, device=None, dtype=torch.float32,
                 kv_heads: int | None = None):
        self.cfg, self.W, self.max_len, self.max_batch = cfg, cfg.sliding_window, max_len, max_batch
        self.ring = min(self.W, max_len)        # a sequence never holds more than max_len positions anyway
        self.kinds = list(cfg.layer_types)
        nkv, dh = kv_heads or cfg.num_key_value_heads, cfg.head_dim   # kv_heads: this TP rank's share
        size = {"sliding": self.ring, "full": max_len}
        self.k = [torch.zeros(max_batch, nkv, size[k], dh, device=device, dtype=dtype) for k in self.kinds]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.pos = {kind: torch.full((max_batch, size[kind]), -1, dtype=torch.long, device=device)
                    for kind in ("sliding", "full")}     # position held in each slot, -1 = empty
        self.length = torch.zeros(max_batch, dtype=torch.long, device=device)  # 1 + last position held
        self.r0, self.r1, self.valid = 0, max_batch, None
        self.tap = None       # a list: update() leaves each layer's new k/v in it (the engine's prefix cache)

    # --- bookkeeping by the engine ------------------------------------------------------------------------
    def begin(self, r0: int, r1: int, valid: torch.Tensor | None = None):
        """The next forward runs on slots r0..r1-1; valid (B, T) marks real tokens (False = right padding)."""
        self.r0, self.r1, self.valid = r0, r1, valid

    def reset(self, slot: int):
        for p in self.pos.values():
            p[slot] = -1
        self.length[slot] = 0

    def move(self, src: int, dst: int):
        """Copy sequence `src` into slot `dst` (compaction when a request leaves)."""
        n = int(self.length[src])
        for i, kind in enumerate(self.kinds):
            S = self.ring if kind == "sliding" else n
            self.k[i][dst, :, :S] = self.k[i][src, :, :S]
            self.v[i][dst, :, :S] = self.v[i][src, :, :S]
        for p in self.pos.values():
            p[dst] = p[src]
        self.length[dst] = n

    def nbytes(self) -> int:
        """Bytes allocated for keys and values (all slots)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def held_bytes(self, slot: int, bytes_per_el: int | None = None) -> int:
        """Bytes of K/V one sequence actually holds: occupied slots of every layer's buffer."""
        el = bytes_per_el or self.k[0].element_size()
        tokens = sum(int((self.pos[kind][slot] >= 0).sum()) for kind in self.kinds)
        return tokens * self.cfg.kv_bytes_per_token_per_layer(el)

    # --- the protocol model.py calls -----------------------------------------------------------------------
    # Both stay eager under torch.compile: their bookkeeping is data-dependent (nonzero, host reads), and dynamo
    # tracing into them broke the graph at every such statement, each piece compiled on its own
    @torch.compiler.disable
    def reserve(self, position_ids: torch.Tensor) -> dict:
        r0, r1, W = self.r0, self.r1, self.W
        B, T = position_ids.shape
        if B != r1 - r0:
            raise ValueError(f"cache.begin() chose {r1 - r0} slots but the forward has batch {B}")
        valid = self.valid if self.valid is not None else torch.ones_like(position_ids, dtype=torch.bool)
        self.valid = None
        new_pos = torch.where(valid, position_ids, -1)
        last = new_pos.max(dim=1).values                                    # (B,) last real position per row
        if int(last.max()) >= self.max_len:
            raise ValueError(f"position {int(last.max())} does not fit a cache of max_len={self.max_len}")
        bi, ti = valid.nonzero(as_tuple=True)
        p = position_ids[bi, ti]
        # full layers: the key of position p lives at index p
        self._full = (bi, ti, p)
        self.pos["full"][r0 + bi, p] = p
        self.length[r0:r1] = torch.maximum(self.length[r0:r1], last + 1)
        self._S = int(self.length[r0:r1].max())
        out = {"full": self.pos["full"][r0:r1, :self._S]}
        # sliding layers: ring slot p % W
        ring_pos = self.pos["sliding"][r0:r1]
        if T == 1:        # decode: overwrite in place (the evicted key, p - W, is outside every window now)
            self._mode = "inplace"
            self._ring = (bi, ti, p % W)
            ring_pos[bi, p % W] = p
            out["sliding"] = ring_pos
        else:             # a chunk: attend over concat(old ring, chunk), then keep the chunk's last W tokens
            self._mode = "fresh" if not bool((ring_pos >= 0).any()) else "concat"
            out["sliding"] = new_pos if self._mode == "fresh" else torch.cat([ring_pos, new_pos], dim=1)
            keep = valid & (position_ids > last[:, None] - W)
            kb, kt = keep.nonzero(as_tuple=True)
            kp = position_ids[kb, kt]
            self._ring = (kb, kt, kp % W)
            ring_pos[kb, kp % W] = kp     # after the cat above, which copied the old positions
        return out

    @torch.compiler.disable
    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        K, V, r0, r1 = self.k[layer_idx], self.v[layer_idx], self.r0, self.r1
        if self.tap is not None:                 # every new position, before the ring drops all but the last W
            self.tap[layer_idx] = (k, v)
        if self.kinds[layer_idx] == "full":
            bi, ti, p = self._full
            K[r0 + bi, :, p] = k[bi, :, ti].to(K.dtype)      # (N, nkv, dh) on both sides
            V[r0 + bi, :, p] = v[bi, :, ti].to(V.dtype)
            return K[r0:r1, :, :self._S], V[r0:r1, :, :self._S]
        bi, ti, slot = self._ring
        if self._mode == "inplace":
            K[r0 + bi, :, slot] = k[bi, :, ti].to(K.dtype)
            V[r0 + bi, :, slot] = v[bi, :, ti].to(V.dtype)
            return K[r0:r1], V[r0:r1]
        if self._mode == "fresh":
            ko, vo = k, v
        else:
            ko, vo = torch.cat([K[r0:r1], k.to(K.dtype)], dim=2), torch.cat([V[r0:r1], v.to(V.dtype)], dim=2)
        K[r0 + bi, :, slot] = k[bi, :, ti].to(K.dtype)
        V[r0 + bi, :, slot] = v[bi, :, ti].to(V.dtype)
        return ko, vo


# ----------------------------------------------------------------------------------------------------------
# The prefix cache: every chat request starts with the same rendered preamble; prefill it once


class PrefixCache:
    """K/V of prompt prefixes in blocks of `block` tokens, LRU under a byte bound. A block's key hashes its tokens
    and its parent's key, so a key names the whole prefix up to the block's end (vLLM's block hashes). A block
    holds every layer's k/v for its own positions, (L, nkv, block, dh): a hit at prefix P needs the full layers'
    K/V for 0..P-1 (the chain) and each sliding ring as it is after P tokens (P-W..P-1: the chain's last blocks),
    and blocks hold both with nothing twice. A ring snapshot per cached prefix would cost W positions per block
    boundary or, taken only at a request's longest boundary, miss the next request, which leaves the shared
    preamble inside that last block. Every use touches a chain leaf first, so a parent is always more recently
    used than its children: the least recently used block has no child, and eviction never strands a chain."""

    def __init__(self, max_bytes: int, block: int = 64):
        self.max_bytes, self.block, self.nbytes = max_bytes, block, 0
        self.blocks = collections.OrderedDict()           # key -> (k, v), least recently used first

    def keys(self, tokens: list) -> list[bytes]:
        h, b = [b""], self.block                          # one key per complete block
        for j in range(len(tokens) // b):
            h.append(hashlib.blake2b(h[-1] + str(tokens[j * b:(j + 1) * b]).encode()).digest())
        return h[1:]

    def match(self, keys: list) -> list[tuple]:
        """(k, v) of the longest held chain of `keys`, marked as just used (leaf first)."""
        n = next((j for j, key in enumerate(keys) if key not in self.blocks), len(keys))
        for key in reversed(keys[:n]):
            self.blocks.move_to_end(key)
        return [self.blocks[key] for key in keys[:n]]

    def insert(self, keys: list, j0: int, kv: list):
        """Blocks j0.. of the chain `keys` (a hit holds those before j0), then evict down to the bound."""
        if j0 and keys[j0 - 1] not in self.blocks:        # the parent went, evicted for another row's blocks
            return
        for key, (k, v) in zip(keys[j0:], kv):
            if key not in self.blocks:
                self.blocks[key] = (k, v)
                self.nbytes += 2 * k.numel() * k.element_size()
        self.match(keys[:j0 + len(kv)])
        while self.nbytes > self.max_bytes:
            k, _ = self.blocks.popitem(last=False)[1]
            self.nbytes -= 2 * k.numel() * k.element_size()


# ----------------------------------------------------------------------------------------------------------
# The decode step, fused: what the parallel block buys at serving time


# oneDNN's pre-packed weights (CPU, fp32). A matmul of a few rows against a large weight spends most of its time
# re-packing the weight into the kernel's blocked layout, every call, from memory (a decode step's weights are out
# of cache by the time it comes back to them). Packed once, the kernel streams them as they are. Measured on the
# 2-core AVX2 machine, a whole step's matmuls with cold weights: 1.1-1.6x faster at 8-64 rows on the race and
# small shapes, and at 16-64 on tiny (0.98x at 8); 0.4-0.96x at 1-2 rows, where the plain K x N matmul stays
# (1 row runs at memory bandwidth).
PACKED_MIN_BATCH = 8


@torch.library.custom_op("commanda::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ W^T, W (N, K) packed by torch.ops.mkldnn._reorder_linear_weight. A custom op so that torch.compile
    calls it as it is (inductor lowers oneDNN linears only for weights frozen into the graph as constants)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


@torch.library.custom_op("commanda::packed_linear_add", mutates_args=())
def packed_linear_add(x: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h + x @ W^T in one oneDNN call (the add is the kernel's post-op), W packed as in packed_linear."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, h, w, None, "add")


def addmm_into(x: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h + x @ w for w K x N: packed_linear_add's unpacked counterpart."""
    return torch.addmm(h, x, w)


@packed_linear.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


@packed_linear_add.register_fake
def _(x, h, w):
    return torch.empty_like(h)


def pack_weight(w: torch.Tensor, batch_hint: int = 16):
    """(N, K) weight -> oneDNN's blocked layout for x @ w^T, or None where that is not available or not measured
    to pay (not CPU, not fp32, a torch built without oneDNN)."""
    if w.device.type != "cpu" or w.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), batch_hint)
    except (RuntimeError, AttributeError):
        return None


class FusedDecode:
    """One decode step (one new token per live sequence) straight on the WindowKVCache, with the parallel
    block's two fusions (the report's reason for the parallel block is throughput, and this is where it shows):

      - q, k, v, gate and up all read the SAME LayerNorm output, so they are one matmul: x @ W_in,
        W_in = [Wq; Wk; Wv; Wgate; Wup]^T  (H x (nh*dh + 2*nkv*dh + 2*I)).
      - attention's o_proj and the MLP's down_proj both write into the same residual, so they are one matmul
        too, with the residual add folded in: h = addmm(h, [attn, silu(gate)*up], [Wo^T; Wdown^T]).

    Two matmuls per layer instead of seven, about a dozen kernels per layer instead of ~70 through the generic
    forward (its mask building and cache bookkeeping are per-chunk work a decode step doesn't need). Weights
    are stored K x N contiguous, the layout in which a 1-row matmul is fastest on CPU (measured 2-3x over
    F.linear's N x K for fp32 at N >= 3584). Only the weights are concatenated: the norm modules, RoPE,
    attention and output logits are model.py's own; tests check the step against the uncached model.

    On CPU in fp32, batches of PACKED_MIN_BATCH rows or more run the same two matmuls (and the output layer)
    on oneDNN-packed copies of the fused weights instead (pack=False: never).

    The fused weights are a copy (one more model's worth of memory, two with the packed copies, so Engine uses
    this only below a size budget) rebuilt whenever a parameter changes in place (tensor._version), so an
    Engine sampling from a policy that is being trained (posttrain.py) never decodes with stale weights."""

    def __init__(self, model: CommandA, pack: bool = True):
        self.model, self.cfg, self.pack = model, model.config, pack
        self._params = list(model.parameters())     # walking the module tree each step costs ~0.4 ms
        self._versions = None
        self.refresh()

    def _version_key(self):
        return tuple(p._version for p in self._params)

    @torch.no_grad()
    def refresh(self):
        """Rebuild the fused weights if any parameter changed since the last build. Rebuilt IN PLACE (copy_ into
        the same tensors), so CUDA graphs captured over them stay valid."""
        key = self._version_key()
        if key == self._versions:
            return
        n_by_k = []                                   # (w_in, w_out) per layer, then the tied embedding, all N x K
        for layer in self.model.model.layers:
            a, m = layer.self_attn, layer.mlp
            n_by_k.append((torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, m.gate_proj.weight,
                                      m.up_proj.weight]),
                           torch.cat([a.o_proj.weight, m.down_proj.weight], dim=1)))
        n_by_k.append((self.model.model.embed_tokens.weight,))
        fresh = [tuple(w.t().contiguous() for w in ws) for ws in n_by_k]    # K x N (the output embedding: H x V)
        # the packed copies are rebuilt, not copied into: they only exist on CPU, where no CUDA graph holds them
        packed = [tuple(pack_weight(w) for w in ws) for ws in n_by_k] if self.pack else None
        self.packed = packed if packed and all(w is not None for ws in packed for w in ws) else None
        if self._versions is None:
            self.weights = fresh
        else:
            for dst, src in zip(self.weights, fresh):
                for d, s in zip(dst, src):
                    d.copy_(s)
        self.embed = self.model.model.embed_tokens.weight
        self._versions = key

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, cache: "WindowKVCache", static: bool = False):
        """ids, pos: (B,) for cache rows 0..B-1. Writes each new k/v into its slot and returns (B, V) fp32.
        static=True: no host synchronization and shapes that depend only on B (full layers attend over all
        max_len slots under a mask) -- the form a CUDA graph can capture (StaticDecode below)."""
        cfg, first = self.cfg, self.model.model.layers[0]
        B = ids.shape[0]
        # this process's heads and MLP columns (a TP rank holds a share: parallel.shard_for_decode)
        nh, nkv, dh, I = first.self_attn.nh, first.self_attn.nkv, cfg.head_dim, first.mlp.gate_proj.weight.shape[0]
        nq, nk = nh * dh, nkv * dh
        rows = torch.arange(B, device=ids.device)
        ring_slot = pos % cache.ring
        # bookkeeping once per step (not per layer): which position each slot now holds
        cache.pos["sliding"][rows, ring_slot] = pos
        cache.pos["full"][rows, pos] = pos
        cache.length[:B] = pos + 1
        S = cache.max_len if static else int(pos.max()) + 1             # full layers attend over 0..S-1
        # a mask only where some row holds empty slots (short prompts, mixed lengths); None = attend to all
        masks = {}
        for kind, held in (("sliding", cache.pos["sliding"][:B]), ("full", cache.pos["full"][:B, :S])):
            ok = held >= 0
            masks[kind] = ok[:, None, None, :] if static or not bool(ok.all()) else None
        cos, sin = rope_cos_sin(pos[:, None], dh, cfg.rope_theta, self.embed.dtype)  # (B, 1, 1, dh)
        h = F.embedding(ids, self.embed)                                  # (B, H)
        # the two matmuls per layer and the output layer: on the packed copies for batches (PACKED_MIN_BATCH)
        if self.packed is not None and B >= PACKED_MIN_BATCH:
            weights, mm, mm_add = self.packed, packed_linear, packed_linear_add
        else:
            weights, mm, mm_add = self.weights, torch.matmul, addmm_into
        for i, (layer, (w_in, w_out)) in enumerate(zip(self.model.model.layers, weights)):
            y = mm(layer.input_layernorm(h), w_in)                        # (B, nq + 2 nk + 2 I)
            qk = y[:, :nq + nk].view(B, nh + nkv, 1, dh)
            kind = layer.self_attn.kind
            if kind == "sliding":                                         # RoPE on q and k at once; NoPE on full
                qk = apply_rope(qk, cos, sin)
            q, k = qk[:, :nh], qk[:, nh:]
            v = y[:, nq + nk:nq + 2 * nk].view(B, nkv, 1, dh)
            K, V = cache.k[i], cache.v[i]
            slot = ring_slot if kind == "sliding" else pos
            K[rows, :, slot] = k[:, :, 0].to(K.dtype)
            V[rows, :, slot] = v[:, :, 0].to(V.dtype)
            if kind == "sliding":
                K, V = K[:B], V[:B]
            else:
                K, V = K[:B, :, :S], V[:B, :, :S]
            attn = attend(q, K, V, masks[kind])                           # (B, nh, 1, dh)
            g, u = y[:, nq + 2 * nk:nq + 2 * nk + I], y[:, nq + 2 * nk + I:]
            z = torch.cat([attn.reshape(B, nq), F.silu(g) * u], dim=1)   # [attn, swiglu] feeds [Wo^T; Wdown^T]
            if layer.add_branches is residual_add:
                h = mm_add(z, h, w_out)                                   # h + o_proj(attn) + down_proj(mlp)
            else:                                                         # a TP rank: the hook all-reduces
                h = layer.add_branches(h, mm(z, w_out), 0)
        return output_logits(self.model.model.norm(h), weights[-1][0], cfg, matmul=mm)


class StaticDecode:
    """FusedDecode in fixed shapes, optionally replayed as CUDA graphs (gpt-fast's trick for small-batch decode,
    where a GPU spends more time launching ~12 kernels per layer than running them).

    The live batch B is padded up to a bucket (1, 2, 4, ..., max_batch); the extra rows decode position 0 in
    free cache slots (harmless: a slot is reset before a prefill uses it). Inputs go through fixed buffers, so
    a graph captured once per bucket replays with new tokens. graphs=False runs the same static step eagerly:
    that is how the padding and masking are tested on a CPU."""

    compiled_buckets = 0      # over all compiled instances in this process (see recompile_limit below)

    def __init__(self, fused: FusedDecode, cache: "WindowKVCache", graphs: bool, compile: bool = False):
        if graphs and not cache.k[0].is_cuda:
            raise ValueError("CUDA graphs need the model and cache on a CUDA device")
        self.fused, self.cache, self.graphs = fused, cache, graphs
        # compile=True: inductor fuses the step's small kernels (norms, RoPE, SwiGLU, cache writes, masks) into a
        # few loops. Static shapes, so one compilation per bucket (~10 s each on a 2-core CPU); the weights are
        # graph inputs (refresh() updates them in place), so a policy in training never needs a recompile.
        step = lambda ids, pos, c: fused(ids, pos, c, static=True)            # noqa: E731
        self.step = torch.compile(step, dynamic=False) if compile else step
        dev, n = cache.k[0].device, cache.max_batch
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.pos = torch.zeros(n, dtype=torch.long, device=dev)
        self.buckets = sorted({min(2 ** i, n) for i in range(n.bit_length() + 1)})
        if compile:   # one compiled graph per bucket must fit dynamo's cache, which is per code object: every
            # StaticDecode of the process compiles the same `step` code, so the limit grows with each one (the
            # bench's compiled engines fell back to eager, silently, once the first ones had used it up)
            StaticDecode.compiled_buckets += len(self.buckets)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                       StaticDecode.compiled_buckets + 2)
        self.captured = {}                                  # bucket -> (graph, output buffer)

    def refresh(self):
        self.fused.refresh()                                # in place: captured graphs see the new weights

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, cache: "WindowKVCache") -> torch.Tensor:
        B = ids.shape[0]
        Bb = next(b for b in self.buckets if b >= B)
        self.ids[:B].copy_(ids)
        self.pos[:B].copy_(pos)
        self.pos[B:Bb].zero_()                              # padding rows: position 0 of a free slot
        if not self.graphs:
            return self.step(self.ids[:Bb], self.pos[:Bb], cache)[:B]
        if Bb not in self.captured:
            # warm up on a side stream (allocator and cuBLAS workspaces), then capture one step
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    self.step(self.ids[:Bb], self.pos[:Bb], cache)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = self.step(self.ids[:Bb], self.pos[:Bb], cache)
            self.captured[Bb] = (g, out)
        g, out = self.captured[Bb]
        g.replay()
        return out[:B]


# ----------------------------------------------------------------------------------------------------------
# Sampling


def sample_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                 generator: torch.Generator) -> int:
    """One token from fp32 logits (V,): temperature, then top-k, then top-p (the smallest set of tokens whose
    probability reaches p; the most likely token is always kept). The generator makes it reproducible."""
    x = logits.float().cpu() / temperature
    if top_k is not None and 0 < top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sx, idx = torch.sort(x, descending=True)
        probs = torch.softmax(sx, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p          # mass BEFORE this token already reaches p
        x = torch.full_like(x, float("-inf")).scatter(0, idx, sx.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(torch.softmax(x, dim=-1), 1, generator=generator))


# ----------------------------------------------------------------------------------------------------------
# The engine: batched prefill, continuous batching


@dataclass
class Request:
    prompt: list
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop_tokens: frozenset = frozenset()
    generator: torch.Generator | None = None
    sink: queue.Queue | None = None     # gets (tag, token) per token and (tag, None) when finished
    tag: object = None
    out: list = field(default_factory=list)
    finish_reason: str | None = None    # 'stop' | 'length' | 'cancelled' | 'error'
    error: str | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    logprobs: int | None = None         # None: off; k >= 0: each output token's log-prob and the top k
    token_logprobs: list = field(default_factory=list)   # per output token: (log-prob, [(id, log-prob)] * k)
    _next_lp: tuple | None = None

    def finish(self, reason: str, error: str | None = None):
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error
            if self.sink is not None:
                self.sink.put((self.tag, None))
            self.done.set()


class Engine:
    """Generation over a WindowKVCache. Each step() admits waiting requests (one padded prefill for the group,
    within a token budget), then runs ONE decode step for every live request: requests join and leave
    between decode steps (continuous batching). Call generate()/generate_stream() directly, or start() a
    background thread and submit() from many threads (the HTTP server does that)."""

    def __init__(self, model: CommandA, tokenizer=None, max_batch: int = 32, max_len: int | None = None,
                 prefill_tokens: int | None = None, cache_dtype: torch.dtype | None = None, compile: bool = False,
                 fused: bool | None = None, cuda_graphs: bool = False, prefix_cache_mb: float = 256,
                 prefix_block: int = 64, tp_group=None, pack_weights: bool = True):
        self.model, self.tokenizer, self.cfg = model.eval(), tokenizer, model.config
        # tensor parallelism (parallel.shard_for_decode): rank 0 schedules, the other ranks follow() its calls;
        # the prefix cache is rank 0's own state, and CUDA graphs would capture collectives: both off under TP
        self.tp_group, self.tp_calls, self._tp_lock, self._tp_open = tp_group, collections.Counter(), \
            threading.Lock(), tp_group is not None and dist.get_rank(tp_group) == 0
        if tp_group is not None:
            if cuda_graphs:
                raise ValueError("--cuda-graphs does not combine with --tp")
            prefix_cache_mb = 0
        # decode steps through FusedDecode (see above): on by default while its copy of the weights is small
        # (<= 2 GiB); FP8 weights keep model.py's fp8_linear path
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if fused is None:
            fused = isinstance(model, CommandA) and weight_bytes <= 2 * 2**30 and not self.cfg.fp8
        fused = fused or cuda_graphs                    # the graphs replay the fused step
        if fused and self.cfg.fp8:
            raise ValueError("fused decode (and so --cuda-graphs) has no FP8 path: use fused=False with fp8 weights")
        self.fused = FusedDecode(model, pack=pack_weights) if fused else None
        # compile=True: the fused decode step is compiled in static shapes (StaticDecode, below); the generic
        # forward (prefill, and decode when not fused) with dynamic=True, since batch size and cache length
        # change every call. The cache's Python bookkeeping stays eager (a graph break), where it belongs.
        self.forward = torch.compile(self.model, dynamic=True) if compile else self.model
        p = next(model.parameters(), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.max_len = max_len or min(self.cfg.max_position_embeddings, 4096)
        # padded prompt tokens per prefill: bounds activation and mask memory (logits are last-token only)
        self.prefill_tokens = prefill_tokens or 4096
        self.max_batch = max_batch
        self.cache = WindowKVCache(self.cfg, max_batch, self.max_len, self.device,
                                   cache_dtype or (p.dtype if p is not None else torch.float32),
                                   kv_heads=model.model.layers[0].self_attn.nkv if isinstance(model, CommandA) else None)
        if cuda_graphs or (compile and self.fused is not None):
            # the static step replaces the eager fused one: replayed as CUDA graphs (raises unless the cache lives
            # on a CUDA device) and/or compiled by inductor
            self.fused = StaticDecode(self.fused, self.cache, graphs=cuda_graphs, compile=compile)
        self.default_stop = frozenset([tokenizer.eot_id] if tokenizer is not None else [])
        self.active: list[Request] = []        # active[i] lives in cache slot i
        self.waiting: collections.deque[Request] = collections.deque()
        self.cv = threading.Condition()
        self._thread, self._stopping = None, False
        # a shared prompt prefix (the chat preamble) prefills once; 0 MB: off. Used only inside step(), so on
        # the engine's one thread. Weights changed in place (a policy in training) empty it (_restore).
        self.prefix = PrefixCache(int(prefix_cache_mb * 2**20), prefix_block) if prefix_cache_mb > 0 else None
        self._params, self._weights_seen = list(model.parameters()), None
        # update() leaves every layer's new k/v in this list: a fixed object, so torch.compile guards stay put
        self.cache.tap = [None] * self.cfg.num_hidden_layers if self.prefix is not None else None
        self.stats = {"steps": 0, "prefills": 0, "max_active": 0, "tokens": 0,
                      "prefix_hits": 0, "prefix_tokens": 0, "prefix_bytes": 0}

    # --- submitting ---------------------------------------------------------------------------------------
    def submit(self, prompt, max_new_tokens: int, temperature: float = 0.0, top_k=None, top_p=None,
               seed: int | None = None, stop_tokens=None, sink=None, tag=None, logprobs: int | None = None) -> Request:
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("empty prompt: give at least one token")
        if any(t < 0 or t >= self.cfg.vocab_size for t in prompt):
            raise ValueError(f"prompt has token ids outside [0, {self.cfg.vocab_size})")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if len(prompt) + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"context of {self.max_len} tokens")
        if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 0):
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0")
        g = torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))
        stop = self.default_stop if stop_tokens is None else frozenset(int(t) for t in stop_tokens)
        if logprobs is not None and not 0 <= logprobs <= min(20, self.cfg.vocab_size):
            raise ValueError(f"logprobs must be in [0, 20], got {logprobs!r}")
        req = Request(prompt, max_new_tokens, float(temperature), top_k, top_p, stop, g, sink, tag, logprobs=logprobs)
        with self.cv:
            self.waiting.append(req)
            self.cv.notify()
        return req

    def cancel(self, req: Request):
        """Frees the request's slot at the next step (a client that went away)."""
        req.cancelled = True
        with self.cv:
            self.cv.notify()

    # --- one iteration --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self):
        self._retire()                                # cancelled ones leave before we spend compute on them
        new, budget = [], self.prefill_tokens
        with self.cv:
            while self.waiting and len(self.active) + len(new) < self.max_batch:
                r = self.waiting[0]
                if r.cancelled:
                    self.waiting.popleft().finish("cancelled")
                    continue
                T = max([len(x.prompt) for x in new] + [len(r.prompt)])
                if new and T * (len(new) + 1) > budget:  # padded prefill cost; the first one always goes
                    break
                new.append(self.waiting.popleft())
        if new:
            self._prefill(new)
            self._retire()
        if self.active:
            self._decode()
            self._retire()
        self.stats["steps"] += 1

    def _prefill(self, new: list[Request]):
        n0, B = len(self.active), len(new)
        start = [self._restore(n0 + i, r) for i, r in enumerate(new)]   # tokens a prefix-cache hit already holds
        T = max(len(r.prompt) - s for r, s in zip(new, start))
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        for i, (r, s) in enumerate(zip(new, start)):
            L = len(r.prompt) - s
            ids[i, :L] = torch.tensor(r.prompt[s:])
            pos[i] = s + torch.arange(T).clamp(max=L - 1)   # pad queries repeat the last real position (no NaN rows)
            valid[i, :L] = True
        self.active.extend(new)
        self.stats["max_active"] = max(self.stats["max_active"], len(self.active))
        self.stats["prefills"] += 1
        last = self._call("prefill", n0, ids, pos, valid)                      # (B, V) at each last prompt token
        if self.prefix is not None:
            self._store(new, start)
        self._emit(new, self._sample(last, new))

    def _restore(self, slot: int, r: Request) -> int:
        """Empty `slot`, then copy in the longest cached prefix of r.prompt that leaves a token to prefill (its
        logits give the first new token). Returns the prefix length P: positions continue at P."""
        c, pc = self.cache, self.prefix
        c.reset(slot)
        if pc is None:
            return 0
        if (version := tuple(p._version for p in self._params)) != self._weights_seen:   # K/V of old weights
            self.prefix, self._weights_seen = PrefixCache(pc.max_bytes, pc.block), version
            return 0
        hit = pc.match(pc.keys(r.prompt)[:(len(r.prompt) - 1) // pc.block])
        if not hit:
            return 0
        K, V = (torch.cat(t, dim=2) for t in zip(*hit))    # (L, nkv, P, dh)
        P = K.shape[2]
        p = torch.arange(P, device=c.length.device)
        ring = p[max(0, P - c.W):]            # a sliding layer's ring after P tokens: position p in slot p % W
        for i, kind in enumerate(c.kinds):
            if kind == "full":
                c.k[i][slot, :, :P], c.v[i][slot, :, :P] = K[i], V[i]
            else:
                c.k[i][slot][:, ring % c.W], c.v[i][slot][:, ring % c.W] = K[i][:, ring], V[i][:, ring]
        c.pos["full"][slot, :P], c.pos["sliding"][slot, ring % c.W], c.length[slot] = p, ring, P
        self.stats["prefix_hits"] += 1
        self.stats["prefix_tokens"] += P
        return P

    def _store(self, new: list[Request], start: list[int]):
        """Cache the complete blocks each row just prefilled, taken from the tap: the prompt stays ONE forward
        (a miss pays no extra pass), and the ring has already dropped all but the last W positions."""
        tap, L = self.cache.tap, len(self.cache.tap)
        self.cache.tap = [None] * L                          # let go of the chunk's k/v
        b, dtype = self.prefix.block, self.cache.k[0].dtype
        for i, (r, s) in enumerate(zip(new, start)):       # s, a hit's P, is a block boundary
            n = len(r.prompt) // b * b - s                  # new tokens 0..n-1 complete blocks s/b, s/b + 1, ...
            if n > 0:
                K, V = (torch.stack([tap[j][x][i, :, :n] for j in range(L)]).to(dtype) for x in (0, 1))
                self.prefix.insert(self.prefix.keys(r.prompt), s // b,
                                   [(K[:, :, t:t + b].clone(), V[:, :, t:t + b].clone()) for t in range(0, n, b)])
        self.stats["prefix_bytes"] = self.prefix.nbytes

    def _decode(self):
        dev = self.device
        ids = torch.tensor([r.out[-1] for r in self.active], device=dev)
        pos = torch.tensor([len(r.prompt) + len(r.out) - 1 for r in self.active], device=dev)
        self._emit(self.active, self._sample(self._call("decode", ids, pos), self.active))

    # --- the calls that touch the model or the KV cache (under TP, every rank makes them in the same order) ---
    def _call(self, op: str, *args):
        """Run op_<op>(*args). Under TP, rank 0 first sends the call to the other ranks (follow), so every rank
        runs the same forward and the same collectives; one call at a time (HTTP threads call forward too)."""
        if self.tp_group is None:
            return getattr(self, "op_" + op)(*args)
        with self._tp_lock:
            self.tp_calls[op] += 1
            dist.broadcast_object_list([(op, args)], src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
            return getattr(self, "op_" + op)(*args)

    def follow(self):
        """A TP rank other than 0: replay rank 0's calls until its Engine.stop()."""
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
            op, args = box[0]
            if op == "stop":
                return
            getattr(self, "op_" + op)(*args)

    def op_prefill(self, n0: int, ids, pos, valid):
        dev = self.device
        if self.tp_group is not None:                  # rank 0 emptied these slots when it scheduled them
            for slot in range(n0, n0 + ids.shape[0]):
                self.cache.reset(slot)
        self.cache.begin(n0, n0 + ids.shape[0], valid.to(dev))
        return self.forward(ids.to(dev), position_ids=pos.to(dev), cache=self.cache,
                            logits_index=valid.sum(1).to(dev) - 1)[:, 0]

    def op_decode(self, ids, pos):
        if self.fused is not None:
            self.fused.refresh()                        # no-op unless the weights changed (a policy in training)
            return self.fused(ids, pos, self.cache)
        self.cache.begin(0, ids.shape[0])
        return self.forward(ids[:, None], position_ids=pos[:, None], cache=self.cache)[:, -1]

    def op_move(self, src: int, dst: int):
        self.cache.move(src, dst)

    def op_forward(self, ids):
        return self.model(ids)

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        toks = logits.argmax(dim=-1).tolist()            # greedy rows: one vectorized argmax
        for i, r in enumerate(reqs):
            if r.temperature > 0:
                toks[i] = sample_token(logits[i], r.temperature, r.top_k, r.top_p, r.generator)
            if r.logprobs is not None:                   # the model's distribution, before temperature / top-p
                lp = torch.log_softmax(logits[i].float(), dim=-1)
                top = lp.topk(r.logprobs) if r.logprobs else None
                r._next_lp = (lp[toks[i]].item(), list(zip(top.indices.tolist(), top.values.tolist())) if top else [])
        return toks

    def _emit(self, reqs: list[Request], toks: list[int]):
        now = time.perf_counter()
        for r, t in zip(reqs, toks):
            if r.finish_reason is not None:
                continue
            r.t_first = r.t_first or now
            if t in r.stop_tokens:                       # the stop token itself is not part of the output
                r.finish("stop")
                continue
            r.out.append(t)
            if r.logprobs is not None:
                r.token_logprobs.append(r._next_lp)
            self.stats["tokens"] += 1
            if r.sink is not None:
                r.sink.put((r.tag, t))
            if len(r.out) >= r.max_new_tokens:
                r.finish("length")

    def _retire(self):
        """Drop finished / cancelled requests; the last live row moves into each freed slot."""
        for i in range(len(self.active) - 1, -1, -1):
            r = self.active[i]
            if r.cancelled:
                r.finish("cancelled")
            if r.finish_reason is None:
                continue
            last = len(self.active) - 1
            if i != last:
                self._call("move", last, i)
                self.active[i] = self.active[last]
            self.active.pop()

    # --- driving it -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prompt_logprobs(self, prompt: list, k: int = 0) -> list:
        """Each prompt token's log-prob given the tokens before it ((None, []) for the first) and the top k
        alternatives, from one uncached forward of the model: what /v1/completions' echo returns."""
        ids = torch.tensor([prompt], device=self.device)
        lp = torch.log_softmax(self._call("forward", ids)[0, :-1].float(), dim=-1)   # (T-1, V): predicts 1..T-1
        chosen = lp.gather(1, ids[0, 1:, None])[:, 0].tolist()
        top = lp.topk(k, dim=-1) if k else None
        alts = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())] if top else [[]] * len(chosen)
        return [(None, [])] + list(zip(chosen, alts))

    def start(self):
        """Run the continuous-batching loop in a background thread (for servers)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        if self._thread is not None:
            with self.cv:
                self._stopping = True
                self.cv.notify()
            self._thread.join()
            self._thread = None
        if self._tp_open:                               # release the following ranks, once
            self._tp_open = False
            with self._tp_lock:
                dist.broadcast_object_list([("stop", ())], src=dist.get_global_rank(self.tp_group, 0),
                                           group=self.tp_group)

    def _loop(self):
        while True:
            with self.cv:
                while not self._stopping and not self.waiting and not self.active:
                    self.cv.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as e:  # a bug or OOM must not hang clients: fail what is in flight, keep serving
                print(f"engine: step failed: {e!r}", file=sys.stderr)
                with self.cv:
                    victims = self.active + list(self.waiting)
                    self.active, self.waiting = [], collections.deque()
                for r in victims:
                    r.finish("error", repr(e))
        for r in self.active + list(self.waiting):
            r.finish("cancelled")

    def _run(self, reqs: list[Request]):
        if self._thread is not None:
            for r in reqs:
                r.done.wait()
        else:
            while not all(r.done.is_set() for r in reqs):
                self.step()

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_k=None,
                 top_p=None, seed: int | None = None, stop_tokens=None) -> list[list[int]]:
        """New tokens per prompt (the stop token excluded). With a seed, prompt i samples with seed + i, so a
        result does not depend on what else is in the batch."""
        reqs = [self.submit(p, max_new_tokens, temperature, top_k, top_p, None if seed is None else seed + i,
                            stop_tokens) for i, p in enumerate(prompts)]
        self._run(reqs)
        return [r.out for r in reqs]

    def generate_stream(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                        top_k=None, top_p=None, seed: int | None = None, stop_tokens=None):
        """Yields (prompt index, token) as tokens are produced; the same tokens generate() would return."""
        sink = queue.Queue()
        reqs = [self.submit(p, max_new_tokens, temperature, top_k, top_p, None if seed is None else seed + i,
                            stop_tokens, sink, i) for i, p in enumerate(prompts)]
        left = len(reqs)
        try:
            while left:
                if self._thread is None and sink.empty():
                    self.step()
                    continue
                i, t = sink.get()
                if t is None:
                    left -= 1
                else:
                    yield i, t
        finally:  # the consumer stopped early: free the slots
            for r in reqs:
                if r.finish_reason is None:
                    self.cancel(r)


# ----------------------------------------------------------------------------------------------------------
# CLI: serving a checkpoint is api.py's, the benchmark bench.py's (serve.py hands over to them)


def load(ckpt: str, device: str, fp8: bool = False):
    from tokenizer import Tokenizer
    # CUDA: bf16 weights (the report's inference precision); CPU: fp32, which is faster there at this size
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return CommandA.from_pretrained(ckpt, dtype=dtype, device=device, fp8=fp8), Tokenizer.load(ckpt)


def main():
    argv = sys.argv[1:]
    # serving a checkpoint is api.py's CLI, the benchmark bench.py's: hand the process over (exec, not import, so
    # both stay above serve.py in the import graph and signals reach the server)
    if argv and set(argv) <= {"-h", "--help"}:
        print("usage: serve.py --ckpt DIR [--port N | --chat | --tp N ...]   serve a checkpoint (python api.py --help)\n"
              "       serve.py --bench [--bench-presets tiny,small ...]       benchmark the engine (python bench.py --help)")
        return
    target = "bench.py" if "--bench" in argv else "api.py"
    os.execv(sys.executable, [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), target)] + argv)

if __name__ == "__main__":
    main()
