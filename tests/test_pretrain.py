"""pretrain.py: muP groups, the schedule, exact resume, the CLI end to end, and its bad-input errors."""
import errno
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import pretrain as P
from model import CommandA, ModelConfig
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = ["--preset", "micro", "--vocab-size", "512", "--corpus-mb", "0.3", "--seq-len", "64", "--batch-size", "4",
         "--steps", "10", "--eval-every", "5", "--ckpt-every", "3", "--log-every", "5", "--samples", "1",
         "--context-stages", "1:0.5,4:0.5"]


def run(args, env=None, timeout=300):
    return subprocess.run([sys.executable, "pretrain.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def summary(proc):
    """The last stdout line (short: the per-step series are in summary.json, which it names) and that file."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    short = json.loads(line)
    assert len(line) < 2000 and "losses" not in short
    with open(os.path.join(ROOT, short["summary"])) as f:
        full = json.load(f)
    assert {k: full[k] for k in short if k != "summary"} == {k: v for k, v in short.items() if k != "summary"}
    return full


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, summary(run([*MICRO, "--out", str(out)]))


# ---------------------------------------------------------------------------------------------------- recipe


def test_mup_param_groups_cover_every_parameter_once_with_lr_over_m():
    cfg = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=8, mup_base_hidden_size=32)
    model = CommandA(cfg)
    groups = {g["name"]: g for g in P.param_groups(model, P.TrainConfig())}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups["hidden"]["lr_mult"] == 1 / 4                          # eta / m for hidden matrices
    assert groups["embedding"]["lr_mult"] == 1.0                         # embeddings (tied output) keep eta
    assert groups["vector"]["weight_decay"] == 0.0 and all(p.ndim == 1 for p in groups["vector"]["params"])
    assert model.model.layers[0].self_attn.q_proj.weight in groups["hidden"]["params"]


def test_schedule_warmup_stable_linear_cooldown_to_zero():
    cfg = P.TrainConfig(steps=100, lr=1.0, warmup_frac=0.1, cooldown_frac=0.4)
    lrs = [P.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)              # linear warmup
    assert all(l == 1.0 for l in lrs[10:60])                                           # stable
    decay = [lrs[s] - lrs[s + 1] for s in range(60, 99)]
    assert all(d == pytest.approx(1 / 40) for d in decay)                              # linear cooldown
    assert lrs[99] == pytest.approx(1 / 40) and P.lr_at(100, cfg) == 0.0             # ... reaching zero


def test_phases_extend_context_inside_the_cooldown():
    cfg = P.TrainConfig(steps=100, seq_len=256, cooldown_frac=0.3, context_stages=[[1, 0.5], [4, 0.3], [8, 0.2]])
    plan = P.phases(cfg)
    assert [(p["seq_len"], p["mix"]) for p in plan] == [(256, "main"), (256, "high_quality"), (1024, "long"),
                                                         (2048, "long")]
    assert plan[0]["start"] == 0 and plan[-1]["end"] == 100
    assert all(a["end"] == b["start"] for a, b in zip(plan, plan[1:]))
    assert plan[1]["start"] == 70 and [P.phase_at(s, plan) for s in (0, 69, 70, 85, 99)] == [0, 0, 1, 2, 3]


def test_coord_check_mup_keeps_logits_flat_where_sp_grows(tmp_path):
    res = P.coord_check(str(tmp_path / "cc.png"), widths=(64, 256), steps=5)
    g = res["logit_growth_widest_vs_narrowest"]
    assert g["SP"] > 2.5 and g["muP"] < 1.5 and (tmp_path / "cc.png").exists()


# ---------------------------------------------------------------------------------------------------- end to end


def test_cli_end_to_end_micro(full_run):
    out, res = full_run
    for key in ("val_loss", "losses", "tokens", "seconds", "params", "vocab_size", "out"):
        assert key in res
    assert len(res["losses"]) == 10 and res["vocab_size"] == 512
    assert res["val_loss"] < res["uniform_loss"] - 0.2 and all(map(math.isfinite, res["losses"]))
    m = CommandA.from_pretrained(out)
    tok = Tokenizer.load(out)
    assert m.config.vocab_size == tok.vocab_size == 512
    ids = torch.tensor([tok.encode("def f(x):")])
    assert m(ids).shape == (1, ids.shape[1], 512)
    assert (out / "loss.png").exists() and (out / "data" / "data_card.json").exists()


def test_exact_resume_after_a_kill(full_run, tmp_path):
    _, ref = full_run
    crashed = run([*MICRO, "--out", str(tmp_path)], env={"PRETRAIN_CRASH_AT_STEP": "8"})
    assert crashed.returncode == 17                        # died after step 8; last checkpoint at step 6
    resumed = summary(run([*MICRO, "--out", str(tmp_path), "--resume"]))
    assert resumed["losses"] == ref["losses"]              # bit-for-bit the uninterrupted run
    assert resumed["val_loss"] == ref["val_loss"]


# ---------------------------------------------------------------------------------------------------- bad input


def test_missing_and_empty_data_are_clear_errors(tmp_path):
    p = run(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert p.returncode == 2 and "no such file or folder" in p.stderr
    (tmp_path / "empty").mkdir()
    p = run(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert p.returncode == 2 and "error:" in p.stderr and "Traceback" not in p.stderr


def test_corpus_too_small_for_the_sequence_length(tmp_path):
    (tmp_path / "d.txt").write_text("A short document about the Python language and its uses. " * 40)
    p = run(["--data", str(tmp_path / "d.txt"), "--preset", "micro", "--vocab-size", "512", "--seq-len", "512",
             "--batch-size", "64", "--steps", "4", "--out", str(tmp_path / "o")])
    assert p.returncode == 2 and ("too small" in p.stderr or "corpus" in p.stderr), p.stderr[-2000:]


def test_bad_flags_and_incompatible_resume(full_run, tmp_path):
    p = run(["--steps", "0"])
    assert p.returncode == 2 and "--steps must be >= 1" in p.stderr
    p = run(["--clip", "-1"])
    assert p.returncode == 2 and "--clip must be a positive number" in p.stderr
    p = run(["--preset", "gpt5"])
    assert p.returncode == 2 and "unknown" in p.stderr
    out, _ = full_run
    p = run([*MICRO, "--out", str(out), "--resume", "--lr", "0.1"])
    assert p.returncode == 2 and "another configuration" in p.stderr and "lr=" in p.stderr
    p = run([*MICRO, "--out", str(tmp_path / "fresh"), "--resume"])
    assert p.returncode == 2 and "no checkpoint" in p.stderr


@pytest.mark.parametrize("failing", ["torch.save", "safetensors"])
def test_full_disk_on_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing):
    """The real savers' errors: torch.save raises RuntimeError, safetensors raises SafetensorError."""
    from safetensors import SafetensorError
    import safetensors.torch
    tok = Tokenizer.train([open(os.path.join(ROOT, "model.py")).read()], 300)
    model = CommandA(ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=2, num_key_value_heads=1, sliding_window=8))
    opt = torch.optim.AdamW(model.parameters())
    cfg = P.TrainConfig()
    P.save_checkpoint(str(tmp_path), model, opt, 3, {}, [1.0], cfg, "fp", tok, [])
    (tmp_path / "checkpoint.old").mkdir()          # debris of a run killed mid-cleanup must not block saving
    P.save_checkpoint(str(tmp_path), model, opt, 3, {}, [1.0], cfg, "fp", tok, [])

    def full_disk_torch(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file")

    def full_disk_st(*a, **k):
        raise SafetensorError("No space left on device (os error 28)")
    if failing == "torch.save":
        monkeypatch.setattr(torch, "save", full_disk_torch)
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", full_disk_st)
    with pytest.raises(RuntimeError, match="could not write the checkpoint at step 4.*previous checkpoint .* is intact"):
        P.save_checkpoint(str(tmp_path), model, opt, 4, {}, [1.0], cfg, "fp", tok, [])
    monkeypatch.undo()
    state = torch.load(tmp_path / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["step"] == 3 and not (tmp_path / "checkpoint.tmp").exists()
    CommandA.from_pretrained(tmp_path / "checkpoint")


def test_nan_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = CommandA.forward

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        return out * float("nan") if k.get("targets") is not None and calls["n"] >= 3 else out
    monkeypatch.setattr(CommandA, "forward", poisoned)
    cfg = P.TrainConfig(preset="micro", vocab_size=512, corpus_mb=0.3, seq_len=64, batch_size=4, steps=6,
                        samples=0, context_stages=[[1, 1.0]])
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 3"):
        P.train(cfg, str(tmp_path), verbose=False)


def test_fp8_flag_trains_end_to_end(tmp_path):
    res = summary(run(["--preset", "micro", "--vocab-size", "512", "--corpus-mb", "0.3", "--seq-len", "64",
                       "--batch-size", "4", "--steps", "6", "--fp8", "--samples", "0", "--context-stages", "1:1",
                       "--out", str(tmp_path)]))
    assert all(map(math.isfinite, res["losses"])) and res["losses"][-1] < res["losses"][0]
    assert CommandA.from_pretrained(tmp_path).config.fp8 is False  # fp8 is a runtime switch, not a checkpoint field


def test_compile_flag_traces_the_training_step_and_changes_no_loss(tmp_path, monkeypatch):
    """--compile wraps the step in torch.compile. Dynamo's eager backend (the graph capture without inductor's
    minutes of C++ compilation) must trace the model's band attention and chunked loss and train the same."""
    real, compiled = torch.compile, []

    def eager_compile(m, **kw):
        compiled.append(m)
        return real(m, backend="eager")
    monkeypatch.setattr(P.torch, "compile", eager_compile)
    cfg = P.TrainConfig(preset="micro", vocab_size=512, corpus_mb=0.3, seq_len=64, batch_size=4, steps=4,
                        samples=0, context_stages=[[1, 1.0]], eval_every=4, ckpt_every=4)
    ref = P.train(cfg, str(tmp_path / "eager"), verbose=False)
    res = P.train(cfg, str(tmp_path / "compiled"), verbose=False, compile=True)
    assert len(compiled) == 1
    assert res["losses"] == pytest.approx(ref["losses"], rel=1e-5)


def test_lr_sweep_mup_curves_coincide_across_widths_sp_curves_do_not(tmp_path):
    res = P.lr_sweep(str(tmp_path / "sweep.png"), widths=(64, 256), lrs=(1e-3, 3e-3), steps=10)
    L = res["losses"]
    gap = {m: max(abs(L[f"{m}@64@{lr:g}"] - L[f"{m}@256@{lr:g}"]) for lr in (1e-3, 3e-3)) for m in ("SP", "muP")}
    assert gap["muP"] < 0.1 < gap["SP"] and (tmp_path / "sweep.png").exists()


def test_induction_probe_separates_a_copier_from_a_guesser():
    """The probe scores the first copy and the repeat apart: an ideal copier (predicts the token one period
    later from the one a period back) scores ~0 on the repeat only; a uniform model scores log V on both."""
    V, L = 64, 20

    class Copier(torch.nn.Module):
        def __init__(self, copy):
            super().__init__()
            self.w, self.copy = torch.nn.Parameter(torch.zeros(1)), copy

        def forward(self, ids):                   # logits for ids[:, t + 1] at position t
            logits = torch.zeros(*ids.shape, V)
            if self.copy:
                t = torch.arange(ids.shape[1])
                src = (t + 1 - L).clamp(min=0)    # the token one period back of the next one
                logits[:, t >= L - 1] = 30 * torch.nn.functional.one_hot(ids[:, src], V).float()[:, t >= L - 1]
            return logits

    copier = P.induction_probe(Copier(True), (0, V), length=L)
    guesser = P.induction_probe(Copier(False), (0, V), length=L)
    assert guesser["first"] == pytest.approx(math.log(V), abs=1e-3) == guesser["repeat"]
    assert copier["repeat"] < 1e-3 and copier["first"] == pytest.approx(math.log(V), abs=1e-3)
