"""
Post-training Command A (report section 3, Figure 3): the pipeline that turns the pretrained model into the
polished one, and every method of alignment.py runnable on its own (stages.py runs those).

    python posttrain.py --tiny                      # the whole pipeline from out/tiny (~27 min on 2 CPU cores)
    python posttrain.py sft  --init out/tiny --suites math --out out/math_sft        # completion-only SFT
    python posttrain.py rm   --init out/tiny --suites math,code --out out/rm          # Bradley-Terry reward model
    python posttrain.py pref --loss ipo --init out/tiny --suites safety --out out/safety_ipo
    python posttrain.py copg --online --init out/math_sft --suites math --out out/math_copg
    python posttrain.py bon  --init out/math_sft --suites math --out out/math_bon    # best-of-N -> SFT
    python posttrain.py bandit                                                        # CoPG's 3-armed bandit
    python posttrain.py bench                                                         # SFT vs pretraining tok/s

The pipeline, in the report's order, each stage a directory of OUT (HF checkpoint + tokenizer + result.json; a
rerun skips finished stages and resumes a killed one): 1. Instruct: SFT on every suite, then preference tuning;
2. six SFT experts from Instruct, each on its domain plus a share of the others; 3. the SFT soup: merge.py's
linear merge, weights searched on validation with a per-domain floor; 4. six RL experts from the soup, each with
its domain's method (rl_math ... rl_long_context); 5. the RL soup; 6. polishing: best-of-N SFT, then offline SRPO
and online CoPG in alternation while the validation score rises. Then polished vs RL soup, pairwise (verifiers
and reward model). Scores are always on the test split, which no stage trains on (validation is carved from the
train split). At tiny scale chats use the compact system preamble (PipelineConfig.preamble), recorded in every
stage's tokenizer.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

import data as D
import merge as M
import tasks as T
from alignment import (
    PREF_LOSSES, Indices, RewardModel, StageConfig, best_of_n, parse_final, bt_loss, check_pairs, completion_nll, copg_loss,
    copg_offline_objective, copg_online_objective, dpo_loss, hinge_loss, ipo_loss, ipo_sft_loss, make_engine,
    pair_sequences, pref_objective, reference_logps, reference_pairs, render, rm_accuracy, rm_objective,
    rm_reward_fn, run_bandit, sample, score_suites, seq, sequence_logps, sft_objective, sft_sequences, slic_loss,
    split_train_val, srpo_loss, tokenizer_fingerprint, train_loop, verifier_reward_fn)
from model import CommandA, atomic_write_text, pyplot, save_figure
from pretrain import precision
from stages import bench, fingerprint_of, load_init, print_table, run_stage, write_outputs

# SPEC 9: the losses are part of posttrain's public interface (they live in alignment.py)
__all__ = ["dpo_loss", "ipo_loss", "hinge_loss", "slic_loss", "srpo_loss", "ipo_sft_loss", "bt_loss", "copg_loss",
           "sequence_logps"]

# ----------------------------------------------------------------------------------------------------------
# The pipeline (report Figure 3): base -> Instruct -> six SFT experts -> SFT soup -> six RL experts -> RL soup
# -> polishing, every stage a directory OUT/<stage> (module docstring)


DOMAINS = ("code", "safety", "rag", "math", "multilingual", "long_context")
EVAL_SUITES = ("instruct",) + DOMAINS + ("tools",)
EXPERT_SUITES = {"code": ["code"], "safety": ["safety"], "rag": ["rag", "tools"], "math": ["math"],
                 "multilingual": ["multilingual"], "long_context": ["long_context"]}


@dataclass
class PipelineConfig:
    n_train: int = 384                # train-split examples per suite (a validation set is carved from them)
    n_val: int = 16                   # validation examples per suite (soup weight search, polishing's stop)
    n_eval: int = 64                  # test examples per suite (the reported table)
    max_new: int = 48                 # tokens per evaluated / sampled completion
    preamble: str = "compact"         # chat format (chat.system_preamble): "compact" drops the fixed
                                      # ~350-token prose of "full" (7.5x the compute per example, measured);
                                      # every stage's tokenizer.json records it, so serve.py renders the same
    seq_len: int = 512                # packed SFT row length (every difficulty-1 conversation fits)
    long_seq_len: int = 2048          # the long-context expert's rows: its long conversations need them
    context: int = 2048               # the longest sequence sampled or scored
    augment: int = 0                  # extra preamble / safety-mode variants per SFT example (sft_sequences)
    batch_size: int = 8               # rows (SFT) / pairs / prompts per step
    lr_sft: float = 3e-3
    lr_rl: float = 3e-4
    instruct_steps: int = 150
    instruct_pref_steps: int = 20
    expert_steps: int = 130           # per SFT expert (per seed for code and multilingual)
    # The RAG expert first learns to read a number out of a document, on fresh RAG examples alone (train split,
    # validation left out) in short rows, then trains on its whole mix like the others. Copying generalizes only
    # when no example repeats often enough to be memorized, and only when it has most of the gradient:
    # measured from Instruct, 384 examples x 160 steps -> 0.02 on test; fresh RAG alone, 600 steps -> 0.97;
    # fresh RAG inside the whole mix (tools, other domains), 500 steps -> 0.08.
    rag_examples: int = 4800
    rag_steps: int = 600
    rag_seq_len: int = 320            # a difficulty-1 RAG conversation is ~270 tokens: one per row
    # The math expert trains on fresh examples too, and longer: it carries the prompt's numbers into its
    # reasoning. Measured from Instruct, math alone, 256 test prompts: 160 steps on fresh examples 0.39,
    # 300 steps 0.72 (the expert on 384 repeated examples + the mix, 160 steps: 0.35).
    math_examples: int = 4000
    math_steps: int = 300
    cross_domain: float = 0.2         # share of other domains' data in an expert's SFT mix
    code_seeds: int = 3               # top-k seed merge: keep the best k of these
    code_topk: int = 2
    multilingual_seeds: int = 2       # uniform seed soup
    rl_steps: int = 20
    rm_steps: int = 15                # per reward-model stage
    n_samples: int = 4                # best-of-N / pairs
    rl_prompts: int = 16              # train prompts per suite an RL expert samples on (sampling is the cost)
    sample_prompts: int = 12          # per suite: Instruct's pairs, the reward model's pairs, polishing
    search_evals: int = 4             # merges evaluated by each soup's weight search (a started sweep finishes)
    search_step: float = 1.0          # the greedy search's first move, in units of the uniform weight 1/K
    floor: float = 0.8                # per-domain floor: the soup keeps >= floor x the expert's validation score
    polish_rounds: int = 2            # at most; stops when the validation score stops rising
    polish_steps: int = 4             # per SRPO and per online-CoPG phase of a round (SRPO: 6 sequences a pair)
    refine_rounds: int = 2            # the reward-based refinement loop (math)
    seed: int = 0


TINY_PIPELINE = PipelineConfig()
MICRO_PIPELINE = PipelineConfig(n_train=12, n_val=3, n_eval=2, max_new=8, seq_len=512, batch_size=2,
                                instruct_steps=2, instruct_pref_steps=1, expert_steps=1, rag_examples=16, rag_steps=1,
                                rag_seq_len=512, math_examples=16, math_steps=1, code_seeds=2, code_topk=1,
                                multilingual_seeds=2, rl_steps=1, rm_steps=1, n_samples=2, search_evals=3,
                                rl_prompts=12, sample_prompts=4, polish_steps=1, polish_rounds=2, refine_rounds=2)


class Pipeline:
    """The state of one pipeline run: the tokenizer, the data splits, the stage directories and results."""

    def __init__(self, init: str, out: str, cfg: PipelineConfig, verbose=True):
        self.cfg, self.out, self.verbose = cfg, out, verbose
        self.base, self.tok = load_init(init)
        self.tok.preamble = cfg.preamble          # before any rendering, and saved with every stage
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.base.to(self.device)
        # what a finished stage was made from: another --init or configuration must not reuse it
        self.fp = fingerprint_of(asdict(cfg), os.path.abspath(init), tokenizer_fingerprint(self.tok))
        self.ac = precision(self.device, False, verbose=False)
        self.max_len = min(cfg.context, self.base.config.max_position_embeddings)
        train = {s: T.SUITES[s].generate(cfg.seed, cfg.n_train, "train") for s in EVAL_SUITES}
        self.train, self.val = {}, {}
        for s, exs in train.items():
            tr, va = split_train_val(exs, 0.15)
            if not va and len(tr) > 1:            # a tiny split: hold out one example all the same
                va = [tr.pop()]
            self.train[s], self.val[s] = tr, va[:cfg.n_val]
            if not tr or not va:
                raise ValueError(f"suite {s}: no train or validation examples (--n-train {cfg.n_train} too small)")
        self.test = {s: T.SUITES[s].generate(cfg.seed, cfg.n_eval, "test") for s in EVAL_SUITES}
        # the RAG and math experts' own examples: the same generator run longer (its first n_train are train + val)
        self.fresh = {}
        for s, n in (("rag", cfg.rag_examples), ("math", cfg.math_examples)):
            held = {e.id for e in self.val[s]}
            self.fresh[s] = [e for e in T.SUITES[s].generate(cfg.seed, max(n, cfg.n_train), "train")
                             if e.id not in held]
        check_no_leak({**self.train, **{f"{s} expert": v for s, v in self.fresh.items()}}, self.test)
        self.results, self.seconds, self.extra = {}, {}, {}

    # --- bookkeeping --------------------------------------------------------------------------------------
    def dir(self, stage):
        return os.path.join(self.out, stage.replace(" ", "_"))

    def log(self, msg):
        if self.verbose:
            tqdm.write(msg)

    def done(self, stage) -> bool:
        f = os.path.join(self.dir(stage), "result.json")
        if not os.path.isfile(f):
            return False
        with open(f) as fh:
            made_from = json.load(fh).get("pipeline_fingerprint")
        if made_from != self.fp:
            raise ValueError(f"{self.out} holds a pipeline run from another --init or configuration ({stage}); "
                             f"use another --out, or delete it to start over")
        return True

    def load(self, stage) -> CommandA:
        return CommandA.from_pretrained(self.dir(stage)).to(self.device)

    def finish(self, stage, model, extra=None, seconds=0.0):
        """Score the stage's model on every suite's test split, write it (checkpoint, tokenizer, result.json)."""
        scores = score_suites(model, self.tok, [e for s in EVAL_SUITES for e in self.test[s]], self.cfg.max_new)
        result = {"stage": stage, "scores": scores, "seconds": round(seconds, 1), "pipeline_fingerprint": self.fp,
                  **(extra or {})}
        write_outputs(self.dir(stage), model, self.tok, result, None, stage)
        for d in ("checkpoint", "checkpoint.old"):              # a finished stage keeps only its final weights
            shutil.rmtree(os.path.join(self.dir(stage), d), ignore_errors=True)
        self.log(f"{stage}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()) + f"  ({seconds:.0f} s)")
        return result

    def run(self, stage, fn):
        """Skip a finished stage (its result is read back); otherwise run fn() -> (model, extra) and finish."""
        if self.done(stage):
            with open(os.path.join(self.dir(stage), "result.json")) as f:
                r = json.load(f)
            self.log(f"{stage}: done earlier, skipped")
        else:
            t0 = time.time()
            model, extra = fn()
            r = self.finish(stage, model, extra, time.time() - t0)
        self.results[stage], self.seconds[stage], self.extra[stage] = r["scores"], r["seconds"], r
        return r

    def val_score(self, model, domains=DOMAINS) -> dict:
        return score_suites(model, self.tok, [e for d in domains for s in EXPERT_SUITES.get(d, [d])
                                              for e in self.val[s]], self.cfg.max_new)

    def single_turn(self, split: dict, n=None) -> list:
        """Every single-turn suite's examples of a split (the first n of each): what the samplers prompt with."""
        return [e for s in EVAL_SUITES if not T.SUITES[s].multi_turn for e in split[s][:n]]

    def stage_cfg(self, steps, lr, seed=0, batch_size=None) -> StageConfig:
        return StageConfig(steps=max(1, steps), batch_size=batch_size or self.cfg.batch_size, lr=lr, eval_every=10 ** 9,
                           ckpt_every=max(1, steps // 4), seed=self.cfg.seed + seed)

    def fit(self, model, objective, data, out, steps, lr, key: tuple, seed=0, batch=None, desc=None, more=None):
        """train_loop as the pipeline runs it: `data` (rows, or Indices of pairs / groups) shuffled by the seed,
        a killed run resumed when the pipeline's fingerprint and `key` say it is the same one."""
        batch = batch or self.cfg.batch_size
        loaders = {"main": D.Loader(data, batch, seed=self.cfg.seed + seed), **(more or {})}
        train_loop(model, objective, loaders, self.stage_cfg(steps, lr, seed, batch), out, resume=True,
                   fingerprint=fingerprint_of(self.fp, *key), desc=desc or os.path.basename(out), verbose=self.verbose)
        return model

    # --- the methods, as the pipeline uses them ------------------------------------------------------------
    def sft(self, model, examples, steps, out, seed=0, lr=None, extra_seqs=(), row_len=None, batch=None):
        row_len = min(row_len or self.cfg.seq_len, self.max_len)
        # longer rows, fewer of them: every step trains on the same number of tokens (as pretraining's cooldown)
        batch = batch or max(1, self.cfg.batch_size * self.cfg.seq_len // row_len)
        seqs, dropped = sft_sequences(self.tok, examples, row_len, augment=self.cfg.augment, seed=self.cfg.seed + seed)
        seqs += [s for s in extra_seqs if len(s[0]) <= row_len]
        if dropped:
            self.log(f"{os.path.basename(out)}: {dropped} SFT conversations longer than a row ({row_len}) left out")
        if not seqs:
            raise ValueError(f"{out}: no SFT data (empty domain?)")
        packed = D.pack_whole([s[0] for s in seqs], row_len, self.tok.pad_id, [s[1] for s in seqs])
        return self.fit(model, sft_objective(model, self.ac), packed, out, steps, lr or self.cfg.lr_sft,
                        ("sft", len(seqs), steps, seed), seed, batch)

    def pref(self, model, pairs, loss, steps, out, beta=0.1, sft_weight=1.0):
        check_pairs(pairs)
        # the reference is the model as it enters this stage: its log-probs, computed before the first update
        refl = reference_logps(model, self.tok, pairs, lambda p: pair_sequences(self.tok, p, loss), self.max_len,
                               self.ac)
        obj = pref_objective(model, self.tok, pairs, refl, loss, beta, self.max_len, self.ac, sft_weight=sft_weight)
        return self.fit(model, obj, Indices(len(pairs)), out, steps, self.cfg.lr_rl, (loss, len(pairs), steps))

    def pairs(self, model, examples, seed=0):
        """On-policy pairs (best vs worst of n samples, scored by the verifiers) and best-of-N's stats, plus clean
        off-policy ones (the reference vs another example's reference) where sampling found too few."""
        engine = make_engine(model, self.tok, self.max_len)
        _, pairs, stats = best_of_n(engine, self.tok, examples, self.cfg.n_samples, verifier_reward_fn(self.tok), 0.7,
                                    self.cfg.max_new, self.cfg.seed + seed)
        model.train()
        if len(pairs) < len(examples) // 2:
            pairs += reference_pairs(self.tok, examples, self.cfg.seed + seed)
        return pairs, stats

    def copg_offline(self, model, groups, steps, out, beta=0.1, sft_weight=0.0, rehearsal=None):
        refl = reference_logps(model, self.tok, groups, lambda g: g["seqs"], self.max_len, self.ac)   # as in pref
        obj = copg_offline_objective(model, self.tok, groups, refl, beta, self.max_len, self.ac, sft_weight)
        more = {}
        if rehearsal is not None:       # SFT rehearsal: one batch of reference SFT rows with every RL batch
            more["sft"] = rehearse = D.Loader(rehearsal, max(1, self.cfg.batch_size // 2), seed=self.cfg.seed)

            def with_rehearsal(idx, base=obj):
                loss, m = base(idx)
                with torch.autocast(**self.ac):
                    nll = completion_nll(model, next(rehearse))
                return loss + nll, {**m, "rehearsal_nll": nll.item()}
            obj = with_rehearsal
        return self.fit(model, obj, Indices(len(groups)), out, steps, self.cfg.lr_rl, ("copg", len(groups), steps),
                        more=more)

    def groups(self, model, examples, k, seed=0) -> list:
        """k scored samples per prompt as whole sequences (ReAct episodes for multi-turn suites), kept where the
        rewards differ: CoPG's offline data."""
        engine, tok = make_engine(model, self.tok, self.max_len), self.tok
        single = [e for e in examples if not T.SUITES[e.suite].multi_turn]
        multi = [e for e in examples if T.SUITES[e.suite].multi_turn]
        groups = []
        if single:
            comps = sample(engine, tok, single, k, 0.7, self.cfg.max_new, self.cfg.seed + seed)
            for ex, cs, rs in zip(single, comps, verifier_reward_fn(tok)(single, comps)):
                groups.append({"seqs": [seq(ex.prompt_ids(tok), c) for c in cs], "rewards": rs})
        episodes = [{"seqs": [], "rewards": []} for _ in multi]
        for j in range(k if multi else 0):          # ReAct episodes: k independent rollouts per prompt
            eps = T.run_react(engine, tok, multi, max_new_tokens=self.cfg.max_new, temperature=0.7,
                              seed=self.cfg.seed + seed + 7919 * j)
            for g, e in zip(episodes, eps):
                final = parse_final(e.final)
                turns = e.messages[len(e.example.messages):] + ([final] if final else [])
                trained = any(t["role"] == "assistant" for t in turns)      # else nothing carries a loss
                g["seqs"].append(render(tok, e.example, turns) if trained else None)
                g["rewards"].append(T.SUITES[e.example.suite].score(e.example, e.final) if not e.error else 0.0)
        model.train()
        return [g for g in groups + episodes if max(g["rewards"]) > min(g["rewards"]) and
                all(s is not None and len(s[0]) <= self.max_len for s in g["seqs"])]

    def soup(self, name, experts: dict) -> tuple:
        """merge.py's linear merge, weights by its search on validation scores with a per-domain floor (floor x
        each expert's own validation score in its domain)."""
        names = list(experts)
        models = [self.load(experts[n]) for n in names]
        own = {n: self.val_score(m, [n]) for n, m in zip(names, models)}   # each expert on its own suites
        floor = {s: self.cfg.floor * v for n in names for s, v in own[n].items()}
        score = lambda m: {k: v for k, v in self.val_score(m.to(self.device)).items()  # noqa: E731
                           if k in floor}
        res = M.search_weights(models, score, floor, method="greedy", max_evals=self.cfg.search_evals,
                               step=self.cfg.search_step, progress=self.verbose)
        w = res["best"].weights
        merged = M.merge("linear", models, w)
        self.log(f"{name}: weights " + ", ".join(f"{n} {x:.2f}" for n, x in zip(names, w)) +
                 f" (val mean {res['best'].mean:.3f}, floor {'met' if res['best'].feasible else 'NOT met'})")
        return merged, {"weights": dict(zip(names, w)), "evaluations": res["evaluations"],
                        "floor_met": res["best"].feasible}


def prompt_text(ex) -> str:
    """What the model sees, plus a tools example's hidden tables (the same question over other data is another
    example: its answer differs)."""
    return json.dumps([ex.messages, ex.documents, ex.safety_mode, ex.check.get("env")], sort_keys=True, default=str)


def check_no_leak(train: dict, test: dict):
    """No test example is trained on: not by id, and not by its prompt under another id (a re-generated copy)."""
    tr = [e for v in train.values() for e in v]
    te = [e for v in test.values() for e in v]
    ids = {e.id for e in tr} & {e.id for e in te}
    prompts = {prompt_text(e) for e in tr} & {prompt_text(e) for e in te}
    if ids or prompts:
        raise RuntimeError(f"{len(ids)} test example ids and {len(prompts)} test prompts appear in the training "
                           f"data: the split is broken")


def run_pipeline(init: str, out: str, cfg: PipelineConfig, verbose=True) -> dict:
    """The report's Figure 3, stage by stage (module docstring), then the polished model against the RL soup."""
    P_ = Pipeline(init, out, cfg, verbose)
    os.makedirs(out, exist_ok=True)
    t_all = time.time()
    bar = tqdm(total=16, desc="pipeline", disable=not verbose)

    def step(stage, fn):
        r = P_.run(stage, fn)
        bar.update(1)
        return r
    step("instruct", lambda: instruct(P_))                                                  # 1.
    for domain in DOMAINS:                                                                  # 2.
        step(f"sft expert {domain}", lambda d=domain: sft_expert(P_, d))
    step("sft soup", lambda: P_.soup("sft soup", {d: f"sft expert {d}" for d in DOMAINS}))  # 3.
    rm = reward_model(P_)
    for domain in DOMAINS:                                                                  # 4.
        step(f"rl expert {domain}", lambda d=domain: RL_EXPERTS[d](P_, P_.load("sft soup"), d, rm))
    step("rl soup", lambda: P_.soup("rl soup", {d: f"rl expert {d}" for d in DOMAINS}))    # 5.
    step("polished", lambda: polish(P_))                                                    # 6.
    bar.close()
    summary = {"stages": P_.results, "seconds": P_.seconds, "pairwise": pairwise_vs_rl_soup(P_, rm),
               "refinement": P_.extra.get("rl expert math", {}).get("refinement", []),
               "total_seconds": round(time.time() - t_all, 1)}
    report(summary, out)
    return summary


def mix(P_, domain, own=None) -> list:
    """An expert's SFT data: its domain's train split (or `own`) plus a cross_domain share of every other
    suite's."""
    c = P_.cfg
    own = own if own is not None else [e for s in EXPERT_SUITES[domain] for e in P_.train[s]]
    rng = random.Random(f"{c.seed}|{domain}")
    others = [e for s in EVAL_SUITES if s not in EXPERT_SUITES[domain] for e in P_.train[s]]
    return own + rng.sample(others, min(len(others), int(c.cross_domain / (1 - c.cross_domain) * len(own))))


def instruct(P_):
    """1. Instruct: SFT on every suite's train split, then preference tuning (DPO on its own samples)."""
    c = P_.cfg
    m = copy.deepcopy(P_.base)
    every = [e for s in EVAL_SUITES for e in P_.train[s]]
    P_.sft(m, every, c.instruct_steps, os.path.join(P_.dir("instruct"), "sft"))
    pairs, stats = P_.pairs(m, P_.single_turn(P_.train, c.sample_prompts))
    P_.pref(m, pairs, "dpo", c.instruct_pref_steps, os.path.join(P_.dir("instruct"), "pref"))
    return m, {"pairs": len(pairs), "bon": stats}


def sft_expert(P_, domain):
    """2. An SFT expert from Instruct, on its domain's data with some cross-domain data, as the report trains it."""
    c = P_.cfg
    data, d = mix(P_, domain), P_.dir(f"sft expert {domain}")
    if domain in ("code", "multilingual"):            # seed runs: code keeps the top k, multilingual soups them all
        n = c.code_seeds if domain == "code" else c.multilingual_seeds
        runs = [P_.sft(P_.load("instruct"), data, c.expert_steps, os.path.join(d, f"seed{i}"), seed=i)
                for i in range(n)]
        if domain == "multilingual":
            return M.merge("soup", runs), {"seeds": n}
        merged, ranking = M.topk_merge(runs, lambda m: P_.val_score(m, ["code"]), c.code_topk,
                                       names=[f"seed{i}" for i in range(n)])
        return merged, {"seed_ranking": [(name, s) for name, s, _ in ranking], "k": c.code_topk}
    if domain == "long_context":                      # short : long at 3 : 1 (the report's 16K : 256K)
        long = T.SUITES["long_context"].generate(c.seed, max(1, len(P_.train["long_context"]) // 3), "train",
                                                 difficulty=2)
        long = [e for e in long if e.id not in {v.id for v in P_.val["long_context"]}]
        return P_.sft(P_.load("instruct"), data + long, c.expert_steps, d, row_len=c.long_seq_len), {"long": len(long)}
    if domain == "rag":                               # reading a document first: see rag_examples
        m = P_.sft(P_.load("instruct"), P_.fresh["rag"], c.rag_steps, os.path.join(d, "read"), row_len=c.rag_seq_len,
                   batch=c.batch_size)
        reading = P_.val_score(m, ["rag"])
        P_.log(f"sft expert rag: after reading fresh documents, validation rag {reading['rag']:.2f}")
        return P_.sft(m, data, c.expert_steps, d), {"rag_examples": len(P_.fresh["rag"]), "read_val": reading}
    if domain == "math":                              # fresh examples, more steps: see math_examples
        return P_.sft(P_.load("instruct"), mix(P_, domain, P_.fresh["math"]), c.math_steps, d), \
            {"math_examples": len(P_.fresh["math"])}
    return P_.sft(P_.load("instruct"), data, c.expert_steps, d), {}


def reward_model(P_) -> RewardModel:
    """Two Bradley-Terry stages on verifier-labelled pairs (clean off-policy, then the SFT soup's own samples)."""
    c, tok = P_.cfg, P_.tok
    rm_dir = os.path.join(P_.out, "reward_model")
    if not P_.done("reward model"):
        single = P_.single_turn(P_.train, c.sample_prompts)
        low = reference_pairs(tok, single, c.seed)
        _, high, _ = best_of_n(make_engine(P_.load("sft soup"), tok, P_.max_len), tok, single, c.n_samples,
                               verifier_reward_fn(tok), 0.7, c.max_new, c.seed + 1)   # on-policy only
        if not high:
            high = low                                    # the model never varies: stage 2 repeats stage 1
            P_.log("reward model: no on-policy pairs (every sample scored the same); stage 2 reuses stage 1's")
        rm = RewardModel.from_lm(P_.dir("sft soup")).to(P_.device)
        for i, (pairs, lr) in enumerate(((low, 3e-4), (high, 1e-4))):
            check_pairs(pairs)
            P_.fit(rm, rm_objective(rm, tok, pairs, P_.max_len, P_.ac), Indices(len(pairs)),
                   os.path.join(rm_dir, f"stage{i + 1}"), c.rm_steps, lr, ("rm", i, len(pairs)),
                   desc=f"reward model {i + 1}")
        acc = rm_accuracy(rm, tok, reference_pairs(tok, P_.single_turn(P_.val), c.seed), P_.max_len, P_.ac)
        write_outputs(rm_dir, rm, tok, {"stage": "reward model", "val_accuracy": acc, "pairs": [len(low), len(high)],
                                        "pipeline_fingerprint": P_.fp}, None, "reward model")
        P_.log(f"reward model: validation pairwise accuracy {acc:.2f}")
    return RewardModel.load(rm_dir, tok).to(P_.device)


# 4. The six RL experts, each from the SFT soup with its domain's method: fn(P_, soup, domain, rm) -> (model, extra)

def _rl_prompts(P_, domain) -> list:
    return [e for s in EXPERT_SUITES[domain] for e in P_.train[s][:P_.cfg.rl_prompts]]


def rl_math(P_, m, domain, rm):
    """Preference pairs from its own samples, scored by the verifier: the reward-based refinement loop."""
    c, d, exs, log = P_.cfg, P_.dir(f"rl expert {domain}"), _rl_prompts(P_, domain), []
    for r in range(c.refine_rounds):
        pairs, stats = P_.pairs(m, exs, seed=10 + r)
        P_.pref(m, pairs, "dpo", c.rl_steps, os.path.join(d, f"round{r + 1}"))
        log.append({"round": r + 1, "pairs": len(pairs), "sample_score": stats["mean_score"],
                    "val": P_.val_score(m, ["math"])["math"]})
        P_.log(f"refinement round {r + 1} (math): samples scored {stats['mean_score']:.3f}, "
               f"validation {log[-1]['val']:.3f}")
    return m, {"refinement": log}


def rl_code(P_, m, domain, rm):
    """Offline CoPG on correctness rewards + SFT rehearsal + an SFT term + interpolation toward the parent."""
    c, d, exs, tok = P_.cfg, P_.dir(f"rl expert {domain}"), _rl_prompts(P_, domain), P_.tok
    groups = P_.groups(m, exs, k=c.n_samples, seed=20)
    seqs, _ = sft_sequences(tok, exs, c.seq_len)
    rehearsal = D.pack_whole([s[0] for s in seqs], c.seq_len, tok.pad_id, [s[1] for s in seqs])
    if groups:
        P_.copg_offline(m, groups, c.rl_steps, d, sft_weight=0.5, rehearsal=rehearsal)
    else:
        P_.log("rl expert code: SKIPPED CoPG: every prompt's samples scored the same (no signal)")
    return M.merge("interpolate", [m], base=P_.load("sft soup"), eta=0.5), \
        {"groups": len(groups), "eta": 0.5, "skipped": not groups}


def rl_safety(P_, m, domain, rm):
    """IPO + SFT with equal weight."""
    pairs, _ = P_.pairs(m, _rl_prompts(P_, domain), seed=30)
    return P_.pref(m, pairs, "ipo_sft", P_.cfg.rl_steps, P_.dir(f"rl expert {domain}"), sft_weight=0.0), \
        {"pairs": len(pairs)}


def rl_multilingual(P_, m, domain, rm):
    """Best-of-N over every SFT expert's answers, judged by the reward model, then SFT + preference."""
    c, d, exs, tok = P_.cfg, P_.dir(f"rl expert {domain}"), _rl_prompts(P_, domain), P_.tok
    cands = [sample(make_engine(P_.load(f"sft expert {x}"), tok, P_.max_len), tok, exs, 1, 0.7, c.max_new,
                    c.seed + 40) for x in DOMAINS]
    comps = [[cs[i][0] for cs in cands] for i in range(len(exs))]
    rewards = rm_reward_fn(rm, tok)(exs, comps)
    sft_data, pairs = [], []
    for ex, cs, rs in zip(exs, comps, rewards):
        order = sorted(range(len(cs)), key=lambda i: -rs[i])
        b, w = cs[order[0]], cs[order[-1]]
        if b[-1:] == [tok.eot_id]:
            sft_data.append(seq(ex.prompt_ids(tok), b))
            if b != w:
                pairs.append({"prompt": ex.prompt_ids(tok), "chosen": b, "rejected": w})
    P_.sft(m, exs, c.rl_steps, os.path.join(d, "sft"), lr=c.lr_rl * 10, extra_seqs=sft_data)
    if pairs:
        P_.pref(m, pairs, "dpo", c.rl_steps, os.path.join(d, "pref"))
    return m, {"bon_sft": len(sft_data), "pairs": len(pairs)}


def rl_rag(P_, m, domain, rm):
    """Offline CoPG on RAG answers and ReAct episodes."""
    c = P_.cfg
    groups = P_.groups(m, _rl_prompts(P_, domain), k=c.n_samples, seed=50)
    if groups:
        P_.copg_offline(m, groups, c.rl_steps, P_.dir(f"rl expert {domain}"), sft_weight=0.5)
    else:
        P_.log("rl expert rag: SKIPPED CoPG: every prompt's samples scored the same (no signal)")
    return m, {"groups": len(groups), "skipped": not groups}


def rl_long_context(P_, m, domain, rm):
    """SFT + preference."""
    c, d, exs = P_.cfg, P_.dir(f"rl expert {domain}"), _rl_prompts(P_, domain)
    P_.sft(m, exs, c.rl_steps, os.path.join(d, "sft"), lr=c.lr_rl * 10)
    pairs, _ = P_.pairs(m, exs, seed=60)
    P_.pref(m, pairs, "dpo", c.rl_steps, os.path.join(d, "pref"))
    return m, {"pairs": len(pairs)}


RL_EXPERTS = {"code": rl_code, "safety": rl_safety, "rag": rl_rag, "math": rl_math, "multilingual": rl_multilingual,
              "long_context": rl_long_context}


def polish(P_):
    """6. Best-of-N SFT on a high-quality subset, then offline SRPO and online CoPG in alternation, for as long
    as the validation score keeps rising. Every step is kept only if it raises it, from the RL soup's own."""
    c, tok = P_.cfg, P_.tok
    m, d = P_.load("rl soup"), P_.dir("polished")
    every = P_.single_turn(P_.train, c.sample_prompts)
    hq, _, stats = best_of_n(make_engine(m, tok, P_.max_len), tok, every, c.n_samples, verifier_reward_fn(tok),
                             0.7, c.max_new, c.seed + 70, min_best=1.0)   # the high-quality subset: fully correct
    m.train()
    start_val = best_val = sum(P_.val_score(m).values())
    best_state, rounds = copy.deepcopy(m.state_dict()), []
    if hq:
        P_.sft(m, [], c.rl_steps, os.path.join(d, "bon_sft"), lr=c.lr_rl * 10, extra_seqs=hq)
        v = sum(P_.val_score(m).values())
        rounds.append({"round": 0, "step": "best-of-N SFT", "val_sum": v})
        P_.log(f"polishing best-of-N SFT: validation sum {v:.3f} (RL soup {best_val:.3f})")
        if v > best_val:
            best_val, best_state = v, copy.deepcopy(m.state_dict())
        else:
            m.load_state_dict(best_state)
    for r in range(c.polish_rounds):
        pairs, _ = P_.pairs(m, every, seed=80 + r)
        P_.pref(m, pairs, "srpo", c.polish_steps, os.path.join(d, f"srpo{r + 1}"), sft_weight=0.0)
        ref = copy.deepcopy(m).eval()
        obj = copg_online_objective(m, ref, tok, every, 0.1, P_.max_len, P_.ac, verifier_reward_fn(tok),
                                    c.max_new, 2, 0.7)
        train_loop(m, obj, {"main": D.Loader(Indices(len(every)), c.batch_size, seed=c.seed + r)},
                   P_.stage_cfg(c.polish_steps, c.lr_rl), os.path.join(d, f"copg{r + 1}"), resume=True,
                   fingerprint=fingerprint_of(P_.fp, "online", r), desc=f"polish copg {r + 1}", verbose=P_.verbose)
        v = sum(P_.val_score(m).values())
        rounds.append({"round": r + 1, "val_sum": v})
        P_.log(f"polishing round {r + 1}: validation sum {v:.3f} (best {best_val:.3f})")
        if v <= best_val:
            m.load_state_dict(best_state)          # keep the best round: the score stopped rising
            break
        best_val, best_state = v, copy.deepcopy(m.state_dict())
    return m, {"bon": stats, "rounds": rounds, "start_val_sum": start_val, "val_sum": best_val}


def pairwise_vs_rl_soup(P_, rm) -> dict:
    """The report's pairwise evaluation: the polished model against the RL soup, on the test split, judged by
    the verifiers and by the reward model (one generation pass per model, two judges)."""
    c, tok = P_.cfg, P_.tok
    suites = [s for s in EVAL_SUITES if not T.SUITES[s].multi_turn]

    ra, rb = (T.evaluate_details(P_.load(stage), tok, suites, n=c.n_eval, seed=c.seed, max_new_tokens=c.max_new)
              for stage in ("polished", "rl soup"))
    pw = {"verifiers": T.judge_pairs(ra, rb), "reward_model": T.judge_pairs(ra, rb, rm.judge(tok))}
    return {k: {"win": v["win"], "tie": v["tie"], "loss": v["loss"], "win_rate": v["win_rate"]} for k, v in pw.items()}


def run_pairwise(args) -> dict:
    """`posttrain.py pairwise`: win / tie / loss of A against B per judge, one generation pass per model."""
    if args.n < 1 or args.max_new < 1 or args.difficulty < 1:
        raise ValueError("--n, --max-new and --difficulty must be >= 1")
    suites = T.check_suites(args.suites or [s for s in T.SUITES if not T.SUITES[s].multi_turn])
    (a, tok), (b, tok_b) = load_init(args.a), load_init(args.b)
    if tok_b.ranks != tok.ranks:
        raise ValueError("the two checkpoints have different tokenizers; pairwise needs one")
    ra, rb = (T.evaluate_details(m, tok, suites, n=args.n, seed=args.seed, max_new_tokens=args.max_new,
                                 difficulty=args.difficulty) for m in (a, b))
    res = {"verifiers": T.judge_pairs(ra, rb)}
    if args.rm:
        res["reward_model"] = T.judge_pairs(ra, rb, RewardModel.load(args.rm, tok).judge(tok))
    print(f"{'judge':<14} {'suite':<14} {'win':>6} {'tie':>6} {'loss':>6}   (A = {args.a}, B = {args.b})")
    for judge, r in res.items():
        for k, v in r["per_suite"].items():
            print(f"{judge:<14} {k:<14} {v['win']:6.2f} {v['tie']:6.2f} {v['loss']:6.2f}")
    print(json.dumps({j: {k: round(v, 4) for k, v in r.items() if k in ("win", "tie", "loss", "win_rate")}
                      for j, r in res.items()}))
    return res


def in_domain(scores: dict, d: str) -> float:
    """A domain's score: the mean over its suites (rag = rag + tools); 0 for a missing stage or suite."""
    return sum(scores.get(s, 0.0) for s in EXPERT_SUITES[d]) / len(EXPERT_SUITES[d])


def retention(stages: dict) -> dict:
    """Each expert's in-domain score kept by the soups: soup score / expert score (None for an expert at 0)."""
    def kept(kind, d):
        expert = in_domain(stages.get(f"{kind} expert {d}", {}), d)
        return round(in_domain(stages.get(f"{kind} soup", {}), d) / expert, 3) if expert else None
    return {kind: {d: kept(kind, d) for d in DOMAINS} for kind in ("sft", "rl")}


def findings(summary) -> list[tuple[str, str, str]]:
    """The report's post-training findings beside ours, from the stage x suite test scores."""
    st = summary["stages"]

    def dom(stage, d):
        return in_domain(st[stage], d)

    beat = [d for d in DOMAINS if dom(f"sft expert {d}", d) > dom("instruct", d)]
    rows = [("Each expert beats the Instruct model it starts from, in its domain",
             "yes (the reason experts exist)",
             f"{len(beat)} of 6 (" + ", ".join(f"{d} {dom('instruct', d):.2f}->{dom(f'sft expert {d}', d):.2f}"
                                              for d in DOMAINS) + ")")]
    for kind, claim in (("sft", "The SFT soup keeps the experts' scores"), ("rl", "The RL soup keeps them")):
        kept = {d: dom(f"{kind} soup", d) - dom(f"{kind} expert {d}", d) for d in DOMAINS
                if dom(f"{kind} expert {d}", d) > 0}
        if kept:
            worst = min(kept, key=kept.get)
            ours = (f"mean change {sum(kept.values()) / len(kept):+.3f} over the {len(kept)} domains the experts "
                    f"score in; least kept: {worst} ({kept[worst]:+.2f})")
        else:
            ours = "no expert scores above 0"
        rows.append((claim, "within ~1.8% of the experts on average; code least preserved", ours))
    rl = [d for d in DOMAINS if dom(f"rl expert {d}", d) > dom("sft soup", d)]
    mean = lambda stage: sum(st[stage].values()) / len(st[stage])  # noqa: E731
    rows.append(("RL raises each domain over the SFT soup", "yes",
                 f"{len(rl)} of 6 RL experts above the SFT soup in-domain ({', '.join(rl) or 'none'}); "
                 f"mean over suites: SFT soup {mean('sft soup'):.3f}, RL soup {mean('rl soup'):.3f}"))
    pw = summary["pairwise"]
    rows.append(("Polishing wins pairwise against the model before it", "yes: the largest gain, the last stage",
                 "; ".join(f"{k}: win rate {v['win_rate']:.2f} ({v['tie']:.0%} ties)" for k, v in pw.items())))
    return rows


def report(summary, out):
    stages, suites = summary["stages"], list(next(iter(summary["stages"].values())))
    lines = ["| stage | " + " | ".join(suites) + " | seconds |", "|---|" + "---:|" * (len(suites) + 1)]
    for st, sc in stages.items():
        lines.append(f"| {st} | " + " | ".join(f"{sc[s]:.2f}" for s in suites) + f" | {summary['seconds'][st]:.0f} |")
    summary["retention"] = ret = retention(stages)
    lines += ["", "| retention (soup / expert, in-domain) | " + " | ".join(DOMAINS) + " |", "|---|" + "---:|" * len(DOMAINS)]
    for k, v in ret.items():
        lines.append(f"| {k} soup | " + " | ".join("-" if v[d] is None else f"{v[d]:.2f}" for d in DOMAINS) + " |")
    lines += ["", "| polished vs RL soup | win | tie | loss | win rate |", "|---|---:|---:|---:|---:|"]
    for k, v in summary["pairwise"].items():
        lines.append(f"| judged by {k} | {v['win']:.2f} | {v['tie']:.2f} | {v['loss']:.2f} | {v['win_rate']:.2f} |")
    lines += ["", "| finding | report | ours (tiny, test split) |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in findings(summary)]
    text = "\n".join(lines)
    print("\n" + text)
    atomic_write_text(os.path.join(out, "pipeline.md"), text + "\n")
    heatmap(stages, os.path.join(out, "pipeline.png"))


def heatmap(stages, path):
    plt = pyplot()
    names, suites = list(stages), list(next(iter(stages.values())))
    m = np.array([[stages[n][s] for s in suites] for n in names])
    fig, ax = plt.subplots(figsize=(1.1 * len(suites) + 3, 0.42 * len(names) + 1.5))
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(suites)), suites, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(suites)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] < 0.5 else "black")
    fig.colorbar(im, ax=ax, label="test score (verifiers)")
    ax.set_title("post-training pipeline: every stage on every domain (test split)")
    fig.tight_layout()
    save_figure(fig, path)

# ----------------------------------------------------------------------------------------------------------
# CLI


def build_parser():
    ap = argparse.ArgumentParser(description="Command A post-training: the whole pipeline (--tiny / --micro), or "
                                 "one stage (sft, rm, pref, copg, bon) from a checkpoint on tasks.py suites, the "
                                 "CoPG bandit, or the throughput bench.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the whole pipeline at tiny scale (~27 min on 2 CPU cores)")
    ap.add_argument("--micro", action="store_true", help="the whole pipeline at micro scale (the tests' setting)")
    ap.add_argument("--init", dest="pipeline_init", default="out/tiny", help="pipeline: the pretrained checkpoint")
    ap.add_argument("--out", dest="pipeline_out", default=None, help="pipeline: output directory (default "
                    "out/posttrain, or out/posttrain_micro with --micro)")
    sub = ap.add_subparsers(dest="stage")
    common = argparse.ArgumentParser(add_help=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = common.add_argument_group("data and run")
    g.add_argument("--init", default="out/tiny", help="starting checkpoint (HF Cohere2 + tokenizer)")
    g.add_argument("--out", required=True, help="output directory: the stage's checkpoint, curves.png, result.json")
    g.add_argument("--suites", default="math", help="comma-separated tasks.py suites")
    g.add_argument("--n-train", type=int, default=256, help="train-split examples per suite")
    g.add_argument("--n-eval", type=int, default=64, help="test-split examples per suite (reported scores)")
    g.add_argument("--n-val", type=int, default=32, help="at most this many validation examples (carved from train)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="share of the train examples held out")
    g.add_argument("--difficulty", type=int, default=1)
    g.add_argument("--max-new", type=int, default=64, help="tokens per sampled / evaluated completion")
    g.add_argument("--steps", type=int, default=100)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--warmup-frac", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0)
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--ckpt-every", type=int, default=25)
    g.add_argument("--early-stop", type=int, default=0, help="evaluations without improvement before stopping")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--fp32", action="store_true", help="no bf16 autocast (it is off anyway on CPUs without bf16)")
    g.add_argument("--resume", action="store_true", help="continue OUT/checkpoint exactly")
    g.add_argument("--force", action="store_true", help="overwrite a finished or unfinished stage in OUT")
    g.add_argument("--seq-len", type=int, default=0, help="SFT row length (0: the model's context)")
    g.add_argument("--preamble", choices=("full", "compact"), default=None,
                   help="chat format's system preamble (default: the init tokenizer's; saved with the stage)")

    p = sub.add_parser("sft", parents=[common], help="completion-only SFT", formatter_class=ap.formatter_class)
    p.add_argument("--preamble-aug", type=int, default=1, help="extra copies per example under other preambles/modes")
    p.add_argument("--l2-init", type=float, default=0.0, help="drift control: L2 pull toward the initial weights")
    p.add_argument("--pretrain-mix", type=float, default=0.0, help="drift control: weight of pretraining rows")
    p = sub.add_parser("rm", parents=[common], help="Bradley-Terry reward model, two stages",
                       formatter_class=ap.formatter_class)
    p.add_argument("--stage1-steps", type=int, default=50, help="steps on the lower-quality pairs")
    p.add_argument("--n-samples", type=int, default=4, help="samples per prompt for the on-policy pairs")
    p.add_argument("--margin", type=float, default=0.0)
    p.add_argument("--center", type=float, default=0.01, help="centering eta * (r_w + r_l)^2")
    for name, hlp in (("pref", "offline preference optimization"), ("copg", "CoPG (offline or --online)"),
                      ("bon", "best-of-N sampling, then SFT on the best")):
        p = sub.add_parser(name, parents=[common], help=hlp, formatter_class=ap.formatter_class)
        p.add_argument("--beta", type=float, default=0.1)
        p.add_argument("--n-samples", type=int, default=4, help="samples per prompt (best-of-N / pairs)")
        p.add_argument("--rm", default=None, help="score samples with this reward model instead of the verifiers")
        p.add_argument("--ref", default=None, help="reference model (default: the --init checkpoint)")
        p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1 = the policy itself)")
        p.add_argument("--sft-weight", type=float, default=0.0, help="add this much SFT loss on the chosen / best "
                       "answer (pref, offline copg)")
        if name == "pref":
            p.add_argument("--loss", default="dpo", choices=PREF_LOSSES)
            p.add_argument("--no-length-norm", action="store_true", help="IPO without per-token normalization")
        if name == "copg":
            p.add_argument("--online", action="store_true", help="sample 2 per prompt from the current policy")
            p.add_argument("--k", type=int, default=4, help="offline: samples per prompt")
    p = sub.add_parser("bench", help="SFT vs pretraining tokens/s; online CoPG samples/s and time split",
                       formatter_class=ap.formatter_class)
    p.add_argument("--init", default="out/tiny")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("pairwise", help="two checkpoints answer the same test prompts; the verifiers judge, and the "
                       "reward model too with --rm", formatter_class=ap.formatter_class)
    p.add_argument("--a", required=True, help="checkpoint A")
    p.add_argument("--b", required=True, help="checkpoint B (same tokenizer)")
    p.add_argument("--rm", default=None, help="also judge with this reward model (posttrain.py rm --out DIR)")
    p.add_argument("--suites", default=None, help="comma-separated suites (default: every single-turn suite)")
    p.add_argument("--n", type=int, default=16, help="test examples per suite")
    p.add_argument("--difficulty", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new", type=int, default=64, help="tokens per answer")
    p = sub.add_parser("bandit", help="CoPG's 3-armed bandit vs DPO", formatter_class=ap.formatter_class)
    p.add_argument("--iters", type=int, default=1500)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--out", default="out/bandit", help="folder for bandit.png and bandit.json")
    return ap


def check_stage_args(ap, args):
    for name in ("n_train", "n_eval", "max_new"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.val_fraction < 1:
        ap.error("--val-fraction must be in [0, 1)")
    if getattr(args, "beta", 1.0) <= 0:
        ap.error("--beta must be > 0")
    if getattr(args, "n_samples", 2) < 1 or getattr(args, "stage1_steps", 1) < 1:
        ap.error("--n-samples and --stage1-steps must be >= 1")
    if getattr(args, "temperature", 1.0) <= 0:
        ap.error("--temperature must be > 0")
    if getattr(args, "k", 2) < 2:
        ap.error("--k must be >= 2 (CoPG compares samples of the same prompt)")


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.stage is None and args.tiny == args.micro:
        ap.error("give a stage (sft, rm, pref, copg, bon, pairwise, bench, bandit) or exactly one of --tiny / --micro")
    if args.stage == "bandit" and (args.iters < 1 or not args.beta > 0):
        ap.error("--iters must be >= 1 and --beta > 0")
    if args.stage not in (None, "bench", "bandit", "pairwise"):
        check_stage_args(ap, args)
    try:                                     # a bad input is one line on stderr and exit status 2, no traceback
        if args.stage is None:
            out = args.pipeline_out or ("out/posttrain_micro" if args.micro else "out/posttrain")
            summary = run_pipeline(args.pipeline_init, out, MICRO_PIPELINE if args.micro else TINY_PIPELINE)
            print(f"wrote {out}/pipeline.md, {out}/pipeline.png and a checkpoint per stage")
            print(json.dumps({k: summary[k] for k in ("stages", "seconds", "pairwise", "retention", "refinement")}))
            return summary
        if args.stage == "bench":
            res = bench(args.init, args.seq_len, args.batch_size, args.rounds)
            print(f"pretraining {res['pretrain_tok_s']:,} tok/s | SFT {res['sft_tok_s']:,} tok/s "
                  f"({res['sft_vs_pretrain']}x; {100 * res['sft_real_tok_frac']:.0f}% of SFT row positions are real "
                  f"tokens, {100 * res['completion_tok_frac']:.1f}% carry loss)")
            print(f"online CoPG: {res['copg_samples_s']} samples/s; {100 * res['copg_sample_frac']:.0f}% of the time "
                  f"sampling, {100 * res['copg_update_frac']:.0f}% scoring + update")
            print(json.dumps(res))
            return res
        if args.stage == "pairwise":
            return run_pairwise(args)
        if args.stage == "bandit":
            summary = run_bandit(args.iters, args.beta, args.out)
            print(json.dumps(summary))
            return summary
        T.check_suites(args.suites)
        result = run_stage(args)
    except (FileNotFoundError, FileExistsError, ValueError, FloatingPointError) as e:
        print(f"posttrain.py{' ' + args.stage if args.stage else ''}: error: {e}", file=sys.stderr)
        sys.exit(2)
    print_table(result)
    print(f"wrote {args.out} (checkpoint, curves.png, result.json)")
    print(json.dumps({k: result[k] for k in ("stage", "before", "after", "seconds") if k in result}
                     | {k: result[k] for k in ("tok_per_s", "timing") if k in result}))
    return result


if __name__ == "__main__":
    main()
