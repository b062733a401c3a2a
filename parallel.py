"""
Data, fully-sharded, sequence and tensor parallelism for Command A (report: "trained in JAX with named sharding
over a mesh of H100s" -- DP, FSDP, SP and Megatron-style TP), on torch.distributed, launched with torchrun:

    torchrun --standalone --nproc_per_node 4 pretrain.py --tiny --fsdp 2 --tp 2      # one node (gloo on CPU)
    torchrun --nnodes 2 --node_rank R --rdzv_endpoint HOST:29500 --nproc_per_node 8 pretrain.py --fsdp 2 --tp 8
    python parallel.py --plan command-a --gpus 64 [--dp --fsdp --sp --tp] [--seq --micro-batch]   # plan the real run
        [--gather-dtype bf16] [--recompute] [--decode-batch --decode-context]   # ranked: activation vs param traffic

The PyTorch analog of JAX's named sharding is a DeviceMesh with named dims and DTensor placements. The four axes,
in the order torchtitan composes them (TP first, then FSDP per block and on the root):

  dp    replicate the model, split the batch, all-reduce gradients            -> fully_shard on mesh dim 0 (HSDP)
  fsdp  split the batch; shard params, grads and Adam state (ZeRO-3):
        all-gather before use, reduce-scatter gradients                        -> fully_shard on mesh dim 1
  sp    split the SEQUENCE over ranks for the whole block (norm, residual, MLP, loss); attention all-gathers
        K/V along sp, so sliding windows and document masks stay exact        -> Attention.gather_kv hook
  tp    Megatron TP: q/k/v/gate/up column-parallel, o/down row-parallel, heads and KV heads split
        (DTensor Shard(0) / Shard(1) weights), with Megatron's sequence parallelism in the norm/residual
        region: ONE all-gather before the column-parallel projections, ONE reduce-scatter after the
        row-parallel ones                                   -> DecoderLayer.gather_norm / add_branches hooks

Command A's parallel block helps TP: attention and MLP read the same LayerNorm output and both add into the
residual, so one all-gather feeds q, k, v, gate and up, and the two row-parallel partial sums are added
BEFORE the single reduce-scatter (a sequential block needs 2 all-gathers + 2 reduce-scatters per layer).

model.py states the layer math once; this file changes only where tensors live: which rows, tokens and heads
a rank holds, and the collectives in the layer's hooks (identity in one process).

Library and hand-written parts: the mesh (init_device_mesh), the weight layouts (distribute_tensor), FSDP2
(fully_shard, HSDP on a 2-D mesh) and checkpoint gathering (torch.distributed.checkpoint.state_dict) are
PyTorch's own. The Megatron-SP collectives are written out (_AllGather / _ReduceScatter, autograd-aware: the
backward of an all-gather is a reduce-scatter and vice versa) because they are the strategy, and because the
library's module hooks gather the norm output once per branch and reduce-scatter each branch's output (2 + 2
per layer where the parallel block needs 1 + 1); tests check our block against that parallelize_module path
(SequenceParallel + PrepareModuleInput + Colwise/RowwiseParallel) on the same weights.

Numerics: every parallel layout computes the same function as one process; only the order of floating-point
sums can differ (gradient reductions over ranks, row-parallel partial sums, GEMMs over fewer rows). Under bf16
autocast each row-parallel GEMM rounds its partial to bf16 (as NCCL-reduced TP does); the two branches' partials
are summed and reduced in fp32 and rounded once; the loss is an fp64 token sum (exact in any order).
`python tests/parity.py` measures the result ("Parity" below): on this repo's CPU, fp32 runs log the
single-process losses bit for bit in all six layouts it tries; bf16 runs differ by <= 7.6e-6 after the first
update, 1.2-3.1x what one process differs from itself when it takes the same batch as two micro-batches.

References: Shoeybi et al. 2019 (Megatron-LM TP), Korthikanti et al. 2022 (sequence parallelism, activation
memory), Rajbhandari et al. 2020 (ZeRO), Zhao et al. 2023 (PyTorch FSDP), torchtitan (composition order).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import types
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model import PRESETS, CommandA, ModelConfig, dense_masks, doc_ids_from_positions, flops_per_token, nll_sum, \
    positions_from_doc_ids, rope_cos_sin

AXES = ("dp", "fsdp", "sp", "tp")
# torch 2.13 renames the tensor collectives (*_single) and deprecates slicing flattened mesh dims; the GPU
# machines run 2.11, which has only the old names, so keep them and silence the notices
warnings.filterwarnings("ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated")
warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ParallelConfig:
    dp: int = 1      # data parallel: model replicated, gradients all-reduced (the outer, inter-node axis)
    fsdp: int = 1    # fully sharded data parallel: params / grads / Adam state split over these ranks (ZeRO-3)
    sp: int = 1      # sequence parallel: tokens of every row split over these ranks, K/V all-gathered in attention
    tp: int = 1      # tensor parallel (Megatron): heads and MLP columns split; fastest links (inside a node)

    @property
    def world(self) -> int:
        return self.dp * self.fsdp * self.sp * self.tp

    @property
    def data(self) -> int:  # ranks that see different rows of the batch
        return self.dp * self.fsdp

    def validate(self, cfg: ModelConfig | None = None, world_size: int | None = None):
        for a in AXES:
            v = getattr(self, a)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{a} must be a positive integer, got {v!r}")
        if world_size is not None and self.world != world_size:
            raise ValueError(f"--dp {self.dp} x --fsdp {self.fsdp} x --sp {self.sp} x --tp {self.tp} = {self.world}, "
                             f"but the world size is {world_size}: the product of the axes must equal the number "
                             f"of processes (torchrun --nproc_per_node x --nnodes)")
        if cfg is not None and self.tp > 1:
            if cfg.num_key_value_heads % self.tp:
                raise ValueError(f"--tp {self.tp}: num_key_value_heads={cfg.num_key_value_heads} is not divisible "
                                 f"by tp; every TP rank needs whole KV heads (GQA). Use a tp that divides "
                                 f"{cfg.num_key_value_heads}")
            if cfg.num_attention_heads % self.tp or cfg.intermediate_size % self.tp:
                raise ValueError(f"--tp {self.tp} must divide num_attention_heads={cfg.num_attention_heads} and "
                                 f"intermediate_size={cfg.intermediate_size}")

    def check_batch(self, B: int, T: int):
        if B % self.data:
            raise ValueError(f"batch of {B} rows cannot be split over dp x fsdp = {self.data} ranks: "
                             f"choose a --batch-size divisible by {self.data}")
        if T % (self.sp * self.tp):
            raise ValueError(f"sequence of {T} tokens cannot be split over sp x tp = {self.sp * self.tp} ranks: "
                             f"every context length must be divisible by {self.sp * self.tp}")


# ----------------------------------------------------------------------------------------------------------
# Process group and the named mesh


def init_distributed(device_type: str | None = None) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment; multi-node
    is torchrun's own --nnodes/--rdzv flags). NCCL on CUDA, gloo on CPU. Returns this process's device."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("parallel training needs torchrun: torchrun --nproc_per_node N pretrain.py ... "
                           "(RANK / WORLD_SIZE are not set)")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local} has no GPU: this node has {torch.cuda.device_count()}; start "
                               f"torchrun with --nproc_per_node <= {torch.cuda.device_count()} (or hide the GPUs "
                               f"with CUDA_VISIBLE_DEVICES= to run on CPU with gloo)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def build_mesh(pc: ParallelConfig, device_type: str):
    """The 4-D mesh (dp, fsdp, sp, tp). Ranks are laid out tp-fastest: TP neighbours share a node (NVLink),
    dp is the outermost (slowest links carry only one gradient all-reduce per step)."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (pc.dp, pc.fsdp, pc.sp, pc.tp), mesh_dim_names=AXES)


@dataclass
class ParallelState:
    """What the sharded forward needs to know about this rank; attached to the model as `model._parallel`."""
    pc: ParallelConfig
    mesh: object
    groups: dict          # axis -> ProcessGroup
    rank: dict            # axis -> this rank's coordinate
    tp_sharded: set       # parameter names split by TP (the rest are replicated over tp)
    fsdp: bool            # fully_shard applied (some of dp / fsdp / sp > 1)

    @property
    def data_rank(self) -> int:
        return self.rank["dp"] * self.pc.fsdp + self.rank["fsdp"]


# ----------------------------------------------------------------------------------------------------------
# Hand-written collectives along the sequence (autograd-aware), counted for the plan's formulas

COLLECTIVES = Counter()   # (op, axis) -> calls;  ("bytes", axis) -> bytes handed to the collective


def _comm_dtype(x):  # gloo has no bf16 reduction kernels: carry bf16 as fp32 (exact) on CPU
    return torch.float32 if (x.dtype == torch.bfloat16 and not x.is_cuda) else x.dtype


def _all_gather(x, group, axis, dim):
    COLLECTIVES[("all_gather", axis)] += 1
    COLLECTIVES[("bytes", axis)] += x.numel() * x.element_size()
    n = dist.get_world_size(group)
    xm = x.movedim(dim, 0).to(_comm_dtype(x)).contiguous()                  # rank blocks laid out along dim 0
    out = torch.empty((n * xm.shape[0], *xm.shape[1:]), dtype=xm.dtype, device=x.device)
    dist.all_gather_into_tensor(out, xm, group=group)
    return out.movedim(0, dim).to(x.dtype)


def _reduce_scatter(x, group, axis, dim):
    COLLECTIVES[("reduce_scatter", axis)] += 1
    COLLECTIVES[("bytes", axis)] += x.numel() * x.element_size()
    n = dist.get_world_size(group)
    xm = x.movedim(dim, 0).to(_comm_dtype(x)).contiguous()
    out = torch.empty((xm.shape[0] // n, *xm.shape[1:]), dtype=xm.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, xm, op=dist.ReduceOp.SUM, group=group)
    return out.movedim(0, dim).to(x.dtype)


class _AllGather(torch.autograd.Function):
    """Concatenate the ranks' chunks along `dim`. Backward: every rank's gradient w.r.t. the full tensor is a
    partial sum (its own tokens' contribution), so the chunk's gradient is the SUM over ranks: a reduce-scatter."""

    @staticmethod
    def forward(ctx, x, group, axis, dim):
        ctx.args = (group, axis, dim)
        return _all_gather(x, group, axis, dim)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, *ctx.args), None, None, None


class _ReduceScatter(torch.autograd.Function):
    """Sum partial results over ranks and keep this rank's chunk along `dim`. Backward: an all-gather."""

    @staticmethod
    def forward(ctx, x, group, axis, dim):
        ctx.args = (group, axis, dim)
        return _reduce_scatter(x, group, axis, dim)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, *ctx.args), None, None, None


def all_gather_seq(x, P: ParallelState, axis: str, dim: int = 1):
    return _AllGather.apply(x, P.groups[axis], axis, dim)


def reduce_scatter_seq(x, P: ParallelState, axis: str, dim: int = 1):
    return _ReduceScatter.apply(x, P.groups[axis], axis, dim)


# ----------------------------------------------------------------------------------------------------------
# The sharded forward: model.py's layers unchanged, on this rank's rows, tokens and heads. Only where tensors
# live changes: per-rank head counts (gpt-fast's tp.py), model.py's Linear on its local weight shard, and the
# layer's hooks (identity in one process) for the collectives below.


def _local(w):
    """A TP weight is a DTensor (placed by parallelize); gradient arithmetic uses this rank's shard of it."""
    from torch.distributed.tensor import DTensor
    return w.to_local() if isinstance(w, DTensor) else w


def _gather_kv(k, v, P: ParallelState):
    """SP: the mask (window, documents) may reach keys held by any sp rank, so gather all of K and V (one
    collective for both); the queries stay local. Exact for any window and document layout."""
    nkv = k.shape[1]
    kv = all_gather_seq(torch.cat([k, v], dim=1), P, "sp", dim=2)        # (B, 2 nkv/tp, T, dh)
    return kv[:, :nkv], kv[:, nkv:]


def _gather_norm(n, P: ParallelState):
    """TP's sequence parallelism: the norm ran on this rank's tokens; ONE all-gather feeds q, k, v, gate and up."""
    return all_gather_seq(n, P, "tp")                                    # (B, T/sp, H)


def _reduce_scatter_add(h, attn, mlp, P: ParallelState):
    """The row-parallel o_proj and down_proj left partial sums: the parallel block adds them BEFORE the ONE
    reduce-scatter that completes both and hands each rank its tokens back. The sum is carried in fp32 and
    rounded once, after the reduction."""
    y = reduce_scatter_seq(attn.float() + mlp.float(), P, "tp")
    return h + y.to(h.dtype)


def _model_forward(self, input_ids, targets=None, position_ids=None, doc_ids=None, cache=None, logits_index=None):
    """CommandA.forward under all four axes. Every rank receives the SAME global batch (B, T) and keeps its rows
    (dp x fsdp) and tokens (sp x tp). Returns the global token-mean loss; its gradient is this rank's share,
    scaled so FSDP's average over its mesh turns into the sum over ranks (see `grad_scale`)."""
    P = self._parallel
    if targets is None or cache is not None or logits_index is not None:
        raise ValueError("the sharded model only trains (input_ids + targets); gather_full_model() gives a "
                         "single-process model for logits, evaluation and generation")
    cfg, pc = self.config, P.pc
    B, T = input_ids.shape
    pc.check_batch(B, T)
    if position_ids is None:
        position_ids = positions_from_doc_ids(doc_ids) if doc_ids is not None else \
            torch.arange(T, device=input_ids.device).expand(B, T)
    if doc_ids is None:
        doc_ids = doc_ids_from_positions(position_ids)
    n_targets = (targets != -100).sum().clamp(min=1)          # of the global batch: every rank knows it
    Bd, Ts, Tl = B // pc.data, T // pc.sp, T // (pc.sp * pc.tp)
    rows = slice(P.data_rank * Bd, (P.data_rank + 1) * Bd)                     # DP / FSDP: split the batch
    q = slice(P.rank["sp"] * Ts, (P.rank["sp"] + 1) * Ts)                      # SP: this rank's query tokens
    mine = slice(q.start + P.rank["tp"] * Tl, q.start + (P.rank["tp"] + 1) * Tl)  # TP's SP: my residual tokens
    ids, tgt, pos, doc = input_ids[rows], targets[rows], position_ids[rows], doc_ids[rows]

    h = self.model.embed_tokens(ids[:, mine])                                   # (B/data, T/(sp*tp), H)
    rope = rope_cos_sin(pos[:, q], cfg.head_dim, cfg.rope_theta, h.dtype)
    masks = dense_masks(cfg, pos[:, q], doc[:, q], pos, doc)                   # rows: my queries; cols: all keys
    for layer in self.model.layers:
        h = layer(h, rope, masks[layer.self_attn.kind])
    local = nll_sum(self.lm_logits(self.model.norm(h)), tgt[:, mine])         # this rank's tokens, in fp64
    total = local.detach().clone()
    COLLECTIVES[("all_reduce", "world")] += 1
    dist.all_reduce(total)                            # every token lives on exactly one rank: the sum is the batch's
    scaled = local / n_targets * grad_scale(P)
    # value: the global mean (the fp64 sum one process takes of the same per-token losses); gradient: my share
    return (scaled + (total / n_targets - scaled).detach()).float()


def grad_scale(P: ParallelState) -> float:
    """FSDP averages gradients over its mesh (dp x fsdp x sp ranks); each of those ranks holds a disjoint share
    of the loss, so the loss is multiplied by the mesh size to make the average a sum."""
    return float(P.pc.dp * P.pc.fsdp * P.pc.sp) if P.fsdp else 1.0


# ----------------------------------------------------------------------------------------------------------
# Applying the strategies to a CommandA (in torchtitan's order: TP, then FSDP per block, then the root)


# Megatron's layout: column-parallel = weight rows (output features) split, row-parallel = weight columns (input
# features) split. Head h's rows are contiguous, so splitting q_proj's rows gives each rank whole heads, and
# k/v_proj's whole KV heads (kv_heads % tp == 0).
TP_SHARD_DIM = {"self_attn.q_proj": 0, "self_attn.k_proj": 0, "self_attn.v_proj": 0, "self_attn.o_proj": 1,
                "mlp.gate_proj": 0, "mlp.up_proj": 0, "mlp.down_proj": 1}


def shard_tp(layer, mesh, P: ParallelState):
    """Place one DecoderLayer on the tp mesh: its Linears' weights become DTensor shards (model.py's Linear
    multiplies by the local shard), its head counts per rank, its hooks the Megatron-SP collectives."""
    from torch.distributed.tensor import Shard, distribute_tensor
    for name, dim in TP_SHARD_DIM.items():
        lin = layer.get_submodule(name)
        lin.weight = torch.nn.Parameter(distribute_tensor(lin.weight.data, mesh, [Shard(dim)]))
    layer.self_attn.nh //= P.pc.tp
    layer.self_attn.nkv //= P.pc.tp
    layer.gather_norm = functools.partial(_gather_norm, P=P)
    layer.add_branches = functools.partial(_reduce_scatter_add, P=P)


def parallelize(model: CommandA, pc: ParallelConfig, mesh=None) -> CommandA:
    """Shard `model` in place over the mesh and switch its forward to the sharded one. Call on every rank with
    the same (identically initialised or loaded) full model; build the optimizer afterwards."""
    from torch.distributed.fsdp import fully_shard

    pc.validate(model.config, dist.get_world_size())
    device_type = next(model.parameters()).device.type
    mesh = mesh if mesh is not None else build_mesh(pc, device_type)
    use_fsdp = pc.dp * pc.fsdp * pc.sp > 1
    P = ParallelState(pc=pc, mesh=mesh, groups={a: mesh.get_group(a) for a in AXES},
                      rank={a: mesh.get_local_rank(a) for a in AXES}, tp_sharded=set(), fsdp=use_fsdp)
    for i, layer in enumerate(model.model.layers):
        if pc.tp > 1:
            shard_tp(layer, mesh["tp"], P)
            P.tp_sharded |= {f"model.layers.{i}.{name}.weight" for name in TP_SHARD_DIM}
        if pc.sp > 1:
            layer.self_attn.gather_kv = functools.partial(_gather_kv, P=P)
    model._parallel = P
    model.forward = types.MethodType(_model_forward, model)   # the same module: its entry point splits the batch
    if use_fsdp:
        # HSDP: replicate over dp (dim 0), shard over fsdp x sp (dim 1). SP ranks hold the same weights but
        # different tokens, so they join the sharding group (torchtitan does the same for context parallel).
        fmesh = mesh["fsdp", "sp"]._flatten("fsdp_sp")
        fmesh = mesh["dp", "fsdp_sp"]
        for layer in model.model.layers:       # one all-gather / reduce-scatter unit per block
            fully_shard(layer, mesh=fmesh)
        fully_shard(model, mesh=fmesh)         # the root: embedding (tied output) and final norm
    return model


def is_parallel(model) -> bool:
    return getattr(model, "_parallel", None) is not None


# ----------------------------------------------------------------------------------------------------------
# After backward: gradients of TP-replicated params, and the global gradient norm


@torch.no_grad()
def sync_grads(model):
    """Parameters TP does not split (embedding, norms) are replicated over tp, but each tp rank saw only its
    slice of the sequence: sum their gradients over tp (one bucketed all-reduce). FSDP already reduced
    everything over dp / fsdp / sp. (SPEC 4: "norm-weight gradients need a sum over the tp group".)"""
    P = model._parallel
    if P.pc.tp == 1:
        return
    grads = [_local(p.grad) for n, p in model.named_parameters() if n not in P.tp_sharded and p.grad is not None]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    COLLECTIVES[("all_reduce", "tp")] += 1
    COLLECTIVES[("bytes", "tp")] += flat.numel() * flat.element_size()
    dist.all_reduce(flat, group=P.groups["tp"])
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def _replicas(p, world: int) -> int:
    """How many ranks hold each element of p: world / (product of the mesh dims p is sharded over)."""
    from torch.distributed.tensor import DTensor
    shards = 1
    if isinstance(p, DTensor):
        for i, pl in enumerate(p.placements):
            if pl.is_shard():
                shards *= p.device_mesh.size(i)
    return world // shards


@torch.no_grad()
def clip_grad_norm_(model, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for parameters on different meshes: sum the squares of local shards,
    each divided by its replication count, over all ranks."""
    P = model._parallel
    world = P.pc.world
    params = [p for p in model.parameters() if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for p in params:
        sq += _local(p.grad).double().pow(2).sum() / _replicas(p.grad, world)
    COLLECTIVES[("all_reduce", "world")] += 1
    dist.all_reduce(sq)
    norm = sq.sqrt().float()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)      # torch's formula
    for p in params:
        _local(p.grad).mul_(coef.to(p.grad.dtype))
    return norm


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: any layout <-> the single-process (HF) layout, through torch.distributed.checkpoint.state_dict


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # gathering a (fsdp, tp) parameter takes two all-gathers; DTensor logs that on every rank, every tensor
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    return StateDictOptions(full_state_dict=True)


def full_model_state(model) -> dict:
    """The unsharded state dict (HF names), on every rank (a collective: call on all ranks)."""
    if not is_parallel(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return {k: v.detach().cpu() for k, v in get_model_state_dict(model, options=_options()).items()}


def gather_full_model(model) -> CommandA:
    """A single-process CommandA with the current weights (for evaluation, sampling, save_pretrained)."""
    sd = full_model_state(model)
    with torch.device("meta"):
        full = CommandA(model.config)
    full.load_state_dict(sd, assign=True)
    return full


def _param_names(model, opt) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def full_optimizer_state(model, opt) -> dict:
    """The optimizer state in the single-process layout of `opt.state_dict()` (params as indices in group
    order), unsharded: a single process or any other layout loads it (a collective)."""
    if not is_parallel(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    osd = get_optimizer_state_dict(model, opt, options=_options())
    names = _param_names(model, opt)
    state = {i: {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in osd["state"][n].items()}
             for i, n in enumerate(names) if n in osd["state"]}
    return {"state": state, "param_groups": opt.state_dict()["param_groups"]}


def load_full_state(model, opt, model_state: dict, opt_state: dict | None):
    """Load single-process (HF) weights and optimizer state into a model of any layout (all ranks call it)."""
    if not is_parallel(model):
        model.load_state_dict(model_state)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    dev = next(model.parameters()).device                    # checkpoints are read to the CPU; shards live here
    set_model_state_dict(model, {k: v.to(dev) for k, v in model_state.items()}, options=_options())
    if opt_state is not None:
        names = _param_names(model, opt)
        if len(names) != sum(len(g["params"]) for g in opt_state["param_groups"]):
            raise ValueError("optimizer state does not match this model's parameters")
        # copies (the optimizer updates its state in place), moments on the params' device, Adam's step stays
        osd = {"state": {names[int(i)]: {k: (v.clone() if k == "step" else v.to(dev, copy=True))
                                         if torch.is_tensor(v) else v for k, v in s.items()}
                         for i, s in opt_state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in opt_state["param_groups"]]}
        set_optimizer_state_dict(model, opt, osd, options=_options())


def local_state_bytes(model, opt) -> dict:
    """Bytes this rank holds for parameters and optimizer state (its shards only; Adam's scalar step excluded)."""
    pbytes = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())
    obytes = sum(_local(v).numel() * _local(v).element_size() for s in opt.state.values() for k, v in s.items()
                 if torch.is_tensor(v) and k != "step")
    return {"params": pbytes, "optimizer": obytes}


# ----------------------------------------------------------------------------------------------------------
# The training loop's view of a layout: one object, with single-process defaults


class Layout:
    """What pretrain.py's loop asks of the layout, and nothing else: the device, whether this process writes,
    checks before the data work, the model's wrapping, the gradient reduction + clip, and the gathered model /
    optimizer state for evaluation and checkpoints. Layout(None) is one process, where each is the identity."""

    def __init__(self, pc: ParallelConfig | None = None):
        self.pc = pc
        if pc is None:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.rank, self.world = 0, 1
        else:                     # torchrun: this process's device; rank 0 alone logs and writes
            self.device = init_distributed()
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def check(self, cfg: ModelConfig, batches: list[tuple[str, int, int]]):
        """Fail before the data work if the layout cannot split the model or a phase's (name, rows, tokens)."""
        if self.pc is None:
            return
        self.pc.validate(cfg, self.world)
        for name, B, T in batches:
            try:
                self.pc.check_batch(B, T)
            except ValueError as e:
                raise ValueError(f"phase {name} (rows of {T} tokens, {B} per step: the long stages keep the "
                                 f"tokens per step, so they have fewer rows): {e}") from None

    def check_same_data(self, fingerprint: str):
        """Every rank must have built the same training data (each builds it deterministically)."""
        if self.pc is None:
            return
        fp = torch.tensor([int(fingerprint[:15], 16)], dtype=torch.int64)
        lo, hi = fp.clone(), fp.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if lo.item() != hi.item():
            raise RuntimeError("the ranks built different training data (non-deterministic corpus?)")

    def wrap(self, model: CommandA) -> CommandA:
        """Shard the model (TP, then FSDP); build the optimizer after this."""
        return model if self.pc is None else parallelize(model, self.pc)

    def clip_grads(self, model, max_norm: float) -> torch.Tensor:
        """After backward: TP-replicated gradients summed over tp, then the global norm clipped."""
        if self.pc is None:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        sync_grads(model)
        return clip_grad_norm_(model, max_norm)

    def full_model(self, model) -> CommandA:
        """The single-process model (a collective: every rank calls it)."""
        return model if self.pc is None else gather_full_model(model).to(self.device)

    def full_optimizer_state(self, model, opt) -> dict:
        return opt.state_dict() if self.pc is None else full_optimizer_state(model, opt)

    def describe(self) -> str:
        return "" if self.pc is None else ("parallel: " + " x ".join(f"{a}={getattr(self.pc, a)}" for a in AXES) +
                                           f" over {self.world} processes ({dist.get_backend()})")

    def close(self):
        """Every rank reaches teardown before any destroys the group: a rank that tears gloo down while another
        still writes or logs can abort it ("terminate called without an active exception")."""
        if self.pc is not None and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# The plan: memory and communication per GPU from the ZeRO / Megatron formulas (what parallelize() does), and a
# cost model that ranks layouts. The report pretrains with DP, FSDP and SP only, "to minimize activation traffic",
# and keeps TP for decoding. Two kinds of traffic, timed apart:
#   ACTIVATION bytes -- TP's all-gather / reduce-scatter of the norm output and partial sums, SP's K/V gathers:
#     every layer waits for them, forward and backward, so they sit on the critical path (exposed in full).
#   PARAMETER bytes -- FSDP's all-gathers of the next block (prefetched while this one computes), its gradient
#     reduce-scatters, the dp all-reduce: they overlap with compute and cost time only past it.
#   comm s   = sum over collectives of bytes / link(group)  (activation s + parameter s, no overlap)
#   exposed s = activation s + max(0, parameter s - compute s),  compute s = FLOPs / (bf16 peak x MFU)
# A group runs on NVLink when its ranks sit in one node (the tp-fastest mesh of build_mesh: a tp group spans tp
# consecutive ranks, sp spans sp x tp, the FSDP group fsdp x sp x tp, dp all), else on each GPU's InfiniBand
# link, the slowest hop of the ring. Layouts process different tokens per step, so they rank by exposed seconds
# per million tokens (fitting layouts first): the same order as estimated tokens/s, as compute per token is equal.

H100_MEM = 80e9          # bytes of HBM on an H100 SXM
H100 = {"hbm_bytes_per_s": 3.35e12, "bf16_flops": 989e12, "fp8_flops": 1979e12}   # SXM spec sheet, dense
GPUS_PER_NODE = 8        # HGX H100: 8 GPUs on one NVSwitch
# per GPU, per direction: NVLink 4 is 18 links x 25 GB/s = 450 GB/s; one ConnectX-7 NDR NIC (400 Gb/s) per GPU
LINK_BYTES_PER_S = {"nvlink": 450e9, "ib": 50e9}
MFU = 0.4                # assumed fraction of bf16 peak the GEMMs reach: how long compute lasts to hide FSDP behind
BYTES = {"master": 4, "grad": 4, "adam": 8}           # per param: fp32 master, fp32 grads, Adam m + v
# FSDP's gathered copy: fp32 is what parallelize() does (exact parity with one process); bf16 is
# MixedPrecisionPolicy(param_dtype=bf16): half the gathered bytes and half the all-gather traffic
GATHER_BYTES = {"fp32": 4, "bf16": 2}


def collectives_per_step(cfg: ModelConfig, pc: ParallelConfig, micro_batches: int = 1) -> dict:
    """Collective calls per optimizer step that parallel.py issues itself (FSDP's are the library's). Per layer
    and micro-batch: TP+SP 1 all-gather + 1 reduce-scatter forward (the parallel block's fusion) and the same
    swapped in backward; SP 1 K/V all-gather forward, 1 reduce-scatter backward. Per micro-batch one loss
    all-reduce; per step one tp all-reduce of the replicated gradients and one for the gradient norm."""
    L, m = cfg.num_hidden_layers, micro_batches
    c = Counter()
    if pc.tp > 1:
        c[("all_gather", "tp")] = 2 * L * m
        c[("reduce_scatter", "tp")] = 2 * L * m
        c[("all_reduce", "tp")] = 1
    if pc.sp > 1:
        c[("all_gather", "sp")] = L * m
        c[("reduce_scatter", "sp")] = L * m
    if pc.world > 1:
        c[("all_reduce", "world")] = m + 1
    return dict(c)


def link(pc: ParallelConfig, axis: str) -> float:
    """Bytes/s one GPU moves in a collective over `axis`: NVLink if the group's ranks fit in one node."""
    span = {"tp": pc.tp, "sp": pc.sp * pc.tp, "fsdp": pc.fsdp * pc.sp * pc.tp, "dp": pc.world}[axis]
    return LINK_BYTES_PER_S["nvlink" if span <= GPUS_PER_NODE else "ib"]


def plan(cfg: ModelConfig, pc: ParallelConfig, seq: int, micro_batch: int, micro_batches: int = 1,
         recompute: bool = False, gather_dtype: str = "fp32") -> dict:
    """Per-GPU memory (bytes) and communication (bytes sent per step, ring algorithms: an all-gather or
    reduce-scatter of S bytes over g ranks sends (g-1)/g * S, an all-reduce twice that), split into activation
    and parameter traffic, and the cost model's seconds."""
    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kvd = cfg.num_key_value_heads * cfg.head_dim
    t, s, shard = pc.tp, pc.sp, pc.fsdp * pc.sp
    layer_mats = 2 * H * H + 2 * H * kvd + 3 * H * I            # q, o, k, v, gate, up, down: split by TP
    replicated = V * H + (L + 1) * H                             # tied embedding + norms: not split by TP here
    per_tp_rank = L * layer_mats / t + replicated                # parameters one TP rank owns before FSDP
    p_local = per_tp_rank / shard                                # ... and after FSDP's sharding
    gb = GATHER_BYTES[gather_dtype]
    mem = {"params": p_local * BYTES["master"], "grads": p_local * BYTES["grad"], "optimizer": p_local * BYTES["adam"],
           "gathered": 2 * layer_mats / t * gb}                  # two blocks unsharded at a time (prefetch)
    # activations kept for backward, bf16 unless noted, per token per layer (no dropout, flash attention):
    # residual in fp32 4H, norm out 2H, q 2H, k+v 4*kvd, attention out 2H, gate/up/product 6I
    per_tok_layer = 10 * H + 4 * kvd + 6 * I
    tokens_local = micro_batch * seq / (s * t)                   # norm/residual/MLP regions are sequence-sharded
    if recompute:   # full activation checkpointing: keep each layer's input, rebuild one layer at a time
        act = L * tokens_local * 4 * H + tokens_local * per_tok_layer
    else:
        act = L * tokens_local * per_tok_layer
    if s > 1:       # the gathered K/V of the whole row, saved for backward
        act += (1 if recompute else L) * micro_batch * seq * 2 * 2 * kvd / t
    act += tokens_local * V * 4                                  # fp32 logits of this rank's tokens
    mem["activations"] = act
    mem["total"] = sum(mem.values())
    ring = lambda g: (g - 1) / g                                 # noqa: E731
    m = micro_batches
    tok_mb = micro_batch * seq
    # FSDP: all-gather params forward and again backward (gather dtype), reduce-scatter grads in fp32 -- torchtitan's
    # reduce_dtype: a bf16 sum over many ranks keeps 8 mantissa bits, and Adam's update reads those small grads
    fsdp_gather = m * 2 * ring(shard) * per_tp_rank * gb if shard > 1 else 0.0
    fsdp_reduce = m * ring(shard) * per_tp_rank * 4 if shard > 1 else 0.0
    # TP+SP per layer: AG of the norm output (fp32 residual dtype) + RS of the fp32 partials, x2 for backward;
    # once per step the replicated (embedding, norm) grads are all-reduced over tp: parameter traffic
    tp_act = m * L * 4 * ring(t) * (tok_mb / s) * H * 4 if t > 1 else 0.0
    tp_grad = 2 * ring(t) * replicated / shard * 4 if t > 1 else 0.0
    comm = {"fsdp": fsdp_gather + fsdp_reduce, "dp": 2 * ring(pc.dp) * p_local * 4 if pc.dp > 1 else 0.0,
            "tp": tp_act + tp_grad,
            # SP: K/V of local heads gathered forward, reduce-scattered backward (bf16)
            "sp": m * L * 2 * ring(s) * tok_mb * 2 * kvd / t * 2 if s > 1 else 0.0}
    comm["total"] = sum(comm.values())
    traffic = {"activation": tp_act + comm["sp"], "parameter": comm["fsdp"] + comm["dp"] + tp_grad,
               "fsdp_gather": fsdp_gather, "grad_reduce": fsdp_reduce + comm["dp"] + tp_grad}
    act_s = tp_act / link(pc, "tp") + comm["sp"] / link(pc, "sp")
    param_s = comm["fsdp"] / link(pc, "fsdp") + comm["dp"] / link(pc, "dp") + tp_grad / link(pc, "tp")
    tokens = pc.data * micro_batch * m * seq
    # recompute runs the forward twice: 8N instead of 6N per token for the matmuls
    flops = tokens / pc.world * flops_per_token(cfg, seq) * (4 / 3 if recompute else 1)
    compute_s = flops / (H100["bf16_flops"] * MFU)
    exposed = act_s + max(0.0, param_s - compute_s)
    cost = {"activation_s": act_s, "parameter_s": param_s, "comm_s": act_s + param_s, "compute_s": compute_s,
            "exposed_s": exposed, "exposed_s_per_mtok": exposed / tokens * 1e6}
    return {"layout": {a: getattr(pc, a) for a in AXES}, "gpus": pc.world, "seq": seq, "micro_batch": micro_batch,
            "tokens_per_step": tokens, "gather_dtype": gather_dtype,
            "micro_batches": m, "recompute": recompute, "memory": mem, "comm_bytes_per_step": comm,
            "traffic_bytes_per_step": traffic, "cost": cost,
            "collectives_per_step": {f"{op}@{ax}": n for (op, ax), n in collectives_per_step(cfg, pc, m).items()},
            "fits_h100": mem["total"] < H100_MEM}


def candidate_layouts(gpus: int, cfg: ModelConfig | None = None) -> list[ParallelConfig]:
    """The report's pretraining axes without TP (pure FSDP, HSDP, FSDP x SP, DP x FSDP x SP; SP inside a node)
    beside Megatron TP inside a node (alone or with SP). Each (sp, tp) is tried with one model replica over all
    GPUs and as HSDP with replicas of 32 GPUs (4 nodes shard a 111B model's Adam state); no-SP no-TP also with
    one-node replicas (fsdp on NVLink, the smaller models' layout). Layouts the preset's heads forbid are left out."""
    out = []
    for sp, tp in ((1, 1), (2, 1), (4, 1), (8, 1), (1, 4), (1, 8), (2, 8), (4, 8)):
        for replica in ((gpus, 32, GPUS_PER_NODE) if sp * tp == 1 else (gpus, 32)):
            if replica <= gpus and gpus % replica == 0 and replica % (sp * tp) == 0:
                pc = ParallelConfig(dp=gpus // replica, fsdp=replica // (sp * tp), sp=sp, tp=tp)
                try:
                    pc.validate(cfg)
                except ValueError:
                    continue
                if pc not in out:
                    out.append(pc)
    return out


def rank_plans(rows: list) -> list:
    """Fitting layouts first, each group by exposed communication seconds per million tokens; sets r["rank"]."""
    rows = sorted(rows, key=lambda r: (not r["fits_h100"], r["cost"]["exposed_s_per_mtok"]))
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    return rows


def plan_table(cfg: ModelConfig, layouts, seq: int, micro_batch: int, recompute: bool,
               gather_dtype: str = "fp32") -> tuple[str, list]:
    G = 1e9
    rows = rank_plans([plan(cfg, pc, seq, micro_batch, recompute=recompute, gather_dtype=gather_dtype)
                       for pc in layouts])
    lines = ["| rank | dp | fsdp | sp | tp | tokens/step | params+grads+Adam GB | gathered GB | activations GB | "
             "total GB | fits 80 GB | activation GB/step (tp / sp) | parameter GB/step (gather / grads) | comm s "
             "(act + param) | compute s | exposed s/step | exposed s per M tokens |", "|" + "---|" * 17]
    for r in rows:
        m, c, tr, k, l = r["memory"], r["comm_bytes_per_step"], r["traffic_bytes_per_step"], r["cost"], r["layout"]
        lines.append(f"| {r['rank']} | {l['dp']} | {l['fsdp']} | {l['sp']} | {l['tp']} | {r['tokens_per_step']:,} | "
                     f"{(m['params'] + m['grads'] + m['optimizer']) / G:.1f} | {m['gathered'] / G:.1f} | "
                     f"{m['activations'] / G:.1f} | {m['total'] / G:.1f} | {'yes' if r['fits_h100'] else 'no'} | "
                     f"{tr['activation'] / G:.1f} ({(tr['activation'] - c['sp']) / G:.1f} / {c['sp'] / G:.1f}) | "
                     f"{tr['parameter'] / G:.0f} ({tr['fsdp_gather'] / G:.0f} / {tr['grad_reduce'] / G:.0f}) | "
                     f"{k['activation_s']:.2f} + {k['parameter_s']:.2f} | {k['compute_s']:.2f} | "
                     f"{k['exposed_s']:.2f} | {k['exposed_s_per_mtok']:.1f} |")
    return "\n".join(lines), rows


def where_tp_is_needed(cfg: ModelConfig, gpus: int, micro_batch: int, recompute: bool, gather_dtype: str,
                       seqs=(8192, 32768, 131072, 262144)) -> dict:
    """Per seq: the best layout without TP and the best with it (the cheapest that fits, else the smallest), and
    the longest power-of-two seq at which some no-TP layout still fits (activations of one row grow with seq;
    only TP or more SP than a node's 8 split them further)."""
    def best(seq, with_tp):
        rows = [plan(cfg, pc, seq, micro_batch, recompute=recompute, gather_dtype=gather_dtype)
                for pc in candidate_layouts(gpus, cfg) if (pc.tp > 1) == with_tp and seq % (pc.sp * pc.tp) == 0]
        fit = [r for r in rows if r["fits_h100"]]
        if fit:
            return min(fit, key=lambda r: r["cost"]["exposed_s_per_mtok"])
        return min(rows, key=lambda r: r["memory"]["total"]) if rows else None
    fits = lambda r: bool(r and r["fits_h100"])                  # noqa: E731
    gb = lambda r: r and r["memory"]["total"] / 1e9              # noqa: E731
    out = []
    for seq in seqs:
        no_tp, tp = best(seq, False), best(seq, True)
        verdict = ("fits without TP" if fits(no_tp) else "needs TP" if fits(tp) else
                   "nothing fits: " + ("more GPUs or SP" if recompute else "--recompute, more GPUs or SP"))
        out.append({"seq": seq, "no_tp": no_tp and no_tp["layout"], "no_tp_gb": gb(no_tp), "no_tp_fits": fits(no_tp),
                    "tp": tp and tp["layout"], "tp_gb": gb(tp), "tp_fits": fits(tp), "verdict": verdict})
    longest, seq = None, 1024
    while seq <= 2 ** 21 and (best(seq, False) or {}).get("fits_h100"):
        longest, seq = seq, 2 * seq
    return {"per_seq": out, "longest_no_tp_seq": longest}


def where_tp_table(w: dict, gpus: int, micro_batch: int, recompute: bool) -> str:
    name = lambda l: (" x ".join(f"{a} {l[a]}" for a in AXES if l[a] > 1) or "1 GPU") if l else "-"  # noqa: E731
    lines = [f"where TP is needed ({gpus} GPUs, micro-batch {micro_batch}, {'full' if recompute else 'no'} "
             f"recompute; best = cheapest that fits, else smallest):",
             "| seq | best no-TP layout | GB | fits | best TP layout | GB | fits | verdict |", "|" + "---|" * 8]
    for r in w["per_seq"]:
        gbs = [f"{g:.0f}" if g is not None else "-" for g in (r["no_tp_gb"], r["tp_gb"])]
        lines.append(f"| {r['seq']:,} | {name(r['no_tp'])} | {gbs[0]} | {'yes' if r['no_tp_fits'] else 'no'} | "
                     f"{name(r['tp'])} | {gbs[1]} | {'yes' if r['tp_fits'] else 'no'} | {r['verdict']} |")
    n = w["longest_no_tp_seq"]
    lines.append("no no-TP layout fits even at seq 1,024" if n is None else
                 f"no-TP layouts fit at every seq tried, up to {n:,}" if n >= 2 ** 21 else
                 f"no-TP layouts fit up to seq {n:,}; from seq {2 * n:,} on, TP (or sp > {GPUS_PER_NODE}) is needed")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Tensor parallelism for serving (serve.py --tp N): the report keeps TP for fast decoding at small batch


def _all_reduce_add(h, attn, mlp, group):
    """The two row-parallel projections left partial sums; the parallel block adds them into one residual, so ONE
    all-reduce per layer completes both (fp32 on gloo: it has no bf16 sum)."""
    y = attn + mlp
    COLLECTIVES[("all_reduce", "tp_decode")] += 1
    if y.dtype == torch.bfloat16 and dist.get_backend(group) == "gloo":
        z = y.float()
        dist.all_reduce(z, group=group)
        return h + z.to(y.dtype)
    dist.all_reduce(y, group=group)
    return h + y


def shard_for_decode(model: CommandA, group=None) -> CommandA:
    """Megatron TP for inference, in place: this rank keeps its query heads' q rows and o_proj columns, the KV
    heads they read (kv_heads % tp == 0, so GQA groups stay whole), and its share of the MLP columns. The tied
    embedding (the input lookup needs every row) and the norms stay whole, so each rank computes the full logits
    and no gather is needed. model.py's layer runs unchanged on the local weights; its add_branches hook does
    the one all-reduce."""
    tp, r = dist.get_world_size(group), dist.get_rank(group)
    cfg = model.config
    if cfg.num_key_value_heads % tp or cfg.intermediate_size % tp:
        raise ValueError(f"--tp {tp} must divide num_key_value_heads={cfg.num_key_value_heads} and "
                         f"intermediate_size={cfg.intermediate_size} (each rank holds whole KV heads)")

    def keep(lin, dim, n):
        w = lin.weight.detach()
        lin.weight = torch.nn.Parameter((w[r * n:(r + 1) * n] if dim == 0 else w[:, r * n:(r + 1) * n]).clone(),
                                        requires_grad=False)
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        a.nh, a.nkv = a.nh // tp, a.nkv // tp
        for lin, dim, n in ((a.q_proj, 0, a.nh * a.dh), (a.k_proj, 0, a.nkv * a.dh), (a.v_proj, 0, a.nkv * a.dh),
                            (a.o_proj, 1, a.nh * a.dh), (m.gate_proj, 0, cfg.intermediate_size // tp),
                            (m.up_proj, 0, cfg.intermediate_size // tp), (m.down_proj, 1, cfg.intermediate_size // tp)):
            keep(lin, dim, n)
        layer.add_branches = functools.partial(_all_reduce_add, group=group)
    return model


# ----------------------------------------------------------------------------------------------------------
# Decoding: why the report keeps TP for serving. At small batch every token reads all weights and the KV cache
# once, so a decode step is bound by HBM bandwidth until the batch is large enough to be bound by FLOPs.


def decode_plan(cfg: ModelConfig, tp: int, batch: int, context: int, fp8: bool) -> dict:
    """Per GPU under TP: weight and KV bytes, the bandwidth-bound and compute-bound time of one decode step, and
    the batch where the two meet. Assumes weights and KV heads split evenly (KV heads replicate past
    kv_heads), bf16 KV cache (FP8 weights when fp8), no overlap loss, and all-reduce latency ignored."""
    wb = 1 if fp8 else 2
    weights = cfg.num_params() * wb / tp
    kv = cfg.kv_cache_bytes(context) / min(tp, cfg.num_key_value_heads)          # one sequence, window-aware
    keys = sum(min(context, cfg.sliding_window) if k == "sliding" else context for k in cfg.layer_types)
    flops = (2 * cfg.num_params() + 4 * cfg.num_attention_heads * cfg.head_dim * keys) / tp   # per token
    peak, bw = H100["fp8_flops" if fp8 else "bf16_flops"], H100["hbm_bytes_per_s"]
    t_mem, t_flop = (weights + batch * kv) / bw, batch * flops / peak
    per_token_gap = flops / peak - kv / bw            # compute-bound when batch * this exceeds weights / bw
    return {"tp": tp, "precision": "fp8" if fp8 else "bf16", "batch": batch, "context": context,
            "weight_gb": weights / 1e9, "kv_gb": batch * kv / 1e9, "fits_80gb": weights + batch * kv < H100_MEM,
            "step_ms": 1e3 * max(t_mem, t_flop), "tok_s_per_seq": 1 / max(t_mem, t_flop),
            "compute_bound_batch": math.ceil(weights / bw / per_token_gap) if per_token_gap > 0 else None}


def decode_table(cfg: ModelConfig, context: int, batch: int = 1) -> str:
    lines = [f"| TP | precision | weights GB/GPU | KV GB/GPU ({batch} seq) | fits 80 GB | ms/step at batch {batch} | "
             f"tok/s per seq at batch {batch} | compute-bound from batch |", "|---|---|---:|---:|---|---:|---:|---:|"]
    for tp in (1, 2, 4, 8):
        for fp8 in (False, True):
            r = decode_plan(cfg, tp, batch, context, fp8)
            lines.append(f"| {tp} | {r['precision']} | {r['weight_gb']:.1f} | {r['kv_gb']:.2f} | "
                         f"{'yes' if r['fits_80gb'] else 'no'} | {r['step_ms']:.1f} | {r['tok_s_per_seq']:.0f} | "
                         f"{r['compute_bound_batch'] or 'never: KV-bound'} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Plan a parallel layout: memory per GPU, activation and parameter "
                                 "traffic per step, ranked by a cost model (see the plan section), for a model "
                                 "preset on H100s; then where TP is needed, and decoding under TP. (Loss parity "
                                 "under torchrun is measured by python tests/parity.py.)")
    ap.add_argument("--plan", metavar="PRESET", required=True, help=f"model preset ({', '.join(PRESETS)})")
    ap.add_argument("--gpus", type=int, default=64, help="number of GPUs (default 64)")
    for a in AXES:
        ap.add_argument(f"--{a}", type=int, default=None, help=f"{a} degree of one layout to detail")
    ap.add_argument("--seq", type=int, default=8192, help="tokens per row (report: 8K main phase; default 8192)")
    ap.add_argument("--micro-batch", type=int, default=1, help="rows per data-parallel rank (dp x fsdp) per "
                    "micro-batch; sp and tp ranks share a row (default 1)")
    ap.add_argument("--recompute", action="store_true", help="full activation checkpointing per block")
    ap.add_argument("--gather-dtype", choices=sorted(GATHER_BYTES), default="fp32", help="dtype FSDP all-gathers "
                    "parameters in: fp32 (what parallelize() does) or bf16 (MixedPrecisionPolicy(param_dtype=bf16)); "
                    "gradients reduce-scatter in fp32 either way (default fp32)")
    ap.add_argument("--decode-context", type=int, default=8192, help="context of the decode table (default 8192)")
    ap.add_argument("--decode-batch", type=int, default=1, help="sequences decoded together (default 1)")
    args = ap.parse_args(argv)
    if args.plan not in PRESETS:
        ap.error(f"--plan {args.plan!r}: unknown preset; choose from {sorted(PRESETS)}")
    if min(args.gpus, args.seq, args.micro_batch, args.decode_batch, args.decode_context) < 1:
        ap.error("--gpus, --seq, --micro-batch, --decode-batch and --decode-context must be >= 1")
    cfg = PRESETS[args.plan]
    layouts, chosen = candidate_layouts(args.gpus, cfg), None
    if any(getattr(args, a) is not None for a in AXES):
        given = {a: getattr(args, a) or 1 for a in AXES}
        if args.fsdp is None:                # fsdp takes the GPUs the other axes leave
            given["fsdp"] = max(1, args.gpus // math.prod(given.values()))
        chosen = ParallelConfig(**given)
        try:
            chosen.validate(cfg, args.gpus)
            chosen.check_batch(chosen.data * args.micro_batch, args.seq)
        except ValueError as e:
            ap.error(str(e))
        layouts = [chosen] + [pc for pc in layouts if pc != chosen]
    layouts = [pc for pc in layouts if args.seq % (pc.sp * pc.tp) == 0]
    table, rows = plan_table(cfg, layouts, args.seq, args.micro_batch, args.recompute, args.gather_dtype)
    print(f"{args.plan}: {cfg.num_params() / 1e9:.1f}B params, {args.gpus} GPUs, seq {args.seq}, micro-batch "
          f"{args.micro_batch}, {'full recompute' if args.recompute else 'no recompute'}; fp32 master + grads "
          f"+ Adam = 16 B/param split by tp x fsdp x sp; FSDP gathers {args.gather_dtype}, reduces grads in fp32")
    print(f"cost model: activation traffic (TP, SP) exposed in full, parameter traffic (FSDP, DP) only past compute "
          f"(bf16 peak x MFU {MFU}); NVLink {LINK_BYTES_PER_S['nvlink'] / 1e9:.0f} GB/s inside a node of "
          f"{GPUS_PER_NODE}, InfiniBand {LINK_BYTES_PER_S['ib'] / 1e9:.0f} GB/s per GPU across; ranked by exposed "
          f"s per M tokens, layouts that fit 80 GB first")
    print(table)
    if chosen is not None:
        r, G = next(r for r in rows if r["layout"] == {a: getattr(chosen, a) for a in AXES}), 1e9
        print(f"\nlayout dp={chosen.dp} fsdp={chosen.fsdp} sp={chosen.sp} tp={chosen.tp} (rank {r['rank']} of "
              f"{len(rows)}):")
        print("  memory per GPU: " + ", ".join(f"{k} {v / G:.2f} GB" for k, v in r["memory"].items()))
        print("  sent per GPU per step: " + ", ".join(f"{k} {v / G:.2f} GB"
                                                      for k, v in r["comm_bytes_per_step"].items()))
        print("  collectives parallel.py issues per step: " +
              (", ".join(f"{k} x{v}" for k, v in r["collectives_per_step"].items()) or "none") +
              " (+ FSDP's all-gathers / reduce-scatters per block)")
    seqs = sorted({8192, 32768, 131072, 262144, args.seq})
    tp_needed = where_tp_is_needed(cfg, args.gpus, args.micro_batch, args.recompute, args.gather_dtype, seqs)
    print("\n" + where_tp_table(tp_needed, args.gpus, args.micro_batch, args.recompute))
    print(f"\ndecoding {args.plan} on H100s at batch {args.decode_batch}, context {args.decode_context} (bandwidth "
          f"{H100['hbm_bytes_per_s'] / 1e12:.2f} TB/s): a bound, not a measurement\n" +
          decode_table(cfg, args.decode_context, args.decode_batch))
    decode = [decode_plan(cfg, tp, args.decode_batch, args.decode_context, fp8) for tp in (1, 2, 4, 8)
              for fp8 in (False, True)]
    print(json.dumps({"preset": args.plan, "params": cfg.num_params(), "rows": rows, "decode": decode,
                      "chosen": chosen and {a: getattr(chosen, a) for a in AXES}, "gather_dtype": args.gather_dtype,
                      "cost_model": {"gpus_per_node": GPUS_PER_NODE, "link_bytes_per_s": LINK_BYTES_PER_S, "mfu": MFU},
                      "where_tp_is_needed": tp_needed, "decode_batch": args.decode_batch,
                      "decode_context": args.decode_context}))
    return rows


if __name__ == "__main__":
    main()
