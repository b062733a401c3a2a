"""parallel.py: DP, FSDP (HSDP), SP and TP on gloo/CPU against one process -- losses over several optimizer steps
and final parameters, with sliding windows, document masks, GQA and muP groups in the model; FSDP memory per
rank; counted collectives against the plan's formulas; checkpoints across layouts; the written-out Megatron
block against parallelize_module's; pretrain.py under torchrun; the plan CLI.

Two process-group launches (2 and 4 ranks) run all distributed checks; the tests read their results."""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import parallel as par
import parity
import pretrain as P
from model import CommandA, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# GQA (4 query heads, 2 KV heads), 3 sliding layers (window 6 < T) + 1 full, muP on (m = 2)
CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, sliding_window=6, max_position_embeddings=64, mup_base_hidden_size=32)
B, T, STEPS = 4, 16, 3
TOL = dict(rtol=2e-4, atol=2e-5)


def batches(n=STEPS, seed=0):
    """Packed rows with several documents each (document ids, -100 targets at every document end)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, CFG.vocab_size, (B, T + 1), generator=g)
        cuts = torch.rand(B, T, generator=g) < 0.15
        doc = cuts.long().cumsum(1)
        tgt = ids[:, 1:].clone()
        tgt[:, :-1][doc[:, 1:] != doc[:, :-1]] = -100                 # never predict across a document boundary
        out.append({"input_ids": ids[:, :-1], "targets": tgt, "doc_ids": doc})
    return out


def fresh(seed=0):
    torch.manual_seed(seed)
    model = CommandA(CFG)
    opt = torch.optim.AdamW(P.param_groups(model, P.TrainConfig(weight_decay=0.1)), lr=1e-2, betas=(0.9, 0.95))
    for g in opt.param_groups:
        g["lr"] = 1e-2 * g["lr_mult"]
    return model, opt


def train(model, opt, data):
    losses = []
    for b in data:
        loss = model(b["input_ids"], targets=b["targets"], doc_ids=b["doc_ids"])
        loss.backward()
        if par.is_parallel(model):
            par.sync_grads(model)
            par.clip_grad_norm_(model, 0.5)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def max_param_diff(sd, ref):
    return max((sd[k].float() - ref[k].float()).abs().max().item() for k in ref)


# ---------------------------------------------------------------------------------------------------- workers


def _layouts(world):
    if world == 2:
        return [dict(dp=2), dict(fsdp=2), dict(sp=2), dict(tp=2)]
    return [dict(fsdp=2, tp=2), dict(sp=2, tp=2), dict(dp=2, fsdp=2), dict(fsdp=2, sp=2)]


def _job(world):
    rank = dist.get_rank()
    data = batches()
    res = {"layouts": {}}
    if rank == 0:
        model, opt = fresh()
        res["ref_losses"] = train(model, opt, data)
        ref_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        res["ref_bytes"] = par.local_state_bytes(model, opt)
    for lay in _layouts(world):
        pc = par.ParallelConfig(**lay)
        model, opt = fresh()
        par.parallelize(model, pc)
        opt = torch.optim.AdamW(P.param_groups(model, P.TrainConfig(weight_decay=0.1)), lr=1e-2, betas=(0.9, 0.95))
        for g in opt.param_groups:
            g["lr"] = 1e-2 * g["lr_mult"]
        par.COLLECTIVES.clear()
        losses = train(model, opt, data[:1])
        counted = {f"{op}@{ax}": n for (op, ax), n in par.COLLECTIVES.items() if op != "bytes"}
        losses += train(model, opt, data[1:])
        sd = par.gather_full_model(model).state_dict()   # a collective: every rank
        r = {"losses": losses, "counted": counted, "bytes": par.local_state_bytes(model, opt),
             "formula": {f"{op}@{ax}": n for (op, ax), n in par.collectives_per_step(CFG, pc).items()}}
        if rank == 0:
            r["param_diff"] = max_param_diff(sd, ref_sd)
        res["layouts"][json.dumps(lay)] = r
    if world == 2:
        res["library"] = _library_block_check()
        res["errors"] = _error_checks()
        res["tp_decode"] = _tp_decode_check()
    else:
        res["ckpt"] = _checkpoint_round_trip(data)
    return res


def _checkpoint_round_trip(data):
    """2 steps in fsdp x tp -> full (HF-layout) state -> 1 step in sp x tp, and 1 step in one process: both
    continue exactly like an uninterrupted single-process run."""
    rank = dist.get_rank()
    out = {}
    a, opt_a = fresh()
    par.parallelize(a, par.ParallelConfig(fsdp=2, tp=2))
    opt_a = torch.optim.AdamW(P.param_groups(a, P.TrainConfig(weight_decay=0.1)), lr=1e-2, betas=(0.9, 0.95))
    for g in opt_a.param_groups:
        g["lr"] = 1e-2 * g["lr_mult"]
    train(a, opt_a, data[:2])
    msd, osd = par.full_model_state(a), par.full_optimizer_state(a, opt_a)
    b, _ = fresh(seed=123)                     # other init: everything must come from the checkpoint
    par.parallelize(b, par.ParallelConfig(sp=2, tp=2))
    opt_b = torch.optim.AdamW(P.param_groups(b, P.TrainConfig(weight_decay=0.1)), lr=1e-2, betas=(0.9, 0.95))
    par.load_full_state(b, opt_b, msd, osd)
    out["resumed_loss"] = train(b, opt_b, data[2:])
    out["resumed_sd"] = par.full_model_state(b)
    if rank == 0:
        ref, ref_opt = fresh()
        out["ref_losses"] = train(ref, ref_opt, data)
        ref_sd = ref.state_dict()
        out["layout_diff"] = max_param_diff(out.pop("resumed_sd"), ref_sd)
        one, one_opt = fresh(seed=7)           # the same checkpoint in a single process
        one.load_state_dict(msd)
        one_opt.load_state_dict(osd)
        out["single_loss"] = train(one, one_opt, data[2:])
        out["single_diff"] = max_param_diff(one.state_dict(), ref_sd)
        # ... and through the HF files: save_pretrained + from_pretrained of the gathered model
        with tempfile.TemporaryDirectory() as d:
            m = CommandA(CFG)
            m.load_state_dict(msd)
            m.save_pretrained(d)
            back = CommandA.from_pretrained(d)
            out["hf_equal"] = all(torch.equal(back.state_dict()[k], msd[k]) for k in msd)
    else:
        out.pop("resumed_sd")
    return out


def _library_block_check():
    """model.py's layer with parallel.py's Megatron TP+SP hooks (1 all-gather, 1 reduce-scatter) against the same
    layer sharded by parallelize_module with the library's SequenceParallel / Colwise / Rowwise styles and run
    through model.py's own DecoderLayer.forward: same outputs, same input and weight gradients."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)
    from model import rope_cos_sin, attention_allowed
    rank = dist.get_rank()
    torch.manual_seed(1)
    model = CommandA(CFG)
    x = torch.randn(2, T, CFG.hidden_size)
    pos = torch.arange(T).expand(2, T)
    rope = rope_cos_sin(pos, CFG.head_dim, CFG.rope_theta, torch.float32)
    mask = attention_allowed(pos[:, None, :, None], pos[:, None, None, :], 0, 0, CFG.sliding_window)
    Tl = T // 2
    mine = CommandA(CFG)
    mine.load_state_dict(model.state_dict())
    par.parallelize(mine, par.ParallelConfig(tp=2))
    xl = x[:, rank * Tl:(rank + 1) * Tl].clone().requires_grad_(True)
    y_mine = mine.model.layers[0](xl, rope, mask)
    y_mine.pow(2).sum().backward()

    lib = CommandA(CFG).model.layers[0]
    lib.load_state_dict(model.model.layers[0].state_dict())
    mesh = mine._parallel.mesh["tp"]
    parallelize_module(lib, mesh, {
        "input_layernorm": SequenceParallel(),
        "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                        desired_input_layouts=(Replicate(), None, None, None)),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        **{k: ColwiseParallel() for k, dim in par.TP_SHARD_DIM.items() if dim == 0},
        "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)})
    lib.self_attn.nh //= 2
    lib.self_attn.nkv //= 2
    xl2 = x[:, rank * Tl:(rank + 1) * Tl].clone().requires_grad_(True)
    from torch.distributed.tensor import DTensor
    y_lib = lib(DTensor.from_local(xl2, mesh, [Shard(1)]), rope, mask)   # the residual as a sequence-sharded DTensor
    y_lib.to_local().pow(2).sum().backward()
    out = {"out_diff": (y_lib.to_local() - y_mine).abs().max().item(),
           "dx_diff": (xl2.grad - xl.grad).abs().max().item()}
    gm = {n: par._local(p.grad) for n, p in mine.model.layers[0].named_parameters()}
    gm["input_layernorm.weight"] = gm["input_layernorm.weight"].clone()
    dist.all_reduce(gm["input_layernorm.weight"])          # what sync_grads does for TP-replicated params
    # the library leaves the norm weight's gradient Partial (a pending sum over tp); sync_grads() sums it
    assert lib.input_layernorm.weight.grad.placements[0].is_partial()
    g_lib = {n: par._local(p.grad.redistribute(placements=[Replicate()]) if p.grad.placements[0].is_partial()
                           else p.grad) for n, p in lib.named_parameters()}
    out["grad_diffs"] = {n: (g_lib[n] - gm[n]).abs().max().item() for n in g_lib}
    out["grad_diff"] = max(out["grad_diffs"].values())
    # the autograd all-gather against the library's functional collective (forward and backward)
    from torch.distributed import _functional_collectives as funcol
    all_gather_tensor_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    a = torch.randn(2, 3, 4, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    w = torch.randn(2, 6, 4)
    (par.all_gather_seq(a, mine._parallel, "tp", dim=1) * w).sum().backward()
    g = all_gather_tensor_autograd(b.transpose(0, 1).contiguous(), 0, mine._parallel.groups["tp"])
    (g.transpose(0, 1) * w).sum().backward()
    out["allgather_grad_diff"] = (a.grad - b.grad).abs().max().item()
    return out


def _tp_decode_check():
    """serve.py's Engine on a model sharded by parallel.shard_for_decode (serve.py --tp 2): a window-crossing
    batch decodes greedily to one process's tokens, fused and unfused, echo log-probs match, and each model
    call costs one all-reduce per layer."""
    import copy
    from serve import Engine
    rank = dist.get_rank()
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, sliding_window=6, max_position_embeddings=256)
    model = CommandA(cfg)
    model.init_weights()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (9, 3, 14)]   # W = 6: windows cross
    out = {}
    for fused in (True, False):
        one = Engine(copy.deepcopy(model), fused=fused, max_batch=4, max_len=64)
        engine = Engine(par.shard_for_decode(copy.deepcopy(model)), fused=fused, max_batch=4, max_len=64,
                        tp_group=dist.group.WORLD)
        par.COLLECTIVES.clear()
        if rank == 0:
            got, lp = engine.generate(prompts, 10, stop_tokens=[]), engine.prompt_logprobs(prompts[2], 2)
            engine.stop()
            out[fused] = {"same_tokens": got == one.generate(prompts, 10, stop_tokens=[]),
                          "lp_diff": max(abs(a - b) for (a, _), (b, _) in zip(lp[1:], one.prompt_logprobs(prompts[2], 2)[1:])),
                          "all_reduces": par.COLLECTIVES[("all_reduce", "tp_decode")],
                          "model_calls": sum(engine.tp_calls[k] for k in ("prefill", "decode", "forward")),
                          "kv_heads": engine.cache.k[0].shape[1]}
        else:
            engine.follow()
    try:
        par.shard_for_decode(CommandA(ModelConfig(**{**CFG.__dict__, "num_key_value_heads": 1, "layer_types": None})))
    except ValueError as e:
        out["error"] = str(e)
    return out


def _error_checks():
    out = {}
    bad = ModelConfig(**{**{f: getattr(CFG, f) for f in ("vocab_size", "hidden_size", "intermediate_size",
                                                         "num_hidden_layers", "sliding_window")},
                         "num_attention_heads": 4, "num_key_value_heads": 1})
    try:
        par.parallelize(CommandA(bad), par.ParallelConfig(tp=2))
    except ValueError as e:
        out["kv"] = str(e)
    try:
        par.parallelize(CommandA(CFG), par.ParallelConfig(fsdp=4))
    except ValueError as e:
        out["world"] = str(e)
    m, _ = fresh()
    par.parallelize(m, par.ParallelConfig(sp=2))
    try:
        m(torch.zeros(2, 15, dtype=torch.long), targets=torch.zeros(2, 15, dtype=torch.long))
    except ValueError as e:
        out["seq"] = str(e)
    return out


def _worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    par.init_distributed("cpu")       # gloo on CPU even where a GPU exists: the models here live on the CPU
    try:
        res = _job(world)
    except Exception:
        res = {"error": traceback.format_exc()}
    if rank == 0 or "error" in res:
        torch.save(res, f"{path}.{rank}")
    # Every rank must reach teardown before any destroys the group: a rank that tore gloo down while its
    # peer still had a send in flight aborted the peer (SIGABRT, 5 of 41 launches; 0 of 30 with the barrier).
    dist.barrier()
    dist.destroy_process_group()


def _launch(world, tmp):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp / f"res{world}")
    ctx = mp.spawn(_worker, args=(world, port, path), nprocs=world, join=False)
    deadline = time.time() + 600                 # a collective that never completes must fail, not hang
    while not ctx.join(timeout=2):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world}-process job did not finish in 600 s (a mismatched collective?)")
    for r in range(world):
        if os.path.exists(f"{path}.{r}"):
            res = torch.load(f"{path}.{r}", weights_only=False)  # our own test output, written just now
            assert "error" not in res, f"rank {r}:\n{res['error']}"
    return torch.load(f"{path}.0", weights_only=False)


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _launch(2, tmp_path_factory.mktemp("w2"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _launch(4, tmp_path_factory.mktemp("w4"))


# ---------------------------------------------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(dp=2), dict(fsdp=2), dict(sp=2), dict(tp=2)])
def test_each_axis_matches_one_process_losses_and_parameters(world2, layout):
    r = world2["layouts"][json.dumps(layout)]
    assert len(r["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(world2["ref_losses"]), **TOL)
    assert r["param_diff"] < 1e-4       # absolute, after 3 Adam steps of lr 1e-2: fp32 sum order only


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(fsdp=2, tp=2), dict(sp=2, tp=2), dict(dp=2, fsdp=2), dict(fsdp=2, sp=2)])
def test_2x2_layouts_match_one_process(world4, layout):
    r = world4["layouts"][json.dumps(layout)]
    torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(world4["ref_losses"]), **TOL)
    assert r["param_diff"] < 1e-4       # absolute, after 3 Adam steps of lr 1e-2: fp32 sum order only


@pytest.mark.slow
def test_fsdp_holds_one_nth_of_params_and_adam_state(world2, world4):
    ref = world2["ref_bytes"]
    assert world2["layouts"][json.dumps(dict(fsdp=2))]["bytes"] == {k: v // 2 for k, v in ref.items()}
    assert world2["layouts"][json.dumps(dict(dp=2))]["bytes"] == ref          # DP replicates
    assert world4["layouts"][json.dumps(dict(dp=2, fsdp=2))]["bytes"] == {k: v // 2 for k, v in ref.items()}


@pytest.mark.slow
def test_counted_collectives_match_the_plan_formula(world2, world4):
    for res in (world2, world4):
        for lay, r in res["layouts"].items():
            assert r["counted"] == r["formula"], lay
    tp = world2["layouts"][json.dumps(dict(tp=2))]["counted"]
    assert tp["all_gather@tp"] == tp["reduce_scatter@tp"] == 2 * CFG.num_hidden_layers   # 1 + 1 per layer, x2 bwd


@pytest.mark.slow
def test_checkpoint_round_trip_between_layouts_and_one_process(world4):
    c = world4["ckpt"]
    torch.testing.assert_close(torch.tensor(c["resumed_loss"]), torch.tensor(c["ref_losses"][2:]), **TOL)
    torch.testing.assert_close(torch.tensor(c["single_loss"]), torch.tensor(c["ref_losses"][2:]), **TOL)
    assert c["layout_diff"] < 1e-4 and c["single_diff"] < 1e-4 and c["hf_equal"]


@pytest.mark.slow
def test_written_out_megatron_block_equals_the_parallelize_module_path(world2):
    lib = world2["library"]
    assert lib["out_diff"] < 1e-5 and lib["dx_diff"] < 1e-5 and lib["grad_diff"] < 1e-5
    assert lib["allgather_grad_diff"] < 1e-6


@pytest.mark.slow
def test_bad_layouts_are_clear_errors(world2):
    e = world2["errors"]
    assert "num_key_value_heads=1" in e["kv"] and "divisible" in e["kv"]
    assert "world size is 2" in e["world"]
    assert "15 tokens" in e["seq"]


def test_plan_cli_command_a_table_and_json():
    proc = subprocess.run([sys.executable, "parallel.py", "--plan", "command-a", "--gpus", "64", "--tp", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["chosen"] == {"dp": 1, "fsdp": 8, "sp": 1, "tp": 8}
    first = next(r for r in res["rows"] if r["layout"] == res["chosen"])
    # ZeRO accounting: 16 bytes/param split over tp x fsdp (the replicated embedding only over fsdp)
    cfg = P.PRESETS["command-a"]
    H, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    per_rank = (cfg.num_params() - V * H - (L + 1) * H) / 8 / 8 + (V * H + (L + 1) * H) / 8
    m = first["memory"]
    assert m["params"] + m["grads"] + m["optimizer"] == pytest.approx(16 * per_rank)
    full_fsdp = next(r for r in res["rows"] if r["layout"] == {"dp": 1, "fsdp": 64, "sp": 1, "tp": 1})
    assert full_fsdp["comm_bytes_per_step"]["tp"] == 0 and full_fsdp["comm_bytes_per_step"]["fsdp"] > 0
    plan_out, decode_out = proc.stdout.split("\ndecoding command-a")
    plan_out, where_out = plan_out.split("\nwhere TP is needed")
    table = [l for l in plan_out.splitlines() if l.startswith("| ")]
    assert len(table) == 1 + len(res["rows"])
    assert any(l.startswith(f"| {first['rank']} | 1 | 8 | 1 | 8 | 65,536 |") for l in table)
    assert f"(rank {first['rank']} of {len(res['rows'])})" in plan_out
    assert len([l for l in where_out.splitlines() if l.startswith("| ")]) == 1 + 4      # seq 8K, 32K, 128K, 256K
    assert len([l for l in decode_out.splitlines() if l.startswith("| ")]) == 1 + len(res["decode"]) == 9
    assert first["collectives_per_step"]["all_gather@tp"] == 2 * L
    table_only = subprocess.run([sys.executable, "parallel.py", "--plan", "command-a", "--gpus", "64"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
    assert table_only.returncode == 0, table_only.stderr
    assert len(json.loads(table_only.stdout.strip().splitlines()[-1])["rows"]) == len(res["rows"])
    bad = subprocess.run([sys.executable, "parallel.py", "--plan", "command-a", "--gpus", "64", "--tp", "16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "num_key_value_heads=8" in bad.stderr


def _plan_rows(gather_dtype="fp32", seq=8192, micro_batch=1, recompute=False, gpus=64):
    cfg = P.PRESETS["command-a"]
    return par.plan_table(cfg, par.candidate_layouts(gpus, cfg), seq, micro_batch, recompute, gather_dtype)


def _row(rows, **layout):
    return next(r for r in rows if r["layout"] == {"dp": 1, "fsdp": 1, "sp": 1, "tp": 1, **layout})


def test_plan_lists_the_reports_no_tp_layouts_that_fit_beside_tp_ones_with_activation_and_parameter_traffic():
    """The report pretrains with DP, FSDP and SP only: on 64 H100s at seq 8192, fsdp 8 x sp 8 fits (~67 GB) and
    is listed with pure FSDP, HSDP and DP x FSDP x SP beside the TP layouts; its only activation traffic is SP's
    K/V gathers, a TP layout's is the per-layer norm all-gather + partial-sum reduce-scatter."""
    table, rows = _plan_rows()
    cfg = P.PRESETS["command-a"]
    H, L, N = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_params()
    kvd = cfg.num_key_value_heads * cfg.head_dim
    no_tp = [r for r in rows if r["layout"]["tp"] == 1]
    fams = {(r["layout"]["dp"] > 1, r["layout"]["sp"] > 1) for r in no_tp if r["layout"]["fsdp"] > 1}
    assert fams == {(False, False), (True, False), (False, True), (True, True)}   # FSDP, HSDP, FSDP x SP, all three
    assert any(r["layout"]["tp"] > 1 and r["fits_h100"] for r in rows)
    fs = _row(rows, fsdp=8, sp=8)
    assert fs["fits_h100"] and 60e9 < fs["memory"]["total"] < 75e9
    assert f"| {fs['rank']} | 1 | 8 | 8 | 1 | 65,536 |" in table and "| yes |" in table
    tr = fs["traffic_bytes_per_step"]
    assert tr["activation"] == pytest.approx(L * 2 * 7 / 8 * 8192 * 2 * kvd * 2)             # SP's K/V, bf16
    assert tr["parameter"] == pytest.approx(3 * 63 / 64 * N * 4)        # fp32 gathers fwd + bwd, fp32 grad RS
    assert _row(rows, fsdp=64)["traffic_bytes_per_step"]["activation"] == 0
    tp = _row(rows, fsdp=8, tp=8)
    assert tp["traffic_bytes_per_step"]["activation"] == pytest.approx(L * 4 * 7 / 8 * 8192 * H * 4)
    assert tp["traffic_bytes_per_step"]["parameter"] < tr["parameter"] / 6      # TP splits the weights by 8
    for r in rows:
        t, c = r["traffic_bytes_per_step"], r["comm_bytes_per_step"]
        assert t["activation"] + t["parameter"] == pytest.approx(c["total"])
        assert (t["activation"] > c["sp"]) == (r["layout"]["tp"] > 1)


def test_plan_bf16_gathers_halve_gathered_memory_and_the_fsdp_all_gather_traffic_only():
    _, f32 = _plan_rows("fp32")
    _, b16 = _plan_rows("bf16")
    by = {json.dumps(r["layout"]): r for r in f32}
    for r in b16:
        a = by[json.dumps(r["layout"])]
        assert r["gather_dtype"] == "bf16" and a["gather_dtype"] == "fp32"
        assert r["memory"]["gathered"] == pytest.approx(a["memory"]["gathered"] / 2)
        ta, tb = a["traffic_bytes_per_step"], r["traffic_bytes_per_step"]
        assert ta["fsdp_gather"] > 0 and tb["fsdp_gather"] == pytest.approx(ta["fsdp_gather"] / 2)
        assert tb["grad_reduce"] == pytest.approx(ta["grad_reduce"])                # grads reduce in fp32
        assert tb["activation"] == pytest.approx(ta["activation"])
        assert tb["parameter"] == pytest.approx(ta["parameter"] - ta["fsdp_gather"] / 2)
        assert tb["parameter"] == pytest.approx(tb["fsdp_gather"] + tb["grad_reduce"])


def test_plan_ranking_puts_fitting_layouts_first_in_order_of_the_stated_cost():
    """exposed = activation s + max(0, parameter s - compute s): activation traffic on the critical path, FSDP's
    behind compute; links: NVLink inside a node of 8, InfiniBand per GPU across; rank by exposed s per M tokens."""
    for kw in ({}, {"gather_dtype": "bf16", "micro_batch": 4, "recompute": True}):
        _, rows = _plan_rows(**kw)
        assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1)) and rows[0]["fits_h100"]
        fits = [r["fits_h100"] for r in rows]
        assert fits == sorted(fits, reverse=True) and not all(fits)
        for group in (True, False):
            cost = [r["cost"]["exposed_s_per_mtok"] for r in rows if r["fits_h100"] == group]
            assert cost == sorted(cost)
        cheapest = min(rows, key=lambda r: r["cost"]["exposed_s_per_mtok"])
        assert not cheapest["fits_h100"] and cheapest["rank"] > sum(fits)            # ranked after every fit
        for r in rows:
            c = r["cost"]
            assert c["exposed_s"] == pytest.approx(c["activation_s"] + max(0, c["parameter_s"] - c["compute_s"]))
            assert c["exposed_s_per_mtok"] == pytest.approx(c["exposed_s"] / r["tokens_per_step"] * 1e6)
    nv, ib = par.LINK_BYTES_PER_S["nvlink"], par.LINK_BYTES_PER_S["ib"]
    _, rows = _plan_rows()
    tp = _row(rows, fsdp=8, tp=8)          # tp group inside a node, fsdp group (stride 8) across 8 nodes
    assert tp["cost"]["activation_s"] == pytest.approx(tp["traffic_bytes_per_step"]["activation"] / nv)
    fsdp_bytes = tp["comm_bytes_per_step"]["fsdp"]      # + the tp all-reduce of the replicated grads, on NVLink
    tp_grad = tp["traffic_bytes_per_step"]["parameter"] - fsdp_bytes
    assert tp["cost"]["parameter_s"] == pytest.approx(fsdp_bytes / ib + tp_grad / nv) and tp_grad > 0
    fs = _row(rows, fsdp=8, sp=8)          # K/V gathers inside a node, FSDP over all 64 GPUs
    assert fs["cost"]["activation_s"] == pytest.approx(fs["traffic_bytes_per_step"]["activation"] / nv)
    assert fs["cost"]["parameter_s"] == pytest.approx(fs["traffic_bytes_per_step"]["parameter"] / ib)
    hsdp = _row(rows, dp=8, fsdp=8)        # fsdp inside a node on NVLink, the dp all-reduce on InfiniBand
    c = hsdp["comm_bytes_per_step"]
    assert hsdp["cost"]["parameter_s"] == pytest.approx(c["fsdp"] / nv + c["dp"] / ib) and c["dp"] > 0
    # at micro-batch 1 a GPU holds too few tokens to hide gathering all 111B params, and TP gathers 1/8 of them;
    # with 4 rows (recompute, bf16 gathers) compute hides FSDP, and a no-TP layout is cheapest
    assert rows[0]["layout"]["tp"] > 1
    _, rows = _plan_rows("bf16", micro_batch=4, recompute=True)
    assert rows[0]["layout"]["tp"] == 1 and rows[0]["layout"]["sp"] > 1


def test_plan_where_tp_is_needed_is_the_seq_past_which_no_no_tp_layout_fits():
    cfg = P.PRESETS["command-a"]
    w = par.where_tp_is_needed(cfg, 64, 1, False, "fp32")
    by = {r["seq"]: r for r in w["per_seq"]}
    assert set(by) == {8192, 32768, 131072, 262144}
    assert by[8192]["no_tp_fits"] and by[8192]["no_tp"]["tp"] == 1 and by[8192]["verdict"] == "fits without TP"
    assert not by[32768]["no_tp_fits"] and by[32768]["tp_fits"] and by[32768]["verdict"] == "needs TP"
    assert not by[262144]["no_tp_fits"] and not by[262144]["tp_fits"]
    assert w["longest_no_tp_seq"] == 8192
    no_tp = [pc for pc in par.candidate_layouts(64, cfg) if pc.tp == 1]
    assert not any(par.plan(cfg, pc, 16384, 1)["fits_h100"] for pc in no_tp)
    assert par.where_tp_is_needed(cfg, 64, 1, True, "bf16")["longest_no_tp_seq"] > 8192   # recompute: longer


def test_plan_cli_gather_dtype_and_decode_batch_flags():
    def run(*args):
        return subprocess.run([sys.executable, "parallel.py", "--plan", "command-a", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    ok = run("--gather-dtype", "bf16", "--decode-batch", "4", "--decode-context", "16384")
    assert ok.returncode == 0, ok.stderr
    res = json.loads(ok.stdout.strip().splitlines()[-1])
    assert {"preset", "params", "rows", "decode", "where_tp_is_needed", "gather_dtype"} <= set(res)
    assert res["gather_dtype"] == "bf16" and all(r["gather_dtype"] == "bf16" for r in res["rows"])
    assert all(d["batch"] == 4 and d["context"] == 16384 for d in res["decode"])
    assert "decoding command-a on H100s at batch 4, context 16384" in ok.stdout
    assert "where TP is needed (64 GPUs" in ok.stdout and "no-TP layouts fit up to seq" in ok.stdout
    bad = run("--gather-dtype", "fp16")
    assert bad.returncode == 2 and "--gather-dtype" in bad.stderr


# ---------------------------------------------------------------------------------------------------- pretrain.py

MICRO = ["--preset", "micro", "--vocab-size", "512", "--corpus-mb", "0.3", "--seq-len", "64", "--batch-size", "4",
         "--steps", "10", "--eval-every", "2", "--ckpt-every", "2", "--log-every", "2", "--samples", "0",
         "--context-stages", "1:0.5,2:0.5", "--max-steps", "4"]


def _pretrain(args, nproc=1):
    return parity.run_pretrain([*MICRO, *args], nproc, timeout=240, env={"OMP_NUM_THREADS": "1"})   # CPU + gloo


@pytest.mark.slow
def test_pretrain_under_torchrun_matches_one_process_and_resumes_in_another_layout(tmp_path):
    """pretrain.py (bf16 autocast) under torchrun with FSDP=2: the same losses as one process (bf16 rounding of
    weights turns fp32 reduction-order differences into ~1e-5 after the first update); its checkpoint, saved
    in the single-process layout, resumes in ONE process and continues like the uninterrupted run."""
    ref = _pretrain(["--out", str(tmp_path / "one")])
    two = _pretrain(["--out", str(tmp_path / "two"), "--fsdp", "2", "--max-steps", "2"], nproc=2)
    assert abs(two["losses"][0] - ref["losses"][0]) < 1e-5         # before any update: a few fp32 ulps at most
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(ref["losses"][:2]), rtol=0, atol=2e-3)
    assert CommandA.from_pretrained(str(tmp_path / "two")).config.num_hidden_layers == CFG.num_hidden_layers
    resumed = _pretrain(["--out", str(tmp_path / "two"), "--resume"])
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=2e-3)


@pytest.mark.slow
def test_pretrain_fp32_under_torchrun_matches_one_process_up_to_sum_order(tmp_path):
    one = _pretrain(["--out", str(tmp_path / "one"), "--fp32", "--max-steps", "3"])
    two = _pretrain(["--out", str(tmp_path / "two"), "--fp32", "--max-steps", "3", "--sp", "2"], nproc=2)
    assert two["losses"][0] == one["losses"][0]          # fp64 token sum: the first step's loss is bit-equal
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=0, atol=1e-5)
    assert abs(two["val_loss"] - one["val_loss"]) <= 2e-5


@pytest.mark.slow
def test_parity_cli_compares_layouts_with_the_one_process_noise_floor(tmp_path, monkeypatch):
    """tests/parity.py, the parity harness: one process, the same with 2x micro-batches (the floor) and a torchrun
    layout, per precision; a layout that computed another function would be orders of magnitude off."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert MICRO[-2:] == ["--max-steps", "4"]
    base = MICRO[:-2] + ["--max-steps", "3", "--seed", "0"]
    rows = parity.parity(base, batch_size=4, grad_accum=1, layouts=["dp=2"], out=str(tmp_path), precisions=("bf16",))
    assert [r["run"] for r in rows] == ["1 process", "1 process, 2x micro-batches (floor)", "dp=2"]
    ref, floor, dp = rows
    assert ref["max_abs_diff"] == 0 and len(dp["losses"]) == 3 and dp["processes"] == 2
    assert abs(dp["losses"][0] - ref["losses"][0]) < 1e-5    # before any update: a few ulps of bf16 GEMM order
    assert 0 < floor["max_abs_diff"] < 1e-3 and dp["max_abs_diff"] < 1e-3
    assert dp["vs_floor"] == pytest.approx(dp["max_abs_diff"] / floor["max_abs_diff"])
    table = parity.parity_table(rows)
    assert f"| bf16 | dp=2 | 2 | {'yes' if dp['first_step_bit_equal'] else 'no'} |" in table and "(reference)" in table
    with pytest.raises(ValueError, match="axis=degree"):
        parity._layout_flags("pp=2")
    assert P.TINY["batch_size"] * 2 == 64 and P.TINY.get("grad_accum", 1) == 1   # parity.py: TINY, twice the rows


def test_pretrain_layout_errors_are_clear(tmp_path):
    proc = subprocess.run([sys.executable, "pretrain.py", *MICRO, "--out", str(tmp_path), "--tp", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "world size is 1" in proc.stderr and "torchrun" in proc.stderr


def _cuda_worker(rank, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    device = par.init_distributed("cuda")
    out = {"backend": dist.get_backend()}
    torch.manual_seed(0)
    ref = CommandA(CFG).to(device)
    model = CommandA(CFG).to(device)
    model.load_state_dict(ref.state_dict())
    par.parallelize(model, par.ParallelConfig())             # the sharded forward on a 1-GPU mesh
    b = {k: v.to(device) for k, v in batches(1)[0].items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out["ref"] = ref(b["input_ids"], targets=b["targets"], doc_ids=b["doc_ids"]).item()
        out["par"] = model(b["input_ids"], targets=b["targets"], doc_ids=b["doc_ids"]).item()
    torch.save(out, path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_nccl_world_of_one_runs_the_sharded_forward_in_bf16(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_cuda_worker, args=(port, str(tmp_path / "cuda.pt")), nprocs=1, join=True)
    out = torch.load(str(tmp_path / "cuda.pt"), weights_only=True)
    assert out["backend"] == "nccl" and abs(out["ref"] - out["par"]) < 1e-2


def test_decode_plan_is_bandwidth_bound_at_batch_1_and_kv_bound_at_long_context():
    """The analytic decode projection: a batch-1 step reads every weight byte once (so TP=2 in FP8 halves the
    time of TP=2 in bf16, and Command A only fits 2 H100s in FP8); at 8K context each sequence's KV reads cost
    more than its FLOPs, so batching never makes decode compute-bound there, while at 1K it does."""
    from model import PRESETS
    cfg = PRESETS["command-a"]
    bf16, fp8 = (par.decode_plan(cfg, 2, 1, 8192, f) for f in (False, True))
    assert not bf16["fits_80gb"] and fp8["fits_80gb"]
    assert abs(fp8["weight_gb"] - cfg.num_params() / 2 / 1e9) < 1e-6
    assert abs(fp8["step_ms"] - 1e3 * (fp8["weight_gb"] + fp8["kv_gb"]) * 1e9 / par.H100["hbm_bytes_per_s"]) < 1e-9
    assert 1.9 < bf16["step_ms"] / fp8["step_ms"] < 2.0
    assert fp8["compute_bound_batch"] is None and par.decode_plan(cfg, 2, 1, 1024, True)["compute_bound_batch"] > 1


@pytest.mark.slow
def test_tensor_parallel_decoding_matches_one_process_with_one_all_reduce_per_layer(world2):
    """serve.py --tp 2 (fp32, gloo): every rank holds half the heads, KV heads and MLP columns; greedy tokens of
    a batch whose prompts cross the sliding window equal one process's, fused and unfused."""
    r = world2["tp_decode"]
    for fused in (True, False):
        assert r[fused]["same_tokens"] and r[fused]["lp_diff"] < 1e-4 and r[fused]["kv_heads"] == 1
        assert r[fused]["all_reduces"] == CFG.num_hidden_layers * r[fused]["model_calls"]   # one per layer
    assert "num_key_value_heads" in r["error"]
