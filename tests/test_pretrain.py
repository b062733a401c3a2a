"""pretrain.py: muP groups, the schedule, exact resume, the CLI end to end, and its bad-input errors."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import pretrain as P
from model import CommandA, ModelConfig, PRESETS
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


def test_tiny_stages_have_the_reports_four_context_ratios_and_cool_down_in_bf16():
    """Report: the cooldown grows the context 8K -> 32K -> 128K -> 256K, i.e. 1:4:16:32 of the main context,
    and trains in FP8 until the cooldown, which runs in BF16."""
    for fp8 in (False, True):
        plan = P.phases(P.TrainConfig(**{**P.TINY, "fp8": fp8}))
        cool = [p for p in plan if p["name"] != "main"]
        assert [p["seq_len"] // P.TINY["seq_len"] for p in cool] == [1, 4, 16, 32]
        assert [p["mix"] for p in cool] == ["high_quality", "long", "long", "long"]
        assert plan[0]["precision"] == ("fp8" if fp8 else "bf16") and all(p["precision"] == "bf16" for p in cool)
    # every phase sees the same tokens per step: the longest stage still has whole rows
    assert P.rows_per_batch(P.TrainConfig(**P.TINY), 32 * P.TINY["seq_len"]) == 1


def test_instruction_data_comes_from_the_train_split_only(monkeypatch):
    from suite import Suite
    from tasks import SUITES
    with open(os.path.join(ROOT, "chat.py"), encoding="utf-8") as f:
        tok = Tokenizer.train([f.read()], 600)
    splits, real = [], Suite.generate

    def spy(self, seed, n, split="train", difficulty=1):
        splits.append(split)
        return real(self, seed, n, split, difficulty)
    monkeypatch.setattr(Suite, "generate", spy)
    docs = P.instruction_data(tok, 20_000, seed=0)
    assert sum(map(len, docs)) >= 20_000 and set(splits) == {"train"}
    monkeypatch.setattr(Suite, "generate", real)
    # no test-split conversation (of any suite, at the seeds it drew) is among them
    rounds = len(splits) // len(SUITES)
    test = {tuple(tok.render_chat(ex.sft_messages(), ex.documents, ex.tools, ex.safety_mode,
                                  add_generation_prompt=False))
            for r in range(rounds) for s in SUITES.values() for ex in s.generate(r, 16, split="test")}
    assert test and not test & {tuple(d[1:]) for d in docs}
    assert all(d[0] == tok.bos_id for d in docs)
    mixed = P.interleave(list(range(100)), ["a", "b", "c"], seed=0)
    assert sorted(x for x in mixed if isinstance(x, int)) == list(range(100)) and len(mixed) == 103
    assert [x for x in mixed if isinstance(x, str)] == ["a", "b", "c"]


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


def test_bad_flags_and_incompatible_resume(full_run, tmp_path, capsys):
    for argv, msg in ((["--steps", "0"], "--steps must be >= 1"), (["--clip", "-1"], "--clip must be a positive number"),
                      (["--preset", "gpt5"], "unknown")):          # argparse errors: in-process, no torch start-up
        with pytest.raises(SystemExit) as e:
            P.main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err
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


def test_fp8_until_the_cooldown_then_bf16_and_resume_across_the_switch_is_exact(tmp_path, monkeypatch):
    import model as M
    calls, per_step, real_fb = [0], [], P.forward_backward
    real_fp8 = M.fp8_linear

    def counting_fp8(x, w):
        calls[0] += 1
        return real_fp8(x, w)

    def fb(*a, **kw):
        before = calls[0]
        out = real_fb(*a, **kw)
        per_step.append(calls[0] > before)
        return out
    monkeypatch.setattr(M, "fp8_linear", counting_fp8)
    monkeypatch.setattr(P, "forward_backward", fb)
    cfg = P.TrainConfig(preset="micro", vocab_size=512, corpus_mb=0.3, seq_len=64, batch_size=4, steps=8,
                        cooldown_frac=0.5, samples=0, context_stages=[[1, 1.0]], eval_every=8, ckpt_every=8,
                        fp8=True)
    res = P.train(cfg, str(tmp_path / "direct"), verbose=False)
    assert per_step == [True] * 4 + [False] * 4                     # FP8 in the main phase, off in the cooldown
    assert [p["precision"] for p in res["phases"]][0] == "fp8" and res["phases"][1]["precision"] != "fp8"
    assert res["phases"][0]["steps"] == [0, 3] and res["phases"][1]["steps"] == [4, 7]
    # the CLI logs the switch, and a run killed after it resumes from a checkpoint before it to the same losses,
    # bit for bit, as the uninterrupted run above (the same configuration)
    args = ["--preset", "micro", "--vocab-size", "512", "--corpus-mb", "0.3", "--seq-len", "64", "--batch-size",
            "4", "--steps", "8", "--cooldown-frac", "0.5", "--fp8", "--samples", "0", "--context-stages", "1:1",
            "--ckpt-every", "3", "--eval-every", "8", "--out", str(tmp_path / "cli")]
    crashed = run(args, env={"PRETRAIN_CRASH_AT_STEP": "5"})          # last checkpoint: step 3, in FP8
    assert crashed.returncode == 17 and "FP8 -> BF16" in crashed.stdout + crashed.stderr
    assert summary(run(args + ["--resume"]))["losses"] == res["losses"]


def test_recompute_gives_the_same_losses(tmp_path):
    cfg = dict(preset="micro", vocab_size=512, corpus_mb=0.3, seq_len=64, batch_size=4, steps=4, samples=0,
               context_stages=[[1, 1.0]], eval_every=4, ckpt_every=4)
    ref = P.train(P.TrainConfig(**cfg), str(tmp_path / "plain"), verbose=False)
    res = P.train(P.TrainConfig(**cfg, recompute=True), str(tmp_path / "recompute"), verbose=False)
    assert res["losses"] == pytest.approx(ref["losses"], rel=1e-6, abs=0)


def test_recompute_bench_reports_time_and_memory_with_the_same_losses():
    import bench
    off, on = bench.recompute_bench("micro", batch=2, T=32, window=0, reps=1, rounds=1)
    assert (off["recompute"], on["recompute"]) == (False, True) and off["losses"] == on["losses"]
    assert off["step_s"] > 0 and on["step_s"] > 0 and off["peak_above_base_bytes"] >= 0


def test_train_bench_races_each_precision_against_transformers_in_the_same_precision(monkeypatch):
    import bench
    try:
        import transformers  # noqa: F401  (the yardstick rows appear only where transformers is installed)
        hf = {"transformers-bf16", "transformers-fp32"}
    except ImportError:
        hf = set()
    # where bf16 matmuls are slower than fp32 (emulated: no native bf16) only fp32 races
    monkeypatch.setattr(bench, "measure_matmul_peak", lambda dtype: {torch.bfloat16: 1e9, torch.float32: 1e11}[dtype])
    r = bench.train_bench(("micro",), batch=2, T=32, window=8, reps=1)
    assert {row["method"] for row in r["rows"]} == {"fp32"} | {m for m in hf if "fp32" in m}
    monkeypatch.setattr(bench, "measure_matmul_peak", lambda dtype: {torch.bfloat16: 2e11, torch.float32: 1e11}[dtype])
    r = bench.train_bench(("micro",), batch=2, T=32, window=8, reps=1)
    rows = {row["method"]: row for row in r["rows"]}
    assert set(rows) == {"bf16", "fp32"} | hf
    cfg = dataclasses.replace(bench.PRESETS["micro"], sliding_window=8)
    for m, row in rows.items():
        prec = row["precision"]
        assert prec == ("fp32" if "fp32" in m else "bf16") and row["window"] == 8
        assert row["mfu"] == pytest.approx(row["tok_per_s"] * bench.flops_per_token(cfg, 32) / r["peak_flops"][prec],
                                           rel=1e-2, abs=1e-4)
        if hf:   # each precision against transformers in the same precision
            ref = rows["transformers-" + prec]["tok_per_s"]
            assert row["vs_transformers"] == pytest.approx(row["tok_per_s"] / ref, abs=0.011)


def test_gpu_checks_run_on_a_cpu_as_a_dry_run(monkeypatch, capsys):
    """bench.py --gpu is the one script a lent GPU runs (issue #17's device checks). The same code runs here on
    micro shapes, so that it works the first time there: every check reports, MFU and the decode bound follow
    from the measured peak and bandwidth, the engine decodes transformers' tokens, and without CUDA the CLI
    says how to dry-run instead of timing a CPU."""
    import bench
    monkeypatch.setattr(bench, "device_matmul_peak", lambda device, dtype=torch.bfloat16: 1e11)
    monkeypatch.setattr(bench, "device_bandwidth", lambda device: 1e10)
    r = bench.gpu_checks("cpu", "micro", reps=1)
    assert not [row for row in r["rows"] if "error" in row]           # each check reports its error as a row
    rows = {(row["check"], row.get("batch")): row for row in r["rows"]}
    s = bench.CHECK_SIZES["micro"]
    for p in ("bf16", "fp8"):
        row = rows[(f"train {p}", None)]
        assert row["mfu"] == pytest.approx(row["tok_per_s"] * bench.flops_per_token(s["cfg"], s["T"]) / 1e11,
                                           rel=1e-2, abs=1e-4)
    # a sanity check only (at initialization any weights give ~ln V): FP8 runs and its loss is no garbage
    assert rows[("train fp8", None)]["first_loss"] == pytest.approx(rows[("train bf16", None)]["first_loss"], rel=0.02)
    assert "skipped" in rows[("attention", None)]                    # FlexAttention's backward is CUDA-only
    try:
        import transformers  # noqa: F401
        hf = True
    except ImportError:
        hf = False
    for B in s["decode"]["batches"]:
        assert rows[("decode engine", B)]["tok_per_s"] > 0
        if hf:
            assert rows[("decode hf-generate", B)]["same_tokens_as_engine"] == 1.0
            assert rows[("decode engine", B)]["vs_hf_generate"] > 0
    bound = rows[("decode bound, batch 1", None)]
    assert bound["bound_tok_s"] == pytest.approx(1e10 / (4 * s["cfg"].num_params()), rel=1e-3)   # fp32 weights
    assert "| train fp8 |" in capsys.readouterr().out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.main(["--gpu"])
        assert "--device cpu --size micro" in capsys.readouterr().err


def test_hf_yardstick_loads_in_the_dtype_and_keeps_fp32_rope():
    """The GPU decode race runs transformers in bf16. Loading in bf16 keeps its RoPE frequencies in fp32; a cast
    after loading would round them (a non-persistent buffer) and make `generate` diverge for that reason alone."""
    pytest.importorskip("transformers")
    import bench
    hf = bench._hf_model(CommandA(bench.PRESETS["micro"]), torch.bfloat16)
    assert next(hf.parameters()).dtype == torch.bfloat16
    assert {b.dtype for n, b in hf.named_buffers() if "inv_freq" in n} == {torch.float32}


def test_gpu_checks_go_on_past_a_failing_check(monkeypatch):
    """A lease is minutes long and its CUDA paths have never run: a check that raises becomes an error row and
    the checks after it still run."""
    import bench
    monkeypatch.setattr(bench, "device_matmul_peak", lambda device, dtype=torch.bfloat16: 1e11)
    monkeypatch.setattr(bench, "device_bandwidth", lambda device: 1e10)
    monkeypatch.setattr(bench, "check_training", lambda *a: [{"check": "train bf16"}])

    def broken(*a):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(bench, "check_attention", broken)
    monkeypatch.setattr(bench, "check_decode", lambda *a: [{"check": "decode engine", "batch": 1}])
    monkeypatch.setattr(bench, "check_decode_bound", lambda *a: [{"check": "decode bound, batch 1"}])
    rows = bench.gpu_checks("cpu", "micro")["rows"]
    assert [r["check"] for r in rows] == ["train bf16", "attention", "decode engine", "decode bound, batch 1"]
    assert "illegal memory access" in rows[1]["error"]


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


# ---------------------------------------------------------------------------------------------------- ablations


@pytest.mark.slow
def test_ablation_cli_runs_every_claim_on_a_micro_config(tmp_path):
    import ablate
    p = subprocess.run([sys.executable, "ablate.py", "--micro", "--reps", "1", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.load(open(tmp_path / "ablate.json"))
    v = r["variants"]
    assert set(v) == set(ablate.VARIANTS) and (tmp_path / "ablate.png").exists()
    tokens = {x["tokens"] for x in v.values()}
    assert len(tokens) == 1                                                    # equal tokens for every variant
    assert all(math.isfinite(x["val_loss"]) and x["step_tok_per_s"] > 0 for x in v.values())
    # the sequential block has one more (weight-only) LayerNorm per layer, counted on the trained module;
    # the attention variants differ only in KV bytes
    n_layers, H = PRESETS["micro"].num_hidden_layers, PRESETS["micro"].hidden_size
    assert v["sequential block"]["params"] - v[ablate.REPORT_MODEL]["params"] == n_layers * H
    kv = {n: list(v[n]["kv_bytes"].values())[-1] for n in ("all full / NoPE", ablate.REPORT_MODEL,
                                                            "all sliding / RoPE")}
    assert kv["all full / NoPE"] > kv[ablate.REPORT_MODEL] > kv["all sliding / RoPE"]
    assert v["no cooldown"]["phases"] == [{"name": "main", "seq_len": 64, "steps": [0, 7],
                                           "precision": v["no cooldown"]["phases"][0]["precision"]}]
    assert len(v[ablate.REPORT_MODEL]["phases"]) == 3 and "| sequential block |" in p.stdout
    # decay only: the same cooldown steps, on the main mix at the main context
    assert [(x["name"], x["steps"]) for x in v["decay on the main mix"]["phases"]] == [("main", [0, 5]),
                                                                                        ("cooldown@64", [6, 7])]
    assert v[ablate.REPORT_MODEL]["retrieval"]["distance"] == r["distance"] > PRESETS["micro"].sliding_window
    # --race-only re-measures the throughput of the saved run without training, and keeps everything else
    p = subprocess.run([sys.executable, "ablate.py", "--micro", "--race-only", "--reps", "1", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r2 = json.load(open(tmp_path / "ablate.json"))
    assert {n: x["val_loss"] for n, x in r2["variants"].items()} == {n: x["val_loss"] for n, x in v.items()}
    assert all(x["step_tok_per_s"] > 0 for x in r2["variants"].values()) and "| no cooldown |" in p.stdout


def test_sequential_block_is_the_sequential_formula():
    import ablate
    from model import rope_cos_sin
    torch.manual_seed(0)
    cfg = PRESETS["micro"]
    layer = ablate.SequentialLayer(cfg, 0)
    h = torch.randn(2, 5, cfg.hidden_size)
    rope = rope_cos_sin(torch.arange(5).expand(2, 5), cfg.head_dim, cfg.rope_theta, h.dtype)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    h1 = h + layer.self_attn(layer.input_layernorm(h), rope, mask)
    ref = h1 + layer.mlp(layer.post_attention_layernorm(h1))
    torch.testing.assert_close(layer(h, rope, mask), ref)
    parallel = h + layer.self_attn(layer.input_layernorm(h), rope, mask) + layer.mlp(layer.input_layernorm(h))
    assert not torch.allclose(ref, parallel, atol=1e-4)
    assert isinstance(ablate.sequential_model(cfg).model.layers[0], ablate.SequentialLayer)
    assert not isinstance(CommandA(cfg).model.layers[0], ablate.SequentialLayer)   # the patch was undone
