"""
Post-training Command A (report section 3, Figure 3): the methods, each a function beside its equation, and
one training loop that runs them all.

    python posttrain.py sft  --init out/tiny --suites math --out out/math_sft        # completion-only SFT
    python posttrain.py rm   --init out/tiny --suites math,code --out out/rm          # Bradley-Terry reward model
    python posttrain.py pref --loss ipo --init out/tiny --suites safety --out out/safety_ipo
    python posttrain.py copg --online --init out/math_sft --suites math --out out/math_copg
    python posttrain.py bon  --init out/math_sft --suites math --out out/math_bon    # best-of-N -> SFT
    python posttrain.py bandit                                                        # CoPG's 3-armed bandit

What is here, in the report's order (SPEC 6 has every formula with its check values):
  SFT            token-mean NLL on what the assistant wrote (prompt and tool-result tokens carry no loss),
                 whole conversations packed into rows with document masks, preamble augmentation (the same
                 example under varied system preambles and safety modes), drift control (an L2 pull toward
                 the initial weights and/or rows of pretraining data mixed in).
  reward model   the CommandA trunk + a scalar head read at the last non-pad token; Bradley-Terry with an
                 optional margin and centering; two stages (lower-quality pairs, then higher-quality ones).
  offline pref.  DPO, IPO (length-normalized or not), SLiC-HF (and its hinge-norm form), SRPO (one network as
                 generator and self-refiner), IPO + SFT (the safety expert); reference log-probs computed once.
  CoPG           (Flet-Berliac et al. 2024) offline from k scored samples per prompt, and online with 2
                 generations per prompt sampled by serve.Engine from the current policy (= RLOO with k = 2).
  best-of-N      sample N, score by a verifier or the RM, keep the best (SFT data) and best-vs-worst (pairs).

Notation: logp(y|x) is summed over completion tokens only; h(y) = logp_theta(y|x) - logp_ref(y|x);
Delta = h(y_w) - h(y_l). Every loss takes per-example tensors and returns per-example losses.

Precision as pretrain.py: fp32 master weights and Adam state, bf16 matmuls under autocast, log-softmax in fp32.
Checkpoints: `OUT/checkpoint` is swapped in atomically (weights, Adam, step, data position, RNG, logs) and
`--resume` continues bit for bit; the finished stage is an HF Cohere2 checkpoint + tokenizer in OUT.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
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
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data as D
import tasks as T
from model import CommandA, ModelConfig, bf16_is_fast
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------------
# The losses (SPEC 6). Inputs: per-example tensors [N]; outputs: per-example losses [N].


def dpo_loss(h_w, h_l, beta):
    """DPO (Rafailov et al. 2023, Eq. 7): -log sigmoid(beta * Delta). 0.6931 at init; beta=0.1, h_w=2, h_l=-1:
    0.5544. logsigmoid is the stable form of log(sigmoid) for large |Delta|."""
    return -F.logsigmoid(beta * (h_w - h_l))


def ipo_loss(h_w, h_l, beta, len_w=None, len_l=None):
    """IPO (Azar et al. 2023, Eq. 17): (Delta - 1/(2 beta))^2, minimal (0) at Delta = 1/(2 beta), so the policy
    cannot run away from the reference as DPO's can. With lengths, each log-ratio is first divided by its
    completion length (TRL's reading); without, the paper's. beta=0.1: init 25; h_w=2 over 4 tokens, h_l=-1
    over 2: normalized 16, unnormalized 4."""
    if (len_w is None) != (len_l is None):
        raise ValueError("ipo_loss: give both len_w and len_l, or neither")
    if len_w is not None:
        h_w, h_l = h_w / len_w, h_l / len_l
    return (h_w - h_l - 1 / (2 * beta)) ** 2


def hinge_loss(h_w, h_l, beta):
    """SLiC's hinge on the log-ratio margin (the "hinge-norm" form; TRL's loss_type="hinge"): relu(1 - beta *
    Delta). beta=0.1, Delta=3: 0.7; zero loss and zero gradient once beta * Delta >= 1."""
    return F.relu(1 - beta * (h_w - h_l))


def slic_loss(logp_w, logp_l, logp_ref_answer, delta, lam):
    """SLiC-HF (Zhao et al. 2023, Eq. 2): max(0, delta - logp(y_w) + logp(y_l)) - lam * logp(y_ref). A rank
    calibration on the policy's own log-probs plus a regularizer toward a reference ANSWER (the SFT target):
    no reference model is needed."""
    return F.relu(delta - logp_w + logp_l) - lam * logp_ref_answer


def srpo_loss(h_w_given_l, h_l_given_l, h_w_given_w, h_l_given_w, h_w, h_l, beta=0.1, a=0.8):
    """SRPO (Choi et al. 2024, arXiv 2406.01660), SPEC 6's reading of its offline loss. One network is both
    the generator pi(y|x) and the self-refiner pi(y|x, draft) (the revision prompt holds the draft); h(a|b) is
    the log-ratio of answer a revising draft b:
      L_self = (1/2 - beta[h(y_w|y_l) - h(y_l|y_l)])^2 + (1/2 - beta[h(y_w|y_w) - h(y_l|y_w)])^2
      L_gen  = (beta[h(y_w|y_l) + h(y_w) - h(y_l|y_w) - h(y_l)] - 1)^2
      L = (1 - a) L_gen + a L_self.    At init (every h = 0): 0.2 * 1 + 0.8 * 0.5 = 0.6."""
    l_self = (0.5 - beta * (h_w_given_l - h_l_given_l)) ** 2 + (0.5 - beta * (h_w_given_w - h_l_given_w)) ** 2
    l_gen = (beta * (h_w_given_l + h_w - h_l_given_w - h_l) - 1) ** 2
    return (1 - a) * l_gen + a * l_self


def ipo_sft_loss(h_w, h_l, beta, nll_w, len_w=None, len_l=None):
    """The safety expert's objective (report 3.3.3): IPO + SFT on the chosen answer, equal weight. nll_w is the
    chosen completion's token-mean negative log-likelihood."""
    return ipo_loss(h_w, h_l, beta, len_w, len_l) + nll_w


def bt_loss(r_w, r_l, margin=0.0, center=0.0):
    """Bradley-Terry reward-model loss: -log sigmoid(r_w - r_l - margin) + center * (r_w + r_l)^2. The
    centering term (eta ~ 0.01) pins the reward's free offset near 0. r_w=1, r_l=0: 0.3133; margin 0.5: 0.4741."""
    return -F.logsigmoid(r_w - r_l - margin) + center * (r_w + r_l) ** 2


def copg_loss(rewards, h, beta):
    """CoPG (Flet-Berliac et al. 2024, arXiv 2406.19185). rewards and h are [prompts, k]: k completions per
    prompt. For every pair (y, y') of a prompt: (R(y) - R(y') - beta (h(y) - h(y')))^2, averaged over the
    k(k-1)/2 pairs -> [prompts]. Zero for every pair exactly when pi ~ pi_ref exp(R / beta), whatever policy
    sampled the pair: so it learns offline, and on-policy its gradient is RLOO's (k = 2) on the KL-shaped
    reward R - beta h (tests check both)."""
    if rewards.shape != h.shape or rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"copg_loss: rewards and h must both be [prompts, k >= 2], got "
                         f"{tuple(rewards.shape)} and {tuple(h.shape)}")
    i, j = torch.triu_indices(h.shape[1], h.shape[1], offset=1, device=h.device)
    d = (rewards[:, i] - rewards[:, j]) - beta * (h[:, i] - h[:, j])     # [prompts, pairs]
    return (d ** 2).mean(dim=1)


PREF_LOSSES = ("dpo", "ipo", "hinge", "slic", "srpo", "ipo_sft")

# ----------------------------------------------------------------------------------------------------------
# Log-probabilities of completions: one forward, the LM head only where a completion token is predicted


def sequence_logps(model: CommandA, batch: dict, n_seqs: int | None = None):
    """Summed completion log-probs and completion lengths per sequence, for a packed or padded batch.

    batch: input_ids, targets (-100 where no loss: prompts, padding, document boundaries), position_ids and
    doc_ids [B, T]; doc_ids number the sequences (packed: several per row, data.pack_whole; padded: one per
    row, pads -1). Returns (logp [n_seqs], length [n_seqs]) in fp32, differentiable through logp.
    The hidden states of every token are computed (attention needs them), but the vocabulary projection and
    log-softmax only at the completion tokens: a chat row is mostly preamble and prompt."""
    h = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"],
              return_hidden=True)
    sel = batch["targets"] != -100
    logits = model.lm_logits(h[sel])                                  # [M, V] fp32
    lp = -F.cross_entropy(logits, batch["targets"][sel], reduction="none")
    seq = batch["doc_ids"][sel].long()
    n = int(n_seqs if n_seqs is not None else (int(seq.max()) + 1 if seq.numel() else 0))
    logp = torch.zeros(n, device=lp.device, dtype=lp.dtype).index_add(0, seq, lp)
    length = torch.zeros(n, device=lp.device).index_add(0, seq, torch.ones_like(lp))
    return logp, length


def policy_and_ref_logps(policy, ref, batch, n_seqs, autocast_kw):
    """One forward with gradients for the policy, one without for the reference (SPEC 6's h = logp - logp_ref)."""
    with torch.autocast(**autocast_kw):
        logp, length = sequence_logps(policy, batch, n_seqs)
        with torch.no_grad():
            ref_logp, _ = sequence_logps(ref, batch, n_seqs)
    return logp, ref_logp, length


def packed_batch(seqs: list, seq_len: int, pad_id: int, device="cpu") -> dict:
    """Sequences [(ids, loss_mask)] packed whole into rows (data.pack_whole); doc_ids = sequence index."""
    p = D.pack_whole([s[0] for s in seqs], seq_len, pad_id, [s[1] for s in seqs])
    return {k: v.to(device) for k, v in p.batch(list(range(len(p)))).items()}


def padded_batch(seqs: list, pad_id: int, side: str = "right", device="cpu") -> dict:
    """One sequence per row, padded left or right; pads get doc_id -1 (nobody attends to them, they attend only
    to each other) and positions that start at 0 on the first real token, so both sides give the same result."""
    Tm = max(len(s[0]) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, Tm), pad_id, dtype=torch.long)
    doc = torch.full((B, Tm), -1, dtype=torch.long)
    pos = torch.zeros((B, Tm), dtype=torch.long)
    tgt = torch.full((B, Tm), -100, dtype=torch.long)
    for r, (s, m) in enumerate(seqs):
        L = len(s)
        o = Tm - L if side == "left" else 0
        ids[r, o:o + L], doc[r, o:o + L], pos[r, o:o + L] = torch.tensor(s), r, torch.arange(L)
        t = torch.tensor(s[1:] + [0])
        t[torch.tensor(m[1:] + [0]) == 0] = -100      # the target of token i is token i+1, if it is trained
        tgt[r, o:o + L] = t
    return {k: v.to(device) for k, v in dict(input_ids=ids, targets=tgt, position_ids=pos, doc_ids=doc).items()}


# ----------------------------------------------------------------------------------------------------------
# Data: tasks.py examples rendered in the chat format, completions as token lists


PREAMBLES = [None, "You are a helpful assistant.", "Be concise and accurate.",
             "You are Command, an assistant for enterprise users. Follow the user's instructions exactly.",
             "Answer the user's question directly."]
REVISE = "Improve your previous answer."         # SRPO's self-refinement turn (the draft is in the history)


def with_preamble(ex: T.Example, preamble: str | None, safety_mode: str | None = None) -> T.Example:
    """The same example under another developer preamble (a system message) and/or safety mode. A preamble is
    only added where the example has no system message of its own (those carry the task's constraint)."""
    msgs = ex.messages
    if preamble and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": preamble}] + msgs
    return T.Example(ex.suite, ex.id, msgs, ex.reference, ex.turns, ex.documents, ex.tools,
                     safety_mode or ex.safety_mode, ex.difficulty, ex.check)


def render(tok: Tokenizer, ex: T.Example, turns=None) -> tuple[list, list]:
    """(ids, loss_mask) of the whole conversation: mask 1 on every token an assistant turn wrote (EOT included:
    the model must learn to stop), 0 on the preamble, prompts, documents and tool results."""
    return tok.render_chat(ex.messages + (ex.turns if turns is None else turns), ex.documents, ex.tools,
                           ex.safety_mode, add_generation_prompt=False, return_mask=True)


def completion_ids(tok: Tokenizer, ex: T.Example, turn: dict | None = None) -> list:
    """The tokens the model writes for an assistant message (the reference's by default), EOT included."""
    turn = turn if turn is not None else ex.turns[-1]
    prompt = ex.prompt_ids(tok)
    ids, _ = tok.render_chat(ex.messages + [turn], ex.documents, ex.tools, ex.safety_mode,
                             add_generation_prompt=False, return_mask=True)
    assert ids[:len(prompt)] == prompt, "the generation prompt must be a prefix of the rendered conversation"
    return ids[len(prompt):]


def revision_prompt(tok: Tokenizer, prompt: list, draft: list) -> list:
    """SRPO's self-refinement prompt: the original prompt, the draft as the assistant's turn, then a user turn
    asking for a better answer (special tokens by id; the instruction is plain text)."""
    s = tok.special_ids
    draft = draft if draft and draft[-1] == tok.eot_id else draft + [tok.eot_id]
    return (prompt + draft + [s["<|START_OF_TURN_TOKEN|>"], s["<|USER_TOKEN|>"]] + tok.encode(REVISE) +
            [tok.eot_id, s["<|START_OF_TURN_TOKEN|>"], s["<|CHATBOT_TOKEN|>"]])


def seq(prompt: list, completion: list) -> tuple[list, list]:
    return prompt + completion, [0] * len(prompt) + [1] * len(completion)


def sft_sequences(tok, examples, max_len, augment=0, seed=0) -> tuple[list, int]:
    """Rendered SFT sequences; with augment=k, k extra copies of each example under a random developer preamble
    and (outside the safety suite, whose answer depends on the mode) a random safety mode. Sequences longer
    than max_len + 1 tokens are dropped and counted."""
    rng = random.Random(seed)
    out, dropped = [], 0
    for ex in examples:
        variants = [ex]
        for _ in range(augment):
            mode = None if ex.suite == "safety" else rng.choice(["CONTEXTUAL", "STRICT"])
            variants.append(with_preamble(ex, rng.choice(PREAMBLES[1:]), mode))
        for v in variants:
            s = render(tok, v)
            if len(s[0]) > max_len + 1:
                dropped += 1
            else:
                out.append(s)
    return out, dropped


def pretrain_rows(tok, seq_len, n_docs=400, seed=0) -> D.PackedData:
    """Drift control's pretraining data: data.py's synthetic documents (the educational part of the pretraining
    mix), packed as pretraining packs them (every token a target)."""
    docs = D.synthetic_prose(n_docs, seed) + D.synthetic_math(n_docs, seed) + D.synthetic_code(n_docs, seed)
    return D.pack_documents(docs, tok.encode, tok.bos_id, seq_len, tok.pad_id)


def split_train_val(examples, val_fraction):
    """A validation set carved from the train split by a hash of each example's id (never trained on)."""
    def u(ex):
        return int(hashlib.sha256(f"val|{ex.id}".encode()).hexdigest()[:8], 16) / 16 ** 8
    return [e for e in examples if u(e) >= val_fraction], [e for e in examples if u(e) < val_fraction]


def load_examples(suites, n, split, seed=0, difficulty=1) -> list:
    """n examples of each suite's split (train or test), interleaved so every batch mixes the suites."""
    per = [T.SUITES[s].generate(seed, n, split, difficulty=min(difficulty, T.SUITES[s].max_difficulty))
           for s in T.check_suites(suites)]
    return [ex for group in zip(*per) for ex in group] if per else []


# ----------------------------------------------------------------------------------------------------------
# Sampling and scoring: serve.Engine from the current weights, tasks.py's verifiers (or the reward model)


def make_engine(model, tok, max_len=None):
    return T.make_engine(model, tok, max_batch=32, max_len=max_len or model.config.max_position_embeddings)


def sample(engine, tok, examples, n, temperature=1.0, max_new=96, seed=0, top_k=None):
    """n completions per example: [[completion token ids (EOT appended when the model stopped)]]. The Engine's
    fused decode weights follow the policy's parameters (refreshed when a parameter's version changes)."""
    prompts = [ex.prompt_ids(tok) for ex in examples for _ in range(n)]
    for i, p in enumerate(prompts):
        if len(p) + max_new > engine.max_len:
            raise ValueError(f"example {examples[i // n].id}: prompt of {len(p)} tokens + {max_new} new tokens "
                             f"exceeds the context ({engine.max_len})")
    outs = engine.generate(prompts, max_new, temperature=temperature, top_k=top_k, seed=seed)
    outs = [o + [tok.eot_id] if len(o) < max_new else o for o in outs]
    return [outs[i * n:(i + 1) * n] for i in range(len(examples))]


def verifier_rewards(tok, examples, completions) -> list:
    """tasks.py's verifier score in [0, 1] of every completion: [[float]]."""
    return [[T.SUITES[ex.suite].score(ex, tok.decode(c)) for c in cs] for ex, cs in zip(examples, completions)]


def score_suites(model, tok, examples, max_new=96) -> dict:
    """Mean verifier score per suite (greedy), on the given examples (tasks.complete drives ReAct for tools)."""
    engine = make_engine(model, tok)
    by = {}
    for ex in examples:
        by.setdefault(ex.suite, []).append(ex)
    out = {}
    for name, exs in by.items():
        recs = T.complete(engine, tok, exs, max_new)
        out[name] = sum(0.0 if r["error"] else T.SUITES[name].score(e, r["completion"])
                        for e, r in zip(exs, recs)) / len(exs)
    model.train()
    return out


# ----------------------------------------------------------------------------------------------------------
# The reward model: the CommandA trunk + a scalar head on the last token (report 3.2, "Reward Models")


class RewardModel(CommandA):
    """CommandA whose output is one scalar per sequence: `score` (H -> 1, HF's Cohere2ForSequenceClassification
    name) applied to the final-norm hidden state of the sequence's LAST token (the assistant's end of turn).
    Saved like any checkpoint (config.json + safetensors, the head one extra tensor), so from_pretrained
    loads it; CommandA.from_pretrained refuses it (an unexpected tensor), as it should."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)
        if not self.score.weight.is_meta:
            nn.init.zeros_(self.score.weight)       # every sequence starts at reward 0

    @classmethod
    def from_lm(cls, path: str) -> "RewardModel":
        """A reward model initialized from a language-model checkpoint (the head starts at zero)."""
        lm = CommandA.from_pretrained(path)
        rm = cls(lm.config)
        missing, unexpected = rm.load_state_dict(lm.state_dict(), strict=False)
        assert missing == ["score.weight"] and not unexpected
        return rm

    def rewards(self, batch: dict, n_seqs: int | None = None) -> torch.Tensor:
        """[n_seqs] rewards of the sequences of a packed or padded batch (doc_ids number them, pads are -1)."""
        h = self(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"],
                 return_hidden=True)
        doc = batch["doc_ids"].reshape(-1)
        n = int(n_seqs if n_seqs is not None else int(doc.max()) + 1)
        flat = torch.arange(doc.numel(), device=doc.device)
        real = doc >= 0
        last = torch.full((n,), -1, dtype=torch.long, device=doc.device).scatter_reduce(
            0, doc[real], flat[real], reduce="amax")               # each sequence's last token
        if (last < 0).any():
            raise ValueError("rewards: a sequence has no tokens in this batch")
        return self.score(h.reshape(-1, h.shape[-1])[last]).float().squeeze(-1)

    @torch.no_grad()
    def score_conversations(self, tok: Tokenizer, conversations: list, batch_size: int = 16) -> list:
        """Rewards of whole conversations [(messages, documents, tools, safety_mode) or messages], batched."""
        out, device = [], next(self.parameters()).device
        was = self.training
        self.eval()
        for i in range(0, len(conversations), batch_size):
            seqs = []
            for c in conversations[i:i + batch_size]:
                msgs, docs, tools, mode = (c, None, None, "CONTEXTUAL") if isinstance(c, list) else c
                ids = tok.render_chat(msgs, docs, tools, mode, add_generation_prompt=False)
                seqs.append((ids, [0] * len(ids)))
            out += self.rewards(padded_batch(seqs, tok.pad_id, device=device), len(seqs)).tolist()
        self.train(was)
        return out

    def save(self, path: str, tok: Tokenizer):
        self.save_pretrained(path, extra_config={"architectures": ["Cohere2ForSequenceClassification"],
                                                 "num_labels": 1, "pad_token_id": tok.pad_id})
        tok.save(path)

    @classmethod
    def load(cls, path: str, tok: Tokenizer | None = None) -> "RewardModel":
        """A saved reward model; with `tok`, refuses one trained with another tokenizer."""
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"no reward model in {path} (config.json missing): train one with "
                                    f"`python posttrain.py rm --out {path}`")
        if tok is not None:
            check_same_tokenizer(tok, path, "reward model")
        try:
            return cls.from_pretrained(path)
        except ValueError as e:
            raise ValueError(f"{path} is not a reward model of this architecture: {e}") from None


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    h = hashlib.sha256()
    for r in tok.ranks:
        h.update(bytes(r) + b"\x00")
    h.update(json.dumps(sorted(tok.special_ids.items())).encode())
    return h.hexdigest()[:16]


def check_same_tokenizer(tok: Tokenizer, path: str, what: str):
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise ValueError(f"the {what} in {path} has no tokenizer.json: cannot check it shares the policy's "
                         f"tokenizer")
    other = Tokenizer.load(path)
    if tokenizer_fingerprint(other) != tokenizer_fingerprint(tok):
        raise ValueError(f"the {what} in {path} was trained with another tokenizer (vocabulary "
                         f"{other.vocab_size} vs {tok.vocab_size}, or different merges): its token ids mean "
                         f"other things")


def check_same_architecture(a: ModelConfig, b: ModelConfig, what: str):
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    diff = [f"{f} {getattr(b, f)} vs {getattr(a, f)}" for f in fields if getattr(a, f) != getattr(b, f)]
    if diff:
        raise ValueError(f"the {what} has another architecture than the policy: " + ", ".join(diff))


# ----------------------------------------------------------------------------------------------------------
# One training loop for every objective


@dataclass
class StageConfig:
    steps: int = 100                  # optimizer steps
    batch_size: int = 8               # rows (SFT) / pairs (RM, preference) / prompts (CoPG) per micro-batch
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 1e-4                  # AdamW peak LR (fp32 master weights); warmup, then linear decay to 10%
    warmup_frac: float = 0.1
    weight_decay: float = 0.0         # post-training starts from a trained model: no decay toward zero
    clip: float = 1.0                 # global gradient-norm clip
    eval_every: int = 50              # steps between validation evaluations (and at the end)
    ckpt_every: int = 50              # steps between checkpoints (and at the end)
    early_stop: int = 0               # stop after this many evaluations without a better validation score
    seed: int = 0
    fp32: bool = False                # bf16 autocast off


def validate_stage(cfg: StageConfig):
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "ckpt_every"):
        if not (isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 1):
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(cfg, name)!r}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)) or not (cfg.clip > 0 and math.isfinite(cfg.clip)):
        raise ValueError("--lr and --clip must be positive numbers")
    if not 0 <= cfg.warmup_frac < 1:
        raise ValueError("--warmup-frac must be in [0, 1)")


def lr_at(step: int, cfg: StageConfig) -> float:
    warm = max(1, round(cfg.warmup_frac * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * (1 - 0.9 * (step - warm) / max(1, cfg.steps - warm))


class Indices:
    """A 'dataset' of item indices, so data.Loader's exactly resumable shuffling serves pairs and prompts too."""
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def batch(self, rows):
        return list(rows)


def save_state(out, model, opt, step, loaders, log, cfg, fingerprint):
    """OUT/checkpoint, swapped in whole: a kill leaves the previous one or this one, never a mix."""
    ckpt, tmp, old = (os.path.join(out, n) for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(),
                "meta": json.dumps({"config": asdict(cfg), "fingerprint": fingerprint, "log": log,
                                    "loaders": {k: l.state_dict() for k, l in loaders.items()},
                                    "python_rng": _jsonable(random.getstate()),
                                    "numpy_rng": _jsonable(np.random.get_state())})},
               os.path.join(tmp, "train_state.pt"))
    if os.path.exists(ckpt):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)
    shutil.rmtree(old, ignore_errors=True)


def _jsonable(state):
    return [x.tolist() if isinstance(x, np.ndarray) else list(x) if isinstance(x, tuple) else x for x in state]


def load_state(out, model, opt, loaders, cfg, fingerprint):
    ckpt = os.path.join(out, "checkpoint")
    if not os.path.isdir(ckpt) and os.path.isdir(ckpt + ".old"):
        ckpt += ".old"                               # killed between the two renames
    state = torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=True)   # tensors and JSON only
    meta = json.loads(state["meta"])
    if meta["fingerprint"] != fingerprint:
        raise ValueError(f"{out}/checkpoint was made by another stage configuration or data; start over "
                         f"without --resume (or another --out)")
    saved = {k: v for k, v in meta["config"].items() if k not in ("eval_every", "ckpt_every", "early_stop")}
    now = {k: v for k, v in asdict(cfg).items() if k in saved}
    if saved != now:
        raise ValueError(f"--resume: {out}/checkpoint was trained with other settings: " +
                         ", ".join(f"{k}={saved[k]!r} (now {now[k]!r})" for k in saved if saved[k] != now[k]))
    loaded = type(model).from_pretrained(ckpt)
    with torch.no_grad():
        for p, q in zip(model.parameters(), loaded.parameters()):
            p.copy_(q)
    opt.load_state_dict(state["optimizer"])
    for k, l in loaders.items():
        l.load_state_dict(meta["loaders"][k])
    torch.set_rng_state(state["torch_rng"])
    py = meta["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npr = meta["numpy_rng"]
    np.random.set_state((npr[0], np.array(npr[1], dtype=np.uint32), *npr[2:]))
    return state["step"], meta["log"]


def has_state(out) -> bool:
    return any(os.path.isfile(os.path.join(out, d, "train_state.pt")) for d in ("checkpoint", "checkpoint.old"))


def train_loop(model, objective, loaders: dict, cfg: StageConfig, out: str, evaluate=None, resume=False,
               fingerprint="", desc="train", verbose=True) -> dict:
    """AdamW on fp32 master weights, bf16 autocast, gradient accumulation and clipping, a progress bar with the
    objective's metrics, validation every eval_every steps (and early stopping on it, if asked), atomic
    checkpoints with exact resume. objective(batch) -> (loss, {metric: float}); loaders["main"] feeds it
    (other loaders, e.g. pretraining rows, are saved and resumed alongside). Returns the log."""
    validate_stage(cfg)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(cfg.seed), random.seed(cfg.seed), np.random.seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
    step, log = 0, {"loss": [], "metrics": [], "val": [], "seconds": 0.0}
    if resume and has_state(out):
        step, log = load_state(out, model, opt, loaders, cfg, fingerprint)
        if verbose:
            print(f"{desc}: resumed from {out}/checkpoint at step {step}")
    crash_at = int(os.environ.get("POSTTRAIN_CRASH_AT_STEP", "0"))     # test hook: die like a killed job
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, disable=not verbose, dynamic_ncols=True)
    model.train()
    t0 = time.time() - log["seconds"]
    best, since_best = max([v["score"] for v in log["val"]], default=-math.inf), 0
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss_sum, msum = 0.0, {}
        for _ in range(cfg.grad_accum):
            loss, metrics = objective(next(loaders["main"]))
            if not torch.isfinite(loss):
                bar.close()
                raise FloatingPointError(f"{desc}: non-finite loss ({loss.item()}) at step {step + 1}; the last "
                                         f"good checkpoint is in {out}/checkpoint. Lower --lr (now {cfg.lr}).")
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            for k, v in metrics.items():
                msum[k] = msum.get(k, 0.0) + v / cfg.grad_accum
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        if not torch.isfinite(gnorm):
            bar.close()
            raise FloatingPointError(f"{desc}: non-finite gradient norm at step {step + 1}, before the update; "
                                     f"the last good checkpoint is in {out}/checkpoint. Lower --lr.")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        log["loss"].append(loss_sum)
        log["metrics"].append({k: round(v, 5) for k, v in msum.items()})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", **{k: f"{v:.3g}" for k, v in msum.items()})
        if step == crash_at:
            os._exit(17)
        stop_early = False
        if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            v = evaluate()
            log["val"].append({"step": step, **v})
            bar.write(f"{desc} step {step}: validation " + ", ".join(f"{k} {x:.4f}" for k, x in v.items()))
            if v["score"] > best:
                best, since_best = v["score"], 0
            else:
                since_best += 1
                stop_early = cfg.early_stop > 0 and since_best >= cfg.early_stop
            model.train()
        log["seconds"] = time.time() - t0
        if step % cfg.ckpt_every == 0 or step == cfg.steps or stop_early:
            save_state(out, model, opt, step, loaders, log, cfg, fingerprint)
        if stop_early:
            bar.write(f"{desc}: validation score has not improved for {cfg.early_stop} evaluations: stopping")
            break
    bar.close()
    log["steps_done"] = step
    return log


def autocast_kw(device, fp32=False) -> dict:
    """bf16 autocast where bf16 matmuls are fast (GPUs, CPUs with AVX512-BF16/AMX); fp32 elsewhere."""
    device = torch.device(device)
    return {"device_type": device.type, "dtype": torch.bfloat16, "enabled": not fp32 and bf16_is_fast(device)}


# ----------------------------------------------------------------------------------------------------------
# The objectives: batch -> (loss, metrics)


def completion_nll(model, batch):
    """Token-mean NLL over the target tokens (completion-only for chat rows, every token for pretraining rows)."""
    h = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"], return_hidden=True)
    sel = batch["targets"] != -100
    if not sel.any():
        raise ValueError("a batch with no completion tokens: every example's answer was cut or empty")
    return F.cross_entropy(model.lm_logits(h[sel]), batch["targets"][sel])


def sft_objective(model, ac, l2_init=0.0, pretrain_loader=None, pretrain_weight=0.0):
    """SFT with drift control: + l2_init/2 ||theta - theta_0||^2 (a pull toward the starting weights) and/or
    (1 - w) NLL_sft + w NLL_pretrain on rows of pretraining data (w = pretrain_weight)."""
    init = [p.detach().clone() for p in model.parameters()] if l2_init > 0 else None

    def objective(batch):
        with torch.autocast(**ac):
            loss = completion_nll(model, batch)
            m = {"nll": loss.item()}
            if pretrain_loader is not None and pretrain_weight > 0:
                pre = completion_nll(model, next(pretrain_loader))
                loss = (1 - pretrain_weight) * loss + pretrain_weight * pre
                m["pretrain_nll"] = pre.item()
        if init is not None:
            drift = sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), init))
            loss = loss + 0.5 * l2_init * drift
            m["drift"] = drift.item()
        return loss, m
    return objective


def pair_sequences(tok, pair: dict, loss: str) -> list:
    """The sequences a preference loss reads, in a fixed role order: (y_w, y_l) and, for SRPO, the four
    revisions (y_w|y_l, y_l|y_l, y_w|y_w, y_l|y_w): answer given the draft in the revision prompt."""
    p, w, l = pair["prompt"], pair["chosen"], pair["rejected"]
    out = [seq(p, w), seq(p, l)]
    if loss == "srpo":
        out += [seq(revision_prompt(tok, p, l), w), seq(revision_prompt(tok, p, l), l),
                seq(revision_prompt(tok, p, w), w), seq(revision_prompt(tok, p, w), l)]
    return out


def check_pairs(pairs: list):
    if not pairs:
        raise ValueError("no preference pairs: the data set is empty (every candidate scored the same?)")
    same = sum(p["chosen"] == p["rejected"] for p in pairs)
    if same:
        raise ValueError(f"{same} of {len(pairs)} preference pairs have identical chosen and rejected "
                         f"completions: they carry no preference")


@torch.no_grad()
def reference_logps(ref, tok, items: list, seqs_of, seq_len, ac, batch_size=16) -> torch.Tensor:
    """Reference log-probs of every item's sequences, computed once before training: [items, roles]."""
    ref.eval()
    device = next(ref.parameters()).device
    rows = []
    for i in tqdm(range(0, len(items), batch_size), desc="reference log-probs", leave=False):
        seqs = [s for it in items[i:i + batch_size] for s in seqs_of(it)]
        with torch.autocast(**ac):
            lp, _ = sequence_logps(ref, packed_batch(seqs, seq_len, tok.pad_id, device), len(seqs))
        rows.append(lp.float().view(min(batch_size, len(items) - i), -1))
    return torch.cat(rows)


def pref_objective(model, tok, pairs, ref_logps, loss, beta, seq_len, ac, normalize=True, delta=1.0, lam=0.1):
    """Offline preference optimization on (prompt, chosen, rejected) with cached reference log-probs."""
    if loss not in PREF_LOSSES:
        raise ValueError(f"unknown preference loss {loss!r}: choose from {', '.join(PREF_LOSSES)}")
    device = next(model.parameters()).device

    def objective(idx):
        seqs = [s for i in idx for s in pair_sequences(tok, pairs[i], loss)]
        with torch.autocast(**ac):
            lp, length = sequence_logps(model, packed_batch(seqs, seq_len, tok.pad_id, device), len(seqs))
        lp, length = lp.view(len(idx), -1), length.view(len(idx), -1)
        h = lp - ref_logps[idx].to(device)
        hw, hl, lw, ll = h[:, 0], h[:, 1], length[:, 0], length[:, 1]
        if loss == "dpo":
            per = dpo_loss(hw, hl, beta)
        elif loss == "ipo":
            per = ipo_loss(hw, hl, beta, lw, ll) if normalize else ipo_loss(hw, hl, beta)
        elif loss == "hinge":
            per = hinge_loss(hw, hl, beta)
        elif loss == "slic":      # y_ref: the chosen answer (the SFT target), its log-prob normalized per token
            per = slic_loss(lp[:, 0] / lw, lp[:, 1] / ll, lp[:, 0] / lw, delta, lam)
        elif loss == "srpo":
            per = srpo_loss(h[:, 2], h[:, 3], h[:, 4], h[:, 5], hw, hl, beta)
        else:                     # ipo_sft: the safety expert
            per = ipo_sft_loss(hw, hl, beta, -lp[:, 0] / lw, *((lw, ll) if normalize else (None, None)))
        return per.mean(), {"margin": (hw - hl).mean().item(), "acc": (hw > hl).float().mean().item(),
                            "h": h[:, :2].mean().item()}
    return objective


def rm_objective(rm, tok, pairs, seq_len, ac, margin=0.0, center=0.01):
    device = next(rm.parameters()).device

    def objective(idx):
        seqs = [s for i in idx for s in pair_sequences(tok, pairs[i], "rm")]
        with torch.autocast(**ac):
            r = rm.rewards(packed_batch(seqs, seq_len, tok.pad_id, device), len(seqs)).view(len(idx), 2)
        m = torch.tensor([pairs[i].get("margin", margin) for i in idx], device=device)
        return bt_loss(r[:, 0], r[:, 1], m, center).mean(), {"acc": (r[:, 0] > r[:, 1]).float().mean().item(),
                                                              "r": r.mean().item()}
    return objective


@torch.no_grad()
def rm_accuracy(rm, tok, pairs, seq_len, ac, batch_size=16) -> float:
    rm.eval()
    device, right = next(rm.parameters()).device, 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        seqs = [s for p in chunk for s in pair_sequences(tok, p, "rm")]
        with torch.autocast(**ac):
            r = rm.rewards(packed_batch(seqs, seq_len, tok.pad_id, device), len(seqs)).view(len(chunk), 2)
        right += int((r[:, 0] > r[:, 1]).sum())
    rm.train()
    return right / max(1, len(pairs))


def copg_offline_objective(model, tok, groups, ref_logps, beta, seq_len, ac):
    """groups: [{"prompt", "completions": [k], "rewards": [k]}]; ref_logps [groups, k] cached."""
    device = next(model.parameters()).device

    def objective(idx):
        seqs = [seq(groups[i]["prompt"], c) for i in idx for c in groups[i]["completions"]]
        with torch.autocast(**ac):
            lp, _ = sequence_logps(model, packed_batch(seqs, seq_len, tok.pad_id, device), len(seqs))
        h = lp.view(len(idx), -1) - ref_logps[idx].to(device)
        R = torch.tensor([groups[i]["rewards"] for i in idx], device=device, dtype=h.dtype)
        return copg_loss(R, h, beta).mean(), {"reward": R.mean().item(), "h": h.mean().item()}
    return objective


def copg_online_objective(model, ref, tok, examples, beta, seq_len, ac, reward_fn, max_new=64, k=2,
                          temperature=1.0, seed=0, timing=None):
    """Online CoPG (report 3.3.4, polishing): k = 2 generations per prompt sampled by serve.Engine from the
    CURRENT policy, scored, then the CoPG step. On-policy this is RLOO with k = 2 on R - beta h; the mean of
    h over the samples estimates KL(pi || pi_ref). timing accumulates sampling vs update seconds."""
    engine = make_engine(model, tok)
    device = next(model.parameters()).device
    calls = [0]

    def objective(idx):
        t0 = time.time()
        exs = [examples[i] for i in idx]
        comps = sample(engine, tok, exs, k, temperature, max_new, seed=seed * 1_000_003 + calls[0] * 997)
        calls[0] += 1
        R = torch.tensor(reward_fn(exs, comps), dtype=torch.float32, device=device)
        model.train()                               # the Engine put it in eval mode
        t1 = time.time()
        seqs = [seq(ex.prompt_ids(tok), c) for ex, cs in zip(exs, comps) for c in cs]
        lp, ref_lp, _ = policy_and_ref_logps(model, ref, packed_batch(seqs, seq_len, tok.pad_id, device),
                                             len(seqs), ac)
        h = (lp - ref_lp).view(len(idx), k)
        loss = copg_loss(R, h, beta).mean()
        if timing is not None:
            timing["sample"] += t1 - t0
            timing["update_forward"] += time.time() - t1
            timing["samples"] += len(seqs)
        return loss, {"reward": R.mean().item(), "kl": h.mean().item()}
    return objective


# ----------------------------------------------------------------------------------------------------------
# Building preference data: best-of-N from the model's own samples, scored by a verifier or the reward model


def best_of_n(engine, tok, examples, n, reward_fn, temperature=1.0, max_new=64, seed=0, min_best=0.5):
    """Sample n per prompt, score them, keep the best as SFT data (if it scores >= min_best) and best-vs-worst
    as a preference pair (if they differ in score and in tokens). Returns (sft [(ids, mask)], pairs, stats)."""
    comps = sample(engine, tok, examples, n, temperature, max_new, seed)
    scores = reward_fn(examples, comps)
    sft, pairs = [], []
    for ex, cs, sc in zip(examples, comps, scores):
        order = sorted(range(len(cs)), key=lambda i: -sc[i])
        b, w = order[0], order[-1]
        prompt = ex.prompt_ids(tok)
        if sc[b] >= min_best:
            sft.append(seq(prompt, cs[b]))
        if sc[b] > sc[w] and cs[b] != cs[w]:
            pairs.append({"prompt": prompt, "chosen": cs[b], "rejected": cs[w], "suite": ex.suite,
                          "gap": sc[b] - sc[w]})
    flat = [s for sc in scores for s in sc]
    return sft, pairs, {"mean_score": sum(flat) / max(1, len(flat)), "best_mean": sum(max(s) for s in scores) /
                        max(1, len(scores)), "sft": len(sft), "pairs": len(pairs)}


def reference_pairs(tok, examples, seed=0) -> list:
    """Pairs without sampling: the reference answer against the reference of ANOTHER example of the same suite
    (a fluent, on-format, wrong answer), kept only where the verifier scores it lower. Cheap and clean, but
    off-policy: the reward model's lower-quality first stage, and a fallback for preference tuning."""
    rng = random.Random(seed)
    by = {}
    for ex in examples:
        by.setdefault(ex.suite, []).append(ex)
    pairs = []
    for ex in examples:
        others = [o for o in by[ex.suite] if o.id != ex.id]
        rng.shuffle(others)
        for o in others[:4]:
            suite = T.SUITES[ex.suite]
            if suite.score(ex, o.reference) < suite.score(ex, ex.reference):
                chosen, rejected = completion_ids(tok, ex), completion_ids(tok, ex, o.turns[-1])
                if chosen != rejected:
                    pairs.append({"prompt": ex.prompt_ids(tok), "chosen": chosen, "rejected": rejected,
                                  "suite": ex.suite})
                    break
    return pairs


def rm_reward_fn(rm, tok):
    """Rewards of sampled completions by the reward model (policy and RM share the tokenizer: checked)."""
    def fn(examples, comps):
        seqs = [seq(ex.prompt_ids(tok), c) for ex, cs in zip(examples, comps) for c in cs]
        device = next(rm.parameters()).device
        with torch.no_grad():
            r = rm.rewards(padded_batch(seqs, tok.pad_id, device=device), len(seqs)).tolist()
        k = len(comps[0])
        return [r[i * k:(i + 1) * k] for i in range(len(examples))]
    return fn


def verifier_reward_fn(tok):
    return lambda examples, comps: verifier_rewards(tok, examples, comps)


# ----------------------------------------------------------------------------------------------------------
# CoPG's bandit (Flet-Berliac et al. 2024, section 5.1): offline CoPG finds pi* from any behaviour policy


BANDIT_R = (2.5, 2.0, 1.0)
BANDIT_MU = {"mu1": (0.1, 0.2, 0.7), "mu2": (0.05, 0.05, 0.9)}


def kl(p, q) -> float:
    return float((p * (p / q).log()).sum())


def bandit(iters=3000, beta=0.5, batch=256, lr=0.05, seed=0, method="copg"):
    """3 arms with rewards R, a uniform pi_ref, a softmax policy. Each iteration draws `batch` pairs of arms from
    a fixed behaviour policy mu (offline: pi never samples) and takes an Adam step on
      copg: (R(y) - R(y') - beta (h(y) - h(y')))^2        -> pi* = pi_ref exp(R / beta) / Z, from any mu
      dpo:  -log sigmoid(beta (h(y_w) - h(y_l))), the higher-reward arm labelled the winner (ties dropped):
            the loss only falls as the margins grow, so pi keeps sliding toward the best arm, away from pi*.
    Returns {mu_name: {"pi": final pi, "trace": pi every 10 iterations, "kl_to_pi_star": KL(pi* || pi)}}."""
    R = torch.tensor(BANDIT_R, dtype=torch.float64)
    log_ref = torch.full((3,), -math.log(3), dtype=torch.float64)
    pi_star = torch.softmax(log_ref + R / beta, 0)
    out = {}
    for name, mu in BANDIT_MU.items():
        g = torch.Generator().manual_seed(seed)
        logits = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([logits], lr=lr)
        trace = []
        for it in range(iters):
            arms = torch.multinomial(torch.tensor(mu, dtype=torch.float64), 2 * batch, True, generator=g)
            arms = arms.view(batch, 2)
            h = (torch.log_softmax(logits, 0) - log_ref)[arms]             # [batch, 2]
            if method == "copg":
                loss = copg_loss(R[arms], h, beta).mean()
            else:
                keep = R[arms[:, 0]] != R[arms[:, 1]]
                first_wins = R[arms[:, 0]] > R[arms[:, 1]]
                hw = torch.where(first_wins, h[:, 0], h[:, 1])[keep]
                hl = torch.where(first_wins, h[:, 1], h[:, 0])[keep]
                loss = dpo_loss(hw, hl, beta).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if it % 10 == 0 or it == iters - 1:
                trace.append(torch.softmax(logits.detach(), 0).tolist())
        pi = torch.softmax(logits.detach(), 0)
        out[name] = {"pi": [round(x, 6) for x in pi.tolist()], "trace": trace, "kl_to_pi_star": kl(pi_star, pi)}
    return out, pi_star.tolist()


def plot_bandit(path, copg, dpo, pi_star, beta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = ["tab:green", "tab:blue", "tab:red"]
    for ax, name in zip(axes, BANDIT_MU):
        for res, ls, label in ((copg, "-", "CoPG"), (dpo, ":", "DPO")):
            tr = np.array(res[name]["trace"])
            x = np.arange(len(tr)) * 10
            for a in range(3):
                ax.plot(x, tr[:, a], ls, color=colors[a], label=f"{label} pi(arm {a + 1})")
        for a in range(3):
            ax.axhline(pi_star[a], color=colors[a], lw=0.6, alpha=0.5)
        ax.set_title(f"behaviour {name} = {BANDIT_MU[name]}; thin lines: pi*")
        ax.set_xlabel("iteration")
    axes[0].set_ylabel("probability")
    axes[0].legend(fontsize=7, loc="center right")
    fig.suptitle(f"3-armed bandit, R = {BANDIT_R}, beta = {beta}, uniform pi_ref: offline CoPG reaches "
                 f"pi* = pi_ref exp(R/beta)/Z; DPO on the same rewards does not", fontsize=9)
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, path):
    import matplotlib.pyplot as plt
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


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
    tmp = os.path.join(out, "result.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(out, "result.json"))


def plot_curves(path, log, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({k for m in log["metrics"] for k in m})
    fig, axes = plt.subplots(1, 2 + bool(keys), figsize=(5 * (2 + bool(keys)), 3.6))
    axes[0].plot(range(1, len(log["loss"]) + 1), log["loss"], lw=0.8)
    axes[0].set_title("training loss")
    axes[0].set_xlabel("step")
    if keys:
        for k in keys:
            axes[1].plot([m.get(k, np.nan) for m in log["metrics"]], lw=0.8, label=k)
        axes[1].legend(fontsize=8)
        axes[1].set_title("training metrics")
        axes[1].set_xlabel("step")
    ax = axes[-1]
    for k in sorted({k for v in log["val"] for k in v} - {"step"}):
        ax.plot([v["step"] for v in log["val"]], [v.get(k, np.nan) for v in log["val"]], "o-", label=k)
    ax.legend(fontsize=8)
    ax.set_title("validation (carved from the train split)")
    ax.set_xlabel("step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save_fig(fig, path)


def fingerprint_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_data(args, tok, max_len):
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


def run_stage(args) -> dict:
    t_start = time.time()
    model, tok = load_init(args.init)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    ac = autocast_kw(device, args.fp32)
    max_len = model.config.max_position_embeddings
    cfg = StageConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                      warmup_frac=args.warmup_frac, clip=args.clip, eval_every=args.eval_every,
                      ckpt_every=args.ckpt_every, early_stop=args.early_stop, seed=args.seed, fp32=args.fp32)
    validate_stage(cfg)
    if os.path.isfile(os.path.join(args.out, "result.json")) and not args.force:
        raise FileExistsError(f"{args.out} already holds a finished stage (result.json); use --force to "
                              f"overwrite or another --out")
    if has_state(args.out) and not args.resume and not args.force:
        raise FileExistsError(f"{args.out} holds an unfinished stage: --resume to continue it, --force to "
                              f"start over")
    if args.force and not args.resume:
        for d in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
            shutil.rmtree(os.path.join(args.out, d), ignore_errors=True)
    train, val, test = stage_data(args, tok, max_len)
    fp = fingerprint_of(vars(args).get("stage"), args.suites, args.n_train, args.seed, args.difficulty,
                        tokenizer_fingerprint(tok), {k: v for k, v in vars(args).items() if k in STAGE_KEYS})
    before = score_suites(model, tok, test, args.max_new) if args.stage != "rm" else None
    rng_batches = dict(seed=args.seed)
    result = {"stage": args.stage, "init": args.init, "suites": T.check_suites(args.suites)}
    timing = None

    if args.stage == "sft":
        seqs, dropped = sft_sequences(tok, train, max_len, args.preamble_aug, args.seed)
        if not seqs:
            raise ValueError(f"every SFT example is longer than the context ({max_len} tokens)")
        packed = D.pack_whole([s[0] for s in seqs], args.seq_len or max_len, tok.pad_id, [s[1] for s in seqs])
        loaders = {"main": D.Loader(packed, args.batch_size, **rng_batches)}
        pre = None
        if args.pretrain_mix > 0:
            loaders["pretrain"] = pre = D.Loader(pretrain_rows(tok, 256, seed=args.seed), args.batch_size,
                                                 seed=args.seed + 1)
        objective = sft_objective(model, ac, args.l2_init, pre, args.pretrain_mix)
        val_seqs = sft_sequences(tok, val, max_len)[0]
        val_batch = packed_batch(val_seqs, args.seq_len or max_len, tok.pad_id, device) if val_seqs else None

        def evaluate():
            out = {"score": sum(score_suites(model, tok, val, args.max_new).values()) / max(1, len(set(
                e.suite for e in val)))} if val else {"score": 0.0}
            if val_batch is not None:
                with torch.no_grad(), torch.autocast(**ac):
                    out["nll"] = completion_nll(model, val_batch).item()
            return out
        result.update(examples=len(seqs), dropped_too_long=dropped, rows=len(packed))
        target = model
    elif args.stage == "rm":
        rm = RewardModel.from_lm(args.init).to(device)
        low = reference_pairs(tok, train, args.seed)                        # stage 1: off-policy, easy
        engine = make_engine(model, tok)
        _, high, _ = best_of_n(engine, tok, train, args.n_samples, verifier_reward_fn(tok),
                               max_new=args.max_new, seed=args.seed)           # stage 2: on-policy, verified
        val_pairs = reference_pairs(tok, val, args.seed) + best_of_n(
            engine, tok, val, args.n_samples, verifier_reward_fn(tok), max_new=args.max_new, seed=args.seed + 7)[1]
        test_pairs = best_of_n(engine, tok, test, args.n_samples, verifier_reward_fn(tok), max_new=args.max_new,
                               seed=args.seed + 13)[1] + reference_pairs(tok, test, args.seed)
        check_pairs(low)
        before = {"rm_accuracy_test": rm_accuracy(rm, tok, test_pairs, max_len, ac)}
        model, target = None, rm
        stages = [("low-quality pairs", low, args.stage1_steps)] + ([("high-quality pairs", high, args.steps)]
                                                                     if high else [])
        result.update(pairs_low=len(low), pairs_high=len(high), pairs_val=len(val_pairs),
                      pairs_test=len(test_pairs))
        logs = []
        for i, (name, pairs, steps) in enumerate(stages):
            c = StageConfig(**{**asdict(cfg), "steps": steps})
            sub = os.path.join(args.out, f"stage{i + 1}")
            lg = train_loop(rm, rm_objective(rm, tok, pairs, max_len, ac, args.margin, args.center),
                            {"main": D.Loader(Indices(len(pairs)), args.batch_size, **rng_batches)}, c, sub,
                            lambda: {"score": rm_accuracy(rm, tok, val_pairs, max_len, ac)} if val_pairs else
                            {"score": 0.0}, args.resume, fp + str(i), f"rm {name}")
            logs.append(lg)
        log = {"loss": sum((l["loss"] for l in logs), []), "metrics": sum((l["metrics"] for l in logs), []),
               "val": [dict(v, step=v["step"] + sum(len(x["loss"]) for x in logs[:j]))
                       for j, l in enumerate(logs) for v in l["val"]], "seconds": sum(l["seconds"] for l in logs)}
        after = {"rm_accuracy_test": rm_accuracy(rm, tok, test_pairs, max_len, ac)}
        result.update(before=before, after=after, seconds=round(time.time() - t_start, 1),
                      train_seconds=round(log["seconds"], 1))
        write_outputs(args.out, rm, tok, result, log, "reward model: Bradley-Terry, two stages")
        return result
    else:
        reward_fn = verifier_reward_fn(tok)
        if args.rm:
            rm = RewardModel.load(args.rm, tok).to(device)
            check_same_architecture(model.config, rm.config, "reward model")
            reward_fn = rm_reward_fn(rm, tok)
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        if args.ref:
            check_same_tokenizer(tok, args.ref, "reference model")
            ref = CommandA.from_pretrained(args.ref).to(device).eval()
            check_same_architecture(model.config, ref.config, "reference model")
        engine = make_engine(model, tok)
        val_score = lambda: {"score": sum(score_suites(model, tok, val, args.max_new).values()) /  # noqa: E731
                             max(1, len(set(e.suite for e in val)))} if val else {"score": 0.0}
        if args.stage in ("pref", "bon"):
            sft_data, pairs, stats = best_of_n(engine, tok, train, args.n_samples, reward_fn,
                                               max_new=args.max_new, seed=args.seed)
            if args.stage == "pref" and len(pairs) < len(train) // 2:    # too few on-policy pairs: add clean ones
                pairs += reference_pairs(tok, train, args.seed)
            result.update(bon=stats)
        if args.stage == "pref":
            check_pairs(pairs)
            refl = reference_logps(ref, tok, pairs, lambda p: pair_sequences(tok, p, args.loss), max_len, ac)
            objective = pref_objective(model, tok, pairs, refl, args.loss, args.beta, max_len, ac,
                                       not args.no_length_norm)
            loaders = {"main": D.Loader(Indices(len(pairs)), args.batch_size, **rng_batches)}
            result.update(pairs=len(pairs), loss=args.loss, beta=args.beta)
        elif args.stage == "bon":
            if not sft_data:
                raise ValueError("best-of-N kept no completion (none reached the score threshold): nothing to "
                                 "fine-tune on; try more --n-samples or an easier --difficulty")
            packed = D.pack_whole([s[0] for s in sft_data], max_len, tok.pad_id, [s[1] for s in sft_data])
            loaders = {"main": D.Loader(packed, args.batch_size, **rng_batches)}
            objective = sft_objective(model, ac)
        elif args.stage == "copg":
            if args.online:
                timing = {"sample": 0.0, "update_forward": 0.0, "samples": 0}
                objective = copg_online_objective(model, ref, tok, train, args.beta, max_len, ac, reward_fn,
                                                  args.max_new, 2, seed=args.seed, timing=timing)
                loaders = {"main": D.Loader(Indices(len(train)), args.batch_size, **rng_batches)}
            else:
                comps = sample(engine, tok, train, args.k, 1.0, args.max_new, args.seed)
                rewards = reward_fn(train, comps)
                groups = [{"prompt": ex.prompt_ids(tok), "completions": c, "rewards": r}
                          for ex, c, r in zip(train, comps, rewards) if max(r) > min(r)]
                if not groups:
                    raise ValueError("offline CoPG: every prompt's samples scored the same: no signal")
                refl = reference_logps(ref, tok, groups, lambda g: [seq(g["prompt"], c) for c in g["completions"]],
                                       max_len, ac)
                objective = copg_offline_objective(model, tok, groups, refl, args.beta, max_len, ac)
                loaders = {"main": D.Loader(Indices(len(groups)), args.batch_size, **rng_batches)}
                result.update(groups=len(groups), k=args.k)
            result.update(online=args.online, beta=args.beta)
        evaluate = val_score
        target = model
    t_train = time.time()
    log = train_loop(target, objective, loaders, cfg, args.out, evaluate, args.resume, fp, f"{args.stage}")
    train_seconds = time.time() - t_train
    after = score_suites(model, tok, test, args.max_new)
    result.update(before=before, after=after, seconds=round(time.time() - t_start, 1),
                  train_seconds=round(log["seconds"], 1), steps=log["steps_done"])
    if args.stage == "sft":
        ntok = int(log["steps_done"] * args.batch_size * args.grad_accum * packed.ids.shape[1])
        result["tok_per_s"] = round(ntok / max(train_seconds, 1e-9))
    if timing is not None:
        result["timing"] = {"sample_s": round(timing["sample"], 1), "update_s": round(
            train_seconds - timing["sample"], 1), "samples_per_s": round(timing["samples"] / max(train_seconds, 1e-9), 2)}
    write_outputs(args.out, target, tok, result, log, f"{args.stage} on {','.join(result['suites'])}")
    return result


STAGE_KEYS = ("steps", "batch_size", "grad_accum", "lr", "loss", "beta", "online", "k", "n_samples", "l2_init",
              "pretrain_mix", "preamble_aug", "margin", "center", "stage1_steps", "rm", "ref", "no_length_norm",
              "max_new", "val_fraction", "n_val")


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
    ac = autocast_kw("cpu")
    exs = T.SUITES[suite].generate(seed, 64, "train")
    seqs, _ = sft_sequences(tok, exs, seq_len - 1)
    sft_rows = D.pack_whole([s[0] for s in seqs], seq_len, tok.pad_id, [s[1] for s in seqs])
    pre_rows = pretrain_rows(tok, seq_len, n_docs=200, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    sft_batch = sft_rows.batch(list(range(min(batch, len(sft_rows)))))
    pre_batch = pre_rows.batch(list(range(min(batch, len(pre_rows)))))

    def pretrain_step():
        with torch.autocast(**ac):
            loss = model(pre_batch["input_ids"], targets=pre_batch["targets"], doc_ids=pre_batch["doc_ids"])
        loss.backward()

    def sft_step():
        with torch.autocast(**ac):
            loss = completion_nll(model, sft_batch)
        loss.backward()
    best = {"pretrain": math.inf, "sft": math.inf}
    for _ in tqdm(range(rounds), desc="bench rounds"):
        for name, fn in (("pretrain", pretrain_step), ("sft", sft_step)):
            fn()                                              # warm
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
                opt.step()
                opt.zero_grad(set_to_none=True)
            best[name] = min(best[name], (time.perf_counter() - t0) / steps)
    ntok = batch * seq_len
    out = {"pretrain_tok_s": round(ntok / best["pretrain"]), "sft_tok_s": round(ntok / best["sft"]),
           "sft_real_tok_frac": round(float((sft_rows.doc_ids[:batch] >= 0).mean()), 3),
           "completion_tok_frac": round(float(sft_rows.loss_mask[:batch].mean()), 3)}
    out["sft_vs_pretrain"] = round(out["sft_tok_s"] / out["pretrain_tok_s"], 2)
    ref = copy.deepcopy(model).eval()
    timing = {"sample": 0.0, "update_forward": 0.0, "samples": 0}
    obj = copg_online_objective(model, ref, tok, exs, 0.1, 2048, ac, verifier_reward_fn(tok), 64, 2, seed=seed,
                                timing=timing)
    t0 = time.perf_counter()
    for i in tqdm(range(copg_steps), desc="online CoPG"):
        loss, _ = obj(list(range(i * 8, i * 8 + 8)))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    total = time.perf_counter() - t0
    out.update(copg_samples_s=round(timing["samples"] / total, 2), copg_sample_frac=round(timing["sample"] / total, 3),
               copg_update_frac=round(1 - timing["sample"] / total, 3), copg_prompts_per_step=8)
    return out


# ----------------------------------------------------------------------------------------------------------
# CLI


def build_parser():
    ap = argparse.ArgumentParser(description="Command A post-training: one stage (sft, rm, pref, copg, bon) from "
                                 "a checkpoint on tasks.py suites, or the CoPG bandit.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
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
    p = sub.add_parser("bandit", help="CoPG's 3-armed bandit vs DPO", formatter_class=ap.formatter_class)
    p.add_argument("--iters", type=int, default=1500)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--out", default="out/bandit", help="folder for bandit.png and bandit.json")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.stage == "bench":
        try:
            res = bench(args.init, args.seq_len, args.batch_size, args.rounds)
        except (FileNotFoundError, ValueError) as e:
            print(f"posttrain.py bench: error: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"pretraining {res['pretrain_tok_s']:,} tok/s | SFT {res['sft_tok_s']:,} tok/s "
              f"({res['sft_vs_pretrain']}x; {100 * res['sft_real_tok_frac']:.0f}% of SFT row positions are real "
              f"tokens, {100 * res['completion_tok_frac']:.1f}% carry loss)")
        print(f"online CoPG: {res['copg_samples_s']} samples/s; {100 * res['copg_sample_frac']:.0f}% of the time "
              f"sampling, {100 * res['copg_update_frac']:.0f}% scoring + update")
        print(json.dumps(res))
        return res
    if args.stage == "bandit":
        if args.iters < 1 or not args.beta > 0:
            ap.error("--iters must be >= 1 and --beta > 0")
        copg, pi_star = bandit(args.iters, args.beta)
        dpo, _ = bandit(args.iters, args.beta, method="dpo")
        os.makedirs(args.out, exist_ok=True)
        plot_bandit(os.path.join(args.out, "bandit.png"), copg, dpo, pi_star, args.beta)
        print(f"pi* = pi_ref exp(R/beta)/Z = {[round(x, 4) for x in pi_star]}")
        print(f"{'behaviour':10s}{'method':>7s}  {'final pi':30s}{'KL(pi*||pi)':>12s}")
        for name in BANDIT_MU:
            for label, res in (("CoPG", copg), ("DPO", dpo)):
                print(f"{name:10s}{label:>7s}  {str([round(x, 4) for x in res[name]['pi']]):30s}"
                      f"{res[name]['kl_to_pi_star']:12.2e}")
        summary = {**{k: {"pi": v["pi"], "kl_to_pi_star": v["kl_to_pi_star"]} for k, v in copg.items()},
                   "pi_star": pi_star, "dpo": {k: {"pi": v["pi"], "kl_to_pi_star": v["kl_to_pi_star"]}
                                               for k, v in dpo.items()}}
        with open(os.path.join(args.out, "bandit.json"), "w") as f:
            json.dump(summary, f)
        print(f"wrote {args.out}/bandit.png")
        print(json.dumps(summary))
        return summary
    for name in ("n_train", "n_eval", "max_new"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.val_fraction < 1:
        ap.error("--val-fraction must be in [0, 1)")
    if getattr(args, "beta", 1.0) <= 0:
        ap.error("--beta must be > 0")
    try:
        T.check_suites(args.suites)
        result = run_stage(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"posttrain.py {args.stage}: error: {e}", file=sys.stderr)
        sys.exit(2)
    print_table(result)
    print(f"wrote {args.out} (checkpoint, curves.png, result.json)")
    print(json.dumps({k: result[k] for k in ("stage", "before", "after", "seconds") if k in result}
                     | {k: result[k] for k in ("tok_per_s", "timing") if k in result}))
    return result


if __name__ == "__main__":
    main()
