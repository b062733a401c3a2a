"""
The report's architecture and recipe claims, measured by ablation at toy scale (Command A, arXiv 2504.00698,
"Model architecture" and "Pre-training"): each claim trained with pretrain.py's own loop on the same data,
tokens and seed, in one run, so its numbers compare.

  claim (report)                                   compared against                    measured
  parallel block: about the same quality,          the sequential block                val loss, training tok/s
    higher throughput
  interleaved sliding-window/RoPE : full/NoPE,     all layers full (NoPE), all layers  val loss, tok/s, retrieval of
    3:1: long context at a fraction of the KV        sliding (RoPE)                      tokens past the window, KV
                                                                                         bytes at long context
  cooldown on high-quality data, linear decay      the same linear decay on the main   val loss per domain
                                                     mix (decay only); no cooldown
                                                     (constant LR) at equal tokens
  muP: hyper-parameters transfer across widths     pretrain.py --lr-sweep / --coord-check (README, muP)

    python ablate.py                    # tiny, every claim: tables, ablate.png, out/ablate/ablate.json
    python ablate.py --claims block --steps 100
    python ablate.py --micro            # the seconds-long smoke run the tests use

Throughput is the training step (fwd + bwd + AdamW) of every variant on the same batch, interleaved, best of
N, in this process: ratios, not absolute figures (the machine is shared). Retrieval: `length` random tokens,
`distance` random tokens, the same `length` tokens again; the loss on the repeat against the first copy. Only
a layer that sees past the window can lower it: a full layer, or a stack of sliding ones whose reach L*(W-1)
exceeds the distance (the default distance is past the tiny stack's reach).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from unittest import mock

import torch
import torch.nn.functional as F

import model as M
import pretrain as P
from bench import race
from model import CommandA, DecoderLayer, LayerNorm, PRESETS, atomic_write_json, pyplot, save_figure, tune_malloc


class SequentialLayer(DecoderLayer):
    """The sequential block the report's parallel block replaces: two norms, the MLP reads the attention's output.
    h1 = h + attn(LN1(h));  h2 = h1 + mlp(LN2(h1))."""

    def __init__(self, cfg, layer_idx):
        super().__init__(cfg, layer_idx)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, h, rope, mask, cache=None):
        h = h + self.self_attn(self.input_layernorm(h), rope, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def sequential_model(cfg):
    with mock.patch.object(M, "DecoderLayer", SequentialLayer):   # model.py's Decoder builds its layers by name
        return CommandA(cfg)


def layers_of(kind: str):
    """A model builder with every layer of one kind ('full': NoPE global attention, 'sliding': RoPE window)."""
    return lambda cfg: CommandA(dataclasses.replace(cfg, layer_types=[kind] * cfg.num_hidden_layers))


# name -> (claim, TrainConfig changes, model builder). The report's model is trained once and is the baseline
# row of every claim (the same config, data and seed would train it bit for bit again).
REPORT_MODEL = "Command A (report)"
VARIANTS = {
    REPORT_MODEL: ("all", {}, CommandA),
    "sequential block": ("block", {}, sequential_model),
    "all full / NoPE": ("attention", {}, layers_of("full")),
    "all sliding / RoPE": ("attention", {}, layers_of("sliding")),
    "decay on the main mix": ("cooldown", {"cooldown_data": "main", "context_stages": [[1, 1.0]]}, CommandA),
    "no cooldown": ("cooldown", {"cooldown_frac": 0.0}, CommandA),
}
REPORT = {"block": "parallel block: 'significant improvements in throughput' at comparable quality",
          "attention": "interleaved 3:1 sliding-window (RoPE) / full (NoPE): long-context performance with a "
                       "KV cache mostly bounded by the window",
          "cooldown": "a cooldown on high-quality data with a linear decay improves the final model"}


@torch.no_grad()
def retrieval_probe(model, token_range, distance: int, n=32, length=16, seed=1234, autocast_kw=None) -> dict:
    model.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(*token_range, (n, length), generator=g)
    ids = torch.cat([x, torch.randint(*token_range, (n, distance), generator=g), x], 1)
    with torch.autocast(**(autocast_kw or {"device_type": "cpu", "enabled": False})):
        logits = model(ids[:, :-1]).float()
    ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(0)   # ce[t] predicts ids[t+1]
    model.train()
    s = length + distance                             # where the second copy starts
    first, repeat = ce[:length - 1].mean().item(), ce[s:s + length - 1].mean().item()
    return {"distance": distance, "first": round(first, 3), "repeat": round(repeat, 3),
            "retrieval_nats": round(first - repeat, 3)}


def step_throughput(models: dict, batch: torch.Tensor, autocast_kw, reps: int = 5) -> dict:
    """tok/s of fwd + bwd + AdamW per model on the same batch, interleaved round-robin, best of `reps`."""
    steps = {}
    for name, m in models.items():
        opt = torch.optim.AdamW(m.parameters(), lr=1e-6)

        def step(m=m, opt=opt):
            with torch.autocast(**autocast_kw):
                m(batch[:, :-1], targets=batch[:, 1:]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()
        steps[name] = step
    return {name: batch[:, :-1].numel() / t for name, t in race(steps, reps).items()}


def run(cfg: P.TrainConfig, claims, out: str, distance: int, reps: int, verbose=True) -> dict:
    os.makedirs(out, exist_ok=True)
    data = P.prepare_data(cfg, os.path.join(out, "data"), None, verbose)      # one corpus, one tokenizer, for all
    autocast_kw = P.precision(torch.device("cpu"), False, verbose)
    results, models = {}, {}
    for name, (claim, changes, make) in VARIANTS.items():
        if claim not in claims and claim != "all":
            continue
        if verbose:
            print(f"\n=== {claim}: {name}")
        built = []                                      # train() trains the model it builds in place: keep it
        res = P.train(dataclasses.replace(cfg, **changes), os.path.join(out, _slug(name)), verbose=verbose,
                      data=data, make_model=lambda c, make=make: built.append(make(c)) or built[-1])
        models[name] = built[0]
        results[name] = {"claim": claim, "val_loss": res["val_loss"], "val_loss_by_domain": res["val_loss_by_domain"],
                         "run_tok_per_s": res["tok_per_s"], "tokens": res["tokens"],
                         "params": sum(p.numel() for p in built[0].parameters()),   # the module, not the config
                         "phases": res["phases"]}
    # the claim-specific measurements, every variant in this process
    vocab = models[next(iter(models))].config.vocab_size
    for name, m in models.items():
        results[name]["retrieval"] = retrieval_probe(m, (256, min(4096, vocab)), distance, autocast_kw=autocast_kw)
        c = m.config
        results[name]["kv_bytes"] = {T: c.kv_cache_bytes(T) for T in (cfg.seq_len, 32 * cfg.seq_len)}
        # the same layer pattern at Command A's size and the report's 256K context
        big = dataclasses.replace(PRESETS["command-a"], layer_types=None if c.layer_types == _interleaved(c) else
                                  [c.layer_types[0]] * PRESETS["command-a"].num_hidden_layers)
        results[name]["kv_gib_command_a_256k"] = round(big.kv_cache_bytes(262144) / 2**30, 2)
    g = torch.Generator().manual_seed(cfg.seed)
    batch = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len + 1), generator=g)
    for name, tps in step_throughput(models, batch, autocast_kw, reps).items():
        results[name]["step_tok_per_s"] = round(tps)
    return {"config": dataclasses.asdict(cfg), "distance": distance, "threads": torch.get_num_threads(),
            "variants": results}


def race_only(out: str, reps: int) -> dict:
    """The throughput race of a finished run again, without training: a step's time does not depend on the
    weights, so fresh models of each variant's config race on the same batch, and ablate.json is updated."""
    path = os.path.join(out, "ablate.json")
    if not os.path.exists(path):
        raise SystemExit(f"--race-only: no {path}; run python ablate.py --out {out} first")
    r = json.load(open(path))
    cfg = P.TrainConfig(**r["config"])
    with open(os.path.join(out, _slug(REPORT_MODEL), "config.json")) as f:   # the trained vocab and positions
        mcfg = M.ModelConfig.from_hf_dict(json.load(f))
    torch.manual_seed(cfg.seed)
    models = {n: VARIANTS[n][2](mcfg) for n in r["variants"]}
    batch = torch.randint(0, mcfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1),
                          generator=torch.Generator().manual_seed(cfg.seed))
    autocast_kw = P.precision(torch.device("cpu"), False, False)
    for name, tps in step_throughput(models, batch, autocast_kw, reps).items():
        r["variants"][name]["step_tok_per_s"] = round(tps)
    r["threads"] = torch.get_num_threads()
    print(tables(r))
    plot(r, os.path.join(out, "ablate.png"))
    atomic_write_json(path, r, indent=1)
    return r


def _slug(name: str) -> str:
    return name.split(" (")[0].replace(" / ", "-").replace(" ", "-")


def _interleaved(c) -> list:
    return dataclasses.replace(c, layer_types=None).layer_types


def tables(r: dict) -> str:
    v, out = r["variants"], []
    for claim in ("block", "attention", "cooldown"):
        rows = {n: x for n, x in v.items() if x["claim"] in (claim, "all")}
        if len(rows) < 2:
            continue
        base = v[REPORT_MODEL]
        out.append(f"\n{claim} -- report: {REPORT[claim]}")
        if claim == "cooldown":
            doms = sorted(base["val_loss_by_domain"])
            out.append("| variant | val loss | " + " | ".join(doms) + " |")
            out.append("|---|---:|" + "---:|" * len(doms))
            out += [f"| {n} | {x['val_loss']:.3f} | " + " | ".join(f"{x['val_loss_by_domain'][d]:.3f}" for d in doms)
                    + " |" for n, x in rows.items()]
            continue
        head = "| variant | params | val loss | step tok/s | vs the report's |"
        if claim == "attention":
            head += (f" repeat past {r['distance']} tokens: first / repeat (nats) | KV at T={r['config']['seq_len']}"
                     f" / {32 * r['config']['seq_len']} (KiB) | Command A KV at 256K (GiB) |")
        out += [head, "|" + "---|" * (head.count("|") - 1)]
        for n, x in rows.items():
            line = (f"| {n} | {x['params']:,} | {x['val_loss']:.3f} | {x['step_tok_per_s']:,} | "
                    f"{x['step_tok_per_s'] / base['step_tok_per_s']:.2f}x |")
            if claim == "attention":
                kv = list(x["kv_bytes"].values())
                line += (f" {x['retrieval']['first']:.2f} / {x['retrieval']['repeat']:.2f} | "
                         f"{kv[0] / 2**10:.0f} / {kv[1] / 2**10:.0f} | {x['kv_gib_command_a_256k']:.1f} |")
            out.append(line)
    return "\n".join(out)


def plot(r: dict, path: str):
    plt, v = pyplot(), r["variants"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    names = list(v)
    colors = {"all": "tab:gray", "block": "tab:blue", "attention": "tab:orange", "cooldown": "tab:green"}
    c = [colors[v[n]["claim"]] for n in names]
    for ax, key, label in ((axes[0], "val_loss", "validation loss (nats/token)"),
                           (axes[1], "step_tok_per_s", "training step tok/s (same batch, best of N)")):
        ax.barh(names, [v[n][key] for n in names], color=c)
        ax.set_xlabel(label)
        ax.invert_yaxis()
    axes[0].set_xlim(min(v[n]["val_loss"] for n in names) * 0.97, max(v[n]["val_loss"] for n in names) * 1.01)
    cool = [n for n in names if v[n]["claim"] in ("cooldown", "all")]
    if len(cool) > 1:
        doms = sorted(v[cool[0]]["val_loss_by_domain"])
        w = 0.8 / len(cool)
        for i, n in enumerate(cool):
            axes[2].bar([j + i * w for j in range(len(doms))], [v[n]["val_loss_by_domain"][d] for d in doms], w,
                        label=n)
        axes[2].set_xticks([j + 0.4 - w / 2 for j in range(len(doms))], doms, rotation=30, ha="right")
        axes[2].set_ylabel("validation loss by domain")
        axes[2].set_ylim(0, 1.35 * max(v[n]["val_loss_by_domain"][d] for n in cool for d in doms))  # legend room
        axes[2].legend(fontsize=8)
    fig.suptitle(f"ablations at equal tokens ({next(iter(v.values()))['tokens']:,} per run, seed "
                 f"{r['config']['seed']}): gray the report's model, blue block, orange attention, green cooldown",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


MICRO = dict(preset="micro", vocab_size=512, corpus_mb=0.3, seq_len=64, batch_size=4, steps=8, samples=0,
             context_stages=[[1, 0.5], [4, 0.5]], eval_every=8, ckpt_every=8, log_every=4)


def main(argv=None):
    ap = argparse.ArgumentParser(description="The report's architecture claims measured by ablation: each variant "
                                 "trained by pretrain.py on the same data, tokens and seed; tables, a plot, JSON.")
    ap.add_argument("--claims", default="block,attention,cooldown", help="comma-separated: block, attention, "
                    "cooldown (default: all three)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per variant (default 200)")
    ap.add_argument("--distance", type=int, default=None,
                    help="retrieval probe: tokens between the two copies (default: past the all-sliding stack's "
                         "reach L*(W-1), within the longest trained context)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions of the throughput race")
    ap.add_argument("--out", default="out/ablate", help="output directory (runs, ablate.json, ablate.png)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate for every variant (default: "
                    "--tiny's 3e-3)")
    ap.add_argument("--race-only", action="store_true", help="re-measure the throughput race alone (fresh models, "
                    "no training) and update the step tok/s of --out's ablate.json: for a quiet machine")
    ap.add_argument("--micro", action="store_true", help="seconds-long smoke run (preset micro)")
    args = ap.parse_args(argv)
    claims = args.claims.split(",")
    if set(claims) - {"block", "attention", "cooldown"}:
        ap.error(f"--claims: unknown {sorted(set(claims) - {'block', 'attention', 'cooldown'})}; use block, "
                 f"attention, cooldown")
    if args.steps < 4 or args.reps < 1:
        ap.error("--steps must be >= 4 and --reps >= 1")
    # the tiny recipe, with a cooldown of two stages (main context, then 4x) so every variant sees long rows
    base = MICRO if args.micro else {**P.TINY, "steps": args.steps, "context_stages": [[1, 0.5], [4, 0.5]],
                                     "eval_every": args.steps, "ckpt_every": args.steps, "samples": 0}
    cfg = P.TrainConfig(**{**base, **({"lr": args.lr} if args.lr else {})})
    m = PRESETS[cfg.preset]
    distance = args.distance or min(m.num_hidden_layers * m.sliding_window + 16, 4 * cfg.seq_len - 40)
    if not 0 < distance <= 4 * cfg.seq_len - 32:
        ap.error(f"--distance must be in [1, {4 * cfg.seq_len - 32}] (the longest trained context minus the copies)")
    tune_malloc()
    if args.race_only:
        return race_only(args.out, args.reps)
    t0 = time.time()
    r = run(cfg, claims, args.out, distance, args.reps)
    r["seconds"] = round(time.time() - t0, 1)
    print(tables(r))
    plot(r, os.path.join(args.out, "ablate.png"))
    atomic_write_json(os.path.join(args.out, "ablate.json"), r, indent=1)
    print(json.dumps({"out": args.out, "seconds": r["seconds"], **{n: {k: x[k] for k in ("val_loss", "step_tok_per_s")}
                                                                     for n, x in r["variants"].items()}}))
    return r


if __name__ == "__main__":
    sys.exit(main() and 0)
