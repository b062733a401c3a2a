"""
Pretraining Command A (report section "Pre-training": data, recipe, cooldown, context extension), end to end:

    python pretrain.py --tiny          # ~2.5 min on 2 CPU cores with bf16: data -> tokenizer -> train -> samples

What happens, in the report's order:
  1. data.py builds the corpus (dedup, heuristic + ML quality filters, educational up-weighting) and
     tokenizer.py trains a byte-level BPE on its training split;
  2. muP (Yang et al. 2022, arXiv 2203.03466): hyper-parameters tuned at a base width transfer to wider
     models through per-group learning rates, init scales and an output multiplier (`--coord-check` plots
     the check that activations keep their scale across widths);
  3. precision as the report: fp32 master weights and Adam state, bf16 matmuls (autocast), norms / softmax /
     loss in fp32; `--fp8` switches the linear layers to model.py's FP8 path;
  4. schedule: linear warmup, a constant ("stable") phase, then a LINEAR COOLDOWN to zero on the
     high-quality part of the mix, during which the context grows in stages (report: 8K -> 32K -> 128K ->
     256K, here scaled down) on a domain-balanced long-document mix;
  5. atomic checkpoints with everything needed to resume exactly (weights, Adam, step, RNG, data position);
     the output directory is also an HF Cohere2 checkpoint + tokenizer (CommandA.from_pretrained /
     Tokenizer.load);
  6. parallelism (parallel.py): under `torchrun --nproc_per_node N pretrain.py ... --dp --fsdp --sp --tp` the
     same loop runs sharded over a named device mesh; every rank reads the same global batch and keeps its
     rows / tokens / heads, and checkpoints are gathered to the single-process layout, so they resume in any
     layout. The losses are the single-process run's up to the order of floating-point sums: bit for bit
     with --fp32 (measured here, every layout); under bf16 within ~1e-5, as much as one process differs from
     itself with twice the micro-batches (`python tests/parity.py` measures both).

The log line is `step | loss | lr | tok/s | MFU` (FLOPs per token 6N + 12*L*H*T, PaLM appendix B; peak from
a bf16 matmul measured at start on CPU, a table on GPUs). The last stdout line is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import data as D
import parallel as par
from model import (CommandA, ModelConfig, PRESETS, bf16_is_fast, flops_per_token, measure_matmul_peak,
                   atomic_write_json, pyplot, save_figure, tune_malloc)
from serve import KVCache
from tokenizer import Tokenizer

GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}  # dense FLOP/s


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    preset: str = "tiny"               # model.PRESETS name; vocab_size is replaced by the tokenizer's
    vocab_size: int = 8192             # BPE vocabulary trained on the corpus (incl. Cohere's special tokens)
    corpus_mb: float = 4.0             # stdlib text read for the default corpus (ignored with --data)
    data: str | None = None            # user text / JSONL file or folder instead of the default corpus
    seq_len: int = 256                 # context of the main phase (the report's 8K, scaled down)
    batch_size: int = 16               # rows per micro-batch at seq_len (longer stages keep tokens/step fixed)
    grad_accum: int = 1                # micro-batches per optimizer step
    steps: int = 400                   # optimizer steps of the whole schedule
    max_steps: int | None = None       # stop early after this many steps (the schedule still spans `steps`)
    lr: float = 3e-3                   # peak Adam LR at the muP base width (hidden matrices get lr / m)
    warmup_frac: float = 0.05          # linear warmup share of steps
    cooldown_frac: float = 0.3         # linear cooldown-to-zero share of steps (high-quality + long context)
    # context-extension stages inside the cooldown: (seq_len multiple of seq_len, share of cooldown steps);
    # the report's 8K -> 32K -> 128K -> 256K is 1:4:16:32; tiny: 128 -> 512 -> 2048 -> 4096
    context_stages: list = field(default_factory=lambda: [[1, 0.4], [4, 0.3], [16, 0.2], [32, 0.1]])
    cooldown_data: str = "high_quality"  # the cooldown's mix at the main context; "main" keeps the main mix
                                         # (decay only: the ablation that separates the decay from the data)
    instruct_frac: float = 0.02        # share of the main mix's tokens that is chat-format instruction data
    recompute: bool = False            # activation checkpointing per layer (memory for ~1/3 more compute)
    weight_decay: float = 0.1          # AdamW, on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0                  # global gradient-norm clip
    mup_base_hidden_size: int | None = 128  # muP base width (None: standard parametrization)
    fp8: bool = False                  # FP8 linear layers (e4m3 / e5m2 via torch._scaled_mm)
    seed: int = 0
    val_fraction: float = 0.02         # documents held out for validation (before packing)
    eval_every: int = 100              # steps between validation losses
    ckpt_every: int = 100              # steps between checkpoints
    log_every: int = 10                # steps between log lines
    eval_rows: int = 64                # validation rows per evaluation (spread over the held-out documents)
    samples: int = 3                   # generations printed at the end


# main context 128 = twice tiny's 64-token window, as the report's 8K is twice its 4K window; 4096 tokens a step,
# so the 32x stage (4096) has one row: data-parallel runs (--dp / --fsdp 2) need --batch-size 64
TINY = dict(preset="tiny", vocab_size=8192, corpus_mb=4.0, seq_len=128, batch_size=32, steps=400, lr=3e-3)


def validate(cfg: TrainConfig):
    def need(ok, msg):
        if not ok:
            raise ValueError(msg)
    need(cfg.preset in PRESETS, f"--preset {cfg.preset!r} unknown; choose from {sorted(PRESETS)}")
    for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "ckpt_every", "log_every",
                 "eval_rows"):
        need(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    need(cfg.max_steps is None or cfg.max_steps >= 1, "--max-steps must be >= 1")
    need(cfg.lr > 0 and math.isfinite(cfg.lr), "--lr must be a positive number")
    need(cfg.clip > 0 and math.isfinite(cfg.clip), "--clip must be a positive number")
    need(0 <= cfg.warmup_frac < 1 and 0 <= cfg.cooldown_frac <= 1 and cfg.warmup_frac + cfg.cooldown_frac <= 1,
         "--warmup-frac and --cooldown-frac must be in [0, 1] and sum to <= 1")
    need(cfg.vocab_size >= 512, "--vocab-size must be >= 512")
    need(cfg.corpus_mb > 0, "--corpus-mb must be > 0")
    need(0 < cfg.val_fraction < 0.5, "--val-fraction must be in (0, 0.5)")
    need(all(int(m) >= 1 and f > 0 for m, f in cfg.context_stages), "context stages need multiples >= 1, shares > 0")
    need(cfg.cooldown_data in ("high_quality", "main"), "--cooldown-data must be high_quality or main")
    need(0 <= cfg.instruct_frac < 0.5, "--instruct-frac must be in [0, 0.5)")


# ----------------------------------------------------------------------------------------------------------
# muP: per-group learning rates (Adam). Init scales and the output multiplier live in model.py.


def param_groups(model: CommandA, cfg: TrainConfig):
    """muP for Adam with width multiplier m: hidden matrices LR eta/m (their init var is sigma^2/m); the
    embedding (input AND, tied, output) and vectors keep eta -- the output side is handled by the 1/m
    logit multiplier. Weight decay on matrices only."""
    m = model.config.width_mult
    groups = {"hidden": [], "embedding": [], "vector": []}
    for name, p in model.named_parameters():
        if name == "model.embed_tokens.weight":
            groups["embedding"].append(p)
        elif p.ndim >= 2:
            groups["hidden"].append(p)
        else:
            groups["vector"].append(p)
    return [
        {"name": "hidden", "params": groups["hidden"], "lr_mult": 1.0 / m, "weight_decay": cfg.weight_decay},
        {"name": "embedding", "params": groups["embedding"], "lr_mult": 1.0, "weight_decay": cfg.weight_decay},
        {"name": "vector", "params": groups["vector"], "lr_mult": 1.0, "weight_decay": 0.0},
    ]


# ----------------------------------------------------------------------------------------------------------
# Schedule: warmup -> stable -> linear cooldown to zero, with context stages inside the cooldown


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR for optimizer step `step` (0-based). The cooldown reaches zero one step after the last."""
    warmup = round(cfg.warmup_frac * cfg.steps)
    cooldown = round(cfg.cooldown_frac * cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if step < cfg.steps - cooldown:
        return cfg.lr
    return cfg.lr * (cfg.steps - step) / cooldown


def source(phase: dict) -> str:
    """The loader a phase reads: its own, or the main phase's when it trains on the main mix."""
    return "main" if phase["mix"] == "main" else phase["name"]


def make_loaders(cfg: TrainConfig, plan: list[dict], packed: dict) -> dict:
    """One loader per data source. A phase on the main mix (--cooldown-data main) reads on where the main phase
    stopped: new rows, not a reshuffle of rows already seen."""
    loaders = {}
    for i, p in enumerate(plan):
        if source(p) not in loaders:
            loaders[source(p)] = D.Loader(packed[p["name"]], rows_per_batch(cfg, p["seq_len"]), seed=cfg.seed + i)
    return loaders


def phases(cfg: TrainConfig) -> list[dict]:
    """The run as a list of phases: the main phase on the up-weighted mix, then the cooldown's context
    stages (the first on the high-quality mix at the main context, the rest on long high-quality documents).
    precision: the report trains in FP8 and cools down in BF16, so --fp8 covers the main phase only."""
    cooldown = round(cfg.cooldown_frac * cfg.steps)
    out = [{"name": "main", "start": 0, "end": cfg.steps - cooldown, "seq_len": cfg.seq_len, "mix": "main",
            "precision": "fp8" if cfg.fp8 else "bf16"}]
    start, total = cfg.steps - cooldown, sum(f for _, f in cfg.context_stages)
    for i, (mult, frac) in enumerate(cfg.context_stages):
        end = cfg.steps if i == len(cfg.context_stages) - 1 else start + round(cooldown * frac / total)
        T = cfg.seq_len * int(mult)
        out.append({"name": f"cooldown@{T}", "start": start, "end": end, "seq_len": T,
                    "mix": cfg.cooldown_data if T == cfg.seq_len else "long", "precision": "bf16"})
        start = end
    return [p for p in out if p["end"] > p["start"]]


def phase_at(step: int, plan: list[dict]) -> int:
    return next(i for i, p in enumerate(plan) if p["start"] <= step < p["end"])


# ----------------------------------------------------------------------------------------------------------
# Data: corpus -> split -> tokenizer -> packed rows per phase


def prepare_data(cfg: TrainConfig, out: str, tok: Tokenizer | None, verbose=True):
    # with --data the user's text is the whole corpus; the default adds the project's synthetic documents
    dcfg = D.DataConfig(data=cfg.data, max_bytes=int(cfg.corpus_mb * 1e6), seed=cfg.seed,
                        synthetic_docs=0 if cfg.data else D.DataConfig.synthetic_docs)
    docs, card = D.build_corpus(dcfg, verbose=verbose)
    if not docs:
        raise ValueError("the corpus is empty after filtering: give more or better text with --data")
    card.save(os.path.join(out, "data"))
    # held out per domain, so a few long code files cannot all land on one side of the split
    train_docs, val_docs = [], []
    for dom in sorted({d.domain for d in docs}):
        tr, va = D.split_documents([d for d in docs if d.domain == dom], cfg.val_fraction, cfg.seed)
        train_docs += tr
        val_docs += va
    if tok is None:
        t0 = time.time()
        tok = Tokenizer.train((d.text for d in train_docs), cfg.vocab_size)
        tok_seconds = time.time() - t0
        if verbose:
            print(f"tokenizer: {tok.vocab_size} tokens trained in {tok_seconds:.1f}s")
    else:
        tok_seconds = 0.0

    memo = {}

    def encode(text):  # the mixes repeat documents (up-weighting, cooldown, long stages): encode each once
        ids = memo.get(text)
        if ids is None:
            ids = memo[text] = tok.encode(text)
        return ids
    bos = tok.bos_id
    packed = {}
    main_tokens = D.tokenize_documents(D.pretrain_mix(train_docs, cfg.seed), encode, bos)
    instruct = instruction_data(tok, round(cfg.instruct_frac * sum(map(len, main_tokens))), cfg.seed)
    main_tokens = interleave(main_tokens, instruct, cfg.seed)
    hq_docs = D.high_quality_subset(train_docs, D.DataConfig.hq_fraction)
    hq_tokens = D.tokenize_documents(D.cooldown_mix(train_docs, seed=cfg.seed), encode, bos)
    val_tokens = D.tokenize_documents(val_docs, encode, bos)
    for p in phases(cfg):
        T = p["seq_len"]
        if p["mix"] == "main":
            rows = main_tokens
        elif p["mix"] == "high_quality":
            rows = hq_tokens
        else:
            rows = D.long_context_mix(hq_docs, encode, min_tokens=T, bos_id=bos, seed=cfg.seed)
            if not rows:
                raise ValueError(f"no high-quality documents reach {T} tokens for the long-context stage; lower "
                                 f"the context multiples or give longer documents")
        pk = D.pack(rows, T, pad_id=tok.pad_id)
        rows_needed = cfg.batch_size * cfg.seq_len // T
        if len(pk) < max(1, rows_needed):
            raise ValueError(f"corpus too small for phase {p['name']}: {len(pk)} rows of {T} tokens, a batch "
                             f"needs {rows_needed}; give more data or lower --seq-len / --batch-size")
        packed[p["name"]] = pk
    val = {"all": D.pack(val_tokens, cfg.seq_len, pad_id=tok.pad_id)}
    for dom in sorted({d.domain for d in val_docs}):
        val[dom] = D.pack([t for d, t in zip(val_docs, val_tokens) if d.domain == dom], cfg.seq_len, tok.pad_id)
    n_train = sum(map(len, main_tokens))
    info = {"docs": len(docs), "train_docs": len(train_docs), "val_docs": len(val_docs),
            "train_tokens_main_mix": n_train, "instruction_examples": len(instruct),
            "instruction_tokens": sum(map(len, instruct)), "tokenizer_seconds": round(tok_seconds, 2),
            "bytes_per_token": round(sum(len(d.text.encode()) for d in val_docs) / max(1, sum(map(len, val_tokens))), 3)}
    return tok, packed, val, info


def instruction_data(tok: Tokenizer, n_tokens: int, seed: int) -> list[list[int]]:
    """The report mixes human-written instruction data into pretraining. Here: chat-format conversations
    (prompt and reference answer, the SFT rendering) from tasks.py's TRAIN split of every suite, round-robin
    over the suites, until n_tokens. Only split="train" is ever drawn: the test split stays unseen."""
    from tasks import SUITES                     # lazily: only this function needs the task generators
    out, n, round_ = [], 0, 0
    while n < n_tokens:
        batch = [ex for s in SUITES.values() for ex in s.generate(seed + round_, 16, split="train")]
        if not batch:
            break
        for ex in batch:
            if n >= n_tokens:
                break
            ids = [tok.bos_id] + tok.render_chat(ex.sft_messages(), ex.documents, ex.tools, ex.safety_mode,
                                                 add_generation_prompt=False)
            out.append(ids)
            n += len(ids)
        round_ += 1
    return out


def interleave(docs: list, extra: list, seed: int) -> list:
    """extra spread at random positions through docs (the main mix is already shuffled; order kept)."""
    rng = random.Random(f"instruct:{seed}")
    slots = sorted(rng.randrange(len(docs) + 1) for _ in extra)
    out, j = [], 0
    for i, d in enumerate(docs):
        while j < len(slots) and slots[j] == i:
            out.append(extra[j])
            j += 1
        out.append(d)
    return out + extra[j:]


def data_fingerprint(packed: dict) -> str:
    import hashlib
    h = hashlib.sha1()
    for name in sorted(packed):
        h.update(name.encode())
        h.update(packed[name].ids.tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: atomic directory swap; weights as safetensors, the rest loaded with weights_only=True


def adamw(params, **kw) -> torch.optim.AdamW:
    """AdamW, as one fused kernel over all parameters when they are plain tensors (measured ~3% of a `small` step
    on CPU); parallel.py's sharded DTensor parameters keep the foreach implementation."""
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return torch.optim.AdamW(params, fused=not any(hasattr(p, "to_local") for p in tensors) or None, **kw)


def apply_update(opt, gnorm, where: str, ckpt_dir: str, bar):
    """The optimizer step, unless the clipped gradient's norm is not finite: then stop BEFORE the update, so the
    last checkpoint is still the last good state."""
    if not torch.isfinite(gnorm):
        bar.close()
        raise FloatingPointError(f"{where}: non-finite gradient norm, stopping before the update; the last good "
                                 f"checkpoint is in {ckpt_dir}. Lower --lr.")
    opt.step()
    opt.zero_grad(set_to_none=True)


def write_train_state(out, model, step: int, optimizer_state: dict, meta: dict):
    """OUT/checkpoint, swapped in whole: the weights (safetensors) and train_state.pt (the optimizer, the RNGs,
    `meta` as JSON), every file fsynced before the swap makes it visible. A kill leaves the previous checkpoint
    or this one, never a mix. Both training loops (pretrain.py, alignment.py) write through here."""
    ckpt, tmp, old = (os.path.join(out, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp)
    meta = {**meta, "python_rng": _rng_to_json(random.getstate()), "numpy_rng": _rng_to_json(np.random.get_state())}
    torch.save({"step": step, "optimizer": optimizer_state, "torch_rng": torch.get_rng_state(),
                "meta": json.dumps(meta)}, os.path.join(tmp, "train_state.pt"))
    for name in os.listdir(tmp):
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    if os.path.exists(ckpt):
        shutil.rmtree(old, ignore_errors=True)      # a run killed mid-cleanup may have left one behind
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)                            # the swap: `checkpoint` is always complete
    shutil.rmtree(old, ignore_errors=True)


def read_train_state(out) -> tuple[str, dict, dict]:
    """(checkpoint dir, train_state, meta) of OUT/checkpoint; tensors and JSON only (weights_only=True)."""
    ckpt = os.path.join(out, "checkpoint")
    if not os.path.isdir(ckpt) and os.path.isdir(ckpt + ".old"):
        ckpt += ".old"                               # a kill between the two renames of write_train_state
    if not os.path.isfile(os.path.join(ckpt, "train_state.pt")):
        raise FileNotFoundError(f"--resume: no checkpoint in {out}")
    state = torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=True)  # never unpickle code
    return ckpt, state, json.loads(state["meta"])


def restore_rngs(state: dict, meta: dict):
    torch.set_rng_state(state["torch_rng"])
    py = meta["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npr = meta["numpy_rng"]
    np.random.set_state((npr[0], np.array(npr[1], dtype=np.uint32), *npr[2:]))


def save_checkpoint(out, model, opt, step, loaders, losses, cfg, fingerprint, tok, val_log, opt_state=None):
    """`model` is a single-process model; under parallel.py it is the gathered one and `opt_state` the gathered
    optimizer state (single-process layout), so a checkpoint from any layout resumes in any other."""
    ckpt = os.path.join(out, "checkpoint")
    swapped = False
    try:
        write_train_state(out, model, step, opt_state if opt_state is not None else opt.state_dict(),
                          {"train_config": asdict(cfg), "fingerprint": fingerprint, "losses": losses,
                           "val_log": val_log, "loaders": {k: l.state_dict() for k, l in loaders.items()}})
        swapped = True
        # the output directory itself is an HF checkpoint + tokenizer (each file replaced atomically)
        model.save_pretrained(out, extra_config={"bos_token_id": tok.bos_id, "eos_token_id": tok.eot_id,
                                                 "pad_token_id": tok.pad_id})
        tok.save(out)
    except Exception as e:  # OSError, torch's RuntimeError and SafetensorError all mean "could not write"
        shutil.rmtree(os.path.join(out, "checkpoint.tmp"), ignore_errors=True)
        if swapped:
            raise RuntimeError(f"step {step}: the checkpoint in {ckpt} is complete, but exporting the HF "
                               f"checkpoint into {out} failed ({e}): disk full?") from None
        where = ckpt if os.path.exists(ckpt) else ckpt + ".old"
        raise RuntimeError(f"could not write the checkpoint at step {step} ({e}: disk full?); "
                           f"the previous checkpoint in {where} is intact") from None


def _rng_to_json(state):
    """Python's and numpy's RNG states as plain JSON lists (no pickle, no eval on the way back)."""
    return [x.tolist() if isinstance(x, np.ndarray) else list(x) if isinstance(x, tuple) else x for x in state]


def load_checkpoint(out, model, opt, cfg, fingerprint):
    ckpt, state, meta = read_train_state(out)
    saved = meta["train_config"]
    ignore = {"max_steps", "eval_every", "ckpt_every", "log_every", "samples"}
    diff = {k: (saved.get(k), v) for k, v in asdict(cfg).items()
            if k not in ignore and saved.get(k) != (list(map(list, v)) if k == "context_stages" else v)}
    if diff:
        raise ValueError("--resume: this checkpoint was trained with another configuration: " +
                         ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items()))
    if meta["fingerprint"] != fingerprint:
        raise ValueError("--resume: the packed training data differs from the checkpoint's (other --data "
                         "or corpus); resume needs the same data")
    loaded = CommandA.from_pretrained(ckpt, fp8=model.config.fp8)
    if par.is_parallel(model):   # the single-process layout, distributed to this rank's shards
        par.load_full_state(model, opt, loaded.state_dict(), state["optimizer"])
    else:
        with torch.no_grad():
            for p, q in zip(model.parameters(), loaded.parameters()):
                p.copy_(q)
        opt.load_state_dict(state["optimizer"])
    restore_rngs(state, meta)
    return state["step"], meta


# ----------------------------------------------------------------------------------------------------------
# Evaluation and sampling


@torch.no_grad()
def evaluate(model, val: D.PackedData, rows: int, autocast_kw) -> float:
    """Token-mean loss on up to `rows` validation rows spread evenly over the held-out documents."""
    model.eval()
    pick = np.unique(np.linspace(0, len(val) - 1, min(rows, len(val))).round().astype(int)).tolist()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(pick), 8):
        b = {k: v.to(device) for k, v in val.batch(pick[i:i + 8]).items()}
        n = int((b["targets"] != -100).sum())
        if n == 0:
            continue
        with torch.autocast(**autocast_kw):
            loss = model(b["input_ids"], targets=b["targets"], doc_ids=b["doc_ids"])
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def induction_probe(model, token_range: tuple[int, int], n=32, length=20, seed=1234, autocast_kw=None) -> dict:
    """In-context copying, measured: loss on `length` random tokens and on the same tokens repeated. Without
    induction heads both sit near log V; with them the repeat drops toward 0 (Olsson et al. 2022)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(*token_range, (n, length), generator=g)
    ids = torch.cat([x, x], 1).to(next(model.parameters()).device)
    with torch.autocast(**(autocast_kw or {"device_type": "cpu", "enabled": False})):
        logits = model(ids[:, :-1]).float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(0)
    model.train()
    return {"first": round(ce[:length - 1].mean().item(), 3), "repeat": round(ce[length:].mean().item(), 3)}


@torch.no_grad()
def sample(model, tok, prompt: str, max_new=48, temperature=0.8, top_k=40, seed=0, autocast_kw=None):
    """A few tokens with a KV cache (serve.py has the full engine); top-k sampling with a fixed seed."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.tensor([[tok.bos_id] + tok.encode(prompt)], device=device)
    cache = KVCache(model.config, 1, ids.shape[1] + max_new, device=device)
    out, x = [], ids
    for _ in range(max_new):
        with torch.autocast(**autocast_kw):
            logits = model(x, cache=cache)[0, -1].float()
        v, i = logits.topk(top_k)
        nxt = i[torch.multinomial(torch.softmax(v / temperature, -1).cpu(), 1, generator=g).to(device)]
        if nxt.item() in (tok.bos_id, tok.eos_id, tok.pad_id):
            break
        out.append(nxt.item())
        x = nxt.view(1, 1)
    model.train()
    return prompt + tok.decode(out)


def plot_curves(path, losses, val_log, lrs, plan):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, label="train loss")
    if val_log:
        ax.plot([s for s, _ in val_log], [v for _, v in val_log], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    for p in plan[1:]:
        ax.axvline(p["start"], color="gray", ls=":", lw=0.8)
        ax.text(p["start"], ax.get_ylim()[1], f" {p['name']}", fontsize=7, va="top", rotation=90)
    ax2 = ax.twinx()
    ax2.plot(range(1, len(lrs) + 1), lrs, color="tab:red", lw=0.8, label="lr")
    ax2.set_ylabel("learning rate", color="tab:red")
    # below the stage labels, which sit at the top; validation reads lower than the noisy per-step training
    # loss because it is measured with the weights at that step over held-out rows of the same mix, while the
    # training loss of a step is measured before that step's update (and on one batch only)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0], loc="lower left",
              fontsize=8)
    ax.set_title("pretraining: warmup -> stable -> linear cooldown (high-quality, then long context)\n"
                 "val: held-out rows, scored after the step; train: the step's own batch, before its update",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------
# The training loop


def rows_per_batch(cfg: TrainConfig, seq_len: int) -> int:
    """Longer rows, fewer of them: every phase trains on the same tokens per step (cooldown's long contexts)."""
    return max(1, cfg.batch_size * cfg.seq_len // seq_len)


def train(cfg: TrainConfig, out: str, resume: bool = False, verbose: bool = True,
          parallel: par.ParallelConfig | None = None, fp32: bool = False, compile: bool = False,
          data: tuple | None = None, make_model=CommandA) -> dict | None:
    """Train; returns the summary (None on ranks other than 0 of a parallel run, which log and save nothing).
    fp32=True turns bf16 autocast off: slower, and a parallel run then logs one process's losses (bit for bit
    on this CPU); under bf16 an fp32 value that moved by one ulp can round to the neighbouring bf16 value, so
    reordered sums show up as ~1e-5 (see tests/parity.py). compile=True: the training forward and backward
    through torch.compile (one compilation per context stage; model.py --bench --compile measures the gain).
    data: prepare_data's (tok, packed, val, info), built once and shared by runs that compare models on the same
    tokens (ablate.py); make_model(ModelConfig) builds the model (ablate.py's sequential block)."""
    validate(cfg)
    t_start = time.time()
    torch.manual_seed(cfg.seed), random.seed(cfg.seed), np.random.seed(cfg.seed)
    os.makedirs(out, exist_ok=True)
    L = par.Layout(parallel)                      # one process, or this rank of a torchrun job
    verbose = verbose and L.is_writer
    autocast_kw = precision(L.device, fp32, verbose)
    plan = phases(cfg)
    L.check(PRESETS[cfg.preset], [(p["name"], rows_per_batch(cfg, p["seq_len"]), p["seq_len"]) for p in plan])
    tok, packed, val, data_info = data or prepare_data_on(cfg, out, L.rank, resume, verbose)
    fingerprint = data_fingerprint(packed)
    L.check_same_data(fingerprint)
    mcfg = ModelConfig(**{**asdict(PRESETS[cfg.preset]), "vocab_size": tok.vocab_size, "fp8": cfg.fp8,
                          "mup_base_hidden_size": cfg.mup_base_hidden_size,
                          "max_position_embeddings": max(p["seq_len"] for p in plan)})
    torch.manual_seed(cfg.seed)                   # the init owes nothing to what the data pipeline drew (or cached)
    model = L.wrap(make_model(mcfg).to(L.device))  # every rank: the same seed, the same full model, then sharded
    model.recompute = cfg.recompute
    opt = adamw(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    loaders = make_loaders(cfg, plan, packed)
    step, losses, val_log = 0, [], []
    if resume:
        step, meta = load_checkpoint(out, model, opt, cfg, fingerprint)
        for k, l in loaders.items():
            l.load_state_dict(meta["loaders"][k])
        losses, val_log = meta["losses"], [tuple(v) for v in meta["val_log"]]
        if verbose:
            print(f"resumed from {out}/checkpoint at step {step}")
    peak = peak_flops(L, autocast_kw)
    stop = cfg.steps if cfg.max_steps is None else min(cfg.steps, cfg.max_steps)
    if verbose:
        print(f"model: {cfg.preset} {mcfg.num_params() / 1e6:.2f}M params, vocab {tok.vocab_size}, muP m="
              f"{mcfg.width_mult:g}, {'fp8' if cfg.fp8 else 'bf16' if autocast_kw['enabled'] else 'fp32'} compute "
              f"on {L.device}; plan: " + ", ".join(f"{p['name']} [{p['start']},{p['end']})" for p in plan))
        if L.describe():
            print(L.describe())
    meter = Meter(mcfg, peak, cfg.log_every, verbose)
    step_model = torch.compile(model) if compile else model   # same parameters; saving uses `model`
    crash_at = int(os.environ.get("PRETRAIN_CRASH_AT_STEP", "0"))  # test hook: die like a killed job
    bar = tqdm(total=stop, initial=step, desc="pretrain", disable=not verbose, dynamic_ncols=True)
    model.train()
    while step < stop:
        ph = plan[phase_at(step, plan)]
        if set_fp8(model, ph["precision"] == "fp8") and verbose and step > 0:
            bar.write(f"step {step}: {ph['name']} begins: FP8 -> BF16 matmuls (the report cools down in BF16)")
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        micro = [next(loaders[source(ph)]) for _ in range(cfg.grad_accum)]
        loss_sum, ntok = forward_backward(step_model, micro, L.device, autocast_kw, f"step {step + 1} in phase "
                                          f"{ph['name']}", f"{out}/checkpoint", cfg, bar)
        apply_update(opt, L.clip_grads(model, cfg.clip), f"step {step + 1}", f"{out}/checkpoint", bar)
        step += 1
        losses.append(loss_sum)               # full precision: resume and parity compare bits
        bar.update(1)
        meter.step(step, ntok, ph["seq_len"], loss_sum, lr, ph["name"], bar, force=step == stop)
        if step == crash_at:
            os._exit(17)
        evals, ckpts = step % cfg.eval_every == 0 or step == stop, step % cfg.ckpt_every == 0 or step == stop
        if evals or ckpts:                    # gathered on every rank; rank 0 evaluates and writes
            full = L.full_model(model)
            opt_state = L.full_optimizer_state(model, opt) if ckpts else None
            if evals and L.is_writer:
                val_log.append((step, round(evaluate(full, val["all"], cfg.eval_rows, autocast_kw), 5)))
                bar.set_postfix(val=val_log[-1][1])
            if ckpts and L.is_writer:
                save_checkpoint(out, full, opt, step, loaders, losses, cfg, fingerprint, tok, val_log, opt_state)
    bar.close()
    model = L.full_model(model)               # the single-process model for the summary (a collective)
    if not L.is_writer:
        return None
    return summarize(cfg, model, tok, val, out, losses, val_log, plan, meter, data_info, t_start, autocast_kw,
                     verbose)


def set_fp8(model, on: bool) -> bool:
    """Turn model.py's FP8 linear path on or off in every Linear (a function of the phase alone, so a resumed
    run switches at the same step: FP8's per-tensor scales are dynamic, there is no state to carry). Returns
    whether anything changed."""
    linears = [m for m in model.modules() if isinstance(getattr(m, "fp8", None), bool)]
    changed = any(m.fp8 != on for m in linears)
    for m in linears:
        m.fp8 = on
    return changed


def precision(device, fp32: bool, verbose: bool) -> dict:
    """autocast's arguments: bf16 compute over fp32 master weights, unless --fp32 or the CPU lacks fast bf16."""
    if not fp32 and not bf16_is_fast(device):
        fp32 = True
        if verbose:
            print("this CPU has no native bf16 matmul (bf16 is slower than fp32 here): training in fp32")
    return {"device_type": device.type, "dtype": torch.bfloat16, "enabled": not fp32}


def prepare_data_on(cfg: TrainConfig, out: str, rank: int, resume: bool, verbose: bool):
    """Every rank builds the same data (deterministic); only rank 0 writes the data card into `out`."""
    tok = Tokenizer.load(out) if resume and os.path.isfile(os.path.join(out, "tokenizer.json")) else None
    data_dir = out if rank == 0 else os.path.join(out, f".rank{rank}")
    tok, packed, val, data_info = prepare_data(cfg, data_dir, tok, verbose)
    if rank:
        shutil.rmtree(data_dir, ignore_errors=True)
    return tok, packed, val, data_info


def peak_flops(L, autocast_kw) -> float | None:
    """The peak MFU is measured against: the GPU's datasheet bf16 peak, or a matmul peak measured now on CPU."""
    if L.device.type == "cuda":
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in torch.cuda.get_device_name()), None)
    else:
        peak = measure_matmul_peak(torch.bfloat16 if autocast_kw["enabled"] else torch.float32)
    return peak * L.world if peak else None   # MFU of the whole job (on one CPU the processes share its cores)


def forward_backward(model, micro: list, device, autocast_kw, where: str, ckpt: str, cfg, bar) -> tuple[float, int]:
    """One step's micro-batches, each weighted by its share of target tokens: the step's loss is a token mean."""
    n_targets = sum(int((b["targets"] != -100).sum()) for b in micro)
    loss_sum, ntok = 0.0, 0
    for b in micro:
        b = {k: v.to(device) for k, v in b.items()}
        share = int((b["targets"] != -100).sum()) / max(n_targets, 1)
        with torch.autocast(**autocast_kw):
            loss = model(b["input_ids"], targets=b["targets"], doc_ids=b["doc_ids"])
        if not torch.isfinite(loss):
            bar.close()
            raise FloatingPointError(f"non-finite loss ({loss.item()}) at {where}: stopping. The last good "
                                     f"checkpoint is in {ckpt}; try a lower --lr (now {cfg.lr}) or --clip.")
        (loss * share).backward()
        loss_sum += loss.item() * share
        ntok += b["input_ids"].numel()
    return loss_sum, ntok


class Meter:
    """Throughput: tok/s and MFU over each logging window, and this process's totals for the summary."""

    def __init__(self, mcfg: ModelConfig, peak: float | None, log_every: int, verbose: bool):
        self.mcfg, self.peak, self.log_every, self.verbose = mcfg, peak, log_every, verbose
        self.t0 = self.t_log = time.time()
        self.tok_log, self.tokens, self.flops = 0, 0, 0.0

    def step(self, step, ntok, seq_len, loss, lr, phase, bar, force=False):
        self.tok_log += ntok
        self.tokens += ntok
        self.flops += ntok * flops_per_token(self.mcfg, seq_len)
        if step % self.log_every == 0 or force:
            tok_per_s = self.tok_log / max(time.time() - self.t_log, 1e-9)
            mfu = tok_per_s * flops_per_token(self.mcfg, seq_len) / self.peak if self.peak else float("nan")
            if self.verbose:
                bar.write(f"step {step:5d} | loss {loss:.4f} | lr {lr:.2e} | {tok_per_s:7.0f} tok/s | "
                          f"MFU {100 * mfu:4.1f}% | {phase}")
            self.t_log, self.tok_log = time.time(), 0

    def totals(self) -> dict:
        s = time.time() - self.t0                # includes evaluation and checkpoint writes
        return {"train_seconds": round(s, 1), "tok_per_s": round(self.tokens / max(s, 1e-9)),
                "mfu": round(self.flops / max(s, 1e-9) / self.peak, 4) if self.peak else None, "peak_flops": self.peak}


def summarize(cfg, model, tok, val, out, losses, val_log, plan, meter, data_info, t_start, autocast_kw,
              verbose) -> dict:
    """After training: per-domain validation loss, the induction probe, the loss plot, samples, the summary."""
    totals = meter.totals()
    val_by_domain = {k: round(evaluate(model, v, cfg.eval_rows, autocast_kw), 4) for k, v in val.items() if k != "all"}
    induction = induction_probe(model, (256, min(4096, len(tok.ranks))), autocast_kw=autocast_kw)  # frequent tokens
    if verbose:
        print("val loss by domain: " + ", ".join(f"{k} {v:.3f}" for k, v in val_by_domain.items()))
        print(f"induction probe (20 random tokens, then again): loss {induction['first']:.2f} on the first "
              f"copy, {induction['repeat']:.2f} on the repeat")
    plot_curves(os.path.join(out, "loss.png"), losses, val_log, [lr_at(s, cfg) for s in range(len(losses))], plan)
    prompts = ["def ", "The ", "import "][:cfg.samples]
    if verbose and prompts:
        print("\nsamples (top-k 40, T=0.8):")
        for i, p in enumerate(prompts):
            print(f"--- {p!r}\n{sample(model, tok, p, seed=cfg.seed + i, autocast_kw=autocast_kw)}")
    tokens = len(losses) * cfg.batch_size * cfg.seq_len * cfg.grad_accum
    compute = "bf16" if autocast_kw["enabled"] else "fp32"     # what a "bf16" phase ran in on this device
    run_phases = [{"name": p["name"], "seq_len": p["seq_len"], "steps": [p["start"], p["end"] - 1],
                   "precision": p["precision"] if p["precision"] == "fp8" else compute} for p in plan]
    return {"val_loss": val_log[-1][1], "phases": run_phases, "uniform_loss": round(math.log(tok.vocab_size), 4),
            "losses": losses, "val_log": val_log, "val_loss_by_domain": val_by_domain, "induction": induction,
            "tokens": tokens,
            "seconds": round(time.time() - t_start, 1), "params": model.config.num_params(),
            "vocab_size": tok.vocab_size, **totals, "data": data_info, "out": out}


# ----------------------------------------------------------------------------------------------------------
# muP coordinate check


def _byte_batches(steps, batch=8, T=128):
    """Training batches of raw UTF-8 bytes (vocab 256) from the stdlib: the width studies need tokens, not a
    tokenizer."""
    text = "".join(d.text for d in D.stdlib_documents(max_bytes=400_000)).encode("utf-8")
    n = steps * batch * (T + 1)
    if len(text) < n:
        text = text * (n // len(text) + 1)
    return torch.tensor(list(text[:n]), dtype=torch.long).view(steps, batch, T + 1)


def _width_model(width, mup, lr, seed=0, base=64):
    """A 4-layer Command A of the given width (head_dim fixed at 32: muP grows heads) and its AdamW."""
    torch.manual_seed(seed)
    mcfg = ModelConfig(vocab_size=256, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=4,
                       num_attention_heads=width // 32, num_key_value_heads=max(1, width // 64),
                       sliding_window=32, mup_base_hidden_size=base if mup else None)
    model = CommandA(mcfg)
    opt = torch.optim.AdamW(param_groups(model, TrainConfig(weight_decay=0.0)), lr=lr, betas=(0.9, 0.95))
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_mult"]
    return model, opt


def lr_sweep(path: str, widths=(64, 128, 256), lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1), steps=30, seed=0) -> dict:
    """muP's promise (hyper-parameters transfer across width), checked directly: the training loss after
    `steps` steps against the LR, one curve per width, under SP and muP. Under muP the best LR is the same at
    every width; under SP it moves (usually down) as width grows."""
    plt = pyplot()
    data = _byte_batches(steps)
    res = {}
    for mode in ("SP", "muP"):
        for w in widths:
            for lr in lrs:
                model, opt = _width_model(w, mode == "muP", lr, seed)
                for s in range(steps):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_is_fast("cpu")):
                        loss = model(data[s, :, :-1], targets=data[s, :, 1:])
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                res[(mode, w, lr)] = loss.item()  # the same final batch for every run: comparable
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    best = {}
    for ax, mode in zip(axes, ("SP", "muP")):
        for w in widths:
            ys = [min(res[(mode, w, lr)], 10.0) for lr in lrs]
            ax.plot(lrs, ys, "o-", label=f"width {w}")
            best[f"{mode}@{w}"] = lrs[int(np.nanargmin(ys))]
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"{mode}: loss after {steps} steps")
        ax.legend()
    axes[0].set_ylabel("training loss (bytes)")
    fig.suptitle("muP LR transfer: the optimum should not move with width under muP")
    fig.tight_layout()
    save_figure(fig, path)
    return {"plot": path, "best_lr": best, "losses": {f"{m}@{w}@{lr:g}": round(v, 4) for (m, w, lr), v in res.items()}}


def coord_check(path: str, widths=(64, 128, 256, 512), steps=5, lr=1e-2, seed=0) -> dict:
    """Train each width a few steps with standard parametrization (SP) and with muP (base width 64), and
    plot the mean |activation| of the embedding output, the last block's output and the logits against
    width. Under muP the curves stay flat as width grows; under SP the logits blow up with width.
    Bytes are the tokens here (vocab 256): the check is about widths, not about the tokenizer."""
    plt = pyplot()
    data = _byte_batches(steps)
    results = {}
    for mode in ("SP", "muP"):
        for w in widths:
            model, opt = _width_model(w, mode == "muP", lr, seed)
            acts = {}
            hooks = [model.model.embed_tokens.register_forward_hook(lambda m, i, o: acts.__setitem__("embedding", o)),
                     model.model.layers[-1].register_forward_hook(lambda m, i, o: acts.__setitem__("last block", o))]
            for s in range(steps):
                logits = model(data[s, :, :-1])
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), data[s, :, 1:].reshape(-1))
                for name, a in (("embedding", acts["embedding"]), ("last block", acts["last block"]),
                                ("logits", logits)):
                    results.setdefault((mode, name, s), {})[w] = a.detach().abs().mean().item()
                loss.backward()
                opt.step()
                opt.zero_grad()
            for h in hooks:
                h.remove()
    names = ["embedding", "last block", "logits"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), sharex=True)
    for r, mode in enumerate(("SP", "muP")):
        for c, name in enumerate(names):
            ax = axes[r][c]
            for s in range(steps):
                ys = results[(mode, name, s)]
                ax.plot(widths, [ys[w] for w in widths], "o-", label=f"step {s + 1}", color=plt.cm.viridis(s / steps))
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode}: {name}")
            if c == 0:
                ax.set_ylabel("mean |x|")
            if r == 1:
                ax.set_xlabel("width (hidden size)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"muP coordinate check (Adam, lr={lr}): flat curves = width-independent activations")
    fig.tight_layout()
    save_figure(fig, path)
    # growth of the final-step logit scale from the narrowest to the widest model, per parametrization
    growth = {mode: results[(mode, "logits", steps - 1)][widths[-1]] / results[(mode, "logits", steps - 1)][widths[0]]
              for mode in ("SP", "muP")}
    return {"plot": path, "logit_growth_widest_vs_narrowest": growth}


# ----------------------------------------------------------------------------------------------------------
# CLI


def main(argv=None):
    ap = argparse.ArgumentParser(description="Pretrain a Command A-architecture model with the report's recipe "
                                 "(data pipeline, BPE, muP, bf16/FP8, cooldown, context extension).")
    ap.add_argument("--tiny", action="store_true", help="the few-minute CPU run (preset tiny, 4 MB corpus, 400 steps)")
    ap.add_argument("--out", default="out/tiny", help="output directory (HF checkpoint + tokenizer + plots)")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint exactly")
    ap.add_argument("--coord-check", metavar="PNG", help="run the muP coordinate check, write the plot, exit")
    ap.add_argument("--lr-sweep", metavar="PNG", help="muP LR transfer: loss vs LR at 3 widths, SP and muP; exit")
    d = TrainConfig()
    for f, helptext in [("preset", "model preset"), ("vocab_size", "BPE vocabulary size"),
                        ("corpus_mb", "MB of stdlib text in the default corpus"),
                        ("data", "your text/JSONL file or folder instead of the default corpus"),
                        ("seq_len", "main-phase context length"), ("batch_size", "rows per micro-batch"),
                        ("grad_accum", "micro-batches per step"), ("steps", "optimizer steps in the schedule"),
                        ("max_steps", "stop after N steps (schedule unchanged)"), ("lr", "peak LR at the muP base width"),
                        ("warmup_frac", "warmup share"), ("cooldown_frac", "linear cooldown share"),
                        ("weight_decay", "AdamW weight decay on matrices"), ("clip", "gradient-norm clip"),
                        ("mup_base_hidden_size", "muP base width (0: standard parametrization)"),
                        ("seed", "random seed"), ("eval_every", "steps between validation"),
                        ("ckpt_every", "steps between checkpoints"), ("log_every", "steps between log lines"),
                        ("samples", "generations printed at the end"),
                        ("instruct_frac", "share of main-mix tokens that is chat instruction data (tasks.py train)")]:
        default = getattr(d, f)
        typ = {"data": str, "max_steps": int, "mup_base_hidden_size": int}.get(f, type(default))
        ap.add_argument("--" + f.replace("_", "-"), type=typ, default=None,
                        help=f"{helptext} (default {default})")
    ap.add_argument("--fp8", action="store_true", help="FP8 linear layers (CUDA speed; emulated numerics on CPU)")
    ap.add_argument("--fp32", action="store_true", help="fp32 matmuls (no bf16 autocast): slower; parallel runs then "
                    "log the single-process losses (bf16: within ~1e-5)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step (compiles once per "
                    "context stage: pays on long runs; measure with python model.py --bench --compile)")
    ap.add_argument("--recompute", action="store_true", help="activation checkpointing per layer: keeps each "
                    "layer's input only and recomputes the rest in backward (less memory, more compute)")
    ap.add_argument("--context-stages", default=None,
                    help="cooldown context stages as 'mult:share,...' (default 1:0.4,4:0.3,16:0.2,32:0.1, the "
                    "report's 8K:32K:128K:256K ratios)")
    ap.add_argument("--cooldown-data", choices=("high_quality", "main"), default=None,
                    help="the cooldown's data at the main context: the high-quality mix (default, the report's) or "
                    "the main mix (decay only; an ablation)")
    for a, what in (("dp", "data parallel (replicas)"), ("fsdp", "fully sharded data parallel"),
                    ("sp", "sequence parallel"), ("tp", "tensor parallel (Megatron)")):
        ap.add_argument(f"--{a}", type=int, default=1, help=f"{what} degree; the product of --dp --fsdp --sp --tp "
                        f"must equal torchrun's world size (default 1)")
    args = ap.parse_args(argv)
    tune_malloc()
    if args.coord_check or args.lr_sweep:
        res = coord_check(args.coord_check) if args.coord_check else lr_sweep(args.lr_sweep)
        print(json.dumps(res))
        return res
    values = dict(TINY) if args.tiny else {}
    for f in asdict(d):
        v = getattr(args, f, None)
        if v is not None:
            values[f] = v
    if values.get("mup_base_hidden_size") == 0:
        values["mup_base_hidden_size"] = None
    if args.fp8:
        values["fp8"] = True
    if args.recompute:
        values["recompute"] = True
    if args.context_stages:
        try:
            values["context_stages"] = [[int(a), float(b)] for a, b in
                                        (s.split(":") for s in args.context_stages.split(","))]
        except ValueError:
            ap.error("--context-stages must look like 1:0.4,4:0.3,16:0.2,32:0.1")
    cfg = TrainConfig(**values)
    pc = par.ParallelConfig(dp=args.dp, fsdp=args.fsdp, sp=args.sp, tp=args.tp)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        validate(cfg)
        pc.validate(PRESETS[cfg.preset], world)
        if cfg.recompute and world > 1:
            raise ValueError("--recompute is single-process for now: parallel.py's sharded forward does not "
                             "checkpoint its layers (its collectives would rerun in backward)")
        if cfg.data is not None and not os.path.exists(cfg.data):
            raise FileNotFoundError(f"--data {cfg.data}: no such file or folder")
        res = train(cfg, args.out, resume=args.resume, parallel=pc if world > 1 else None, fp32=args.fp32,
                    compile=args.compile)
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, (ValueError, FileNotFoundError)) else 1)
    if world > 1:
        # every rank reaches here before any tears down: a rank that destroys gloo while another still
        # writes the checkpoint or logs can abort ("terminate called without an active exception")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if res is None:                      # ranks other than 0 print nothing
            return None
    print(f"\nval loss {res['val_loss']:.3f} (uniform ln V = {res['uniform_loss']:.3f}) after {res['tokens']:,} "
          f"tokens in {res['seconds']:.0f}s; checkpoint + tokenizer in {res['out']}")
    # the per-step series go to a file; the last line stays short enough to read
    path = os.path.join(res["out"], "summary.json")
    atomic_write_json(path, res, indent=1)
    print(json.dumps({**{k: v for k, v in res.items() if k not in ("losses", "val_log")}, "summary": path}))
    return res


if __name__ == "__main__":
    main()
