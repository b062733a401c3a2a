"""
The post-training methods of Command A (report section 3), each a function beside its equation, and the one
training loop that runs them all: SFT (completion-only NLL on packed conversations, preamble augmentation, drift
control), the reward model (Bradley-Terry, two stages), the offline preference losses (DPO, IPO, SLiC-HF and its
hinge form, SRPO, IPO + SFT), CoPG (offline from k scored samples per prompt; online from 2 generations per
prompt by serve.Engine, = RLOO with k = 2), best-of-N, and CoPG's bandit. posttrain.py composes them into the
report's pipeline (Figure 3) and runs any one of them from the command line.

Notation (SPEC 6, which has every formula with its check values): logp(y|x) is summed over completion tokens
only; h(y) = logp_theta(y|x) - logp_ref(y|x); Delta = h(y_w) - h(y_l). Every loss takes per-example tensors
and returns per-example losses.

Precision as pretrain.py: fp32 master weights and Adam state, bf16 matmuls under autocast where bf16 is fast,
log-softmax in fp32. Checkpoints: `OUT/checkpoint` is swapped in atomically (weights, Adam, step, data
position, RNG, logs) and a resumed loop continues bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data as D
import tasks as T
from model import CommandA, ModelConfig, atomic_write_json, pyplot, save_figure
from pretrain import apply_update, read_train_state, restore_rngs, write_train_state   # one checkpoint format for both loops
from tokenizer import Tokenizer, parse_completion

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
    h = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"], return_hidden=True)
    sel = batch["targets"] != -100
    logits = model.lm_logits(h[sel])                                  # [M, V] fp32
    lp = -F.cross_entropy(logits, batch["targets"][sel], reduction="none")
    seq = batch["doc_ids"][sel].long()
    n = int(n_seqs if n_seqs is not None else (int(seq.max()) + 1 if seq.numel() else 0))
    logp = torch.zeros(n, device=lp.device, dtype=lp.dtype).index_add(0, seq, lp)
    length = torch.zeros(n, device=lp.device).index_add(0, seq, torch.ones_like(lp))
    return logp, length


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
    ids, _ = render(tok, ex, [turn])
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
    than max_len tokens (a packed row) are dropped and counted."""
    rng = random.Random(seed)
    out, dropped = [], 0
    for ex in examples:
        variants = [ex]
        for _ in range(augment):
            mode = None if ex.suite == "safety" else rng.choice(["CONTEXTUAL", "STRICT"])
            variants.append(with_preamble(ex, rng.choice(PREAMBLES[1:]), mode))
        for v in variants:
            s = render(tok, v)
            if len(s[0]) > max_len:
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
    return T.make_engine(model, tok, max_batch=32, max_len=max_len or min(model.config.max_position_embeddings, 4096))


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
def parse_final(text: str):
    """A completion's (or ReAct episode's final turn's) assistant message; None if there is none."""
    if not text:
        return None
    p = parse_completion(text)
    msg = {"role": "assistant", "content": p["response"]}
    if p.get("thinking"):
        msg["thinking"] = p["thinking"]
    return msg


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
        h = self(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"], return_hidden=True)
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
    def score_sequences(self, seqs: list, pad_id: int, batch_size: int = 16) -> list:
        """Rewards of sequences [(ids, mask)], one padded row each, in batches (the train/eval mode is kept)."""
        was, device, out = self.training, next(self.parameters()).device, []
        self.eval()
        for i in range(0, len(seqs), batch_size):
            out += self.rewards(padded_batch(seqs[i:i + batch_size], pad_id, device=device)).tolist()
        self.train(was)
        return out

    def score_conversations(self, tok: Tokenizer, conversations: list, batch_size: int = 16) -> list:
        """Rewards of whole conversations [(messages, documents, tools, safety_mode) or messages], batched."""
        seqs = []
        for c in conversations:
            msgs, docs, tools, mode = (c, None, None, "CONTEXTUAL") if isinstance(c, list) else c
            ids = tok.render_chat(msgs, docs, tools, mode, add_generation_prompt=False)
            seqs.append((ids, [0] * len(ids)))
        return self.score_sequences(seqs, tok.pad_id, batch_size)

    def judge(self, tok: Tokenizer):
        """The report's pairwise judge as a reward model (tasks.judge_pairs / tasks.pairwise take it in place of
        the verifiers): > 0 when it prefers A's answer. Each whole conversation, prompt and answer, is scored; a
        missing answer (a failed ReAct episode) is an empty assistant turn."""
        def judge(ex: T.Example, a: str, b: str) -> float:
            turns = [parse_final(x) or {"role": "assistant", "content": ""} for x in (a, b)]
            ra, rb = self.score_conversations(tok, [(ex.messages + [t], ex.documents, ex.tools, ex.safety_mode)
                                                    for t in turns])
            return 0.0 if abs(ra - rb) < 1e-5 else ra - rb   # float noise between batch rows is a tie
        return judge

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
    if tok.preamble != "full":           # the chat format is part of what a model was trained to read
        h.update(f"preamble:{tok.preamble}".encode())
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

    def __post_init__(self):          # the messages name the flags: posttrain.py's stages are built from them
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "ckpt_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError("--lr and --clip must be positive numbers")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError("--warmup-frac must be in [0, 1)")


def lr_at(step: int, cfg: StageConfig) -> float:
    warm = max(1, round(cfg.warmup_frac * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * (1 - 0.9 * (step - warm) / max(1, cfg.steps - warm))


class Indices(list):
    """Item indices 0..n-1 as a 'dataset': data.Loader's exactly resumable shuffling serves pairs and prompts."""
    def __init__(self, n: int):
        super().__init__(range(n))

    def batch(self, rows):
        return list(rows)


def load_state(out, model, opt, loaders, cfg, fingerprint):
    ckpt, state, meta = read_train_state(out)
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
    restore_rngs(state, meta)
    return state["step"], meta["log"]


def has_state(out) -> bool:
    return any(os.path.isfile(os.path.join(out, d, "train_state.pt")) for d in ("checkpoint", "checkpoint.old"))


def train_loop(model, objective, loaders: dict, cfg: StageConfig, out: str, evaluate=None, resume=False,
               fingerprint="", desc="train", verbose=True) -> dict:
    """AdamW on fp32 master weights, bf16 autocast, gradient accumulation and clipping, a progress bar with the
    objective's metrics, validation every eval_every steps (and early stopping on it, if asked), atomic
    checkpoints with exact resume. objective(batch) -> (loss, {metric: float}); loaders["main"] feeds it
    (other loaders, e.g. pretraining rows, are saved and resumed alongside). Returns the log."""
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
    best, since_best = -math.inf, 0
    for v in log["val"]:                       # early stopping's state, replayed from the log on resume
        best, since_best = (v["score"], 0) if v["score"] > best else (best, since_best + 1)
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
        apply_update(opt, torch.nn.utils.clip_grad_norm_(params, cfg.clip), f"{desc}, step {step + 1}",
                     f"{out}/checkpoint", bar)
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
        if step % cfg.ckpt_every == 0 or step == cfg.steps or stop_early:   # a kill leaves this one or the last
            meta = {"config": asdict(cfg), "fingerprint": fingerprint, "log": log,
                    "loaders": {k: l.state_dict() for k, l in loaders.items()}}
            write_train_state(out, model, step, opt.state_dict(), meta)
        if stop_early:
            bar.write(f"{desc}: validation score has not improved for {cfg.early_stop} evaluations: stopping")
            break
    bar.close()
    log["steps_done"] = step
    return log


def plot_curves(path, log, title):
    """train_loop's log as a picture: the loss, the objective's metrics, the validation scores."""
    plt = pyplot()
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
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------
# The objectives: batch -> (loss, metrics)


def completion_nll(model, batch):
    """Token-mean NLL over the target tokens (completion-only for chat rows, every token for pretraining rows)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}          # loaders yield CPU tensors
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


def pref_objective(model, tok, pairs, ref_logps, loss, beta, seq_len, ac, normalize=True, delta=1.0, lam=0.1,
                   sft_weight=0.0):
    """Offline preference optimization on (prompt, chosen, rejected) with cached reference log-probs.
    sft_weight > 0 adds that much of the chosen answer's token-mean NLL (the report's "SFT term in the RL loss":
    chosen and rejected answers share most tokens, and the preference losses alone can push both down)."""
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
        elif loss == "slic":      # summed log-probs as the paper; y_ref: the chosen answer (the SFT target)
            per = slic_loss(lp[:, 0], lp[:, 1], lp[:, 0], delta, lam)
        elif loss == "srpo":
            per = srpo_loss(h[:, 2], h[:, 3], h[:, 4], h[:, 5], hw, hl, beta)
        else:                     # ipo_sft: the safety expert
            per = ipo_sft_loss(hw, hl, beta, -lp[:, 0] / lw, *((lw, ll) if normalize else (None, None)))
        if sft_weight > 0:
            per = per + sft_weight * (-lp[:, 0] / lw)
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
        right += float((r[:, 0] > r[:, 1]).sum() + 0.5 * (r[:, 0] == r[:, 1]).sum())   # a tie is a coin flip
    rm.train()
    return right / max(1, len(pairs))


def copg_offline_objective(model, tok, groups, ref_logps, beta, seq_len, ac, sft_weight=0.0):
    """groups: [{"seqs": k sequences (ids, loss_mask) of one prompt, "rewards": [k]}] (a completion, or a whole
    ReAct episode whose every assistant turn is trained); ref_logps [groups, k] cached. sft_weight > 0 adds
    the token-mean NLL of each group's best sequence (the code expert's SFT term in the RL loss)."""
    device = next(model.parameters()).device

    def objective(idx):
        seqs = [s for i in idx for s in groups[i]["seqs"]]
        with torch.autocast(**ac):
            lp, length = sequence_logps(model, packed_batch(seqs, seq_len, tok.pad_id, device), len(seqs))
        lp, length = lp.view(len(idx), -1), length.view(len(idx), -1)
        h = lp - ref_logps[idx].to(device)
        R = torch.tensor([groups[i]["rewards"] for i in idx], device=device, dtype=h.dtype)
        loss = copg_loss(R, h, beta)
        if sft_weight > 0:
            best = R.argmax(1, keepdim=True)
            loss = loss + sft_weight * (-(lp / length).gather(1, best).squeeze(1))
        return loss.mean(), {"reward": R.mean().item(), "h": h.mean().item()}
    return objective


def copg_online_objective(model, ref, tok, examples, beta, seq_len, ac, reward_fn, max_new=64, k=2,
                          temperature=1.0, timing=None):
    """Online CoPG (report 3.3.4, polishing): k = 2 generations per prompt sampled by serve.Engine from the
    CURRENT policy, scored, then the CoPG step. On-policy this is RLOO with k = 2 on R - beta h; the mean of
    h over the samples estimates KL(pi || pi_ref). timing accumulates the seconds spent sampling, and samples."""
    engine = make_engine(model, tok, seq_len)
    device = next(model.parameters()).device

    def objective(idx):
        t0 = time.time()
        exs = [examples[i] for i in idx]
        # the sampling seed comes from torch's RNG, which checkpoints save: a resumed run samples the same
        comps = sample(engine, tok, exs, k, temperature, max_new, seed=int(torch.randint(0, 2 ** 62, (1,))))
        R = torch.tensor(reward_fn(exs, comps), dtype=torch.float32, device=device)
        model.train()                               # the Engine put it in eval mode
        t1 = time.time()
        seqs = [seq(ex.prompt_ids(tok), c) for ex, cs in zip(exs, comps) for c in cs]
        batch = packed_batch(seqs, seq_len, tok.pad_id, device)
        with torch.autocast(**ac):
            lp, _ = sequence_logps(model, batch, len(seqs))
            with torch.no_grad():                   # the reference: no graph (SPEC 6's h = logp - logp_ref)
                ref_lp, _ = sequence_logps(ref, batch, len(seqs))
        h = (lp - ref_lp).view(len(idx), k)
        loss = copg_loss(R, h, beta).mean()
        if timing is not None:
            timing["sample"] += t1 - t0
            timing["samples"] += len(seqs)
        return loss, {"reward": R.mean().item(), "kl": h.mean().item()}
    return objective


# ----------------------------------------------------------------------------------------------------------
# Building preference data: best-of-N from the model's own samples, scored by a verifier or the reward model


def best_of_n(engine, tok, examples, n, reward_fn, temperature=1.0, max_new=64, seed=0, min_best=0.5):
    """Sample n per prompt, score them, keep the best as SFT data (if it scores >= min_best) and best-vs-worst
    as a preference pair (if they differ in score and in tokens); a best completion cut at max_new (no end of
    turn) is not kept. Returns (sft [(ids, mask)], pairs, stats). min_best=None keeps every best (RM scores
    have no absolute scale)."""
    comps = sample(engine, tok, examples, n, temperature, max_new, seed)
    scores = reward_fn(examples, comps)
    sft, pairs = [], []
    for ex, cs, sc in zip(examples, comps, scores):
        order = sorted(range(len(cs)), key=lambda i: -sc[i])
        b, w = order[0], order[-1]
        prompt = ex.prompt_ids(tok)
        stopped = cs[b][-1:] == [tok.eot_id]   # a completion cut at max_new would teach the model not to stop
        if (min_best is None or sc[b] >= min_best) and stopped:
            sft.append(seq(prompt, cs[b]))
        if sc[b] > sc[w] and cs[b] != cs[w] and stopped:
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
        r = rm.score_sequences([seq(ex.prompt_ids(tok), c) for ex, cs in zip(examples, comps) for c in cs], tok.pad_id)
        k = len(comps[0])
        return [r[i * k:(i + 1) * k] for i in range(len(examples))]
    return fn


def verifier_reward_fn(tok):
    """tasks.py's verifier score in [0, 1] of every completion: fn(examples, comps) -> [[float]]."""
    def fn(examples, comps):
        return [[T.SUITES[ex.suite].score(ex, tok.decode(c)) for c in cs] for ex, cs in zip(examples, comps)]
    return fn


# ----------------------------------------------------------------------------------------------------------
# CoPG's bandit (Flet-Berliac et al. 2024, section 5.1): offline CoPG finds pi* from any behaviour policy


BANDIT_R = (2.5, 2.0, 1.0)
BANDIT_MU = {"mu1": (0.1, 0.2, 0.7), "mu2": (0.05, 0.05, 0.9)}


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
        kl = max(0.0, float((pi_star * (pi_star / pi).log()).sum()))      # >= 0; rounding can give -1e-17 at pi*
        out[name] = {"pi": [round(x, 6) for x in pi.tolist()], "trace": trace, "kl_to_pi_star": kl}
    return out, pi_star.tolist()


def plot_bandit(path, copg, dpo, pi_star, beta):
    plt = pyplot()
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
    save_figure(fig, path)


def run_bandit(iters: int, beta: float, out: str) -> dict:
    """`posttrain.py bandit`: CoPG and DPO from both behaviour policies, a table on stdout, OUT/bandit.png and
    OUT/bandit.json (the summary it returns)."""
    copg, pi_star = bandit(iters, beta)
    dpo, _ = bandit(iters, beta, method="dpo")
    os.makedirs(out, exist_ok=True)
    plot_bandit(os.path.join(out, "bandit.png"), copg, dpo, pi_star, beta)
    print(f"pi* = pi_ref exp(R/beta)/Z = {[round(x, 4) for x in pi_star]}")
    print(f"{'behaviour':10s}{'method':>7s}  {'final pi':30s}{'KL(pi*||pi)':>12s}")
    for name in BANDIT_MU:
        for label, res in (("CoPG", copg), ("DPO", dpo)):
            print(f"{name:10s}{label:>7s}  {str([round(x, 4) for x in res[name]['pi']]):30s}"
                  f"{res[name]['kl_to_pi_star']:12.2e}")

    def final(res):                  # the traces stay in the plot
        return {k: {"pi": v["pi"], "kl_to_pi_star": v["kl_to_pi_star"]} for k, v in res.items()}
    summary = {**final(copg), "pi_star": pi_star, "dpo": final(dpo)}
    atomic_write_json(os.path.join(out, "bandit.json"), summary, indent=None)
    print(f"wrote {out}/bandit.png")
    return summary
