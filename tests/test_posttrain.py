"""alignment.py and posttrain.py: every loss at SPEC 6's check values and against TRL's definitions, masking
and packing of completion log-probs, the reward model, CoPG = RLOO, the bandit, each trainer moving its metric
on a micro model, exact resume after a kill, bad input, and the whole pipeline at micro scale."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data as D
import alignment as A
import posttrain as P
import tasks as T
from model import CommandA, ModelConfig
from tokenizer import Tokenizer, chat_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP32 = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": False}


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- the losses


def test_posttrain_exports_the_losses():
    """SPEC 9: the losses are part of posttrain's public interface (they live in alignment.py)."""
    for name in ("dpo_loss", "ipo_loss", "hinge_loss", "slic_loss", "srpo_loss", "bt_loss", "copg_loss",
                 "ipo_sft_loss", "sequence_logps"):
        assert getattr(P, name) is getattr(A, name)


def test_dpo_check_values():
    assert A.dpo_loss(t(0.0), t(0.0), 0.1).item() == pytest.approx(math.log(2), abs=1e-4)      # 0.6931
    assert A.dpo_loss(t(2.0), t(-1.0), 0.1).item() == pytest.approx(0.5544, abs=1e-4)


def test_ipo_check_values_and_minimum():
    assert A.ipo_loss(t(0.0), t(0.0), 0.1).item() == pytest.approx(25.0)
    assert A.ipo_loss(t(2.0), t(-1.0), 0.1, t(4.0), t(2.0)).item() == pytest.approx(16.0)   # 0.5+0.5 = 1 -> (1-5)^2
    assert A.ipo_loss(t(2.0), t(-1.0), 0.1).item() == pytest.approx(4.0)                    # (3-5)^2
    hw = torch.tensor([5.0], dtype=torch.float64, requires_grad=True)                       # Delta = 1/(2 beta)
    loss = A.ipo_loss(hw, t(0.0), 0.1)
    loss.backward()
    assert loss.item() == 0 and hw.grad.item() == 0
    with pytest.raises(ValueError):
        A.ipo_loss(t(1.0), t(0.0), 0.1, len_w=t(2.0))


def test_hinge_check_value_and_zero_gradient_past_the_margin():
    assert A.hinge_loss(t(3.0), t(0.0), 0.1).item() == pytest.approx(0.7)
    hw = torch.tensor([12.0], dtype=torch.float64, requires_grad=True)
    loss = A.hinge_loss(hw, t(1.0), 0.1)                                                     # beta*Delta = 1.1
    loss.backward()
    assert loss.item() == 0 and hw.grad.item() == 0


def test_slic_srpo_bt_copg_check_values():
    # max(0, 1 - (-2) + (-4)) - 0.5 * (-3) = 0 + 1.5; and 1 - (-4) + (-2) = 3 -> 3 + 1.5
    assert A.slic_loss(t(-2.0), t(-4.0), t(-3.0), 1.0, 0.5).item() == pytest.approx(1.5)
    assert A.slic_loss(t(-4.0), t(-2.0), t(-3.0), 1.0, 0.5).item() == pytest.approx(4.5)
    z = t(0.0)
    assert A.srpo_loss(z, z, z, z, z, z, beta=0.1, a=0.8).item() == pytest.approx(0.6)
    assert A.bt_loss(t(1.0), t(0.0)).item() == pytest.approx(0.3133, abs=1e-4)
    assert A.bt_loss(t(1.0), t(0.0), margin=0.5).item() == pytest.approx(0.4741, abs=1e-4)
    assert A.bt_loss(t(1.0), t(0.0), center=0.01).item() == pytest.approx(0.3133 + 0.01, abs=1e-4)
    # k = 3: pairs (0,1): 1 - 0.5*(1-0) = 0.5; (0,2): 2 - 0 = 2; (1,2): 1 - 0.5*(0-1) = 1.5 -> mean of squares
    R, h = torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[1.0, 0.0, 1.0]])
    assert A.copg_loss(R, h, 0.5).item() == pytest.approx((0.25 + 4 + 2.25) / 3)
    # the optimum: h = R / beta + const makes every pair's term zero
    assert A.copg_loss(R, R / 0.5 + 7, 0.5).item() == pytest.approx(0.0, abs=1e-9)


# TRL's DPOTrainer.dpo_loss, as its public source defines the three losses we share (written here from the
# formulas, not copied): logits = (pi_c - pi_r) - (ref_c - ref_r); sigmoid: -logsigmoid(beta logits);
# ipo: (logits - 1/(2 beta))^2 on LENGTH-AVERAGED log-probs; hinge: relu(1 - beta logits).
def trl_losses(pi_c, pi_r, ref_c, ref_r, len_c, len_r, beta):
    logits = (pi_c - pi_r) - (ref_c - ref_r)
    ipo_logits = (pi_c / len_c - pi_r / len_r) - (ref_c / len_c - ref_r / len_r)
    return {"sigmoid": -F.logsigmoid(beta * logits), "ipo": (ipo_logits - 1 / (2 * beta)) ** 2,
            "hinge": torch.relu(1 - beta * logits)}


def test_losses_equal_trl_definitions():
    g = torch.Generator().manual_seed(0)
    pi_c, pi_r, ref_c, ref_r = (-30 * torch.rand(64, generator=g, dtype=torch.float64) for _ in range(4))
    len_c, len_r = (torch.randint(1, 40, (64,), generator=g).double() for _ in range(2))
    for beta in (0.05, 0.1, 0.5):
        ref = trl_losses(pi_c, pi_r, ref_c, ref_r, len_c, len_r, beta)
        hw, hl = pi_c - ref_c, pi_r - ref_r
        torch.testing.assert_close(A.dpo_loss(hw, hl, beta), ref["sigmoid"])
        torch.testing.assert_close(A.ipo_loss(hw, hl, beta, len_c, len_r), ref["ipo"])
        torch.testing.assert_close(A.hinge_loss(hw, hl, beta), ref["hinge"])


def test_copg_gradient_is_rloo_k2():
    """On any two samples of a prompt, grad (CoPG loss) = -4 beta grad (RLOO surrogate with the KL-shaped
    reward R - beta h held fixed): the same direction, so on-policy CoPG is RLOO with k = 2."""
    torch.manual_seed(0)
    logits = torch.randn(5, 7, requires_grad=True)                 # 5 prompts, a 7-way softmax policy
    ref = torch.log_softmax(torch.randn(5, 7), -1)
    y = torch.multinomial(torch.softmax(logits.detach(), -1), 2, replacement=True)   # on-policy samples
    R, beta = torch.randn(5, 2), 0.3
    logp = torch.log_softmax(logits, -1).gather(1, y)
    h = logp - ref.gather(1, y)
    g_copg, = torch.autograd.grad(A.copg_loss(R, h, beta).sum(), logits, retain_graph=True)
    shaped = (R - beta * h).detach()
    adv = shaped - shaped.flip(1)                                 # leave-one-out baseline with k = 2
    g_rloo, = torch.autograd.grad((0.5 * adv * logp).sum(), logits)
    torch.testing.assert_close(g_copg, -4 * beta * g_rloo)


def test_bandit_reaches_pi_star_from_both_behaviour_policies_and_dpo_does_not():
    copg, pi_star = A.bandit(iters=800, batch=128)
    assert pi_star == pytest.approx([0.7054, 0.2595, 0.0351], abs=1e-4)
    for name in A.BANDIT_MU:
        assert copg[name]["kl_to_pi_star"] < 1e-3, name
    dpo, _ = A.bandit(iters=300, batch=64, method="dpo")
    assert all(dpo[name]["kl_to_pi_star"] > 0.1 for name in A.BANDIT_MU)
    assert all(dpo[name]["pi"][0] > pi_star[0] + 0.1 for name in A.BANDIT_MU)   # it slides to the best arm


# ---------------------------------------------------------------------------------------------- micro setup


@pytest.fixture(scope="module")
def tok():
    texts = [chat_text(ex.sft_messages(), ex.documents, ex.tools, ex.safety_mode, False)
             for s in ("math", "safety", "multilingual", "code") for ex in T.SUITES[s].generate(0, 30, "train")]
    return Tokenizer.train(texts, vocab_size=1024)


def micro_model(tok, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=192,
                                num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, sliding_window=16,
                                max_position_embeddings=2048), **kw})
    return CommandA(cfg)


@pytest.fixture(scope="module")
def examples():
    return T.SUITES["math"].generate(0, 24, "train")


def test_sft_targets_are_the_completion_only(tok, examples):
    """The trained tokens are exactly the assistant's completion (EOT included); the loss equals a hand-written
    NLL over exactly those positions, and a different prompt leaves the set of labels unchanged."""
    model = micro_model(tok)
    seqs = [A.render(tok, ex) for ex in examples[:4]]
    for ex, (ids, m) in zip(examples, seqs):
        assert [i for i, k in zip(ids, m) if k] == A.completion_ids(tok, ex)
        assert ids[-1] == tok.eot_id and m[-1] == 1
    b = A.packed_batch(seqs, 2047, tok.pad_id)
    assert int((b["targets"] != -100).sum()) == sum(sum(m) for _, m in seqs)   # BOS is never trained
    with torch.no_grad():
        logits = model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"])
        hand = [-torch.log_softmax(logits[r, i], -1)[b["targets"][r, i]]
                for r, i in (b["targets"] != -100).nonzero().tolist()]
        assert A.completion_nll(model, b).item() == pytest.approx(torch.stack(hand).mean().item(), rel=1e-5)
    # another user prompt (another preamble too): the labels that carry loss are the same tokens
    ex = examples[0]
    other = A.with_preamble(T.Example(ex.suite, ex.id, [{"role": "user", "content": "something else entirely"}],
                                      ex.reference, ex.turns), "Be brief.")
    ids2, m2 = A.render(tok, other)
    assert [i for i, k in zip(ids2, m2) if k] == [i for i, k in zip(*seqs[0]) if k]


def test_packed_equals_unpacked_and_left_equals_right_padding(tok, examples):
    model = micro_model(tok)
    seqs = [A.render(tok, ex) for ex in examples[:5]]
    with torch.no_grad():
        packed, plen = A.sequence_logps(model, A.packed_batch(seqs, 2047, tok.pad_id), 5)
        alone = torch.cat([A.sequence_logps(model, A.padded_batch([s], tok.pad_id), 1)[0] for s in seqs])
        right, _ = A.sequence_logps(model, A.padded_batch(seqs, tok.pad_id, "right"), 5)
        left, llen = A.sequence_logps(model, A.padded_batch(seqs, tok.pad_id, "left"), 5)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-4)
    assert plen.tolist() == llen.tolist() == [sum(m) for _, m in seqs]
    rm = A.RewardModel(micro_model(tok).config)
    torch.nn.init.normal_(rm.score.weight)
    with torch.no_grad():
        rl = rm.rewards(A.padded_batch(seqs, tok.pad_id, "left"), 5)
        rr = rm.rewards(A.padded_batch(seqs, tok.pad_id, "right"), 5)
        rp = rm.rewards(A.packed_batch(seqs, 2047, tok.pad_id), 5)
    torch.testing.assert_close(rl, rr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rp, rr, rtol=1e-5, atol=1e-5)


def test_pack_carries_the_loss_mask():
    docs, masks = [[1, 2, 3, 4], [5, 6, 7]], [[0, 0, 1, 1], [0, 1, 1]]
    for pk in (D.pack(docs, 8, 0, masks), D.pack_whole(docs, 8, 0, masks)):
        b = pk.batch(list(range(len(pk))))
        got = sorted(int(x) for x in b["targets"][b["targets"] != -100])
        assert got == [4, 6, 7] or got == [3, 4, 6, 7]
        assert got == [3, 4, 6, 7]          # targets: tokens whose mask is 1, never across documents
    with pytest.raises(ValueError):
        D.pack_whole([[1] * 20], 8)
    b = D.pack_whole([[1, 2, 3], [4, 5, 6]], 6).batch([0])      # rows filled exactly: every token is an input
    assert b["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 6] and b["doc_ids"][0].tolist() == [0, 0, 0, 1, 1, 1]


# ---------------------------------------------------------------------------------------------- trainers


def cfg(**kw):
    return A.StageConfig(**{**dict(steps=12, batch_size=4, lr=3e-3, warmup_frac=0.0, eval_every=12,
                                   ckpt_every=100, fp32=True), **kw})


def test_sft_lowers_held_out_completion_nll(tok, tmp_path):
    exs = T.SUITES["safety"].generate(0, 48, "train")
    train, val = exs[:40], exs[40:]
    model = micro_model(tok)
    seqs, _ = A.sft_sequences(tok, train, 1023)
    packed = D.pack_whole([s for s, _ in seqs], 1023, tok.pad_id, [m for _, m in seqs])
    vb = A.packed_batch(A.sft_sequences(tok, val, 1023)[0], 1023, tok.pad_id)
    ev = lambda: {"score": -A.completion_nll(model, vb).item()}   # noqa: E731
    with torch.no_grad():
        before = A.completion_nll(model, vb).item()
    A.train_loop(model, A.sft_objective(model, FP32), {"main": D.Loader(packed, 4)}, cfg(steps=15, lr=3e-2),
                 str(tmp_path), ev, verbose=False)
    with torch.no_grad():
        after = A.completion_nll(model, vb).item()
    assert after < before - 1.0, (before, after)


def test_sft_drift_controls(tok, tmp_path):
    model = micro_model(tok)
    w0 = [p.detach().clone() for p in model.parameters()]
    seqs, _ = A.sft_sequences(tok, T.SUITES["math"].generate(0, 8, "train"), 2047, augment=1)
    assert len(seqs) == 16
    packed = D.pack_whole([s for s, _ in seqs], 2047, tok.pad_id, [m for _, m in seqs])
    pre = D.Loader(A.pretrain_rows(tok, 64, n_docs=20), 2)
    obj = A.sft_objective(model, FP32, l2_init=1.0, pretrain_loader=pre, pretrain_weight=0.3)
    log = A.train_loop(model, obj, {"main": D.Loader(packed, 2), "pretrain": pre}, cfg(steps=3), str(tmp_path),
                       verbose=False)
    assert {"nll", "pretrain_nll", "drift"} <= set(log["metrics"][-1]) and log["metrics"][0]["drift"] == 0
    assert pre.position > 0 or pre.epoch > 0
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), w0))


def separable_pairs(tok, n, seed=0):
    """Chosen: the reference answer; rejected: a non-answer. Separable by content alone."""
    out = []
    for ex in T.SUITES["math"].generate(seed, n, "train"):
        bad = A.completion_ids(tok, ex, {"role": "assistant", "content": "I do not know, sorry."})
        out.append({"prompt": ex.prompt_ids(tok), "chosen": A.completion_ids(tok, ex), "rejected": bad})
    return out


def test_reference_pairs_are_verified(tok):
    exs = T.SUITES["math"].generate(0, 12, "train")
    pairs = A.reference_pairs(tok, exs)
    assert len(pairs) >= 10
    for p in pairs:
        ex = next(e for e in exs if e.prompt_ids(tok) == p["prompt"])
        assert T.SUITES["math"].score(ex, tok.decode(p["chosen"])) > T.SUITES["math"].score(ex, tok.decode(p["rejected"]))


def test_reward_model_beats_chance_and_saves_and_loads(tok, tmp_path):
    pairs = separable_pairs(tok, 48)
    train, val = pairs[:36], pairs[36:]
    rm = A.RewardModel(micro_model(tok).config)
    rm.load_state_dict(micro_model(tok).state_dict(), strict=False)
    A.train_loop(rm, A.rm_objective(rm, tok, train, 2047, FP32), {"main": D.Loader(A.Indices(len(train)), 4)},
                 cfg(steps=30), str(tmp_path / "run"), verbose=False)
    acc = A.rm_accuracy(rm, tok, val, 2047, FP32)
    assert acc >= 0.75, acc
    rm.save(str(tmp_path / "rm"), tok)
    back = A.RewardModel.load(str(tmp_path / "rm"), tok)
    assert torch.equal(back.score.weight, rm.score.weight)
    convs = [(p_ex.sft_messages(), None, None, "CONTEXTUAL") for p_ex in T.SUITES["math"].generate(0, 3, "train")]
    assert len(back.score_conversations(tok, convs)) == 3
    with pytest.raises(ValueError, match="unexpected tensor"):
        CommandA.from_pretrained(str(tmp_path / "rm"))


def test_dpo_raises_the_margin_with_cached_reference(tok, tmp_path):
    pairs = separable_pairs(tok, 24)
    model = micro_model(tok)
    ref = micro_model(tok)
    refl = A.reference_logps(ref, tok, pairs, lambda p: A.pair_sequences(tok, p, "dpo"), 2047, FP32)
    assert refl.shape == (len(pairs), 2)
    log = A.train_loop(model, A.pref_objective(model, tok, pairs, refl, "dpo", 0.1, 2047, FP32),
                       {"main": D.Loader(A.Indices(len(pairs)), 4)}, cfg(steps=12, lr=1e-2), str(tmp_path),
                       verbose=False)
    assert log["metrics"][0]["margin"] == pytest.approx(0.0, abs=1e-3)       # policy = reference at the start
    assert sum(m["margin"] for m in log["metrics"][-3:]) / 3 > 1.0


@pytest.mark.parametrize("loss", ["ipo", "hinge", "slic", "srpo", "ipo_sft"])
def test_every_preference_loss_trains(tok, tmp_path, loss):
    pairs = separable_pairs(tok, 8)
    model, ref = micro_model(tok), micro_model(tok)
    refl = A.reference_logps(ref, tok, pairs, lambda p: A.pair_sequences(tok, p, loss), 2047, FP32)
    assert refl.shape[1] == (6 if loss == "srpo" else 2)
    log = A.train_loop(model, A.pref_objective(model, tok, pairs, refl, loss, 0.1, 2047, FP32),
                       {"main": D.Loader(A.Indices(len(pairs)), 4)}, cfg(steps=6), str(tmp_path), verbose=False)
    if loss == "srpo":
        assert log["loss"][0] == pytest.approx(0.6, abs=1e-3)
    assert log["loss"][-1] < log["loss"][0]


def lower_half(tok):
    def reward_fn(exs, comps):
        return [[sum(x < tok.vocab_size // 2 for x in c) / max(1, len(c)) for c in cs] for cs in comps]
    return reward_fn


class _Ex:
    """A bare prompt for sampling tests: prompt_ids is all the samplers need."""
    def __init__(self, ids):
        self.ids = ids

    def prompt_ids(self, tok):
        return self.ids


def test_online_copg_raises_a_verifier_reward_and_engine_follows_the_weights(tok, tmp_path):
    """Verifier: the share of sampled tokens in a set S of 64 tokens (~18% of the initial policy's mass; logit
    scale 4 makes the random micro policy peaked enough to learn from in seconds). The policy is sampled by
    serve.Engine, whose fused decode weights must follow every optimizer step (else it would be off-policy)."""
    model, ref = micro_model(tok, seed=1, logit_scale=4.0), micro_model(tok, seed=1, logit_scale=4.0)
    prompts = [_Ex([tok.bos_id] + tok.encode(f"count {i}:")) for i in range(8)]
    with torch.no_grad():
        p = torch.stack([torch.softmax(model(torch.tensor([e.ids]))[0, -1], -1) for e in prompts]).mean(0)
    S = set(p.topk(64).indices.tolist())

    def reward_fn(exs, comps):
        return [[sum(x in S for x in c) / max(1, len(c)) for c in cs] for cs in comps]
    timing = {"sample": 0.0, "update_forward": 0.0, "samples": 0}
    obj = A.copg_online_objective(model, ref, tok, prompts, 0.05, 512, FP32, reward_fn, max_new=6,
                                  timing=timing)
    log = A.train_loop(model, obj, {"main": D.Loader(A.Indices(8), 8)}, cfg(steps=30, lr=3e-2), str(tmp_path),
                       verbose=False)
    r = [m["reward"] for m in log["metrics"]]
    assert sum(r[-5:]) / 5 > sum(r[:5]) / 5 + 0.4, r
    assert timing["samples"] == 30 * 16 and timing["sample"] > 0
    # the engine built before training now decodes with the trained weights: same greedy tokens as a new one
    eng_old = A.make_engine(model, tok)
    A.sample(eng_old, tok, prompts[:1], 1, 0.0, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fresh = A.make_engine(model, tok)
    assert A.sample(eng_old, tok, prompts, 1, 0.0, 8) == A.sample(fresh, tok, prompts, 1, 0.0, 8)


def test_offline_copg_and_best_of_n(tok, tmp_path):
    model, ref = micro_model(tok, seed=2), micro_model(tok, seed=2)
    exs = T.SUITES["math"].generate(0, 6, "train")
    engine = A.make_engine(model, tok)
    fake = lower_half(tok)
    # best-of-N on scripted samples: per prompt [stopped, stopped, cut at max_new]; reward = number of 7s
    E = tok.eot_id
    outs = {0: [[7, 7], [1], [7, 7, 7, 7]], 1: [[7], [7], [1, 1, 1, 1]], 2: [[1, 7], [1], [2, 2, 2, 2]]}

    class Scripted:
        max_len = 10 ** 6

        def generate(self, prompts, max_new, temperature=0.0, top_k=None, seed=None):
            return [outs[i // 3][i % 3] for i in range(len(prompts))]
    count7 = lambda e, comps: [[float(c.count(7)) for c in cs] for cs in comps]   # noqa: E731
    sft, pairs, stats = A.best_of_n(Scripted(), tok, exs[:3], 3, count7, max_new=4, min_best=1.0)
    # prompt 0: the best (four 7s) was cut at max_new -> no SFT example, no pair; prompt 1: best [7] vs worst
    # [1,1,1,1] (a cut completion may be the rejected one); prompt 2: best [1,7] vs worst [2,2,2,2]
    assert [p["chosen"] for p in pairs] == [[7, E], [1, 7, E]]
    assert [p["rejected"] for p in pairs] == [[1, 1, 1, 1], [2, 2, 2, 2]]
    assert [s[0][-2:] for s in sft] == [[7, E], [7, E]] and stats["pairs"] == 2 and stats["sft"] == 2
    comps = A.sample(engine, tok, exs, 3, 1.0, 6, seed=1)
    groups = [{"seqs": [A.seq(e.prompt_ids(tok), x) for x in c], "rewards": r}
              for e, c, r in zip(exs, comps, fake(exs, comps))]
    refl = A.reference_logps(ref, tok, groups, lambda g: g["seqs"], 2047, FP32)
    log = A.train_loop(model, A.copg_offline_objective(model, tok, groups, refl, 0.5, 2047, FP32),
                       {"main": D.Loader(A.Indices(len(groups)), 3)}, cfg(steps=8), str(tmp_path), verbose=False)
    assert log["loss"][-1] < log["loss"][0]


# ---------------------------------------------------------------------------------------------- resume, errors


@pytest.fixture(scope="module")
def init_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("init")
    micro_model(tok).save_pretrained(str(d))
    tok.save(str(d))
    return str(d)


def cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "posttrain.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=600)


SFT_ARGS = ["sft", "--fp32", "--suites", "safety", "--n-train", "24", "--n-eval", "2", "--n-val", "2", "--max-new", "4",
            "--steps", "6", "--batch-size", "2", "--ckpt-every", "2", "--eval-every", "100", "--lr", "3e-3",
            "--preamble-aug", "0"]


def test_cli_resume_after_a_kill_reproduces_the_losses(init_dir, tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    r = cli(*SFT_ARGS, "--init", init_dir, "--out", full)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["stage"] == "sft" and set(summary["after"]) == {"safety"}
    r = cli(*SFT_ARGS, "--init", init_dir, "--out", killed, env={"POSTTRAIN_CRASH_AT_STEP": "5"})
    assert r.returncode == 17
    assert not os.path.exists(os.path.join(killed, "result.json"))
    r = cli(*SFT_ARGS, "--init", init_dir, "--out", killed)
    assert r.returncode == 2 and "--resume" in r.stderr          # an unfinished stage is not silently redone
    r = cli(*SFT_ARGS, "--init", init_dir, "--out", killed, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    a = json.load(open(os.path.join(full, "checkpoint", "..", "result.json")))
    la = torch.load(os.path.join(full, "checkpoint", "train_state.pt"), weights_only=True)
    lb = torch.load(os.path.join(killed, "checkpoint", "train_state.pt"), weights_only=True)
    assert json.loads(la["meta"])["log"]["loss"] == json.loads(lb["meta"])["log"]["loss"]   # bit for bit
    assert a["steps"] == 6
    m = CommandA.from_pretrained(killed)
    assert Tokenizer.load(killed).vocab_size == m.config.vocab_size or m.config.vocab_size >= 1


def test_cli_preamble_is_saved_with_the_stage(init_dir, tmp_path):
    """--preamble picks the chat format a stage trains on; its tokenizer.json carries it on to serve.py."""
    out = str(tmp_path / "compact")
    r = cli(*SFT_ARGS, "--init", init_dir, "--out", out, "--preamble", "compact")
    assert r.returncode == 0, r.stderr[-2000:]
    assert Tokenizer.load(out).preamble == "compact" and Tokenizer.load(init_dir).preamble == "full"
    r = cli(*SFT_ARGS, "--init", init_dir, "--out", str(tmp_path / "x"), "--preamble", "short")
    assert r.returncode == 2 and "preamble" in r.stderr


def test_cli_bad_input(init_dir, tmp_path, tok):
    r = cli("sft", "--init", str(tmp_path / "nope" / "tiny"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "pretrain.py --tiny" in r.stderr
    r = cli("sft", "--init", init_dir, "--out", str(tmp_path / "o"), "--suites", "cooking")
    assert r.returncode == 2 and "unknown suite" in r.stderr
    r = cli("pref", "--init", init_dir, "--out", str(tmp_path / "o"), "--beta", "0")
    assert r.returncode == 2
    # a reward model from another tokenizer
    other = Tokenizer.train(["completely different text " * 50, "more words here " * 40], vocab_size=280)
    rm_dir = str(tmp_path / "rm")
    A.RewardModel(micro_model(other).config).save(rm_dir, other)
    with pytest.raises(ValueError, match="another tokenizer"):
        A.RewardModel.load(rm_dir, tok)
    with pytest.raises(ValueError, match="another architecture"):
        A.check_same_architecture(micro_model(tok).config, micro_model(tok, num_hidden_layers=2).config, "reference")
    assert not os.path.exists(str(tmp_path / "o"))                 # nothing written by the refused runs


def test_bad_data_and_nan_losses(tok, tmp_path):
    with pytest.raises(ValueError, match="no preference pairs"):
        A.check_pairs([])
    with pytest.raises(ValueError, match="identical"):
        A.check_pairs([{"prompt": [1], "chosen": [2, 3], "rejected": [2, 3]}])
    model = micro_model(tok)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_objective(batch):
        return torch.tensor(float("nan"), requires_grad=True), {}
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        A.train_loop(model, nan_objective, {"main": D.Loader(A.Indices(4), 2)}, cfg(steps=3), str(tmp_path),
                     verbose=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())   # no update was applied


def test_bandit_cli(tmp_path):
    r = cli("bandit", "--iters", "600", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-1000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(s) >= {"mu1", "mu2", "pi_star"} and s["mu1"]["kl_to_pi_star"] < 1e-3
    assert os.path.getsize(tmp_path / "bandit.png") > 10_000


@pytest.mark.slow
def test_micro_pipeline_runs_every_stage_and_resumes(init_dir, tmp_path):
    """`posttrain.py --micro`: every stage of Figure 3 writes a loadable checkpoint scored on every suite; a rerun
    skips them all; a half-written stage directory (no result.json) is redone, not trusted."""
    out = str(tmp_path / "pipe")
    r = cli("--micro", "--init", init_dir, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    stages = ["instruct"] + [f"sft expert {d}" for d in P.DOMAINS] + ["sft soup"] + \
             [f"rl expert {d}" for d in P.DOMAINS] + ["rl soup", "polished"]
    assert list(s["stages"]) == stages
    assert all(set(v) == set(P.EVAL_SUITES) for v in s["stages"].values())
    assert set(s["pairwise"]) == {"verifiers", "reward_model"}
    for st in stages:
        d = os.path.join(out, st.replace(" ", "_"))
        CommandA.from_pretrained(d)
        assert Tokenizer.load(d).vocab_size > 0 and Tokenizer.load(d).preamble == "compact"   # serve.py renders it
    assert os.path.getsize(os.path.join(out, "pipeline.png")) > 10_000
    polish = json.loads(open(os.path.join(out, "polished", "result.json")).read())
    assert polish["rounds"] and polish["val_sum"] >= polish["start_val_sum"]   # never below the RL soup it starts from
    assert polish["val_sum"] == max([polish["start_val_sum"]] + [r["val_sum"] for r in polish["rounds"]])
    os.remove(os.path.join(out, "polished", "result.json"))          # as if killed while writing
    r = cli("--micro", "--init", init_dir, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done earlier, skipped") == len(stages) - 1


def test_findings_read_the_report_claims_off_the_scores():
    """The README's findings table: each claim computed from the stage x suite scores, not written by hand."""
    st = {"instruct": {s: 0.1 for s in P.EVAL_SUITES}}
    for kind, expert, soup in (("sft", 0.4, 0.3), ("rl", 0.5, 0.5)):
        for d in P.DOMAINS:
            st[f"{kind} expert {d}"] = {s: expert for s in P.EVAL_SUITES}
        st[f"{kind} soup"] = {s: soup for s in P.EVAL_SUITES}
    st["sft expert code"]["code"] = 0.05               # below Instruct (and math below): 4 of 6 beat it
    st["sft expert math"]["math"] = 0.0                # scores nothing: left out of retention
    st["rl soup"]["code"] = 0.2                        # code the least kept by the RL soup
    rows = P.findings({"stages": st, "pairwise": {"verifiers": {"win_rate": 0.6, "tie": 0.5}}})
    beat, sft_soup, rl_soup, rl, polish = (r[2] for r in rows)
    assert beat.startswith("4 of 6") and "code 0.10->0.05" in beat and "math 0.10->0.00" in beat
    assert "-0.030 over the 5 domains" in sft_soup and "least kept: safety (-0.10)" in sft_soup
    assert "least kept: code (-0.30)" in rl_soup
    assert rl.startswith("6 of 6") and "SFT soup 0.300" in rl
    assert "win rate 0.60 (50% ties)" in polish


def test_pipeline_trains_on_no_test_example(init_dir):
    pipe = P.Pipeline(init_dir, "/tmp/never-used", P.MICRO_PIPELINE, verbose=False)
    P.check_no_leak(pipe.train, pipe.test)                          # what __init__ ran: ids and prompts disjoint
    for s in P.EVAL_SUITES:
        assert {e.id for e in pipe.val[s]}.isdisjoint({e.id for e in pipe.train[s]})
    # the RAG and math experts' fresh examples: more of the train split, none of validation or test
    for s in ("rag", "math"):
        assert len(pipe.fresh[s]) > len(pipe.train[s])
        assert {e.id for e in pipe.fresh[s]}.isdisjoint({e.id for e in pipe.val[s] + pipe.test[s]})
        P.check_no_leak({s: pipe.fresh[s]}, pipe.test)
    bad = {"math": pipe.train["math"] + pipe.test["math"][:1]}
    with pytest.raises(RuntimeError, match="split is broken"):
        P.check_no_leak(bad, {"math": pipe.test["math"]})


def test_pipeline_needs_an_init():
    r = cli("--micro", "--init", "out/does-not-exist/tiny", "--out", "/tmp/never-written")
    assert r.returncode == 2 and "pretrain.py --tiny" in r.stderr
    assert not os.path.exists("/tmp/never-written")


def test_pairwise_with_the_reward_model_as_judge(tok, init_dir, tmp_path):
    """tasks' pairwise takes the reward model as its judge: antisymmetric, a tie for equal answers, and the
    `posttrain.py pairwise --rm` CLI reports both judges."""
    torch.manual_seed(1)
    rm = A.RewardModel(micro_model(tok).config)
    torch.nn.init.normal_(rm.score.weight, std=1.0)                     # a head that prefers something
    judge = rm.judge(tok)
    ex = T.SUITES["math"].generate(0, 1, "test")[0]
    a, b = "<|START_RESPONSE|>The answer is 4.<|END_RESPONSE|>", "<|START_RESPONSE|>no idea<|END_RESPONSE|>"
    assert judge(ex, a, b) == pytest.approx(-judge(ex, b, a), abs=1e-5) and judge(ex, a, b) != 0
    assert judge(ex, a, a) == pytest.approx(0.0, abs=1e-6) and judge(ex, None, "") == pytest.approx(0.0, abs=1e-6)
    recs = {"math": [{"example": ex, "completion": a}]}
    verdict = T.judge_pairs(recs, {"math": [{"example": ex, "completion": b}]}, judge)
    assert verdict["n"] == 1 and verdict["win"] == float(judge(ex, a, b) > 0)
    rm_dir = str(tmp_path / "rm")
    rm.save(rm_dir, tok)
    r = cli("pairwise", "--a", init_dir, "--b", init_dir, "--rm", rm_dir, "--suites", "math", "--n", "2",
            "--max-new", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out) == {"verifiers", "reward_model"} and out["reward_model"]["tie"] == 1.0   # same model: ties
    r = cli("pairwise", "--a", init_dir, "--b", init_dir, "--n", "0")
    assert r.returncode == 2 and "--n" in r.stderr
