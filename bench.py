"""
The project's speed measurements, as CLIs:

    python model.py --bench [--compile]          # the training step, against transformers' Cohere2 (this file)
    python serve.py --bench [--bench-presets tiny,small] [--compile]     # the engine (serve.py hands over)
    python bench.py --train ... | --bench ...    # the same two, directly
    python bench.py --gpu [--compile]            # issue #17's device checks, one table (a lent GPU's few minutes)

Training step: fwd + bwd + AdamW tok/s and MFU (against the bf16 matmul peak measured in the same run) in bf16
autocast and fp32, beside transformers' Cohere2ForCausalLM on the same weights and shapes (when installed).
Engine: TTFT, decode and end-to-end tok/s per batch size for the fused and the unfused engine; a batch-1 race
against a naive recompute loop, serve.py's contiguous KVCache and transformers' `generate` (when installed), all
with the same greedy tokens; KV bytes against the formula; the prefix cache's TTFT on a shared preamble. Every
comparison runs interleaved, best of N, in one process: compare ratios from one run (README, Serving).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import sys
import time
import traceback

import torch

from model import CommandA, ModelConfig, PRESETS, attend, dense_masks, flops_per_token, measure_matmul_peak, \
    tune_malloc
from serve import Engine, KVCache, WindowKVCache


@torch.inference_mode()
def naive_generate(model, prompts: torch.Tensor, n: int, cache: bool = False) -> torch.Tensor:
    """The straightforward HF-style greedy loop: recompute the whole sequence every step (no cache), or with
    serve.py's contiguous KVCache (keeps every position of every layer) when cache=True."""
    ids, out = prompts, []
    kv = None
    if cache:
        kv = KVCache(model.config, prompts.shape[0], prompts.shape[1] + n)
    for _ in range(n):
        logits = model(ids if not cache or not out else out[-1], cache=kv)[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        ids = torch.cat([ids, nxt], dim=1)
    return torch.cat(out, dim=1)


def _bench_batches(name, engines, vocab, batches, prompt_len, new_tokens, reps):
    """TTFT (the whole batch's prefill) and decode tok/s of each engine at each batch size; engines interleaved
    round-robin, best of `reps` (least disturbed by other load), so rows of one batch size compare fairly."""
    for method, engine in engines:
        t0 = time.perf_counter()
        for B in batches:                               # warm-up (and, with compile, compilation) per batch size
            engine.generate([[1] * prompt_len] * B, 4, stop_tokens=[])
        if "compile" in method:
            print(f"{name:6s} {method}: warm-up incl. compilation {time.perf_counter() - t0:.1f} s")
    rows = []
    for B in batches:
        prompts = torch.randint(0, vocab, (B, prompt_len), generator=torch.Generator().manual_seed(B)).tolist()
        best = {}
        for _ in range(reps):
            for method, engine in engines:
                reqs = [engine.submit(p, new_tokens, stop_tokens=[]) for p in prompts]
                t0 = time.perf_counter()
                while not all(r.done.is_set() for r in reqs):
                    engine.step()
                t1 = time.perf_counter()
                first = max(r.t_first for r in reqs)
                r = {"preset": name, "method": method, "batch": B, "ttft_s": round(first - t0, 4),
                     "decode_tok_s": round(B * (new_tokens - 1) / (t1 - first), 1),
                     "total_tok_s": round(B * new_tokens / (t1 - t0), 1)}
                if method not in best or r["total_tok_s"] > best[method]["total_tok_s"]:
                    best[method] = r
        for method, _ in engines:
            r = best[method]
            rows.append(r)
            print(f"{name:6s} {method:14s} B={B:3d}  TTFT {1000 * r['ttft_s']:8.1f} ms  decode "
                  f"{r['decode_tok_s']:9.1f} tok/s  end-to-end {r['total_tok_s']:9.1f} tok/s")
    return rows


def _bench_prefix(name, model, vocab, prefix_len, suffix_len, reps, mb):
    """TTFT of a request whose first `prefix_len` tokens (a rendered Cohere chat preamble is ~700) an earlier
    request already prefilled, prefix cache on vs off; interleaved, best of `reps`, a new suffix each time."""
    g = torch.Generator().manual_seed(2)
    pre = torch.randint(0, vocab, (prefix_len,), generator=g).tolist()
    asks = [pre + torch.randint(0, vocab, (suffix_len,), generator=g).tolist() for _ in range(reps + 1)]
    engines = {m: Engine(model, max_batch=1, max_len=prefix_len + suffix_len + 8, prefix_cache_mb=c)
               for m, c in (("uncached", 0), ("cached", mb))}
    for e in engines.values():                          # the first request: warm-up, and it fills the cache
        e.generate(asks[:1], 1, stop_tokens=[])
    best = dict.fromkeys(engines, float("inf"))
    for a in asks[1:]:
        for m, e in engines.items():
            r, t0 = e.submit(a, 1, stop_tokens=[]), time.perf_counter()
            while not r.done.is_set():
                e.step()
            best[m] = min(best[m], r.t_first - t0)
    u, c = best["uncached"], best["cached"]
    row = {"preset": name, "prefix": prefix_len, "suffix": suffix_len, "ttft_uncached_s": round(u, 4),
           "ttft_cached_s": round(c, 4), "speedup": round(u / c, 1), "hits": engines["cached"].stats["prefix_hits"],
           "same_tokens": len({str(e.generate(asks[1:], 8, stop_tokens=[])) for e in engines.values()}) == 1}
    print(f"{name:6s} prefix cache: TTFT of a request sharing a {prefix_len}-token preamble (+{suffix_len}): "
          f"{1000 * u:.1f} ms uncached, {1000 * c:.1f} ms cached = {u / c:.1f}x lower (best of {reps}; same "
          f"tokens: {row['same_tokens']})")
    return row


def _hf_model(model, dtype=torch.float32):
    """transformers' Cohere2ForCausalLM (SDPA attention) holding `model`'s weights, through our own HF export; None
    when transformers is not installed (it is a test-only dependency). Loaded in `dtype` rather than cast after:
    .to(dtype) would also round its fp32 RoPE frequencies (a non-persistent buffer) to bf16."""
    try:
        import tempfile
        import transformers
        transformers.logging.set_verbosity_error()
    except ImportError:
        return None
    d = tempfile.mkdtemp()
    model.save_pretrained(d)
    hf = transformers.Cohere2ForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa")
    shutil.rmtree(d, ignore_errors=True)
    return hf


def _hf_generate(model):
    """transformers' `generate` (greedy, its own KV cache) on the same weights, or None without transformers.
    Returns gen(ids, n) -> new tokens."""
    hf = _hf_model(model)
    if hf is None:
        return None
    hf.eval()

    def gen(ids, n):
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False)
        return out[:, ids.shape[1]:]
    return gen


def measure_memory_bandwidth(nbytes: int = 512 * 2**20, reps: int = 5) -> float:
    """Bytes/s of one streaming read over a buffer far larger than the last-level cache (a sum: one read per
    element, like a batch-1 matmul's pass over its weights), best of `reps`, on the current torch threads."""
    x = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def decode_bytes_per_token(model) -> int:
    """Weight bytes a batch-1 decode step must read: every parameter once (the tied embedding as the output
    projection; its input lookup reads one row). The KV cache reads are left out: a lower bound on traffic."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# The decode configuration of issue #17's race (hidden 256, 4 layers, vocab 4096, prompt 32, 128 new tokens)
DECODE_RACE = dict(cfg=dataclasses.replace(PRESETS["tiny"], vocab_size=4096, hidden_size=256, intermediate_size=768),
                   prompt_len=32, new_tokens=128, batches=(1, 16))


def decode_race(cfg, prompt_len, new_tokens, batches, reps=3, compile=True, name="decode"):
    """End-to-end greedy generation (prefill + new_tokens) of the engine, eager and compiled, against
    transformers' `generate` on the same weights, per batch size; interleaved, best of `reps`, same tokens."""
    torch.manual_seed(0)
    model = CommandA(cfg).eval()
    kw = dict(max_batch=max(batches), max_len=prompt_len + new_tokens, prefix_cache_mb=0)
    gens = {"engine": Engine(model, **kw), "engine-unpacked": Engine(model, pack_weights=False, **kw)}
    if compile:
        gens["engine+compile"] = Engine(model, compile=True, **kw)
        gens["compile-unpacked"] = Engine(model, compile=True, pack_weights=False, **kw)
    gens = {m: (lambda x, n, e=e: torch.tensor(e.generate(x.tolist(), n, stop_tokens=[]))) for m, e in gens.items()}
    hf = _hf_generate(model)
    if hf is not None:
        gens["hf-generate"] = hf
    rows = []
    for B in batches:
        p = torch.randint(0, cfg.vocab_size, (B, prompt_len), generator=torch.Generator().manual_seed(B))
        ref = gens["engine"](p, new_tokens)
        for m, gen in gens.items():                     # warm-up (and, compiled, one compilation per batch)
            t0 = time.perf_counter()
            gen(p[:, :8], 2)
            if "compile" in m:
                print(f"{name} {m} B={B}: warm-up incl. compilation {time.perf_counter() - t0:.1f} s")
        best, same = {}, {}
        for _ in range(reps):
            for m, gen in gens.items():
                t0 = time.perf_counter()
                out = gen(p, new_tokens)
                best[m] = max(best.get(m, 0.0), B * new_tokens / (time.perf_counter() - t0))
                same[m] = torch.equal(out, ref)
        for m in gens:
            r = {"config": name, "method": m, "batch": B, "total_tok_s": round(best[m], 1), "same_tokens": same[m]}
            if "hf-generate" in best:
                r["vs_hf_generate"] = round(best[m] / best["hf-generate"], 2)
            rows.append(r)
            print(f"{name} {m:16s} B={B:3d}  end-to-end {best[m]:9.1f} tok/s (best of {reps}; same tokens: "
                  f"{same[m]})" + (f"  {r['vs_hf_generate']:.2f}x hf-generate" if "vs_hf_generate" in r else ""))
    return rows


def bench(presets=("tiny", "small"), batches=(1, 8, 32), prompt_len=128, new_tokens=64, long_ctx=131072,
          compile=False, reps=3, prefix_len=700, prefix_cache_mb=256, decode_config=DECODE_RACE):
    rows, race, kv_rows, prefix_rows, bound_rows = [], [], [], [], []
    bandwidth = measure_memory_bandwidth()
    print(f"memory bandwidth (streaming read of 512 MiB, measured now, {torch.get_num_threads()} thread(s)): "
          f"{bandwidth / 1e9:.1f} GB/s")
    for name in presets:
        cfg = PRESETS[name]
        torch.manual_seed(0)
        model = CommandA(cfg).eval()
        # no prefix cache here: repeated prompts would hit it and these rows measure prefill itself
        kw = dict(max_batch=max(batches), max_len=prompt_len + new_tokens, prefix_cache_mb=0)
        engines = [("engine", Engine(model, fused=True, **kw)),
                   # fused, without oneDNN-packed weights for batches of 8+ rows (FusedDecode): what packing buys
                   ("engine-unpacked", Engine(model, fused=True, pack_weights=False, **kw)),
                   # the same engine decoding through model.py's generic forward: what FusedDecode buys
                   ("engine-unfused", Engine(model, fused=False, **kw))]
        if compile:   # the fused decode step compiled in static shapes, the prefill's generic forward dynamic
            engines.append(("engine+compile", Engine(model, compile=True, **kw)))
        rows += _bench_batches(name, engines, cfg.vocab_size, batches, prompt_len, new_tokens, reps)
        # the batch-1 bound: a decode step must stream every weight from memory once
        bound = bandwidth / decode_bytes_per_token(model)
        for r in rows:
            if r["preset"] == name and r["batch"] == 1:
                bound_rows.append({"preset": name, "method": r["method"], "decode_tok_s": r["decode_tok_s"],
                                   "bound_tok_s": round(bound, 1), "of_bound": round(r["decode_tok_s"] / bound, 3)})
                print(f"{name:6s} {r['method']:14s} B=  1  decode {r['decode_tok_s']:9.1f} tok/s = "
                      f"{100 * r['decode_tok_s'] / bound:5.1f}% of the bandwidth bound {bound:.1f} tok/s "
                      f"({decode_bytes_per_token(model) / 2**20:.1f} MiB of weights per token)")
        # batch 1, one prompt, greedy, end to end (prefill + new_tokens): the engines against the baselines,
        # interleaved round-robin and best-of-`reps`, so load from other jobs on a shared box hits every method
        # alike and the ratios stay meaningful. Every method must produce the engine's tokens.
        p = torch.randint(0, cfg.vocab_size, (1, prompt_len))
        gens = {m: (lambda x, n, e=e: torch.tensor(e.generate(x.tolist(), n, stop_tokens=[]))) for m, e in engines}
        gens["naive-recompute"] = lambda x, n: naive_generate(model, x, n, cache=False)
        gens["model.KVCache"] = lambda x, n: naive_generate(model, x, n, cache=True)
        hf = _hf_generate(model)            # the yardstick; only when transformers is installed
        if hf is not None:
            gens["hf-generate"] = hf
        ref = gens["engine"](p, new_tokens)[0].tolist()
        best, same = {}, {}
        for m, gen in gens.items():         # warm-up
            gen(p[:, :8], 2)
        for _ in range(reps):
            for m, gen in gens.items():
                if m == "naive-recompute" and m in best and new_tokens / best[m] > 5:
                    continue                # one slow recompute run is enough
                t0 = time.perf_counter()
                out = gen(p, new_tokens)
                best[m] = max(best.get(m, 0.0), new_tokens / (time.perf_counter() - t0))
                same[m] = out[0].tolist() == ref
        for m in gens:
            race.append({"preset": name, "method": m, "batch": 1, "total_tok_s": round(best[m], 1),
                         "same_tokens_as_engine": same[m]})
            print(f"{name:6s} {m:15s} B=  1  end-to-end {best[m]:9.1f} tok/s (best of {reps}, interleaved; "
                  f"same tokens as engine: {same[m]})")
        for m, _ in engines:
            for base in ("naive-recompute", "model.KVCache", "hf-generate"):
                if base in best:
                    print(f"{name:6s} {m} at batch 1 vs {base}: {best[m] / best[base]:.1f}x")
        if prefix_len and prefix_cache_mb:
            prefix_rows.append(_bench_prefix(name, model, cfg.vocab_size, prefix_len, 16, reps, prefix_cache_mb))
        # KV bytes: a real cache for one long sequence (bf16) vs the formula and vs an all-full-attention cache
        T = min(long_ctx, 32768)
        c = WindowKVCache(cfg, 1, T, dtype=torch.bfloat16)
        kv = {"preset": name, "T": T, "allocated": c.nbytes(), "formula": cfg.kv_cache_bytes(T),
              "all_full": cfg.kv_cache_bytes(T, window_aware=False)}
        kv_rows.append(kv)
        del c
        print(f"{name:6s} KV bytes at T={T} (bf16): window-aware {kv['allocated'] / 2**20:.1f} MiB "
              f"(formula {kv['formula'] / 2**20:.1f} MiB) vs all-full {kv['all_full'] / 2**20:.1f} MiB")
    # issue #17's decode race: batch 1 and 16 against transformers' generate
    d = decode_config
    decode = decode_race(d["cfg"], d["prompt_len"], d["new_tokens"], d["batches"], reps=reps, compile=compile)
    for name in ("command-a",):
        cfg = PRESETS[name]
        kv_rows.append({"preset": name, "T": long_ctx, "formula": cfg.kv_cache_bytes(long_ctx),
                        "all_full": cfg.kv_cache_bytes(long_ctx, window_aware=False)})
        print(f"{name} KV bytes at T={long_ctx} (bf16, analytic): {cfg.kv_cache_bytes(long_ctx) / 2**30:.2f} GiB "
              f"vs all-full {cfg.kv_cache_bytes(long_ctx, window_aware=False) / 2**30:.2f} GiB")
    return {"threads": torch.get_num_threads(), "prompt_len": prompt_len, "new_tokens": new_tokens,
            "bandwidth_bytes_s": bandwidth, "rows": rows, "batch1": race, "batch1_bound": bound_rows,
            "decode_race": decode, "kv": kv_rows, "prefix_cache": prefix_rows}



# ----------------------------------------------------------------------------------------------------------
# The training step (python model.py --bench)


def race(steps: dict, reps: int) -> dict:
    """Seconds per call of each function: interleaved round-robin (the machine's drift hits all alike), best of
    `reps`. Callers warm up first."""
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(reps):
        for m, step in steps.items():
            t0 = time.perf_counter()
            step()
            best[m] = min(best[m], time.perf_counter() - t0)
    return best


def _train_step(model, ids, bf16, hf=False):
    """One fwd + bwd + AdamW step on ids (B, T+1): ours takes targets, transformers shifts its labels itself."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)   # both models: pretrain.adamw's choice

    def step():
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = (model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss if hf else
                    model(ids[:, :-1], targets=ids[:, 1:]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def train_bench(presets=("tiny", "small"), batch=4, T=512, window=128, reps=5, compile=False):
    """Training-step tok/s and MFU of each preset (its sliding window set to `window` when given): bf16 autocast
    (the report's recipe) and fp32, optionally torch.compile'd, and transformers' Cohere2 in both on the same
    weights; interleaved round-robin, best of `reps`, so load from other jobs hits every method alike. Each
    row's MFU is against the matmul peak of its own precision, and its ratio against transformers in the same
    precision (a CPU without native bf16, AVX2 only, emulates bf16 matmuls: there fp32 is the real race)."""
    peaks = {"bf16": measure_matmul_peak(torch.bfloat16), "fp32": measure_matmul_peak(torch.float32)}
    print(f"matmul peaks (best of 1024^3/2048^3, measured now): bf16 {peaks['bf16'] / 1e9:.1f}, fp32 "
          f"{peaks['fp32'] / 1e9:.1f} GFLOP/s, torch threads={torch.get_num_threads()}")
    bf16 = peaks["bf16"] >= peaks["fp32"]
    if not bf16:   # emulated bf16 (measured 0.8 against 108 GFLOP/s fp32 on an AVX2 EPYC): hours, and meaningless
        print("bf16 matmuls are slower than fp32 here (no native bf16): racing fp32 only")
    rows = []
    for name in presets:
        cfg = dataclasses.replace(PRESETS[name], sliding_window=window or PRESETS[name].sliding_window)
        torch.manual_seed(0)
        model = CommandA(cfg)
        ids = torch.randint(0, cfg.vocab_size, (batch, T + 1))
        precisions = ("bf16", "fp32") if bf16 else ("fp32",)
        steps = {p: _train_step(model, ids, p == "bf16") for p in precisions}
        hf = _hf_model(model)
        if hf is not None:
            steps.update({"transformers-" + p: _train_step(hf, ids, p == "bf16", hf=True) for p in precisions})
        if compile:
            compiled = torch.compile(model)
            steps.update({p + "+compile": _train_step(compiled, ids, p == "bf16") for p in precisions})
        for m, step in steps.items():                 # warm-up (and compilation)
            t0 = time.perf_counter()
            step(), step()
            if "compile" in m:
                print(f"{name:6s} {m}: warm-up incl. compilation {time.perf_counter() - t0:.1f} s")
        best = race(steps, reps)
        # the peak again after the race, keeping the best: a peak taken while a neighbour loads the machine
        # understates it (here MFU read 116% once), and the MFU must not depend on when the peak happened to run
        peaks = {p: max(peaks[p], measure_matmul_peak(torch.bfloat16 if p == "bf16" else torch.float32))
                 for p in precisions}
        print(f"{name:6s} matmul peaks, best so far: " + ", ".join(f"{p} {v / 1e9:.1f}" for p, v in peaks.items())
              + " GFLOP/s")
        for m, dt in best.items():
            prec = "fp32" if "fp32" in m else "bf16"
            tok_s = batch * T / dt
            mfu = tok_s * flops_per_token(cfg, T) / peaks[prec]
            row = {"preset": name, "method": m, "precision": prec, "params": cfg.num_params(), "batch": batch,
                   "seq": T, "window": cfg.sliding_window, "tok_per_s": round(tok_s), "mfu": round(mfu, 4)}
            if "transformers-" + prec in best:
                row["vs_transformers"] = round(best["transformers-" + prec] / dt, 2)
            rows.append(row)
            print(f"{name:6s} {m:18s} params={cfg.num_params() / 1e6:6.2f}M B={batch} T={T} W={cfg.sliding_window} "
                  f"{tok_s:8.0f} tok/s  MFU({prec} peak) {100 * mfu:5.1f}%"
                  + (f"  {row['vs_transformers']:.2f}x transformers {prec}" if "vs_transformers" in row else ""))
    return {"peak_flops": peaks, "threads": torch.get_num_threads(), "rows": rows}


# ----------------------------------------------------------------------------------------------------------
# Activation checkpointing (pretrain.py --recompute): memory against time


def _recompute_child(preset: str, batch: int, T: int, window: int, recompute: bool, reps: int):
    """In a fresh process (peak RSS cannot be reset in one): the step's best time and its peak memory above what
    the model, AdamW state and batch hold before the first step. Prints one JSON line."""
    import resource
    from model import bf16_is_fast
    tune_malloc()
    cfg = dataclasses.replace(PRESETS[preset], sliding_window=window or PRESETS[preset].sliding_window)
    torch.manual_seed(0)
    model = CommandA(cfg)
    model.recompute = recompute
    ids = torch.randint(0, cfg.vocab_size, (batch, T + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    for p in model.parameters():                      # Adam state allocated up front: it is not activation memory
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    bf16, best, losses = bf16_is_fast("cpu"), float("inf"), []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        best = min(best, time.perf_counter() - t0)
        losses.append(loss.item())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"recompute": recompute, "step_s": best, "peak_above_base_bytes": peak - base,
                      "losses": losses, "bf16": bf16}))


def recompute_bench(preset="small", batch=4, T=512, window=128, reps=3, rounds=2) -> list:
    """Step time and peak activation memory with and without per-layer recompute, each in its own process,
    alternating (off, on, off, on) `rounds` times; best of each."""
    import os
    import subprocess
    here, best = os.path.dirname(os.path.abspath(__file__)), {}
    for _ in range(rounds):
        for rc in (False, True):
            code = f"import bench; bench._recompute_child({preset!r}, {batch}, {T}, {window}, {rc}, {reps})"
            p = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, check=True)
            r = json.loads(p.stdout.strip().splitlines()[-1])
            if rc not in best or r["step_s"] < best[rc]["step_s"]:
                best[rc] = {**r, "peak_above_base_bytes": min(r["peak_above_base_bytes"],
                                                             best.get(rc, r)["peak_above_base_bytes"])}
    off, on = best[False], best[True]
    print(f"{preset} B={batch} T={T} W={window}: recompute off {off['step_s']:.3f} s/step, peak +"
          f"{off['peak_above_base_bytes'] / 2**20:.0f} MiB; on {on['step_s']:.3f} s/step "
          f"({on['step_s'] / off['step_s']:.2f}x), peak +{on['peak_above_base_bytes'] / 2**20:.0f} MiB "
          f"({on['peak_above_base_bytes'] / max(1, off['peak_above_base_bytes']):.2f}x); same losses: "
          f"{on['losses'] == off['losses']}")
    return [off, on]


# ----------------------------------------------------------------------------------------------------------
# Issue #17's device checks (python bench.py --gpu): one prepared run for the few minutes a GPU is lent.
# Every number comes from this run: the bf16 matmul peak and the memory bandwidth are measured first, the way
# the CPU rows are, so MFU and the decode bound need no spec sheet. `--device cpu --size micro` runs the same
# code on a CPU (the tests do), skipping what only CUDA has (FlexAttention's backward, CUDA graphs).

# ~1B parameters in Command A's layout: 3 sliding (the report's 4K window) : 1 full, GQA 16:4, head_dim 128
GPU_1B = ModelConfig(vocab_size=32768, hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
                     num_attention_heads=16, num_key_value_heads=4, sliding_window=4096,
                     max_position_embeddings=16384)
CHECK_SIZES = {   # model, training batch x seq, attention check (T, window), decode race config
    "1b": dict(cfg=GPU_1B, batch=1, T=8192, attn_T=8192, attn_W=2048, decode=DECODE_RACE),
    "micro": dict(cfg=dataclasses.replace(PRESETS["micro"], sliding_window=16), batch=2, T=64, attn_T=256, attn_W=64,
                  decode=dict(DECODE_RACE, cfg=PRESETS["micro"], prompt_len=16, new_tokens=16)),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _best_seconds(fn, device, reps, warmup=2):
    """Best wall time of fn() over `reps` calls, the device drained before and after each (CUDA runs async)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def device_matmul_peak(device, dtype=torch.bfloat16) -> float:
    """FLOP/s of square matmuls measured now (a CPU: model.measure_matmul_peak; a GPU: 8192^3, ten per timing)."""
    if device.type == "cpu":
        return measure_matmul_peak(dtype)
    n = 8192
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    return 10 * 2 * n ** 3 / _best_seconds(lambda: [a @ b for _ in range(10)], device, reps=3)


def device_bandwidth(device) -> float:
    """Bytes/s of one streaming read (a sum over 512 MiB on a CPU, 4 GiB on a GPU), measured now."""
    if device.type == "cpu":
        return measure_memory_bandwidth()
    x = torch.ones(2 ** 30, device=device)
    return x.numel() * 4 / _best_seconds(x.sum, device, reps=5)


def check_training(cfg, device, batch, T, reps, peak):
    """bf16 autocast and FP8 (`_scaled_mm` e4m3/e5m2) training steps of the same weights, interleaved: tok/s,
    MFU against the measured bf16 peak, and each step's first loss (FP8 must train the same model)."""
    torch.manual_seed(0)
    with torch.device(device):
        models = {"bf16": CommandA(cfg), "fp8": CommandA(dataclasses.replace(cfg, fp8=True))}
    models["fp8"].load_state_dict(models["bf16"].state_dict())
    ids = torch.randint(0, cfg.vocab_size, (batch, T + 1), device=device)
    steps = {p: _train_step(m, ids, True) for p, m in models.items()}
    first = {p: step().item() for p, step in steps.items()}     # warm-up (compiles), the loss before any update
    for step in steps.values():
        step()
    _sync(device)
    best = race({p: (lambda s=s: (s(), _sync(device))) for p, s in steps.items()}, reps)
    rows = []
    for p, dt in best.items():
        tok_s = batch * T / dt
        rows.append({"check": f"train {p}", "tok_per_s": round(tok_s), "step_s": round(dt, 4),
                     "mfu": round(tok_s * flops_per_token(cfg, T) / peak, 4), "first_loss": round(first[p], 4),
                     "vs_bf16": round(best["bf16"] / dt, 3)})
    del models, steps
    return rows


def _sdpa_backend(q, k, v, mask=None, causal=False) -> str:
    """The kernel SDPA picks for these inputs (flash, efficient, cuDNN or math: the rows' times depend on it)."""
    try:
        from torch.nn.attention import SDPBackend
        return SDPBackend(torch._fused_sdp_choice(q, k, v, attn_mask=mask, is_causal=causal,
                                                  enable_gqa=k.shape[1] != q.shape[1])).name
    except Exception as e:    # a private helper: its absence must not cost the row
        return f"unknown ({type(e).__name__})"


def check_attention(cfg, device, T, W, reps):
    """A sliding layer's attention forward + backward at T tokens, window W: FlexAttention with model.py's block
    mask (it must skip the blocks outside the band: its time over the causal layer's should follow the work,
    keys in the band over keys under the causal mask) against SDPA under the same mask as a dense boolean one
    (and, for the full layer, SDPA's is_causal kernel); each SDPA row names the kernel SDPA chose. The 1b size
    runs T 8192 with W 2048: the band holds 0.46 of the causal layer's 128 x 128 blocks (0.44 of its keys)."""
    if device.type != "cuda":
        return [{"check": "attention", "skipped": "FlexAttention has no CPU backward (torch 2.13): CUDA only"}]
    B, nh, nkv, dh = 1, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    cfg = dataclasses.replace(cfg, sliding_window=W, attn_backend="flex")
    with torch.device("meta"):        # only its _masks() is used: no weights
        shell = CommandA(cfg)
    pos = torch.arange(T, device=device).expand(B, T)
    doc = torch.zeros_like(pos)
    flex, dense = shell._masks(B, T, device, pos, doc, None), dense_masks(cfg, pos, doc, pos, doc)
    q = torch.randn(B, nh, T, dh, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, nkv, T, dh, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    runs = {"flex sliding": flex["sliding"], "sdpa sliding (dense mask)": dense["sliding"],
            "flex full": flex["full"], "sdpa full (dense mask)": dense["full"],
            "sdpa full (is_causal)": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True)}
    rows, ms = [], {}
    for name, mask in runs.items():
        ms[name] = 1000 * _best_seconds(lambda m=mask: attend(q, k, v, m).sum().backward(), device, reps)
    err = (attend(q, k, v, flex["sliding"]) - attend(q, k, v, dense["sliding"])).abs().max().item()
    band = sum(min(i + 1, W) for i in range(T)) / (T * (T + 1) / 2)   # keys in the band over causal keys
    nb, wb = -(-T // 128), -(-(W + 127) // 128)         # FlexAttention's blocks: query block i sees i-wb+1..i
    blocks = sum(min(i + 1, wb) for i in range(nb)) / (nb * (nb + 1) / 2)
    for name, t in ms.items():
        row = {"check": f"attention {name}", "T": T, "window": W, "fwd_bwd_ms": round(t, 2)}
        if name.startswith("sdpa"):
            mask = runs[name] if not callable(runs[name]) else None
            row["sdpa_backend"] = _sdpa_backend(q, k, v, mask, causal=mask is None)
        if name == "flex sliding":
            row.update(vs_sdpa=round(ms["sdpa sliding (dense mask)"] / t, 2), max_abs_err_vs_sdpa=round(err, 4),
                       time_over_full=round(t / ms["flex full"], 3), blocks_over_full=round(blocks, 3),
                       keys_over_full=round(band, 3))
        rows.append(row)
    return rows


def check_decode(cfg, device, prompt_len, new_tokens, batches, reps, compile):
    """Greedy generation, end to end, of the engine (eager; CUDA graphs; compiled + CUDA graphs with `compile`)
    against transformers' `generate` on the same weights, bf16 on a GPU (fp32 on a CPU, as the CPU race)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = CommandA(cfg).eval()
    hf = _hf_model(model, dtype)                     # the same fp32 weights, rounded alike
    model.to(device, dtype)
    kw = dict(max_batch=max(batches), max_len=prompt_len + new_tokens, prefix_cache_mb=0)
    engines = {"engine": Engine(model, **kw)}
    if device.type == "cuda":
        engines["engine+cuda-graphs"] = Engine(model, cuda_graphs=True, **kw)
        if compile:
            engines["compile+cuda-graphs"] = Engine(model, cuda_graphs=True, compile=True, **kw)
    gens = {m: (lambda x, n, e=e: torch.tensor(e.generate(x.tolist(), n, stop_tokens=[]))) for m, e in engines.items()}
    if hf is not None:
        hf.to(device).eval()
        gens["hf-generate"] = lambda x, n: hf.generate(x.to(device), attention_mask=torch.ones_like(x, device=device),
                                                       max_new_tokens=n, min_new_tokens=n,
                                                       do_sample=False)[:, x.shape[1]:].cpu()
    rows = []
    for B in batches:
        p = torch.randint(0, cfg.vocab_size, (B, prompt_len), generator=torch.Generator().manual_seed(B))
        outs = {m: gen(p, new_tokens) for m, gen in gens.items()}      # warm-up (graphs, compilation) + tokens
        best = race({m: (lambda g=gen: (g(p, new_tokens), _sync(device))) for m, gen in gens.items()}, reps)
        for m, dt in best.items():
            same = outs[m] == outs["engine"]
            # in bf16 on random weights near-tied logits can flip a token, and the rows differ from there on:
            # the share of tokens before each row's first difference says how early that happened
            row = {"check": f"decode {m}", "batch": B, "tok_per_s": round(B * new_tokens / dt, 1),
                   "same_tokens_as_engine": round(same.float().mean().item(), 3),
                   "same_until_first_diff": round(same.int().cumprod(1).float().mean().item(), 3)}
            if "hf-generate" in best:
                row["vs_hf_generate"] = round(best["hf-generate"] / dt, 2)
            rows.append(row)
    return rows


def check_decode_bound(cfg, device, bandwidth, new_tokens=128):
    """Batch-1 decode of the ~1B model against its bound: weight bytes per token over the measured bandwidth."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = CommandA(cfg).to(dtype).eval()
    engine = Engine(model, max_batch=1, max_len=16 + new_tokens, prefix_cache_mb=0,
                    cuda_graphs=device.type == "cuda")

    def decode_seconds():              # from the first token on: the prefill is not a decode step
        r = engine.submit([1] * 16, new_tokens, stop_tokens=[])
        while not r.done.is_set():
            engine.step()              # each step ends in .tolist() of its tokens: synchronized
        return time.perf_counter() - r.t_first
    decode_seconds()                   # warm-up: captures the graph
    dt = min(decode_seconds() for _ in range(3))
    bound = bandwidth / decode_bytes_per_token(model)
    tok_s = (new_tokens - 1) / dt
    return [{"check": "decode bound, batch 1" + (" (cuda graphs)" if device.type == "cuda" else ""),
             "params": cfg.num_params(), "tok_per_s": round(tok_s, 1), "bound_tok_s": round(bound, 1),
             "of_bound": round(tok_s / bound, 3)}]


def gpu_checks(device="cuda", size="1b", reps=5, compile=False, cudnn_attention=True) -> dict:
    """The four checks of issue #17 in one run, printed as one table. cudnn_attention=False keeps SDPA off
    cuDNN (a rerun's switch, should its kernels fail under CUDA-graph capture)."""
    device, s = torch.device(device), CHECK_SIZES[size]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)
        try:                             # FlexAttention and --compile need a working Triton toolchain
            torch.compile(lambda x: x + 1)(torch.ones(8, device=device))
            print("torch.compile: works here", flush=True)
        except Exception as e:
            print(f"torch.compile FAILS here ({type(e).__name__}: {str(e)[:200]}): expect error rows", flush=True)
    peak, bandwidth = device_matmul_peak(device), device_bandwidth(device)
    print(f"{name}: bf16 matmul peak {peak / 1e12:.1f} TFLOP/s, memory bandwidth {bandwidth / 1e9:.0f} GB/s "
          f"(measured now); torch {torch.__version__}", flush=True)
    rows = []
    checks = {"train": lambda: check_training(s["cfg"], device, s["batch"], s["T"], reps, peak),
              "attention": lambda: check_attention(s["cfg"], device, s["attn_T"], s["attn_W"], reps),
              "decode": lambda: check_decode(s["decode"]["cfg"], device, s["decode"]["prompt_len"],
                                             s["decode"]["new_tokens"], s["decode"]["batches"], max(2, reps // 2),
                                             compile),
              "decode bound": lambda: check_decode_bound(s["cfg"], device, bandwidth)}
    for what, check in checks.items():
        try:
            new = check()
        except Exception as e:   # a lease is minutes long: one failing path must not cost the other checks
            traceback.print_exc()
            new = [{"check": what, "error": f"{type(e).__name__}: {e}"[:400]}]
        rows += new
        for r in new:            # as they come: a run cut short by its time limit still shows what it measured
            print(json.dumps(r), flush=True)
        gc.collect()                     # a failed check's traceback frames may still hold its models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n| check | {name}, torch {torch.__version__} |\n|---|---|")
    for r in rows:
        print(f"| {r['check']} | " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "check") + " |")
    return {"device": name, "torch": torch.__version__, "peak_flops": peak, "bandwidth_bytes_s": bandwidth,
            "size": size, "rows": rows}



def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description="Benchmarks. Default: serve.py's engine (python serve.py --bench runs "
                                 "this): TTFT, tok/s and KV bytes against a naive loop and transformers' generate, "
                                 "and the prefix cache's TTFT. --train: the training step against transformers' "
                                 "Cohere2 (python model.py --bench runs this).")
    ap.add_argument("--bench", action="store_true", help="(accepted for `serve.py --bench`; this file always benchmarks)")
    ap.add_argument("--bench-presets", default="tiny,small", help="comma-separated presets for --bench")
    ap.add_argument("--bench-prompt", type=int, default=128, help="prompt tokens per request for --bench")
    ap.add_argument("--bench-new", type=int, default=64, help="new tokens per request for --bench")
    ap.add_argument("--bench-reps", type=int, default=3, help="interleaved repetitions of the batch-1 race")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default on CPU: 1; decode steps are ~1 ms of small matmuls, and on a "
                         "shared 2-core box a second OpenMP thread mostly spin-waits: measured 10x slower)")
    ap.add_argument("--train", action="store_true", help="benchmark the training step instead (model.py --bench)")
    ap.add_argument("--bench-batch", type=int, default=4, help="--train: batch size")
    ap.add_argument("--bench-seq", type=int, default=512, help="--train: sequence length")
    ap.add_argument("--bench-window", type=int, default=128,
                    help="--train: sliding window of every preset (0: the preset's own)")
    ap.add_argument("--compile", action="store_true", help="also race the torch.compile'd engine / training step")
    ap.add_argument("--recompute", action="store_true", help="--train: instead, per-layer activation recompute's "
                    "step time and peak memory, with and without (first preset of --bench-presets)")
    ap.add_argument("--gpu", action="store_true", help="instead, issue #17's four device checks in one table: bf16 "
                    "MFU of a ~1B training step, FP8 against bf16, FlexAttention's band against SDPA, CUDA-graph "
                    "decode against transformers' generate (and the batch-1 decode bound)")
    ap.add_argument("--device", default="cuda", help="--gpu: the device (cpu: a dry run of the same code)")
    ap.add_argument("--size", choices=sorted(CHECK_SIZES), default="1b", help="--gpu: model sizes (micro: a dry run on a CPU)")
    ap.add_argument("--no-cudnn-attention", action="store_true", help="--gpu: keep SDPA off cuDNN's kernels")
    ap.add_argument("--prefix-cache-mb", type=float, default=256,
                    help="prefix cache bound for the bench's cached-preamble TTFT row (0: skip that row)")
    args = ap.parse_args(argv)
    if args.bench_prompt < 1 or args.bench_new < 2 or args.bench_reps < 1:
        ap.error("--bench-prompt and --bench-reps must be >= 1 and --bench-new >= 2")
    if args.bench_batch < 1 or args.bench_seq < 2 or args.bench_window < 0:
        ap.error("--bench-batch must be >= 1, --bench-seq >= 2 and --bench-window >= 0")
    unknown = [p for p in args.bench_presets.split(",") if p not in PRESETS]
    if unknown:
        ap.error(f"unknown preset(s) {unknown} for --bench-presets; choose from {sorted(PRESETS)}")
    huge = [p for p in args.bench_presets.split(",") if PRESETS[p].num_params() > 2e9]
    if huge:   # random fp32 weights for 8B+ parameters would not fit this kind of machine
        ap.error(f"--bench builds random weights in fp32; {huge} are too large (over 2B parameters)")
    tune_malloc()
    if args.gpu:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            ap.error("--gpu checks the CUDA paths and needs a CUDA device; `--gpu --device cpu --size micro` runs "
                     "the same code on this CPU as a dry run")
        print(json.dumps(gpu_checks(args.device, args.size, reps=args.bench_reps + 2, compile=args.compile,
                                    cudnn_attention=not args.no_cudnn_attention)))
        return
    if args.train:   # training uses every core (the threads default is the engine's)
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.recompute:
            print(json.dumps(recompute_bench(args.bench_presets.split(",")[0], args.bench_batch, args.bench_seq,
                                             args.bench_window, reps=args.bench_reps)))
            return
        print(json.dumps(train_bench(tuple(args.bench_presets.split(",")), batch=args.bench_batch, T=args.bench_seq,
                                     window=args.bench_window, reps=args.bench_reps + 2, compile=args.compile)))
        return
    if args.threads is None and not torch.cuda.is_available():
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench(tuple(args.bench_presets.split(",")), prompt_len=args.bench_prompt, new_tokens=args.bench_new,
                   compile=args.compile, reps=args.bench_reps, prefix_cache_mb=args.prefix_cache_mb)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
