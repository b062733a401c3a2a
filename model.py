"""
The Command A architecture (Cohere, "Command A: An Enterprise-Ready Large Language Model", arXiv 2504.00698,
section "Model architecture"), in one readable file, weight-compatible with Hugging Face `Cohere2` checkpoints.

What the report says, and where it lives below:
  - decoder-only transformer, SwiGLU MLP, no biases, tied input/output embeddings    -> MLP, CommandA
  - parallel block: attention and MLP read the same LayerNorm output                 -> DecoderLayer
  - interleaved attention, 3 sliding-window layers (RoPE) : 1 full layer (NoPE)      -> ModelConfig.layer_types
  - grouped-query attention                                                          -> Attention
  - document masking, so packed sequences never attend across documents             -> attention_allowed()
  - fp32 master weights, bf16 compute, fp32 for norms / softmax / loss; FP8 on Hopper -> Linear, fp8_linear()

References: transformers' `models/cohere2/modeling_cohere2.py` (the numerics we match, tested against it),
nanoGPT (shape of this file), GPT-J (interleaved-pair RoPE), Ainslie et al. 2023 (GQA),
Micikevicius et al. 2022 (FP8 formats e4m3 / e5m2).

Conventions that differ between libraries and are pinned by tests:
  - a sliding layer with window W sees W keys *including the query itself* (HF's convention;
    FlashAttention's `window_size=(W-1, 0)` means the same thing);
  - RoPE rotates interleaved pairs (x[2i], x[2i+1]) as GPT-J does, not Llama's two halves;
  - full-attention layers use no positional encoding at all (NoPE).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LAYER_KINDS = ("sliding", "full")
HF_LAYER_TYPE = {"sliding": "sliding_attention", "full": "full_attention"}  # our name -> HF config name
FP8_E4M3_MAX = 448.0      # torch.finfo(torch.float8_e4m3fn).max: activations and weights
FP8_E5M2_MAX = 57344.0    # torch.finfo(torch.float8_e5m2).max: gradients (more range, less precision)


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelConfig:
    vocab_size: int = 256000           # Command A: 256000 (a BPE vocabulary shared by 23 languages)
    hidden_size: int = 12288           # d_model. Command A: 12288
    intermediate_size: int = 36864     # SwiGLU inner width. Command A: 36864 (= 3 * hidden)
    num_hidden_layers: int = 64        # Command A: 64
    num_attention_heads: int = 96      # query heads. Command A: 96 -> head_dim 128
    num_key_value_heads: int = 8       # GQA: query head h reads KV head h // (heads / kv_heads). Command A: 8
    sliding_window: int = 4096         # keys a sliding layer sees, INCLUDING the query token. Command A: 4096
    sliding_window_pattern: int = 4    # every 4th layer is full: layer i is full iff (i + 1) % 4 == 0
    layer_types: list[str] | None = None  # per layer 'sliding' | 'full'; None -> derived from the pattern above
    rope_theta: float = 50000.0        # RoPE base, sliding layers only. Command A: 50000
    logit_scale: float = 0.25          # logits = (h @ E^T) * logit_scale. Command A: 0.25 (HF's default 0.0625 is not)
    layer_norm_eps: float = 1e-5       # Cohere LayerNorm epsilon
    max_position_embeddings: int = 131072  # what the HF config says (128K); the model serves 256K
    tie_word_embeddings: bool = True   # output projection = input embedding (the report: shared embeddings)
    initializer_range: float = 0.02    # init std of matrices (muP: hidden matrices get std / sqrt(width_mult))
    # --- muP (Yang et al. 2022): off when None. Not part of the HF config: save_pretrained folds the output
    # multiplier into logit_scale, so an exported muP model is exactly a Cohere2 model.
    mup_base_hidden_size: int | None = None  # width the hyper-parameters were tuned at; m = hidden / base
    # --- runtime switches (not saved to config.json)
    fp8: bool = False                  # FP8 linear layers via torch._scaled_mm (emulated numerics on CPU)
    attn_backend: str = "auto"         # 'sdpa' | 'flex' | 'band' | 'auto' (CUDA: FlexAttention; CPU: band on
    #                                    sliding layers whenever the window skips keys, SDPA elsewhere)

    def __post_init__(self):
        def need(ok, fieldname, msg):
            if not ok:
                raise ValueError(f"ModelConfig.{fieldname}: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                 f"must be a positive integer, got {getattr(self, name)!r}")
        need(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
             f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; "
             f"choose hidden_size = heads * head_dim")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"num_attention_heads={self.num_attention_heads} is not divisible by num_key_value_heads="
             f"{self.num_key_value_heads}; GQA needs every KV head to serve the same number of query heads")
        need(self.head_dim % 2 == 0, "num_attention_heads", f"head_dim={self.head_dim} must be even for RoPE pairs")
        need(isinstance(self.sliding_window, int) and self.sliding_window >= 1, "sliding_window",
             f"must be >= 1 (keys visible including the query itself), got {self.sliding_window!r}")
        need(self.sliding_window_pattern >= 1, "sliding_window_pattern", "must be >= 1")
        if self.layer_types is None:
            p = self.sliding_window_pattern
            self.layer_types = ["full" if (i + 1) % p == 0 else "sliding" for i in range(self.num_hidden_layers)]
        self.layer_types = [{"sliding_attention": "sliding", "full_attention": "full"}.get(k, k)
                            for k in self.layer_types]
        need(len(self.layer_types) == self.num_hidden_layers, "layer_types",
             f"has {len(self.layer_types)} entries for num_hidden_layers={self.num_hidden_layers}")
        bad = [k for k in self.layer_types if k not in LAYER_KINDS]
        need(not bad, "layer_types", f"unknown layer kind(s) {sorted(set(bad))}; use 'sliding' or 'full'")
        need(self.logit_scale > 0, "logit_scale", "must be > 0")
        need(self.mup_base_hidden_size is None or self.mup_base_hidden_size >= 1, "mup_base_hidden_size",
             "must be None (muP off) or a positive width")
        need(self.attn_backend in ("auto", "sdpa", "flex", "band"), "attn_backend",
             "use 'auto', 'sdpa', 'flex' or 'band'")
        if self.fp8:  # torch._scaled_mm on CUDA needs every matmul dim it contracts or emits % 16 == 0
            for name in ("hidden_size", "intermediate_size"):
                need(getattr(self, name) % 16 == 0, name, "must be a multiple of 16 for FP8 (_scaled_mm)")
            need((self.num_key_value_heads * self.head_dim) % 16 == 0, "num_key_value_heads",
                 "kv_heads * head_dim must be a multiple of 16 for FP8 (_scaled_mm)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def width_mult(self) -> float:  # muP's m; 1 when muP is off
        return 1.0 if self.mup_base_hidden_size is None else self.hidden_size / self.mup_base_hidden_size

    def window_of(self, kind: str) -> int | None:
        """The attention window of a layer kind: W keys on sliding layers, none (the whole context) on full."""
        return self.sliding_window if kind == "sliding" else None

    def num_params(self) -> int:
        """Exact parameter count from the shapes (SPEC 1.3), without allocating anything."""
        H, I, V, dh = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        nh, nkv = self.num_attention_heads, self.num_key_value_heads
        per_layer = H * nh * dh + 2 * H * nkv * dh + nh * dh * H + 3 * H * I + H  # q, k+v, o, gate/up/down, norm
        untied = 0 if self.tie_word_embeddings else V * H
        return V * H + self.num_hidden_layers * per_layer + H + untied

    def kv_bytes_per_token_per_layer(self, bytes_per_el: int = 2) -> int:
        return 2 * self.num_key_value_heads * self.head_dim * bytes_per_el  # K and V

    def kv_cache_bytes(self, T: int, bytes_per_el: int = 2, window_aware: bool = True) -> int:
        """KV bytes held for one sequence of T tokens: a sliding layer never needs more than W positions."""
        tokens = sum(min(T, self.sliding_window) if (k == "sliding" and window_aware) else T
                     for k in self.layer_types)
        return tokens * self.kv_bytes_per_token_per_layer(bytes_per_el)

    # --- the HF Cohere2 config.json -------------------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        d = {
            "architectures": ["Cohere2ForCausalLM"], "model_type": "cohere2",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu", "sliding_window": self.sliding_window,
            "layer_types": [HF_LAYER_TYPE[k] for k in self.layer_types],
            "rope_theta": self.rope_theta,  # older transformers read this key ...
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},  # ... newer ones this
            # muP's output multiplier alpha_out / m is folded in, so the export is a plain Cohere2 model
            "logit_scale": self.logit_scale / self.width_mult,
            "layer_norm_eps": self.layer_norm_eps, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": False,
            "initializer_range": self.initializer_range,
        }
        if self.layer_types == ModelConfig(**{**self._hf_fields(), "layer_types": None}).layer_types:
            d["sliding_window_pattern"] = self.sliding_window_pattern  # for transformers versions before layer_types
        return d

    def _hf_fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("fp8", "attn_backend", "mup_base_hidden_size")}

    @classmethod
    def from_hf_dict(cls, d: dict, **runtime) -> "ModelConfig":
        if d.get("model_type") != "cohere2":
            raise ValueError(f"config.json has model_type={d.get('model_type')!r}; this loader reads 'cohere2' "
                             f"(Command A / Command R7B) checkpoints only")
        if d.get("attention_bias", False):
            raise ValueError("config.json has attention_bias=true; Command A has no biases")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act={d['hidden_act']!r}; Cohere2 uses silu (SwiGLU)")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"config.json rope type {rope.get('rope_type')!r} is not supported (only 'default')")
        nh = d["num_attention_heads"]
        if "head_dim" in d and d["head_dim"] is not None and d["head_dim"] != d["hidden_size"] // nh:
            raise ValueError(f"config.json head_dim={d['head_dim']} != hidden_size/num_attention_heads")
        cfg = cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=nh,
            num_key_value_heads=d.get("num_key_value_heads") or nh,
            sliding_window=d.get("sliding_window") or 4096,
            sliding_window_pattern=d.get("sliding_window_pattern", 4), layer_types=d.get("layer_types"),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            logit_scale=d.get("logit_scale", 0.0625),  # HF's class default when the key is absent
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            tie_word_embeddings=d.get("tie_word_embeddings", True),
            initializer_range=d.get("initializer_range", 0.02), **runtime)
        if not cfg.tie_word_embeddings:
            raise ValueError("config.json has tie_word_embeddings=false; Command A ties input and output embeddings")
        return cfg


PRESETS: dict[str, ModelConfig] = {
    # seconds on a CPU: the end-to-end tests' model (same layout: 3 sliding + 1 full, GQA)
    "micro": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, sliding_window=16,
                         max_position_embeddings=1024),
    # trains in minutes on 2 CPU cores (pretrain.py --tiny); 4 layers = 3 sliding + 1 full, like Command A
    "tiny": ModelConfig(vocab_size=8192, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=64,
                        max_position_embeddings=1024),
    # ~28M parameters: the next rung for a single GPU or a patient CPU
    "small": ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, sliding_window=256,
                         max_position_embeddings=8192),
    "command-r7b": ModelConfig(vocab_size=256000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8),
    "command-a": ModelConfig(),  # the defaults above are Command A's 111B
}


# ----------------------------------------------------------------------------------------------------------
# The mask: the single source of truth for who attends to whom (SDPA and FlexAttention both call it)


def attention_allowed(q_pos, kv_pos, q_doc, kv_doc, window: int | None):
    """True where a query at position q_pos may read a key at kv_pos.

    Positions are token positions inside their sequence/document (they restart at 0 for every packed
    document); kv_pos < 0 marks an empty cache slot. `window` W counts keys INCLUDING the query itself, so the
    oldest visible key is q_pos - W + 1 (HF: kv_idx > q_idx - W). All arguments broadcast."""
    ok = (kv_pos >= 0) & (kv_pos <= q_pos) & (q_doc == kv_doc)
    if window is not None:
        ok = ok & (kv_pos > q_pos - window)
    return ok


def doc_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """A new document starts wherever the position does not continue the previous one (packed rows)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(dim=1)


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions restart at 0 at each document boundary: RoPE sees each packed document as if alone."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


# ----------------------------------------------------------------------------------------------------------
# Precision: bf16 compute comes from torch.autocast around the forward (master weights stay fp32);
# FP8 (report: "FP8 tensor cores on Hopper") is the explicit path below.


def fp8_quantize(x: torch.Tensor, dtype: torch.dtype):
    """Per-tensor dynamic scaling: scale = amax / fp8_max, so the largest |x| lands on the format's max.
    Clamp BEFORE the cast: torch 2.11 does not saturate on overflow, and e5m2 overflows to inf even in 2.13."""
    fmax = FP8_E4M3_MAX if dtype == torch.float8_e4m3fn else FP8_E5M2_MAX
    amax = x.detach().abs().max().float().clamp(min=1e-12)
    scale = amax / fmax
    q = (x.float() / scale).clamp(-fmax, fmax).to(dtype)
    return q, scale


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              out_dtype=torch.bfloat16) -> torch.Tensor:
    """torch._scaled_mm with CUDA's constraints checked on every device, so CPU tests catch what a GPU refuses:
    fp8 operands (not both e5m2), `a` row-major, `b` column-major, every dim of the product a multiple of 16,
    fp32 scalar scales."""
    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    if a.dtype not in fp8 or b.dtype not in fp8:
        raise ValueError(f"scaled_mm: operands must be fp8, got {a.dtype} and {b.dtype}")
    if a.dtype == b.dtype == torch.float8_e5m2:
        raise ValueError("scaled_mm: e5m2 x e5m2 is not supported by the hardware; one operand must be e4m3")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"scaled_mm: need [M,K] @ [K,N], got {tuple(a.shape)} @ {tuple(b.shape)}")
    if not a.is_contiguous():
        raise ValueError("scaled_mm: first operand must be row-major (contiguous)")
    if b.stride(0) != 1 or b.stride(1) != b.shape[0]:
        raise ValueError("scaled_mm: second operand must be column-major (e.g. w.t() of a contiguous w)")
    M, K = a.shape
    N = b.shape[1]
    if K % 16 or N % 16 or M % 16:
        raise ValueError(f"scaled_mm: dims must be multiples of 16, got M={M} K={K} N={N}")
    if scale_a.dtype != torch.float32 or scale_b.dtype != torch.float32 or scale_a.numel() != 1:
        raise ValueError("scaled_mm: per-tensor scales must be fp32 scalars")
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


class _FP8Linear(torch.autograd.Function):
    """y = x W^T with x, W in e4m3 and the incoming gradient in e5m2; saves the fp8 copies (not the bf16 ones)."""

    @staticmethod
    def forward(ctx, x, w):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        M = x2.shape[0]
        pad = (-M) % 16  # zero rows contribute nothing to any product, so padding tokens to 16 is exact
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        xq, sx = fp8_quantize(x2, torch.float8_e4m3fn)
        wq, sw = fp8_quantize(w, torch.float8_e4m3fn)
        y = scaled_mm(xq, wq.t(), sx, sw)                        # [M, K] @ [K, N] (w.t() is column-major)
        ctx.save_for_backward(xq, wq, sx, sw)
        ctx.shape, ctx.M, ctx.w_dtype, ctx.x_dtype = shape, M, w.dtype, x.dtype
        return y[:M].reshape(*shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        xq, wq, sx, sw = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        pad = xq.shape[0] - ctx.M
        if pad:
            g2 = F.pad(g2, (0, 0, 0, pad))
        gq, sg = fp8_quantize(g2, torch.float8_e5m2)
        gx = scaled_mm(gq, wq.t().contiguous().t(), sg, sw)          # dL/dx = g @ W      [M, K]
        gw = scaled_mm(gq.t().contiguous(), xq.t().contiguous().t(), sg, sx)  # dL/dW = g^T @ x  [N, K]
        return gx[:ctx.M].reshape(ctx.shape).to(ctx.x_dtype), gw.to(ctx.w_dtype)


def fp8_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):  # the function does its own casting
        return _FP8Linear.apply(x, w)


class Linear(nn.Linear):
    """A bias-free nn.Linear (the report: no biases) with an optional FP8 matmul."""

    def __init__(self, in_features, out_features, fp8=False):
        super().__init__(in_features, out_features, bias=False)
        self.fp8 = fp8

    def forward(self, x):
        w = self.weight
        if hasattr(w, "to_local") and not hasattr(x, "to_local"):
            w = w.to_local()  # a tensor-parallel DTensor (parallel.py) on a plain activation: this rank's shard
        return fp8_linear(x, w) if self.fp8 else F.linear(x, w)


# ----------------------------------------------------------------------------------------------------------
# Building blocks


class LayerNorm(nn.Module):
    """Cohere's LayerNorm: mean-subtracted (a true LayerNorm, not RMSNorm), weight only, computed in fp32."""

    def __init__(self, hidden_size, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        # (x - mean) / sqrt(biased var + eps) * weight, no bias: HF's Cohere LayerNorm, as one fused kernel
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), None, self.eps).to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin for interleaved-pair RoPE: pair i = (x[2i], x[2i+1]) turns by angle pos * theta^(-2i/dh).
    Angles in fp32 (positions up to 256K lose digits in bf16), then cast to the activation dtype as HF does."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32)
                               / head_dim)
    freqs = position_ids[..., None].float() * inv_freq          # (B, T, dh/2)
    emb = freqs.repeat_interleave(2, dim=-1)                    # (B, T, dh): each angle twice, for its pair
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, T, dh) to broadcast over heads


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """out[2i] = x[2i] cos - x[2i+1] sin ; out[2i+1] = x[2i+1] cos + x[2i] sin  (in fp32, as HF): pair i read as
    the complex number x[2i] + i x[2i+1] turned by e^(i angle), one complex multiply instead of six passes."""
    c, s = cos[..., 0::2].float(), sin[..., 0::2].float()
    if torch.compiler.is_compiling():   # inductor has no complex codegen: the same formula in reals, fused by it
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), -1).flatten(-2).to(x.dtype)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(c, s)).flatten(-2).to(x.dtype)


def _flex_attention():
    """FlexAttention (CUDA only: it has no CPU backward in torch 2.13), compiled once; None when unavailable."""
    global _FLEX
    if "_FLEX" not in globals():
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            _FLEX = (torch.compile(flex_attention, dynamic=False), create_block_mask)
        except Exception:  # older torch or no compiler: SDPA is always correct, only slower
            _FLEX = None
    return _FLEX


def attend(q, k, v, mask):
    """Softmax attention of q (B, nh, Tq, dh) over k, v (B, nkv, S, dh), GQA when nkv < nh. `mask` is a boolean
    (.., Tq, S) allowed-mask (SDPA: fp32 softmax accumulation inside the kernel, scale 1/sqrt(dh)) or a
    FlexAttention call built by CommandA._masks."""
    if callable(mask):
        return mask(q, k, v)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                          enable_gqa=k.shape[1] != q.shape[1])


BAND_BLOCK = 32  # query rows per band block: fewer wasted keys than larger blocks, still big enough matmuls


def band_bias(pos, doc, window: int, block: int = BAND_BLOCK):
    """A sliding layer's mask, restricted to its band. Query block b (`block` tokens) can only see keys of its own
    block and of the P = ceil((W-1)/block) blocks before it, so attention costs T x (P+1)·block, not T x T.
    Returns the additive fp32 mask (B, 1, nb, 1, block, Kb) of each query block over its key span, from
    attention_allowed(); padding has position -1 and is never a key (a padded query's row is all-blocked: finite,
    uniform, and dropped)."""
    B, T = pos.shape
    P, nb = -(-(window - 1) // block), -(-T // block)
    q_pos, q_doc = (F.pad(x, (0, nb * block - T), value=-1).view(B, nb, block, 1) for x in (pos, doc))
    kv_pos, kv_doc = (F.pad(x, (P * block, nb * block - T), value=-1).unfold(1, (P + 1) * block, block)[:, :, None]
                      for x in (pos, doc))                                             # (B, nb, 1, Kb)
    ok = attention_allowed(q_pos, kv_pos, q_doc, kv_doc, window)                       # (B, nb, block, Kb)
    return torch.zeros(ok.shape, device=pos.device).masked_fill_(~ok, torch.finfo(torch.float32).min)[:, None, :, None]


def band_attend(q, k, v, bias):
    """attend() for a sliding layer over band_bias's blocks: the same softmax attention, on (block x Kb) tiles.
    The query heads of one KV head share each tile's keys (GQA without copying K/V per head). Scores in the
    activation dtype with the scale and mask fused into their matmul (baddbmm); the softmax kernel accumulates
    in fp32 and rounds its output to the activation dtype, as HF's eager attention does (measured 1.4x faster
    than an fp32 softmax plus casts here). The CPU flash kernel, given a mask, computes all T x T scores."""
    B, nh, T, dh = q.shape
    nkv, nb, block, Kb = k.shape[1], bias.shape[2], bias.shape[-2], bias.shape[-1]
    g, Tp = nh // nkv, nb * block
    q = F.pad(q, (0, 0, 0, Tp - T)).view(B, nkv, g, nb, block, dh).transpose(2, 3).reshape(-1, g * block, dh)
    k, v = (F.pad(x.to(q.dtype), (0, 0, Kb - block, Tp - T)).unfold(2, Kb, block).reshape(-1, dh, Kb)
            for x in (k, v))                                                # (B * nkv * nb, dh, Kb)
    bias = bias.to(q.dtype).expand(B, nkv, nb, g, block, Kb).reshape(-1, g * block, Kb)
    p = torch.softmax(torch.baddbmm(bias, q, k, alpha=dh ** -0.5), dim=-1)   # bf16 in/out, fp32 inside
    y = torch.bmm(p, v.transpose(1, 2)).view(B, nkv, nb, g, block, dh).permute(0, 1, 3, 2, 4, 5)
    return y.reshape(B, nh, Tp, dh)[:, :, :T]


def _same(*x):  # the hooks' one-process default: tensors stay where they are
    return x if len(x) > 1 else x[0]


class Attention(nn.Module):
    """GQA attention. Sliding layers: RoPE + window mask. Full layers: no positional encoding (NoPE)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.kind = layer_idx, cfg.layer_types[layer_idx]
        # heads held by this process; parallel.py's TP divides both by tp (whole KV groups per rank)
        self.nh, self.nkv, self.dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H = cfg.hidden_size
        self.q_proj = Linear(H, self.nh * self.dh, cfg.fp8)   # head h = output rows h*dh ... h*dh+dh-1
        self.k_proj = Linear(H, self.nkv * self.dh, cfg.fp8)
        self.v_proj = Linear(H, self.nkv * self.dh, cfg.fp8)
        self.o_proj = Linear(self.nh * self.dh, H, cfg.fp8)
        # where the keys live: one process holds all of them; parallel.py's SP all-gathers every rank's K/V here
        self.gather_kv = _same

    def forward(self, x, rope, mask, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.dh).transpose(1, 2)   # (B, nh, T, dh)
        k = self.k_proj(x).view(B, T, self.nkv, self.dh).transpose(1, 2)  # (B, nkv, T, dh)
        v = self.v_proj(x).view(B, T, self.nkv, self.dh).transpose(1, 2)
        if self.kind == "sliding":   # RoPE at each token's own position, before K is cached or leaves this rank
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = self.gather_kv(k, v)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                     # (B, nkv, S, dh), S = keys held
        y = attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.dh))


class MLP(nn.Module):
    """SwiGLU: down( silu(gate x) * up x ), no biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.fp8)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.fp8)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.fp8)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """The parallel block: h + attn(n) + mlp(n) with ONE norm n = LayerNorm(h) read by both branches.
    Same quality as the sequential block in the report, with more throughput (the two branches can fuse)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        # where the activations live: identity in one process. parallel.py's TP (Megatron-SP) all-gathers the
        # sequence-sharded norm output here, and completes the branches' partial sums with ONE reduce-scatter.
        self.gather_norm = _same
        self.add_branches = residual_add

    def forward(self, h, rope, mask, cache=None):
        n = self.gather_norm(self.input_layernorm(h))
        return self.add_branches(h, self.self_attn(n, rope, mask, cache), self.mlp(n))


def residual_add(h, attn, mlp):  # HF's order: the fp32 residual takes each bf16 branch in turn
    return h + attn + mlp


class Decoder(nn.Module):  # named `model` inside CommandA so state_dict keys are HF's (model.layers.0....)
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)


# ----------------------------------------------------------------------------------------------------------
# The model


def shard_files(path: str) -> list[str]:
    """The safetensors shard names of an HF checkpoint folder: the index's weight_map values, or the single
    model.safetensors. ValueError for a malformed index, FileNotFoundError when there are no weights."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                return sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is malformed (needs a 'weight_map' of tensor -> shard): {e!r}") from None
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def shard_paths(path: str) -> list[str]:
    """shard_files as full paths, each checked to exist (FileNotFoundError names the missing one)."""
    out = [os.path.join(path, f) for f in shard_files(path)]
    for fpath in out:
        if not os.path.isfile(fpath):
            raise FileNotFoundError(f"shard {fpath} listed in the index is missing")
    return out


def plan_shards(nbytes: dict, max_shard_bytes: int) -> tuple[list[list[str]], list[str]]:
    """Tensor names (in order) grouped into shards of at most max_shard_bytes (a bigger tensor alone), and the
    shard file names in HF's convention: model.safetensors, or model-0000i-of-0000n.safetensors + an index."""
    shards, cur, size = [], [], 0
    for k, n in nbytes.items():
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    shards.append(cur)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    return shards, names


def dense_masks(cfg: ModelConfig, q_pos, q_doc, kv_pos, kv_doc) -> dict:
    """{layer kind: boolean (B, 1, Tq, S) mask} for queries at q_pos/q_doc (B, Tq) over keys at kv_pos/kv_doc
    (B, S). One process: the same tokens on both sides; parallel.py's SP: this rank's queries, all keys."""
    q_pos, kv_pos = q_pos[:, None, :, None], kv_pos[:, None, None, :]
    q_doc, kv_doc = q_doc[:, None, :, None], kv_doc[:, None, None, :]
    return {kind: attention_allowed(q_pos, kv_pos, q_doc, kv_doc, cfg.window_of(kind)) for kind in LAYER_KINDS}


def output_logits(h, lm_head, cfg: ModelConfig, matmul=F.linear):
    """Final-norm hidden states (..., H) -> fp32 logits (..., V) = h @ E^T * logit_scale, with muP's output
    multiplier 1/m riding on the scale. lm_head is the tied embedding E (V, H) for F.linear; serve.py's decode
    step passes its own copy of E and the matmul for it (E^T contiguous, or oneDNN-packed)."""
    y = matmul(h, lm_head)
    return y.float() * (cfg.logit_scale / cfg.width_mult)


def nll_sum(logits, targets):
    """Summed next-token loss over targets != -100 (padding, document boundaries, prompts carry no target), fp32
    log-softmax. Summed in fp64, where a sum of fp32 losses is exact in any order: a batch split over ranks
    (parallel.py) adds no rounding of its own to the logged loss."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                          reduction="none")
    return nll.double().sum()


class _LinearNLL(torch.autograd.Function):
    """nll_sum(output_logits(h, E), targets) without fp32 logits for the whole batch. The logits stay in the
    matmul's dtype (bf16 under autocast, as F.linear returns them); `chunk` rows at a time are taken to fp32 for
    the log-sum-exp, and their gradient softmax - onehot overwrites them in place. The backward is then two
    matmuls on that buffer. Plain autograd holds fp32 logits, their log-softmax and its gradient (3 x N x V x 4
    bytes); this holds N x V x 2 (Liger-Kernel's fused linear cross-entropy, in torch)."""

    @staticmethod
    def forward(ctx, h, w, targets, scale, dtype, chunk, grads):  # grads False: the loss alone (no_grad)
        hc, wc = h.to(dtype), w.to(dtype)
        z = F.linear(hc, wc)                                          # (N, V) logits / scale, in `dtype`
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        for i in range(0, z.shape[0], chunk):
            zc, y = z[i:i + chunk].float() * scale, targets[i:i + chunk]
            keep = y != -100
            y = torch.where(keep, y, 0)
            lse = torch.logsumexp(zc, dim=-1)
            total += ((lse - zc.gather(1, y[:, None])[:, 0]) * keep).double().sum()
            if grads:                                                 # d(sum nll)/dz = (softmax - onehot) * scale
                p = zc.sub_(lse[:, None]).exp_()
                p[torch.arange(len(y), device=y.device), y] -= 1
                z[i:i + chunk] = p * (keep * scale)[:, None]          # rows without a target add nothing
        ctx.save_for_backward(z, hc, wc)
        ctx.dtypes = h.dtype, w.dtype
        return total

    @staticmethod
    def backward(ctx, g):
        gz, hc, wc = ctx.saved_tensors
        gz = gz * g.to(gz.dtype)
        return (gz @ wc).to(ctx.dtypes[0]), (gz.t() @ hc).to(ctx.dtypes[1]), None, None, None, None, None


def linear_nll_sum(h, w, targets, scale: float, chunk: int | None = None):
    """Summed next-token loss of final-norm states h (..., H) against tied embedding w (V, H): nll_sum of
    output_logits, computed by _LinearNLL. Matmuls in the autocast dtype when autocast is on, as F.linear's."""
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    chunk = chunk or max(16, 2**20 // w.shape[0])                     # ~4 MB of fp32 logits at a time
    with torch.autocast(dev, enabled=False):
        return _LinearNLL.apply(h.reshape(-1, h.shape[-1]), w, targets.reshape(-1), scale, dtype, chunk,
                                torch.is_grad_enabled() and (h.requires_grad or w.requires_grad))


class CommandA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self._by_shape = {}   # RoPE tables and masks of unpacked rows, by shape (forward)
        self.recompute = False  # activation checkpointing per layer (pretrain.py --recompute)
        self.init_weights()

    @property
    def lm_head_weight(self):  # tied embeddings: the output projection IS the input embedding
        return self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self):
        """Normal(0, sigma) matrices, embeddings included; muP divides the hidden matrices' variance by the
        width multiplier m (SPEC 3), leaving embeddings and vectors (norm weights) as they are."""
        cfg = self.config
        if self.model.embed_tokens.weight.is_meta:
            return
        std = cfg.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            elif name == "model.embed_tokens.weight":
                p.normal_(0.0, std)
            else:
                p.normal_(0.0, std / math.sqrt(cfg.width_mult))

    def _masks(self, B, T, device, position_ids, doc_ids, cache):
        """One mask per layer kind, all built from attention_allowed()."""
        if cache is not None:
            kv_pos = cache.reserve(position_ids)
            zero = torch.zeros((), dtype=torch.long, device=device)  # a cached sequence is a single document
            return {kind: attention_allowed(position_ids[:, None, :, None], kv_pos[kind][:, None, None, :],
                                            zero, zero, self.config.window_of(kind))
                    for kind in LAYER_KINDS}
        # FlexAttention's compiled kernel needs head_dim >= 16; SDPA serves the rest with the same mask
        use_flex = (self.config.attn_backend == "flex" or
                    (self.config.attn_backend == "auto" and device.type == "cuda")) and \
            self.config.head_dim >= 16 and _flex_attention()
        if use_flex:
            flex, create_block_mask = _flex_attention()
            masks = {}
            for kind in LAYER_KINDS:
                W = self.config.window_of(kind)

                def mask_mod(b, h, q_idx, kv_idx, W=W):
                    return attention_allowed(position_ids[b, q_idx], position_ids[b, kv_idx],
                                             doc_ids[b, q_idx], doc_ids[b, kv_idx], W)
                bm = create_block_mask(mask_mod, B, None, T, T, device=device)
                masks[kind] = (lambda q, k, v, bm=bm: flex(q, k, v, block_mask=bm,
                                                           enable_gqa=k.shape[1] != q.shape[1]))
            return masks
        masks = dense_masks(self.config, position_ids, doc_ids, position_ids, doc_ids)
        W, backend = self.config.sliding_window, self.config.attn_backend
        if backend == "band" or (backend == "auto" and 2 * (W + BAND_BLOCK) <= T):   # the band skips most keys
            bias = band_bias(position_ids, doc_ids, W)
            masks["sliding"] = lambda q, k, v: band_attend(q, k, v, bias)
        return masks

    def forward(self, input_ids, targets=None, position_ids=None, doc_ids=None, cache=None, logits_index=None,
                return_hidden=False):
        """input_ids (B, T). Packed rows: pass doc_ids (B, T) and/or position_ids restarting per document.
        With a cache: position_ids are the absolute positions of the new tokens (default: continue).
        Returns logits (B, T, V) in fp32, or the mean next-token loss over targets != -100 if targets given.
        logits_index (B,): only that position's logits per row, (B, 1, V) -- a prefill needs just the last
        prompt token, and B x T x V fp32 logits would dominate its memory at V = 256K.
        return_hidden: the final-norm hidden states (B, T, H) instead; lm_logits() maps any subset of them to
        logits (post-training scores completion tokens only, a few percent of a chat row)."""
        cfg = self.config
        B, T = input_ids.shape
        device = input_ids.device
        if cache is not None and doc_ids is not None:
            raise ValueError("doc_ids (packed documents) cannot be combined with a KV cache: each cached row "
                             "is one sequence; pass position_ids instead")
        plain = cache is None and position_ids is None and doc_ids is None
        if position_ids is None:
            if doc_ids is not None:
                position_ids = positions_from_doc_ids(doc_ids)
            else:
                start = cache.length if cache is not None else 0
                position_ids = torch.arange(start, start + T, device=device).expand(B, T)
        h = self.model.embed_tokens(input_ids)                   # (B, T, H); no sqrt(H) scaling
        # rows of one document each: RoPE tables and masks depend only on the shape, so they are built once
        key = (B, T, device, h.dtype, cfg.attn_backend, torch.is_inference_mode_enabled()) if plain else None
        built = self._by_shape.get(key)
        if built is None:
            if doc_ids is None:
                doc_ids = doc_ids_from_positions(position_ids)
            # cos/sin in the hidden-state dtype as HF does (fp32 under autocast: no rounding of long positions)
            built = (rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, h.dtype),
                     self._masks(B, T, device, position_ids, doc_ids, cache))
            if key is not None:
                self._by_shape = {key: built}                      # one shape at a time: a training run has one
        rope, masks = built
        for layer in self.model.layers:  # recompute: keep each layer's input, rebuild the rest in backward
            args = (h, rope, masks[layer.self_attn.kind], cache)
            recompute = self.recompute and torch.is_grad_enabled()
            h = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
        if logits_index is not None:
            h = h[torch.arange(B, device=device), logits_index][:, None]   # (B, 1, H)
        h = self.model.norm(h)
        if return_hidden:
            return h
        if targets is None:
            return self.lm_logits(h)
        nll = linear_nll_sum(h, self.lm_head_weight, targets, cfg.logit_scale / cfg.width_mult)
        return (nll / (targets != -100).sum().clamp(min=1)).float()

    def lm_logits(self, h):
        """Final-norm hidden states (..., H) -> fp32 logits (..., V): the tied output embedding."""
        return output_logits(h, self.lm_head_weight, self.config)

    # --- HF checkpoints -------------------------------------------------------------------------------------
    def expected_shapes(self) -> dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device="cpu", **runtime) -> "CommandA":
        """Load an HF Cohere2 checkpoint directory (config.json + model.safetensors or sharded with an index).
        Built on the meta device and filled tensor by tensor, so only one copy of the weights is ever held.
        safetensors only: nothing is unpickled."""
        from safetensors import SafetensorError, safe_open

        if set(runtime) - {"fp8", "attn_backend"}:
            raise TypeError(f"from_pretrained: unknown runtime option(s) {sorted(set(runtime) - {'fp8', 'attn_backend'})}")
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"{cfg_file} not found: not a checkpoint directory")
        try:
            with open(cfg_file) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
        try:
            cfg = ModelConfig.from_hf_dict(hf, **runtime)
        except KeyError as e:
            raise ValueError(f"{cfg_file} lacks required field {e}") from None
        files = shard_paths(path)

        with torch.device("meta"):
            model = cls(cfg)
        expected = model.expected_shapes()
        state = {}
        for fpath in files:
            try:
                with safe_open(fpath, framework="pt", device="cpu") as f:
                    for name in f.keys():
                        if name in state:
                            raise ValueError(f"{fpath}: tensor {name} appears in more than one shard")
                        t = f.get_tensor(name)
                        if name.endswith(".bias"):  # some exports carry all-zero biases; the model has none
                            if torch.count_nonzero(t):
                                raise ValueError(f"{fpath}: tensor {name} is a NONZERO bias; Command A has no biases")
                            continue
                        if name == "lm_head.weight":
                            state[name] = t          # checked against the embedding below (tied)
                            continue
                        if name not in expected:
                            raise ValueError(f"{fpath}: unexpected tensor {name} for this config")
                        if tuple(t.shape) != expected[name]:
                            raise ValueError(f"{fpath}: tensor {name} has shape {tuple(t.shape)}, "
                                             f"config.json implies {expected[name]}")
                        state[name] = t.to(device=device, dtype=dtype)
            except SafetensorError as e:
                raise ValueError(f"{fpath}: unreadable or truncated safetensors file ({e})") from None
        lm_head = state.pop("lm_head.weight", None)
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"checkpoint {path} is missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if lm_head is not None and not torch.equal(lm_head.to(device=device, dtype=dtype),
                                                   state["model.embed_tokens.weight"]):
            raise ValueError(f"{path}: lm_head.weight differs from model.embed_tokens.weight but the model is tied")
        model.load_state_dict(state, strict=True, assign=True)
        return model

    def save_pretrained(self, path: str, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30,
                        extra_config: dict | None = None):
        """Write config.json + safetensors (sharded with an index past max_shard_bytes) in HF's Cohere2 layout.
        Each file goes to a temp name and is renamed into place, so a crash never leaves a half-written file."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        tensors = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in self.state_dict().items()}
        groups, names = plan_shards({k: t.numel() * t.element_size() for k, t in tensors.items()}, max_shard_bytes)
        shards = [{k: tensors[k] for k in g} for g in groups]
        for name, shard in zip(names, shards):
            atomic_write(os.path.join(path, name), lambda p, s=shard: save_file(s, p, metadata={"format": "pt"}))
        index = os.path.join(path, "model.safetensors.index.json")
        if len(shards) > 1:
            idx = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                   "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
            atomic_write_json(index, idx)
        elif os.path.exists(index):
            os.remove(index)
        for stale in os.listdir(path):  # shards of an earlier, differently sharded save
            if stale.startswith("model") and stale.endswith(".safetensors") and stale not in names:
                os.remove(os.path.join(path, stale))
        any_t = next(iter(tensors.values()))
        hf = {**self.config.to_hf_dict(), "torch_dtype": str(any_t.dtype).replace("torch.", ""),
              **(extra_config or {})}
        atomic_write_json(os.path.join(path, "config.json"), hf)


# Every file the project writes goes through atomic_write (tokenizer.py, torch-free, keeps a small copy).
def atomic_write(final_path: str, write_fn):
    """temp file -> fsync -> rename: a kill leaves the old file or the new one, and after a power loss the
    renamed file's bytes are on disk (rename alone orders nothing with the data). write_fn(tmp_path)."""
    tmp = f"{final_path}.tmp{os.getpid()}"
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str):
    def write(p):
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def atomic_write_json(path: str, obj, indent=2):
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False))


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display), imported only when something plots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str, dpi=110):
    """A figure as a PNG, written atomically, then closed."""
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))
    pyplot().close(fig)


# ----------------------------------------------------------------------------------------------------------
# Throughput: FLOPs per token (PaLM appendix B) and MFU against a peak measured here


def flops_per_token(cfg: ModelConfig, T: int) -> float:
    """6N for the matmuls forward+backward + 12*H*T per layer for attention scores (PaLM appendix B; nanoGPT and
    torchtitan count the same), with a sliding layer's T capped at its window: band attention does no more."""
    keys = sum(min(T, cfg.window_of(kind) or T) for kind in cfg.layer_types)
    return 6 * cfg.num_params() + 12 * cfg.hidden_size * keys


def tune_malloc():
    """Keep freed activation buffers in the process instead of returning them to the OS after every step.
    glibc serves blocks above a (dynamic) threshold with mmap and unmaps them on free, so each training step
    page-faults its ~100 MB of activations back in; on 2 CPU cores that costs ~1.5-2x throughput for `tiny`.
    Linux/glibc only; a no-op elsewhere. Called by the CLIs, never on import."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
        libc.mallopt(M_MMAP_THRESHOLD, 2**31 - 1)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        libc.mallopt(M_TOP_PAD, 256 * 2**20)
    except (OSError, AttributeError):
        pass


_BF16_FAST: dict = {}


def bf16_is_fast(device) -> bool:
    """Whether bf16 autocast pays on this device. GPUs: yes. CPUs: only those with native bf16 dot products
    (AVX512-BF16 / AMX); on an AVX2-only CPU oneDNN emulates bf16 and a matmul measured ~50x SLOWER than fp32,
    so the training loops fall back to fp32 there. Measured once per process (~0.1 s)."""
    device = torch.device(device)
    if device.type != "cpu":
        return True
    if "cpu" not in _BF16_FAST:
        a = {dt: torch.randn(256, 256, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
        t = {dt: math.inf for dt in a}
        for _ in range(5):                  # interleaved, best of 5: a busy machine must not flip the decision
            for dt, x in a.items():
                t0 = time.perf_counter()
                x @ x
                t[dt] = min(t[dt], time.perf_counter() - t0)
        _BF16_FAST["cpu"] = t[torch.bfloat16] < 2 * t[torch.float32]
    return _BF16_FAST["cpu"]


def measure_matmul_peak(dtype=torch.bfloat16, sizes=(1024, 2048), seconds=0.5) -> float:
    """FLOP/s of large square matmuls on this machine (best over a few sizes): the MFU denominator on a CPU,
    which has no spec-sheet number. Measured in the same run as the throughput it divides."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            iters += 1
        best = max(best, 2 * n ** 3 * iters / (time.perf_counter() - t0))
    return best


if __name__ == "__main__":
    if "--bench" in sys.argv[1:]:   # the training-step benchmark is bench.py's (against transformers, with --compile)
        argv = [a for a in sys.argv[1:] if a != "--bench"]
        os.execv(sys.executable, [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                "bench.py"), "--train"] + argv)
    ap = argparse.ArgumentParser(description="Command A architecture: presets, parameter counts and KV-cache "
                                 "sizes; --bench: the training-step benchmark (python bench.py --train --help lists "
                                 "its options). The masks of a packed row: python data.py --plot-masks FILE.")
    ap.add_argument("--bench", action="store_true", help="training-step tok/s and MFU against transformers (bench.py)")
    args = ap.parse_args()
    summary = {}
    print(f"{'preset':12s} {'params':>17s} {'layers (S/F)':>13s} {'KV B/tok/layer':>15s} "
          f"{'KV @128K window-aware':>22s} {'KV @128K all-full':>18s}")
    for name, cfg in PRESETS.items():
        n_full = cfg.layer_types.count("full")
        aware, full = cfg.kv_cache_bytes(131072), cfg.kv_cache_bytes(131072, window_aware=False)
        print(f"{name:12s} {cfg.num_params():>17,d} {cfg.num_hidden_layers - n_full:>7d}/{n_full:<5d} "
              f"{cfg.kv_bytes_per_token_per_layer():>15,d} {aware / 2**30:>18.2f} GiB {full / 2**30:>14.2f} GiB")
        summary[name] = {"params": cfg.num_params(), "kv_bytes_128k": aware, "kv_bytes_128k_all_full": full}
    print(json.dumps(summary))
