"""
Post-training, one method at a time (report section 3.2-3.3): any method of alignment.py -- SFT, the
Bradley-Terry reward model, offline preference optimization (DPO / IPO / SLiC / SRPO ...), CoPG (offline or
online), best-of-N then SFT -- run on a checkpoint as one stage: data from tasks.py's train split (a validation
set carved from it), scores on the test split before and after, exact resume of a killed run (--resume), and
the stage's outputs in OUT (HF checkpoint + tokenizer, curves.png, result.json, written last). Also the
throughput bench: SFT vs pretraining tokens/s and where online CoPG's time goes.

    python posttrain.py sft  --init out/tiny --suites math --out out/math_sft     # posttrain.py's CLI dispatches here
    python posttrain.py bench

posttrain.py's pipeline (Figure 3) reuses load_init, write_outputs and fingerprint_of; this file never imports
posttrain.py (the import graph is a DAG with posttrain.py on top).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import data as D
import tasks as T
from alignment import (
    Indices, RewardModel, StageConfig, best_of_n, check_pairs, check_same_architecture, check_same_tokenizer,
    completion_nll, copg_offline_objective, copg_online_objective, has_state, load_examples, make_engine, packed_batch,
    pair_sequences, plot_curves, pref_objective, pretrain_rows, reference_logps, reference_pairs, rm_accuracy,
    rm_objective, rm_reward_fn, sample, score_suites, seq, sft_objective, sft_sequences, split_train_val,
    tokenizer_fingerprint, train_loop, verifier_reward_fn)
from model import CommandA, atomic_write_json
from pretrain import precision
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------------
# One stage from a checkpoint: data from tasks.py's train split (a validation set carved from it), scores on
# the test split before and after, the model and its curves written to OUT


def load_init(path: str):
    """(model, tokenizer) of a checkpoint directory, with errors that say what to do."""
    if not path or not os.path.isdir(path):
        hint = " (make it with `python pretrain.py --tiny`)" if path and path.rstrip("/").endswith("tiny") else ""
        raise FileNotFoundError(f"--init {path}: no such checkpoint directory{hint}")
    for f in ("config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(path, f)):
            raise FileNotFoundError(f"--init {path}: {f} missing; expected a pretrain.py/posttrain.py output "
                                    f"(HF Cohere2 checkpoint + tokenizer)")
    tok = Tokenizer.load(path)
    try:
        model = CommandA.from_pretrained(path)
    except ValueError as e:
        raise ValueError(f"--init {path}: {e}") from None
    if model.config.vocab_size < tok.vocab_size:
        raise ValueError(f"--init {path}: the model's vocabulary ({model.config.vocab_size}) is smaller than the "
                         f"tokenizer's ({tok.vocab_size}): they do not belong together")
    return model, tok


def write_outputs(out, model, tok, result, log, plot_title):
    """The finished stage: HF checkpoint + tokenizer, curves PNG, result.json (written last: its presence
    marks the stage complete; every file is replaced atomically)."""
    if isinstance(model, RewardModel):
        model.save(out, tok)
    else:
        model.save_pretrained(out, extra_config={"bos_token_id": tok.bos_id, "eos_token_id": tok.eot_id,
                                                 "pad_token_id": tok.pad_id})
        tok.save(out)
    if log is not None:
        plot_curves(os.path.join(out, "curves.png"), log, plot_title)
    atomic_write_json(os.path.join(out, "result.json"), result, indent=1)


def fingerprint_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_data(args):
    """Train (minus validation) and test examples of the chosen suites, and a check that the test split never
    leaks into training (tasks.py splits by content hash; this re-checks the ids)."""
    train = load_examples(args.suites, args.n_train, "train", args.seed, args.difficulty)
    test = load_examples(args.suites, args.n_eval, "test", args.seed, args.difficulty)
    train, val = split_train_val(train, args.val_fraction)
    if not train:
        raise ValueError(f"no training examples for --suites {args.suites} (--n-train {args.n_train})")
    leaked = {e.id for e in train} & {e.id for e in test}
    if leaked:
        raise RuntimeError(f"{len(leaked)} test examples are in the training data: the split is broken")
    return train, val[:args.n_val], test


@dataclass
class StageRun:
    """One stage from the command line: what every kind of stage reads."""
    args: object
    model: CommandA
    tok: Tokenizer
    device: torch.device
    ac: dict              # autocast arguments
    max_len: int
    cfg: StageConfig
    fp: str               # fingerprint: resume only what these settings and data made
    train: list
    val: list
    test: list

    def val_score(self) -> dict:
        if not self.val:
            return {"score": 0.0}
        scores = score_suites(self.model, self.tok, self.val, self.args.max_new)
        return {"score": sum(scores.values()) / len(scores)}        # the mean over the suites


# the flags that change what a stage trains: resuming with other values would mix two runs
STAGE_KEYS = ("temperature", "sft_weight", "steps", "batch_size", "grad_accum", "lr", "loss", "beta", "online", "k",
              "n_samples", "l2_init", "pretrain_mix", "preamble_aug", "margin", "center", "stage1_steps", "rm", "ref",
              "no_length_norm", "max_new", "val_fraction", "n_val")


def run_stage(args) -> dict:
    t_start = time.time()
    model, tok = load_init(args.init)
    if args.preamble:                         # else the init's own chat format (its tokenizer.json)
        tok.preamble = args.preamble
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    # rows and KV caches of at most 4K tokens: the context of a real checkpoint (128K) would not fit memory
    max_len = args.seq_len or min(model.config.max_position_embeddings, 4096)
    # the common flags are StageConfig's fields; it refuses bad values (a ValueError: exit status 2)
    cfg = StageConfig(**{k: v for k, v in vars(args).items() if k in StageConfig.__dataclass_fields__})
    claim_out_dir(args)
    train, val, test = stage_data(args)
    fp = fingerprint_of(args.stage, os.path.abspath(args.init), args.seq_len, args.suites, args.n_train, args.seed,
                        args.difficulty, tokenizer_fingerprint(tok),
                        {k: v for k, v in vars(args).items() if k in STAGE_KEYS})
    ac = precision(device, args.fp32, verbose=False)
    x = StageRun(args, model, tok, device, ac, max_len, cfg, fp, train, val, test)
    result = {"stage": args.stage, "init": args.init, "suites": T.check_suites(args.suites)}
    if args.stage == "rm":
        return run_rm_stage(x, result, t_start)
    before = score_suites(model, tok, test, args.max_new)
    objective, loaders, evaluate, timing = (setup_sft if args.stage == "sft" else setup_policy_stage)(x, result)
    t_train = time.time()
    log = train_loop(model, objective, loaders, cfg, args.out, evaluate, args.resume, fp, args.stage)
    train_seconds = time.time() - t_train
    after = score_suites(model, tok, test, args.max_new)
    result.update(before=before, after=after, seconds=round(time.time() - t_start, 1),
                  train_seconds=round(log["seconds"], 1), steps=log["steps_done"])
    if args.stage == "sft":
        ntok = int(log["steps_done"] * args.batch_size * args.grad_accum * loaders["main"].packed.ids.shape[1])
        result["tok_per_s"] = round(ntok / max(train_seconds, 1e-9))
    if timing is not None:
        result["timing"] = {"sample_s": round(timing["sample"], 1), "update_s": round(
            train_seconds - timing["sample"], 1), "samples_per_s": round(timing["samples"] / max(train_seconds, 1e-9), 2)}
    write_outputs(args.out, model, tok, result, log, f"{args.stage} on {','.join(result['suites'])}")
    return result


def claim_out_dir(args):
    """--out must not hold a finished stage (unless --force) or an unfinished one (unless --resume / --force)."""
    if os.path.isfile(os.path.join(args.out, "result.json")) and not args.force:
        raise FileExistsError(f"{args.out} already holds a finished stage (result.json); use --force to "
                              f"overwrite or another --out")
    unfinished = [d for d in (args.out, os.path.join(args.out, "stage1"), os.path.join(args.out, "stage2"))
                  if has_state(d)]
    if unfinished and not args.resume and not args.force:
        raise FileExistsError(f"{args.out} holds an unfinished stage: --resume to continue it, --force to "
                              f"start over")
    if args.force and not args.resume:       # start over: no old state, no old "finished" marker
        for d in ("checkpoint", "checkpoint.old", "checkpoint.tmp", "stage1", "stage2"):
            shutil.rmtree(os.path.join(args.out, d), ignore_errors=True)
        if os.path.exists(os.path.join(args.out, "result.json")):
            os.remove(os.path.join(args.out, "result.json"))


def setup_sft(x: StageRun, result: dict):
    """SFT: whole conversations packed into rows, completion-only loss, optional drift control."""
    args, tok = x.args, x.tok
    seqs, dropped = sft_sequences(tok, x.train, x.max_len, args.preamble_aug, args.seed)
    if not seqs:
        raise ValueError(f"every SFT example is longer than the context ({x.max_len} tokens)")
    packed = D.pack_whole([s[0] for s in seqs], x.max_len, tok.pad_id, [s[1] for s in seqs])
    loaders = {"main": D.Loader(packed, args.batch_size, seed=args.seed)}
    pre = None
    if args.pretrain_mix > 0:
        loaders["pretrain"] = pre = D.Loader(pretrain_rows(tok, 256, seed=args.seed), args.batch_size,
                                             seed=args.seed + 1)
    objective = sft_objective(x.model, x.ac, args.l2_init, pre, args.pretrain_mix)
    val_seqs = sft_sequences(tok, x.val, x.max_len)[0]
    val_batch = packed_batch(val_seqs, x.max_len, tok.pad_id, x.device) if val_seqs else None

    def evaluate():
        out = x.val_score()
        if val_batch is not None:
            with torch.no_grad(), torch.autocast(**x.ac):
                out["nll"] = completion_nll(x.model, val_batch).item()
        return out
    result.update(examples=len(seqs), dropped_too_long=dropped, rows=len(packed))
    return objective, loaders, evaluate, None


def run_rm_stage(x: StageRun, result: dict, t_start: float) -> dict:
    """The reward model: Bradley-Terry on clean off-policy pairs, then on the init model's verified samples."""
    args, tok, max_len, ac = x.args, x.tok, x.max_len, x.ac
    rm = RewardModel.from_lm(args.init).to(x.device)
    engine = make_engine(x.model, tok, max_len)

    def verified_pairs(examples, seed):                  # on-policy: best vs worst of the init model's samples
        return best_of_n(engine, tok, examples, args.n_samples, verifier_reward_fn(tok), max_new=args.max_new,
                         seed=seed)[1]
    low = reference_pairs(tok, x.train, args.seed)                        # stage 1: off-policy, easy
    high = verified_pairs(x.train, args.seed)                             # stage 2: on-policy, verified
    val_pairs = reference_pairs(tok, x.val, args.seed) + verified_pairs(x.val, args.seed + 7)
    test_pairs = verified_pairs(x.test, args.seed + 13) + reference_pairs(tok, x.test, args.seed)
    check_pairs(low)
    before = {"rm_accuracy_test": rm_accuracy(rm, tok, test_pairs, max_len, ac)}
    stages = [("low-quality pairs", low, args.stage1_steps)] + ([("high-quality pairs", high, args.steps)]
                                                                 if high else [])
    result.update(pairs_low=len(low), pairs_high=len(high), pairs_val=len(val_pairs), pairs_test=len(test_pairs))

    def evaluate():
        return {"score": rm_accuracy(rm, tok, val_pairs, max_len, ac) if val_pairs else 0.0}
    log = {"loss": [], "metrics": [], "val": [], "seconds": 0.0}          # both stages, steps counted on
    for i, (name, pairs, steps) in enumerate(stages):
        c = StageConfig(**{**asdict(x.cfg), "steps": steps})
        sub = os.path.join(args.out, f"stage{i + 1}")
        lg = train_loop(rm, rm_objective(rm, tok, pairs, max_len, ac, args.margin, args.center),
                        {"main": D.Loader(Indices(len(pairs)), args.batch_size, seed=args.seed)}, c, sub, evaluate,
                        args.resume, x.fp + str(i), f"rm {name}")
        log["val"] += [dict(v, step=v["step"] + len(log["loss"])) for v in lg["val"]]
        log["loss"] += lg["loss"]
        log["metrics"] += lg["metrics"]
        log["seconds"] += lg["seconds"]
    after = {"rm_accuracy_test": rm_accuracy(rm, tok, test_pairs, max_len, ac)}
    result.update(before=before, after=after, seconds=round(time.time() - t_start, 1),
                  train_seconds=round(log["seconds"], 1))
    write_outputs(args.out, rm, tok, result, log, "reward model: Bradley-Terry, two stages")
    return result


def setup_policy_stage(x: StageRun, result: dict):
    """pref / bon / copg: the policy samples (or not), is scored by the verifiers or --rm, and trains."""
    args, tok, model, max_len, ac = x.args, x.tok, x.model, x.max_len, x.ac
    reward_fn = verifier_reward_fn(tok)
    if args.rm:
        rm = RewardModel.load(args.rm, tok).to(x.device)
        check_same_architecture(model.config, rm.config, "reward model")
        reward_fn = rm_reward_fn(rm, tok)
    if args.ref:
        check_same_tokenizer(tok, args.ref, "reference model")
        ref = CommandA.from_pretrained(args.ref).to(x.device)
        check_same_architecture(model.config, ref.config, "reference model")
    else:
        ref = copy.deepcopy(model)
    ref.eval().requires_grad_(False)
    engine = make_engine(model, tok, max_len)
    timing = None

    def loader(n):                           # pairs, prompts or groups, by index
        return {"main": D.Loader(Indices(n), args.batch_size, seed=args.seed)}
    if args.stage in ("pref", "bon"):
        sft_data, pairs, stats = best_of_n(engine, tok, x.train, args.n_samples, reward_fn, args.temperature,
                                           max_new=args.max_new, seed=args.seed, min_best=None if args.rm else 0.5)
        if args.stage == "pref" and len(pairs) < len(x.train) // 2:    # too few on-policy pairs: add clean ones
            pairs += reference_pairs(tok, x.train, args.seed)
        result.update(bon=stats)
    if args.stage == "pref":
        check_pairs(pairs)
        refl = reference_logps(ref, tok, pairs, lambda p: pair_sequences(tok, p, args.loss), max_len, ac)
        objective = pref_objective(model, tok, pairs, refl, args.loss, args.beta, max_len, ac,
                                   not args.no_length_norm, sft_weight=args.sft_weight)
        loaders = loader(len(pairs))
        result.update(pairs=len(pairs), loss=args.loss, beta=args.beta)
    elif args.stage == "bon":
        if not sft_data:
            raise ValueError("best-of-N kept no completion (none reached the score threshold): nothing to "
                             "fine-tune on; try more --n-samples or an easier --difficulty")
        packed = D.pack_whole([s[0] for s in sft_data], max_len, tok.pad_id, [s[1] for s in sft_data])
        loaders = {"main": D.Loader(packed, args.batch_size, seed=args.seed)}
        objective = sft_objective(model, ac)
    elif args.online:                        # copg: 2 samples per prompt from the current policy, every step
        timing = {"sample": 0.0, "samples": 0}
        objective = copg_online_objective(model, ref, tok, x.train, args.beta, max_len, ac, reward_fn,
                                          args.max_new, 2, args.temperature, timing=timing)
        loaders = loader(len(x.train))
    else:                                    # copg offline: k samples per prompt from the init model, once
        comps = sample(engine, tok, x.train, args.k, args.temperature, args.max_new, args.seed)
        groups = [{"seqs": [seq(ex.prompt_ids(tok), y) for y in c], "rewards": r}
                  for ex, c, r in zip(x.train, comps, reward_fn(x.train, comps)) if max(r) > min(r)]
        if not groups:
            raise ValueError("offline CoPG: every prompt's samples scored the same: no signal")
        refl = reference_logps(ref, tok, groups, lambda g: g["seqs"], max_len, ac)
        objective = copg_offline_objective(model, tok, groups, refl, args.beta, max_len, ac, args.sft_weight)
        loaders = loader(len(groups))
        result.update(groups=len(groups), k=args.k)
    if args.stage == "copg":
        result.update(online=args.online, beta=args.beta)
    return objective, loaders, x.val_score, timing


def print_table(result):
    b, a = result.get("before") or {}, result.get("after") or {}
    print(f"\n{'':24s}{'before':>10s}{'after':>10s}")
    for k in sorted(set(b) | set(a)):
        fmt = lambda x: f"{x:10.3f}" if isinstance(x, (int, float)) else f"{'-':>10s}"  # noqa: E731
        print(f"{k:24s}{fmt(b.get(k))}{fmt(a.get(k))}")


# ----------------------------------------------------------------------------------------------------------
# Benchmark: SFT vs pretraining throughput on the same model, and where online CoPG's time goes


def bench(init: str, seq_len=1024, batch=4, rounds=3, steps=3, copg_steps=3, suite="math", seed=0) -> dict:
    """Interleaved round-robin (best of `rounds`), so a shared machine slows both sides alike:
      pretrain  model(ids, targets): logits and loss at every position of pretraining rows;
      sft       completion_nll: whole chat rows, the vocabulary projection only at completion tokens.
    tokens/s counts every row position (padding included for SFT: pack_whole pads the row ends). Then a few
    online CoPG steps (2 samples per prompt from serve.Engine) with the time split into sampling and update."""
    model, tok = load_init(init)
    ac = precision(torch.device("cpu"), False, verbose=False)
    exs = T.SUITES[suite].generate(seed, 64, "train")
    seqs, _ = sft_sequences(tok, exs, seq_len - 1)
    sft_rows = D.pack_whole([s[0] for s in seqs], seq_len, tok.pad_id, [s[1] for s in seqs])
    pre_rows = pretrain_rows(tok, seq_len, n_docs=200, seed=seed)
    sft_batch, pre_batch = (rows.batch(list(range(min(batch, len(rows))))) for rows in (sft_rows, pre_rows))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def forward_backward(name):
        with torch.autocast(**ac):
            if name == "sft":
                loss = completion_nll(model, sft_batch)
            else:
                loss = model(pre_batch["input_ids"], targets=pre_batch["targets"], doc_ids=pre_batch["doc_ids"])
        loss.backward()

    def update():
        opt.step()
        opt.zero_grad(set_to_none=True)
    best = {"pretrain": math.inf, "sft": math.inf}
    for _ in tqdm(range(rounds), desc="bench rounds"):
        for name in best:
            forward_backward(name)                            # warm
            t0 = time.perf_counter()
            for _ in range(steps):
                forward_backward(name)
                update()
            best[name] = min(best[name], (time.perf_counter() - t0) / steps)
    ntok = batch * seq_len
    out = {"pretrain_tok_s": round(ntok / best["pretrain"]), "sft_tok_s": round(ntok / best["sft"]),
           "sft_real_tok_frac": round(float((sft_rows.doc_ids[:batch] >= 0).mean()), 3),
           "completion_tok_frac": round(float(sft_rows.loss_mask[:batch].mean()), 3)}
    out["sft_vs_pretrain"] = round(out["sft_tok_s"] / out["pretrain_tok_s"], 2)
    timing = {"sample": 0.0, "samples": 0}
    obj = copg_online_objective(model, copy.deepcopy(model).eval(), tok, exs, 0.1, 2048, ac, verifier_reward_fn(tok),
                                64, 2, timing=timing)
    t0 = time.perf_counter()
    for i in tqdm(range(copg_steps), desc="online CoPG"):
        loss, _ = obj(list(range(i * 8, i * 8 + 8)))
        loss.backward()
        update()
    total = time.perf_counter() - t0
    out.update(copg_samples_s=round(timing["samples"] / total, 2), copg_sample_frac=round(timing["sample"] / total, 3),
               copg_update_frac=round(1 - timing["sample"] / total, 3), copg_prompts_per_step=8)
    return out
