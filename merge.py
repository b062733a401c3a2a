"""
Model merging (Command A report, post-training, "Merging"; SPEC section 7): the expert soups, seed soups and
the interpolation back to the parent that the report uses, and the merge methods beyond it (task arithmetic,
TIES, DARE, SLERP), on HF Cohere2 checkpoint directories, one tensor at a time.

What the report does, and where it lives below:
  - six SFT experts -> SFT soup, six RL experts -> RL soup, by linear weight averaging   -> linear()
    (chosen for simplicity, effectiveness and associativity: a soup of soups is again one linear merge)
  - expert weights searched "by hand and brute force" against evaluations               -> search_weights()
    and which expert costs which domain                                                  -> leave_one_out()
  - uniform soups of seeds (multilingual SFT) and top-k seed merging (code)              -> soup, topk_merge()
  - the code expert interpolated back toward its parent (WARP / LITI):
    theta = (1 - eta) * theta_parent + eta * theta_model                                  -> interpolate
Beyond the report, mergekit's methods with mergekit's defaults (no normalization for task arithmetic,
lambda 1, density 1): task arithmetic (Ilharco et al. 2023), TIES (Yadav et al. 2023), DARE (Yu et al. 2024),
SLERP (Shoemake 1985; White 2016 for generative models). The formulas are SPEC section 7's, and its worked
examples are the tests.

Memory. A merge reads one tensor name at a time from every input, keeps running sums instead of stacking the
inputs, and streams each merged tensor straight into its output shard (shards.py does the reading and writing).
  - linear / soup / interpolate / task arithmetic are element-wise, so they go in row blocks (chunk_bytes,
    256 MB by default): peak memory is a few blocks, even for the 256000 x 12288 embedding of Command A;
  - TIES, DARE and SLERP need whole tensors (a magnitude threshold, a drop mask, an angle per tensor): peak
    is ~8 (TIES), ~4 (DARE), ~3 (SLERP) fp32 copies of the largest tensor, measured, whatever the number of
    models (running sums, not stacks). For Command A's 12.6 GB fp32 embedding that is ~100 GB for TIES,
    against 222 GB for one bf16 copy of the model.
tests/test_merge.py measures both on a sharded checkpoint. The output appears only when complete: a failure
leaves no half-written output.

Evaluating merges, not merging, is the cost (the report says so): `search_weights` caches every score and
`--rank-by` evaluates with tasks.py, imported only when asked for.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import numbers
import os
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model import CommandA, atomic_write_json, pyplot, save_figure, tune_malloc
from shards import Checkpoint, CheckpointError, write_checkpoint

METHODS = ("linear", "soup", "interpolate", "task_arithmetic", "ties", "dare", "dare_ties", "slerp")
NEEDS_BASE = ("interpolate", "task_arithmetic", "ties", "dare", "dare_ties")
# methods where every output entry depends only on the same entry of the inputs: these stream in row blocks,
# so even the 3B-entry embedding never sits in memory whole. TIES (a per-tensor magnitude threshold), DARE
# (one drop mask per tensor) and SLERP (one angle per tensor) see whole tensors.
ELEMENTWISE = ("linear", "soup", "interpolate", "task_arithmetic")
# mergekit's default for dividing the combined task vector by the weight sum (TIES' "disjoint mean")
DEFAULT_NORMALIZE = {"linear": True, "soup": True, "task_arithmetic": False, "ties": True, "dare": False,
                     "dare_ties": False}
# how a task-vector method sparsifies each delta, and whether it elects a sign per parameter first
TASK_VECTOR = {"task_arithmetic": (None, False), "ties": ("magnitude", True), "dare": ("random", False),
               "dare_ties": ("random", True)}
# config.json fields that must agree for a merge to mean anything (what the tensors are, how they are used)
ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "sliding_window", "layer_types", "rope_theta",
             "logit_scale", "layer_norm_eps", "tie_word_embeddings")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TIED = {"lm_head.weight": "model.embed_tokens.weight"}  # a tied copy must get the same DARE mask


class MergeError(ValueError):
    """Bad input to a merge: raised before anything is written."""


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class MergeConfig:
    method: str = "linear"             # one of METHODS
    weights: list[float] | None = None # one per model; None -> uniform (linear, soup) or all 1 (task vectors)
    density: float = 1.0               # TIES / DARE: fraction of each task vector kept (mergekit's default: all)
    lam: float = 1.0                   # task-vector scale lambda (mergekit's default 1)
    normalize: bool | None = None      # divide by the weight sum; None -> the method's mergekit default
    t: float = 0.5                     # SLERP position: 0 -> first model, 1 -> second
    eta: float = 0.5                   # interpolate: (1 - eta) * parent + eta * model (the report gives no value)
    seed: int = 0                      # DARE's drop masks (one stream per tensor name and model)
    dtype: str | None = None           # output dtype; None -> every tensor keeps the first model's dtype
    max_shard_bytes: int = 5 * 2**30   # output shard size (HF's default)
    chunk_bytes: int = 2**28           # element-wise methods read row blocks of at most this many fp32 bytes

    def check(self, n_models: int, has_base: bool):
        """Every rule about flags and model counts, before a byte is read or written."""
        m = self.method
        if m not in METHODS:
            raise MergeError(f"unknown merge method {m!r}; choose from {', '.join(METHODS)}")
        if n_models < 1:
            raise MergeError("no models to merge")
        if m in NEEDS_BASE and not has_base:
            raise MergeError(f"method {m!r} needs a base model (--base DIR): "
                             + ("the parent to interpolate toward" if m == "interpolate" else
                                "task vectors are differences from the base"))
        if m not in NEEDS_BASE and has_base:
            raise MergeError(f"method {m!r} does not use a base model; drop --base (or use task_arithmetic / ties "
                             f"/ dare for merges relative to a base)")
        if m == "slerp" and n_models != 2:
            raise MergeError(f"slerp interpolates between exactly 2 models (t=0 -> first, t=1 -> second), "
                             f"got {n_models}")
        if m == "interpolate" and n_models != 1:
            raise MergeError(f"interpolate takes exactly 1 model (--base is the parent), got {n_models}")
        if self.weights is not None:
            if m in ("soup", "slerp", "interpolate"):
                raise MergeError(f"method {m!r} takes no --weights (" + {
                    "soup": "a seed soup is uniform; use linear for weighted averages",
                    "slerp": "use --t", "interpolate": "use --eta"}[m] + ")")
            w = self.weights
            if len(w) != n_models:
                raise MergeError(f"{len(w)} weight(s) for {n_models} model(s): give one weight per model")
            bad = [x for x in w if not isinstance(x, numbers.Real) or not math.isfinite(x) or x < 0]
            if bad:
                raise MergeError(f"weights must be finite and >= 0, got {bad}")
            if sum(w) <= 0:
                raise MergeError("all weights are zero: at least one model must have a positive weight")
        if not 0 < self.density <= 1:
            raise MergeError(f"density must be in (0, 1] (fraction of each task vector kept), got {self.density}")
        if not 0 <= self.t <= 1:
            raise MergeError(f"slerp t must be in [0, 1], got {self.t}")
        if not 0 <= self.eta <= 1:
            raise MergeError(f"interpolate eta must be in [0, 1], got {self.eta}")
        if not math.isfinite(self.lam):
            raise MergeError(f"lambda must be finite, got {self.lam}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise MergeError(f"dtype {self.dtype!r} unknown; choose from {', '.join(DTYPES)}")
        if self.max_shard_bytes < 1 or self.chunk_bytes < 1:
            raise MergeError("max_shard_bytes and chunk_bytes must be positive")

    def resolved_weights(self, n_models: int) -> list[float]:
        if self.weights is not None:
            return [float(x) for x in self.weights]
        return [1.0] * n_models  # uniform; linear divides by the sum, task vectors are summed as mergekit does

    def resolved_normalize(self) -> bool:
        return DEFAULT_NORMALIZE.get(self.method, False) if self.normalize is None else self.normalize


# ----------------------------------------------------------------------------------------------------------
# The math, one tensor at a time. `tensors` may be a lazy iterator: each input is read, folded into running
# sums and dropped before the next is read, so memory never grows with the number of models.


def linear(tensors, weights, normalize=True):
    """sum_i w_i theta_i / sum_i w_i (the report's merge; associative, so soups of soups are linear too)."""
    acc, total = None, 0.0
    for t, w in zip(tensors, weights):
        acc = t.mul_(w) if acc is None else acc.add_(t, alpha=w)  # the input is ours to overwrite
        total += w
        del t  # before the next input is read, or two inputs would be alive at once
    return acc.div_(total) if normalize else acc


def interpolate(parent, model, eta):
    """(1 - eta) * theta_parent + eta * theta_model: WARP / LITI, the code expert's pull back to its init."""
    return parent.mul_(1 - eta).add_(model, alpha=eta)


_ABS_BITS = {torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),  # sign mask, +inf
             torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000)}


def _blocks(n, block=2**20):
    return ((i, min(n, i + block)) for i in range(0, n, block))


def magnitude_trim(delta, density):
    """TIES step 1: keep the top `density` fraction of entries by magnitude, zero the rest.

    The threshold (the k-th largest |x|) is found by bisection on the bit pattern, since non-negative floats
    order like their bits as integers: ~31 counting passes over blocks, exact, and no copy of the tensor
    (kthvalue holds |x| plus its own working copies: ~50 GB for Command A's embedding).
    Entries tied with the threshold are all kept."""
    if density >= 1:
        return delta
    n = delta.numel()
    k = max(1, int(density * n))
    itype, sign_off, inf = _ABS_BITS[delta.dtype]
    flat = delta.reshape(-1)
    bits = flat.view(itype)
    lo, hi = 0, inf  # invariant: count(|x| >= lo) >= k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        count = sum(int(torch.count_nonzero((bits[a:b] & sign_off) >= mid)) for a, b in _blocks(n))
        lo, hi = (mid, hi) if count >= k else (lo, mid - 1)
    for a, b in _blocks(n):
        flat[a:b].mul_((bits[a:b] & sign_off) >= lo)
    return delta


def random_drop(delta, density, seed):
    """DARE: drop each entry with probability 1 - density and rescale the survivors by 1 / density, so the
    task vector keeps its expected value. Seeded per (tensor, model): the same command gives the same merge."""
    if density >= 1:
        return delta
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(delta.shape, generator=g) < density
    return delta.mul_(keep).div_(density)


def task_vectors(base, tensors, weights, lam=1.0, normalize=False, sparsify=None, elect_sign=False,
                 density=1.0, seeds=None):
    """theta_base + lam * combine_i(w_i * sparsify(theta_i - theta_base)).

    task arithmetic: combine = sum. TIES: sparsify by magnitude, elect a sign per parameter by the sign of the
    weighted sum (ties go positive), then average only the entries that agree with it ("disjoint mean").
    DARE: sparsify at random with rescaling. The election is done with four running sums (agreeing positive
    and negative numerators and weights) instead of stacking the K task vectors."""
    seeds = seeds or itertools.repeat(0)
    pos = neg = pos_w = neg_w = None
    wsum = 0.0
    for t, w, s in zip(tensors, weights, seeds):
        d = t.sub_(base)                                  # theta_i - theta_base, in place on our copy
        if sparsify == "magnitude":
            d = magnitude_trim(d, density)
        elif sparsify == "random":
            d = random_drop(d, density, s)
        wsum += w
        if not elect_sign:
            pos = d.mul_(w) if pos is None else pos.add_(d, alpha=w)
            del t, d  # before the next input is read
            continue
        wd = d.mul_(w)
        if pos is None:
            pos, neg = torch.zeros_like(base), torch.zeros_like(base)
            pos_w, neg_w = torch.zeros_like(base), torch.zeros_like(base)
        mask = wd > 0                                      # zeros (trimmed / dropped) vote for neither sign
        pos.addcmul_(wd, mask)                             # fused multiply-add: no temporary tensor
        pos_w.add_(mask, alpha=w)
        torch.lt(wd, 0, out=mask)
        neg.addcmul_(wd, mask)
        neg_w.add_(mask, alpha=w)
        del t, d, wd, mask
    if pos is None:
        return base
    if elect_sign:
        elected = (pos + neg) >= 0                         # sign(sum_i w_i delta_i); a tie elects +
        mixed = torch.where(elected, pos, neg, out=pos)    # element-wise, so writing over an input is safe
        div = torch.where(elected, pos_w, neg_w, out=pos_w)
        del neg, neg_w, elected
        if normalize:                                      # disjoint mean: divide by the agreeing weight only
            mixed = mixed.div_(div.masked_fill_(div == 0, 1))
    else:
        mixed = pos.div_(wsum) if normalize else pos
    return base.add_(mixed, alpha=lam)


def slerp(a, b, t, dot_threshold=0.9995):
    """Spherical interpolation of the two flattened tensors: sin((1-t)O)/sin(O) a + sin(tO)/sin(O) b, with O the
    angle between them; nearly parallel tensors fall back to linear interpolation (sin O -> 0)."""
    na, nb = math.sqrt(_dot64(a, a)), math.sqrt(_dot64(b, b))
    if na == 0 or nb == 0:
        return a.mul_(1 - t).add_(b, alpha=t)
    dot = max(-1.0, min(1.0, _dot64(a, b) / (na * nb)))
    if abs(dot) > dot_threshold:
        return a.mul_(1 - t).add_(b, alpha=t)
    omega = math.acos(dot)
    s = math.sin(omega)
    return a.mul_(math.sin((1 - t) * omega) / s).add_(b, alpha=math.sin(t * omega) / s)


def _dot64(a, b, block=2**22) -> float:
    """<a, b> accumulated in fp64 over blocks: exact enough for billions of entries, one small block of memory."""
    a, b = a.reshape(-1), b.reshape(-1)
    return sum(float(torch.dot(a[i:i + block].double(), b[i:i + block].double())) for i in range(0, a.numel(), block))


def _dare_seed(seed: int, name: str, i: int) -> int:
    return zlib.crc32(f"{seed}:{i}:{TIED.get(name, name)}".encode())


def merge_tensor(cfg: MergeConfig, name: str, tensors, weights, base=None, index=None):
    """One parameter of the merged model from its inputs (floating point, computed in fp32 or wider).
    `index` gives each input's position among all models (DARE's seeds must not depend on skipped zeros)."""
    m = cfg.method
    if m in ("linear", "soup"):
        return linear(tensors, weights, normalize=cfg.resolved_normalize())
    if m == "interpolate":
        return interpolate(base, next(iter(tensors)), cfg.eta)
    if m == "slerp":
        a, b = tensors
        return slerp(a, b, cfg.t)
    sparsify, elect = TASK_VECTOR[m]
    index = index if index is not None else range(len(weights))
    return task_vectors(base, tensors, weights, lam=cfg.lam, normalize=cfg.resolved_normalize(), sparsify=sparsify,
                        elect_sign=elect, density=cfg.density, seeds=[_dare_seed(cfg.seed, name, i) for i in index])


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32  # sums of bf16 weights need fp32


# ----------------------------------------------------------------------------------------------------------
# In memory: state dicts and modules (posttrain.py merges tiny experts without touching the disk)


def _check_same_tensors(named: list[tuple[str, dict]]):
    """Same tensor names and shapes everywhere; names the first difference."""
    (ref_name, ref), rest = named[0], named[1:]
    for other_name, sd in rest:
        missing, extra = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
        if missing:
            raise MergeError(f"{other_name} is missing {len(missing)} tensor(s) that {ref_name} has, "
                             f"e.g. {missing[:3]}")
        if extra:
            raise MergeError(f"{other_name} has {len(extra)} tensor(s) that {ref_name} lacks, e.g. {extra[:3]}")
        for k, shape in ref.items():
            if tuple(sd[k]) != tuple(shape):
                raise MergeError(f"tensor {k} has shape {tuple(sd[k])} in {other_name} but {tuple(shape)} in "
                                 f"{ref_name}: the checkpoints have different architectures")


def merge_state_dicts(method: str, state_dicts: list[dict], weights=None, base: dict | None = None,
                      **params) -> dict:
    """The same merge on in-memory state dicts; returns a new state dict in the first model's dtypes."""
    cfg = MergeConfig(method=method, weights=None if weights is None else list(weights), **params)
    cfg.check(len(state_dicts), base is not None)
    shapes = [(f"model {i}", {k: tuple(v.shape) for k, v in sd.items()}) for i, sd in enumerate(state_dicts)]
    if base is not None:
        shapes.append(("base", {k: tuple(v.shape) for k, v in base.items()}))
    _check_same_tensors(shapes)
    w = cfg.resolved_weights(len(state_dicts))
    idx = list(range(len(state_dicts))) if method in ("slerp", "interpolate") else [i for i, x in enumerate(w) if x > 0]
    out = {}
    for name, ref in state_dicts[0].items():
        if not ref.is_floating_point():
            raise MergeError(f"tensor {name} has dtype {ref.dtype}; only floating-point tensors can be merged")
        cd = _compute_dtype(ref.dtype)
        ts = (state_dicts[i][name].detach().to("cpu", cd, copy=True) for i in idx)
        b = None if base is None else base[name].detach().to("cpu", cd, copy=True)
        res = merge_tensor(cfg, name, ts, [w[i] for i in idx], b, idx)
        out[name] = res.to(getattr(torch, cfg.dtype) if cfg.dtype else ref.dtype).to(ref.device)
    return out


def merge_modules(method: str, models: list[CommandA], weights=None, base: CommandA | None = None,
                  **params) -> CommandA:
    """Merge CommandA modules into a new CommandA with the first model's config."""
    cfgs = [m.config for m in models] + ([base.config] if base is not None else [])
    for c in cfgs[1:]:
        diff = [k for k in ARCH_KEYS if k in c.to_hf_dict() and c.to_hf_dict()[k] != cfgs[0].to_hf_dict()[k]]
        if diff:
            raise MergeError(f"models differ in architecture field(s) {diff}; only same-architecture models merge")
    sd = merge_state_dicts(method, [m.state_dict() for m in models], weights,
                           None if base is None else base.state_dict(), **params)
    with torch.device("meta"):
        merged = CommandA(models[0].config)
    merged.load_state_dict(sd, strict=True, assign=True)
    return merged.eval()


# ----------------------------------------------------------------------------------------------------------
# Choosing what to merge: top-k seeds, the expert-weight search, leave-one-out


def _as_scores(x) -> dict[str, float]:
    """score_fn may return a float or {domain: score}; a float is one domain called 'score'."""
    if isinstance(x, dict):
        if not x:
            raise MergeError("score_fn returned an empty dict of domain scores")
        return {str(k): float(v) for k, v in x.items()}
    return {"score": float(x)}


def topk_merge(candidates: list, score_fn, k: int, out: str | None = None, names=None, **merge_kw):
    """Top-k seed merging (the report's code expert): score every seed run, keep the best k, soup them.
    Returns (merged, ranking) with ranking = [(name, mean score, {domain: score}), ...] best first."""
    if not 1 <= k <= len(candidates):
        raise MergeError(f"k must be in [1, {len(candidates)}] (the number of candidates), got {k}")
    names = names or [str(c) if _kind(c) == "path" else f"candidate {i}" for i, c in enumerate(candidates)]
    ranking = []
    for name, c in zip(names, candidates):
        s = _as_scores(score_fn(c))
        ranking.append((name, sum(s.values()) / len(s), s))
    order = sorted(range(len(candidates)), key=lambda i: -ranking[i][1])
    best = [candidates[i] for i in order[:k]]
    merged = merge("soup", best, out=out, **merge_kw)
    return merged, [ranking[i] for i in order]


@dataclass
class SearchRow:
    weights: list[float]       # normalized to sum 1
    scores: dict[str, float]   # per domain
    mean: float
    min_margin: float          # min over domains of score - floor (>= 0: no domain below its floor)

    @property
    def feasible(self) -> bool:
        return self.min_margin >= 0

    def key(self):  # feasible first, then the highest mean; infeasible ones by how far below the floor
        return (self.feasible, self.mean if self.feasible else self.min_margin)


class _Evaluator:
    """Merge with given weights, score, cache: evaluating merges is the expensive part."""

    def __init__(self, experts, score_fn, floor, workdir=None, **merge_kw):
        self.experts, self.score_fn, self.floor, self.merge_kw = experts, score_fn, floor, merge_kw
        self.kind = {_kind(e) for e in experts}
        if len(self.kind) != 1:
            raise MergeError("experts must be all paths, all modules or all state dicts")
        self.kind = self.kind.pop()
        self.workdir, self.cache, self.rows = workdir, {}, []

    def __call__(self, raw) -> SearchRow:
        total = sum(raw)
        if total <= 0:
            return None
        w = tuple(round(x / total, 6) for x in raw)
        if w in self.cache:
            return self.cache[w]
        if self.kind == "path":  # a checkpoint on disk, valid while score_fn runs
            import tempfile

            with tempfile.TemporaryDirectory(prefix="merge-search-", dir=self.workdir) as d:
                cand = os.path.join(d, "candidate")
                merge("linear", self.experts, list(w), out=cand, progress=False, **self.merge_kw)
                s = self.score_fn(cand)
        else:
            s = self.score_fn(merge("linear", self.experts, list(w), **self.merge_kw))
        s = _as_scores(s)
        floor = self.floor if isinstance(self.floor, dict) else {d: self.floor for d in s}
        row = SearchRow(list(w), s, sum(s.values()) / len(s), min(v - floor.get(d, 0.0) for d, v in s.items()))
        self.cache[w] = row
        self.rows.append(row)
        return row


def search_weights(experts: list, score_fn, floor: float | dict = 0.0, method: str = "grid",
                   grid=(0.0, 0.5, 1.0), step: float = 0.5, min_step: float = 0.05, max_evals: int = 200,
                   workdir: str | None = None, progress: bool = True, **merge_kw) -> dict:
    """The report's brute-force expert-weight search: maximize the mean domain score of the linear merge while
    no domain falls below `floor` (a number, or {domain: number}).

    grid: every combination of `grid` values per expert (normalized; duplicates after normalization are
    evaluated once). greedy: coordinate search from uniform weights: move one expert's weight by +-step,
    keep a move that improves, halve the step when a sweep finds none, stop below min_step.
    Returns {"rows": [SearchRow...] best first, "best": SearchRow, "evaluations": n}."""
    if len(experts) < 2:
        raise MergeError("a weight search needs at least 2 experts")
    ev = _Evaluator(experts, score_fn, floor, workdir, **merge_kw)
    K = len(experts)
    if method == "grid":
        if not grid or any((not math.isfinite(g)) or g < 0 for g in grid):
            raise MergeError(f"grid values must be finite and >= 0, got {grid}")
        combos = [c for c in itertools.product(sorted(set(grid)), repeat=K) if sum(c) > 0]
        seen, todo = set(), []
        for c in combos:
            key = tuple(round(x / sum(c), 6) for x in c)
            if key not in seen:
                seen.add(key)
                todo.append(c)
        if len(todo) > max_evals:
            raise MergeError(f"the grid has {len(todo)} distinct merges > max_evals={max_evals}; use a coarser "
                             f"grid, raise max_evals, or method='greedy'")
        for c in tqdm(todo, desc="grid search", disable=not progress):
            ev(c)
    elif method == "greedy":
        cur = [1.0 / K] * K
        best = ev(cur)
        s = step / K  # steps are in units of the uniform weight
        bar = tqdm(total=max_evals, desc="greedy search", disable=not progress)
        while s >= min_step / K and len(ev.cache) < max_evals:
            improved = False
            for i in range(K):
                for d in (+s, -s):
                    cand = list(cur)
                    cand[i] = max(0.0, cand[i] + d)
                    if cand == cur or sum(cand) <= 0:
                        continue
                    n0 = len(ev.cache)
                    row = ev(cand)
                    bar.update(len(ev.cache) - n0)
                    if row.key() > best.key():
                        cur, best, improved = [x / sum(cand) for x in cand], row, True
                        break
            if not improved:
                s /= 2
        bar.close()
    else:
        raise MergeError(f"search method must be 'grid' or 'greedy', got {method!r}")
    rows = sorted(ev.rows, key=lambda r: r.key(), reverse=True)
    return {"rows": rows, "best": rows[0], "evaluations": len(rows), "floor": floor}


def leave_one_out(experts: list, score_fn, weights=None, names=None, **merge_kw) -> dict:
    """Merge all experts, then each set of K-1 (weights renormalized): delta[e][d] = score without e - score
    with all. Negative: expert e carries domain d. Positive: expert e hurts domain d (the report's "code is
    the least preserved" is this kind of reading)."""
    K = len(experts)
    if K < 2:
        raise MergeError("leave-one-out needs at least 2 experts")
    names = names or [f"expert {i}" for i in range(K)]
    w = list(weights) if weights is not None else [1.0] * K
    MergeConfig(weights=w).check(K, False)
    ev = _Evaluator(experts, score_fn, 0.0, merge_kw.pop("workdir", None), **merge_kw)
    full = ev(w).scores
    without, delta = {}, {}
    for i, name in enumerate(names):
        rest = [x if j != i else 0.0 for j, x in enumerate(w)]
        if sum(rest) <= 0:
            raise MergeError(f"leaving out {name} leaves only zero weights")
        without[name] = ev(rest).scores
        delta[name] = {d: without[name][d] - full[d] for d in full}
    return {"all": full, "without": without, "delta": delta, "names": names}


def format_search_table(result: dict, names=None, top: int = 10) -> str:
    rows = result["rows"][:top]
    names = names or [f"w{i}" for i in range(len(rows[0].weights))]
    domains = list(rows[0].scores)
    lines = ["| " + " | ".join(names + domains + ["mean", "floor ok"]) + " |",
             "|" + "---:|" * (len(names) + len(domains) + 1) + ":---:|"]
    for r in rows:
        lines.append("| " + " | ".join([f"{x:.2f}" for x in r.weights] + [f"{r.scores[d]:.3f}" for d in domains]
                                       + [f"{r.mean:.3f}", "yes" if r.feasible else "no"]) + " |")
    return "\n".join(lines)


def format_loo_table(loo: dict) -> str:
    domains = list(loo["all"])
    lines = ["| left out | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains),
             "| (none: all experts) | " + " | ".join(f"{loo['all'][d]:.3f}" for d in domains) + " |"]
    for name in loo["names"]:
        lines.append(f"| {name} | " + " | ".join(f"{loo['delta'][name][d]:+.3f}" for d in domains) + " |")
    return "\n".join(lines)


def plot_search(result: dict | None, path: str, loo: dict | None = None, names=None):
    """Left: every evaluated merge, mean vs worst domain margin (feasible above the dashed line), best starred.
    Right: the leave-one-out matrix (score change per domain when one expert is left out)."""
    plt = pyplot()
    panels = [p for p in (result, loo) if p is not None]
    if not panels:
        raise MergeError("nothing to plot: give a search result and/or a leave-one-out result")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    axes = list(axes[0])
    if result is not None:
        ax = axes.pop(0)
        rows = result["rows"]
        for ok, color in ((True, "tab:green"), (False, "tab:gray")):
            pts = [(r.min_margin, r.mean) for r in rows if r.feasible == ok]
            if pts:
                ax.scatter(*zip(*pts), s=18, c=color, label="no domain below floor" if ok else "below floor")
        b = result["best"]
        ax.scatter([b.min_margin], [b.mean], marker="*", s=250, c="tab:red", label="chosen")
        ax.axvline(0, ls="--", c="k", lw=0.8)
        ax.set_xlabel("worst domain score - floor")
        ax.set_ylabel("mean domain score")
        ax.set_title(f"expert-weight search ({result['evaluations']} merges)")
        ax.legend(fontsize=8)
    if loo is not None:
        ax = axes.pop(0)
        domains = list(loo["all"])
        m = torch.tensor([[loo["delta"][n][d] for d in domains] for n in loo["names"]])
        v = float(m.abs().max()) or 1.0
        im = ax.imshow(m.numpy(), cmap="RdBu", vmin=-v, vmax=v)
        ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
        ax.set_yticks(range(len(loo["names"])), loo["names"])
        for (i, j), x in zip(itertools.product(range(m.shape[0]), range(m.shape[1])), m.flatten().tolist()):
            ax.text(j, i, f"{x:+.2f}", ha="center", va="center", fontsize=8)
        ax.set_title("leave one out: score change (red: expert carries the domain)")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------
# On disk: checkpoints checked against each other, then merged tensor by tensor (shards.py reads and writes)


def _open_checkpoints(paths: list[str], labels: list[str]) -> tuple[list[Checkpoint], dict[str, tuple]]:
    """The checkpoints, checked against each other (_check_checkpoints), and the tensor shapes they share."""
    try:
        ckpts = [Checkpoint(p) for p in paths]
    except CheckpointError as e:
        raise MergeError(str(e)) from None
    return ckpts, _check_checkpoints(ckpts, labels)


def _check_checkpoints(ckpts: list[Checkpoint], labels: list[str]) -> dict[str, tuple]:
    """Same architecture, the tensors the architecture needs, the same tensors with the same shapes."""
    ref = ckpts[0]
    for c, label in zip(ckpts[1:], labels[1:]):
        diff = [k for k in ARCH_KEYS if ref.config.get(k) != c.config.get(k)]
        if diff:
            k = diff[0]
            raise MergeError(f"{label} ({c.path}) and {labels[0]} ({ref.path}) have different architectures: "
                             f"{k} = {c.config.get(k)!r} vs {ref.config.get(k)!r}" + (
                                 f" (and {len(diff) - 1} more field(s))" if len(diff) > 1 else ""))
    with torch.device("meta"):  # the shapes config.json implies, in HF's order (a model on the meta device: free)
        expected = CommandA(ref.model_config).expected_shapes()
    for c, label in zip(ckpts, labels):
        missing = sorted(set(expected) - set(c.meta))
        if missing:
            raise MergeError(f"{label} ({c.path}) is missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        extra = sorted(k for k in set(c.meta) - set(expected) if k != "lm_head.weight" and not k.endswith(".bias"))
        if extra:
            raise MergeError(f"{label} ({c.path}) has tensor(s) this architecture does not have, e.g. {extra[:3]}")
        for k, shape in expected.items():
            if c.meta[k][1] != shape:
                raise MergeError(f"{label} ({c.path}): tensor {k} has shape {c.meta[k][1]}, "
                                 f"config.json implies {shape}")
    _check_same_tensors([(f"{label} ({c.path})", {k: s for k, (_, s) in c.meta.items()})
                         for c, label in zip(ckpts, labels)])
    # the same token ids must mean the same tokens, or averaging embedding rows averages different words
    blobs = {label: Path(c.path, "tokenizer.json").read_bytes() for c, label in zip(ckpts, labels)
             if os.path.isfile(os.path.join(c.path, "tokenizer.json"))}
    if len(set(blobs.values())) > 1:
        raise MergeError(f"the models have different tokenizer.json files ({', '.join(blobs)}): merged embeddings "
                         f"would mix different tokens")
    return expected


def _check_out(out: str, inputs: list[str], overwrite: bool):
    o = os.path.realpath(out)
    for p in inputs:
        r = os.path.realpath(p)
        if o == r or o.startswith(r + os.sep) or r.startswith(o + os.sep):
            raise MergeError(f"--out {out} would overwrite the input {p}; write the merge somewhere else")
    if os.path.exists(o):
        if not os.path.isdir(o):
            raise MergeError(f"--out {out} exists and is not a directory")
        if os.listdir(o) and not overwrite:
            raise MergeError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def _read(ckpt: Checkpoint, name: str, rows) -> torch.Tensor:
    t = ckpt.read(name, rows)
    return t.to(_compute_dtype(t.dtype))  # fp32 stays as read; bf16 / fp16 are widened once


def merge_checkpoints(cfg: MergeConfig, models: list[str], base: str | None, out: str, overwrite: bool = False,
                      progress: bool = True) -> dict:
    """Stream-merge HF checkpoint directories into `out`. Everything is validated first; the output appears
    only when complete (temp dir next to it, renamed at the end)."""
    cfg.check(len(models), base is not None)
    if sys.byteorder != "little":
        raise MergeError("this writer assumes a little-endian host (safetensors is little-endian)")
    paths = [str(p) for p in models] + ([str(base)] if base is not None else [])
    labels = [f"model {i}" for i in range(len(models))] + (["base"] if base is not None else [])
    _check_out(out, paths, overwrite)
    ckpts, expected = _open_checkpoints(paths, labels)
    experts, base_ckpt = ckpts[:len(models)], (ckpts[-1] if base is not None else None)

    w = cfg.resolved_weights(len(models))
    idx = list(range(len(models))) if cfg.method in ("slerp", "interpolate") else [i for i, x in enumerate(w) if x > 0]
    ref = experts[0]
    # HF's layer order, then what real checkpoints may add (a tied lm_head copy, all-zero biases)
    names = list(expected) + sorted(set(ref.meta) - set(expected))
    meta_out = {k: (DTYPES[cfg.dtype] if cfg.dtype else ref.meta[k][0], ref.meta[k][1]) for k in names}

    def produce(k):
        """Row blocks of merged tensor k; inputs are read lazily, one alive at a time."""
        shape = meta_out[k][1]
        rows = shape[0] if shape else 1
        step = rows
        # TIES and DARE without sparsification (density 1) are element-wise too
        if (cfg.method in ELEMENTWISE or (cfg.method in TASK_VECTOR and cfg.density >= 1)) and len(shape) >= 1:
            step = max(1, cfg.chunk_bytes // max(1, 4 * math.prod(shape[1:])))
        for r0 in range(0, rows, step):
            sl = None if step >= rows else (r0, min(rows, r0 + step))
            ts = (_read(experts[i], k, sl) for i in idx)
            yield merge_tensor(cfg, k, ts, [w[i] for i in idx], _read(base_ckpt, k, sl) if base_ckpt else None, idx)

    record = {"method": cfg.method, "models": [os.path.abspath(p) for p in models],
              "base": os.path.abspath(base) if base else None, "weights": w,
              **{k: v for k, v in asdict(cfg).items() if k not in ("method", "weights")},
              "normalize": cfg.resolved_normalize()}
    t0 = time.time()
    done = write_checkpoint(out, meta_out, produce, ref.config, cfg.max_shard_bytes,
                            files_from=(base_ckpt or ref).path,  # tokenizer files: the parent's, or the first model's
                            extra_json={"merge.json": record},   # provenance: what made this checkpoint
                            metadata={"merge": cfg.method}, desc=f"merge {cfg.method}", progress=progress)
    return {"out": done["out"], "method": cfg.method, "tensors": len(names), "shards": done["shards"],
            "bytes": done["bytes"], "seconds": round(time.time() - t0, 3), "weights": w}


# ----------------------------------------------------------------------------------------------------------
# One entry point for every kind of input


def _kind(x):
    if isinstance(x, (str, os.PathLike)):
        return "path"
    if isinstance(x, CommandA):
        return "module"
    if isinstance(x, dict):
        return "dict"
    raise MergeError(f"cannot merge a {type(x).__name__}: give checkpoint paths, CommandA modules or state dicts")


def merge(method: str, models: list, weights=None, base=None, out: str | None = None, overwrite: bool = False,
          progress: bool = True, **params):
    """merge("linear", ["a", "b"], [2, 1], out="c") streams checkpoints to disk and returns a summary dict;
    CommandA modules give a new CommandA, state dicts a new state dict (in memory, `out` unused).
    params: density, lam, normalize, t, eta, seed, dtype, max_shard_bytes (see MergeConfig)."""
    kinds = {_kind(m) for m in models} | ({_kind(base)} if base is not None else set())
    if len(kinds) > 1:
        raise MergeError(f"models mix {sorted(kinds)}; give all paths, all modules or all state dicts")
    kind = kinds.pop() if kinds else "path"
    if kind == "path":
        if out is None:
            raise MergeError("merging checkpoint directories needs an output directory (out=...)")
        cfg = MergeConfig(method=method, weights=None if weights is None else list(weights), **params)
        return merge_checkpoints(cfg, list(models), base, out, overwrite=overwrite, progress=progress)
    if out is not None:
        raise MergeError("out= is for checkpoint paths; save an in-memory merge with CommandA.save_pretrained")
    if kind == "module":
        return merge_modules(method, list(models), weights, base, **params)
    return merge_state_dicts(method, list(models), weights, base, **params)


# ----------------------------------------------------------------------------------------------------------
# CLI


def tasks_score_fn(suites: list[str], n: int, seed: int, tokenizer_dir: str):
    """score_fn backed by tasks.py: checkpoint path (or model) -> {suite: score}. Import errors surface here,
    before any merge is written."""
    try:
        import tasks
    except ImportError as e:
        raise MergeError(f"--rank-by needs tasks.py (the capability suites) and it could not be imported: "
                         f"{e}") from None
    if not hasattr(tasks, "evaluate"):
        raise MergeError("tasks.py has no evaluate(model, tokenizer, suites=..., n=..., seed=..., split=...)")
    from tokenizer import Tokenizer

    try:
        tok = Tokenizer.load(tokenizer_dir)
    except (FileNotFoundError, ValueError) as e:
        raise MergeError(f"--rank-by needs the tokenizer files in {tokenizer_dir}: {e}") from None

    def score(x):
        model = CommandA.from_pretrained(x) if isinstance(x, (str, os.PathLike)) else x
        with torch.no_grad():
            return tasks.evaluate(model.eval(), tok, suites=suites, n=n, seed=seed, split="test")

    return score


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Merge Command A checkpoints (HF Cohere2 directories) one tensor at a time: the report's "
                    "linear expert soups, seed soups, top-k seed merging and interpolation to the parent, plus "
                    "task arithmetic, TIES, DARE and SLERP; optionally search expert weights with tasks.py.")
    ap.add_argument("--method", required=True, choices=METHODS + ("topk",),
                    help="linear: sum w_i theta_i / sum w_i; soup: uniform average (seeds); topk: soup of the k best "
                         "by --rank-by; interpolate: (1-eta) base + eta model; task_arithmetic / ties / dare / "
                         "dare_ties: base + lambda * combined task vectors; slerp: spherical, two models")
    ap.add_argument("--models", nargs="+", required=True, metavar="DIR", help="checkpoint directories to merge")
    ap.add_argument("--weights", nargs="+", type=float, help="one weight per model (>= 0; linear divides by the sum)")
    ap.add_argument("--base", metavar="DIR", help="base / parent checkpoint (task vectors; interpolate's parent)")
    ap.add_argument("--density", type=float, help="TIES / DARE: fraction of each task vector kept (default 1)")
    ap.add_argument("--lambda", dest="lam", type=float, help="task-vector scale (default 1)")
    ap.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                    help="divide by the weight sum (default as mergekit: yes for linear, soup, ties; no for "
                         "task_arithmetic, dare, dare_ties)")
    ap.add_argument("--t", type=float, help="slerp position, 0 = first model, 1 = second (default 0.5)")
    ap.add_argument("--eta", type=float, help="interpolate: weight of the model vs its parent (default 0.5)")
    ap.add_argument("--seed", type=int, default=0, help="DARE drop masks; tasks.py sampling seed (default 0)")
    ap.add_argument("--dtype", choices=list(DTYPES), help="output dtype (default: the first model's)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="output shard size in GB (default 5)")
    ap.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory (must not be an input)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    ap.add_argument("--rank-by", metavar="SUITE[,SUITE]", help="tasks.py suites to score with (topk, --search, --loo)")
    ap.add_argument("--n", type=int, default=32, help="tasks.py examples per suite (default 32)")
    ap.add_argument("--k", type=int, default=2, help="topk: how many of the best models to soup (default 2)")
    ap.add_argument("--search", choices=("grid", "greedy"), help="linear: search expert weights with --rank-by")
    ap.add_argument("--grid", default="0,0.5,1", help="grid values per expert for --search grid (default 0,0.5,1)")
    ap.add_argument("--floor", type=float, default=0.0, help="--search: no domain score may fall below this")
    ap.add_argument("--max-evals", type=int, default=200, help="--search: at most this many merges evaluated")
    ap.add_argument("--loo", action="store_true", help="linear: leave-one-out analysis with --rank-by")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default torch's; 1 on a shared, busy machine)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_malloc()  # keep freed tensor buffers for reuse: page-faulting each tensor back in costs ~3x here
    try:
        summary = _run(args)
    except (MergeError, CheckpointError, FileNotFoundError) as e:  # CheckpointError: a shard changed mid-merge
        print(f"merge.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps(summary))
    return summary


# which methods read which flag: a flag given to a method that ignores it is a mistake worth reporting
FLAG_METHODS = {"density": ("ties", "dare", "dare_ties"), "lam": ("task_arithmetic", "ties", "dare", "dare_ties"),
                "normalize": ("linear", "task_arithmetic", "ties", "dare", "dare_ties"), "t": ("slerp",),
                "eta": ("interpolate",)}


def _run(args) -> dict:
    for flag, users in FLAG_METHODS.items():
        if getattr(args, flag) is not None and args.method not in users:
            raise MergeError(f"--{'lambda' if flag == 'lam' else flag} has no effect on --method {args.method} "
                             f"(it is used by {', '.join(users)})")
    d = MergeConfig()
    kw = dict(density=d.density if args.density is None else args.density, lam=d.lam if args.lam is None else args.lam,
              normalize=args.normalize, t=d.t if args.t is None else args.t,
              eta=d.eta if args.eta is None else args.eta, seed=args.seed, dtype=args.dtype,
              max_shard_bytes=max(1, int(args.max_shard_gb * 2**30)))
    progress = not args.no_progress
    analysis = args.method == "topk" or args.search or args.loo
    if (args.search or args.loo) and args.method != "linear":
        raise MergeError("--search and --loo search the weights of a linear merge: use --method linear")
    if analysis and not args.rank_by:
        raise MergeError("topk, --search and --loo need --rank-by SUITE[,SUITE] to score merges with tasks.py")
    if args.rank_by and not analysis:
        raise MergeError("--rank-by is used by --method topk, --search and --loo only")
    # everything checkable is checked before any evaluation or write
    method = "soup" if args.method == "topk" else args.method
    MergeConfig(method=method, weights=args.weights if args.method != "topk" else None,
                **kw).check(len(args.models), args.base is not None)
    if args.method == "topk" and args.weights:
        raise MergeError("topk takes no --weights (the k best are souped uniformly)")
    if args.method == "topk" and not 1 <= args.k <= len(args.models):
        raise MergeError(f"--k must be in [1, {len(args.models)}], got {args.k}")
    inputs = args.models + ([args.base] if args.base else [])
    _check_out(args.out, inputs, args.overwrite)
    _open_checkpoints(inputs, [f"model {i}" for i in range(len(args.models))] + (["base"] if args.base else []))
    if not analysis:
        return merge(args.method, args.models, args.weights, args.base, args.out, overwrite=args.overwrite,
                     progress=progress, **kw)

    suites = [s.strip() for s in args.rank_by.split(",") if s.strip()]
    score_fn = tasks_score_fn(suites, args.n, args.seed, args.models[0])
    if args.method == "topk":
        summary, ranking = topk_merge(args.models, score_fn, args.k, out=args.out, overwrite=args.overwrite,
                                      progress=progress, **kw)
        for name, mean, s in ranking:
            print(f"{mean:.4f}  {name}  {json.dumps(s)}")
        return {**summary, "ranking": [{"model": n, "mean": m, "scores": s} for n, m, s in ranking],
                "chosen": [n for n, _, _ in ranking[:args.k]]}

    parent, leaf = os.path.split(os.path.abspath(args.out))
    work = os.path.join(parent, f".{leaf}.search-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    names = [os.path.basename(os.path.normpath(p)) or p for p in args.models]
    try:
        result = loo = None
        weights = args.weights
        if args.search:
            try:
                grid = [float(x) for x in args.grid.split(",")]
            except ValueError:
                raise MergeError(f"--grid must be comma-separated numbers, got {args.grid!r}") from None
            result = search_weights(args.models, score_fn, floor=args.floor, method=args.search, grid=grid,
                                    max_evals=args.max_evals, workdir=work, progress=progress, **kw)
            print(format_search_table(result, names))
            weights = result["best"].weights
        if args.loo:
            loo = leave_one_out(args.models, score_fn, weights, names, workdir=work, **kw)
            print(format_loo_table(loo))
        summary = merge("linear", args.models, weights, out=args.out, overwrite=args.overwrite, progress=progress, **kw)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"experts": names, "floor": args.floor, "suites": suites}
    if result:
        report["search"] = [{"weights": r.weights, "scores": r.scores, "mean": r.mean, "feasible": r.feasible}
                            for r in result["rows"]]
        summary["best"] = report["search"][0]
    if loo:
        report["leave_one_out"] = loo
    atomic_write_json(os.path.join(args.out, "merge_search.json"), report)
    plot_search(result, os.path.join(args.out, "merge_search.png"), loo, names)
    return {**summary, "report": os.path.join(args.out, "merge_search.json")}


if __name__ == "__main__":
    main()
