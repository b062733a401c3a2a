"""merge.py: SPEC section 7's worked examples, streaming merges of sharded checkpoints equal to the in-memory
reference, a peak-memory bound, the expert-weight search, and every bad input of the issue (clear error,
nothing written)."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import merge as M
from model import CommandA, ModelConfig, PRESETS
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Merging is memory-bound; on a shared 2-core box a second torch thread only spin-waits (~5x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sd(**tensors):
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}


def random_sd(seed, shapes={"a": (3, 4), "b": (5,)}):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


# ------------------------------------------------------------------------------- SPEC section 7, in memory


def test_linear_is_weighted_mean_normalized_by_weight_sum():
    m = [sd(x=[3.0, 0.0]), sd(x=[-1.0, 4.0])]
    assert torch.equal(M.merge_state_dicts("linear", m, [3, 1])["x"], torch.tensor([2.0, 1.0]))
    assert torch.equal(M.merge_state_dicts("linear", m, [6, 2])["x"], torch.tensor([2.0, 1.0]))  # scale-free
    assert torch.equal(M.merge_state_dicts("linear", m)["x"], torch.tensor([1.0, 2.0]))          # uniform
    assert torch.equal(M.merge_state_dicts("soup", m)["x"], torch.tensor([1.0, 2.0]))


def test_linear_is_associative_a_soup_of_soups_is_one_linear_merge():
    a, b, c = random_sd(0), random_sd(1), random_sd(2)
    ab = M.merge_state_dicts("linear", [a, b], [1, 2])
    nested = M.merge_state_dicts("linear", [ab, c], [3, 4])           # (a + 2b)/3 carries weight 3
    flat = M.merge_state_dicts("linear", [a, b, c], [1, 2, 4])
    for k in a:
        torch.testing.assert_close(nested[k], flat[k], rtol=1e-6, atol=1e-6)


def test_identity_merges_return_the_model():
    a, base = random_sd(0), random_sd(5)
    for method, kw in [("linear", {}), ("soup", {}), ("task_arithmetic", {"base": base}), ("ties", {"base": base}),
                       ("dare", {"base": base})]:
        out = M.merge_state_dicts(method, [a, a] if method in ("linear", "soup") else [a], **kw)
        for k in a:
            torch.testing.assert_close(out[k], a[k], rtol=1e-6, atol=1e-6, msg=method)
    out = M.merge_state_dicts("slerp", [a, a], t=0.3)
    assert all(torch.allclose(out[k], a[k]) for k in a)


def test_ties_elects_sign_where_task_arithmetic_cancels():
    base, models = sd(x=[1.0]), [sd(x=[3.0]), sd(x=[-1.0])]
    assert M.merge_state_dicts("ties", models, base=base)["x"].item() == 3.0      # SPEC 7: TIES 3 ...
    assert M.merge_state_dicts("task_arithmetic", models, base=base)["x"].item() == 1.0  # ... task arithmetic 1


def test_ties_trims_by_magnitude_then_takes_the_disjoint_mean():
    # deltas [3,1,-2,.5] and [-1,2,2,.1]; density .5 keeps [3,0,-2,0] and [0,2,2,0]; votes: +, +, tie -> +, none
    models = [sd(x=[3.0, 1.0, -2.0, 0.5]), sd(x=[-1.0, 2.0, 2.0, 0.1])]
    out = M.merge_state_dicts("ties", models, base=sd(x=[0.0] * 4), density=0.5)["x"]
    assert out.tolist() == [3.0, 2.0, 2.0, 0.0]
    # without normalization the agreeing deltas are summed, not averaged
    models = [sd(x=[2.0, 1.0]), sd(x=[4.0, -3.0])]
    assert M.merge_state_dicts("ties", models, base=sd(x=[0.0, 0.0]))["x"].tolist() == [3.0, -3.0]
    assert M.merge_state_dicts("ties", models, base=sd(x=[0.0, 0.0]), normalize=False)["x"].tolist() == [6.0, -3.0]


def test_task_arithmetic_defaults_are_mergekits_sum_and_lambda_one():
    base, models = sd(x=[1.0]), [sd(x=[2.0]), sd(x=[4.0])]
    assert M.merge_state_dicts("task_arithmetic", models, base=base)["x"].item() == 5.0       # 1 + (1 + 3)
    assert M.merge_state_dicts("task_arithmetic", models, base=base, lam=0.5)["x"].item() == 3.0
    assert M.merge_state_dicts("task_arithmetic", models, base=base, normalize=True)["x"].item() == 3.0
    assert M.merge_state_dicts("task_arithmetic", models, [1, 0], base=base)["x"].item() == 2.0


def test_dare_density_one_is_identity_and_lower_density_drops_and_rescales_reproducibly():
    base, a, b = random_sd(0), random_sd(1), random_sd(2)
    one = M.merge_state_dicts("dare", [a], base=base, density=1.0)
    assert all(torch.allclose(one[k], a[k], atol=1e-6) for k in a)
    ta = M.merge_state_dicts("task_arithmetic", [a, b], base=base)
    d1 = M.merge_state_dicts("dare", [a, b], base=base, density=1.0)
    assert all(torch.allclose(ta[k], d1[k]) for k in a)

    big = {"w": torch.zeros(20000)}
    x = M.merge_state_dicts("dare", [{"w": torch.ones(20000)}], base=big, density=0.25, seed=3)["w"]
    assert set(x.unique().tolist()) == {0.0, 4.0}                   # dropped, or kept and rescaled by 1/density
    assert abs((x > 0).float().mean().item() - 0.25) < 0.02
    assert abs(x.mean().item() - 1.0) < 0.05                        # the task vector's expectation is kept
    same = M.merge_state_dicts("dare", [{"w": torch.ones(20000)}], base=big, density=0.25, seed=3)["w"]
    other = M.merge_state_dicts("dare", [{"w": torch.ones(20000)}], base=big, density=0.25, seed=4)["w"]
    assert torch.equal(x, same) and not torch.equal(x, other)


def test_dare_gives_a_tied_lm_head_the_embeddings_mask():
    e = torch.randn(50, 8)
    m = {"model.embed_tokens.weight": e, "lm_head.weight": e.clone()}
    base = {k: torch.zeros(50, 8) for k in m}
    out = M.merge_state_dicts("dare", [m], base=base, density=0.5)
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])


def test_slerp_unit_vectors_and_endpoints():
    a, b = sd(x=[1.0, 0.0]), sd(x=[0.0, 1.0])
    torch.testing.assert_close(M.merge_state_dicts("slerp", [a, b], t=0.5)["x"], torch.tensor([0.7071, 0.7071]),
                               atol=1e-4, rtol=0)
    assert M.merge_state_dicts("slerp", [a, b], t=0.0)["x"].tolist() == [1.0, 0.0]
    torch.testing.assert_close(M.merge_state_dicts("slerp", [a, b], t=1.0)["x"], torch.tensor([0.0, 1.0]))
    # 60 degrees apart: the midpoint keeps unit norm (linear interpolation would shrink it to 0.866)
    c = sd(x=[0.5, 3 ** 0.5 / 2])
    mid = M.merge_state_dicts("slerp", [a, c], t=0.5)["x"]
    assert abs(mid.norm().item() - 1.0) < 1e-5
    # nearly parallel tensors fall back to linear interpolation (no 0/0)
    p = M.merge_state_dicts("slerp", [sd(x=[1.0, 0.0]), sd(x=[2.0, 0.0])], t=0.5)["x"]
    assert p.tolist() == [1.5, 0.0]


def test_interpolation_to_the_parent():
    parent, rl = sd(x=[0.0, 10.0]), sd(x=[4.0, 2.0])
    assert M.merge_state_dicts("interpolate", [rl], base=parent, eta=0.25)["x"].tolist() == [1.0, 8.0]
    assert M.merge_state_dicts("interpolate", [rl], base=parent, eta=1.0)["x"].tolist() == [4.0, 2.0]


def test_merge_modules_returns_a_runnable_commanda():
    torch.manual_seed(0)
    a, b = CommandA(PRESETS["micro"]).eval(), CommandA(PRESETS["micro"]).eval()
    m = M.merge("linear", [a, b], [1, 3])
    assert isinstance(m, CommandA)
    k = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(m.state_dict()[k], (a.state_dict()[k] + 3 * b.state_dict()[k]) / 4)
    assert m(torch.tensor([[1, 2, 3]])).shape == (1, 3, PRESETS["micro"].vocab_size)
    with pytest.raises(M.MergeError, match="mix"):
        M.merge("linear", [a, a.state_dict()])


# ------------------------------------------------------------------------------- checkpoints on disk


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Three micro checkpoints, sharded, with a tokenizer: m0, m1 (experts) and p (their parent)."""
    root = tmp_path_factory.mktemp("ckpts")
    tok = Tokenizer.train(["the merged model keeps its tokenizer files " * 20, "def f(x): return x + 1"], 300)
    out = {}
    for i, name in enumerate(("m0", "m1", "p")):
        torch.manual_seed(i)
        m = CommandA(PRESETS["micro"])
        with torch.no_grad():
            m.model.norm.weight.fill_(1.0 + i)  # distinct, so rankings in the top-k tests are known
        m.save_pretrained(str(root / name), max_shard_bytes=120_000)
        tok.save(str(root / name))
        out[name] = str(root / name)
    out["root"] = root
    return out


def load_sd(path):
    return dict(CommandA.from_pretrained(path).state_dict())


@pytest.mark.parametrize("method,kw", [
    ("linear", {"weights": [1, 3]}), ("soup", {}), ("task_arithmetic", {"base": "p", "lam": 0.7}),
    ("ties", {"base": "p", "density": 0.4}), ("ties", {"base": "p", "weights": [2, 1]}),  # density 1: row blocks
    ("dare", {"base": "p", "density": 0.5, "seed": 7}),
    ("dare_ties", {"base": "p", "density": 0.5}), ("slerp", {"t": 0.3}), ("interpolate", {"base": "p", "eta": 0.4}),
])
def test_streaming_merge_equals_in_memory_merge_loads_runs_and_keeps_tokenizer(ckpts, tmp_path, method, kw):
    kw = dict(kw)
    models = ["m0"] if method == "interpolate" else ["m0", "m1"]
    base = kw.pop("base", None)
    out = str(tmp_path / "out")
    summary = M.merge(method, [ckpts[m] for m in models], base=ckpts[base] if base else None, out=out,
                      progress=False, max_shard_bytes=200_000, chunk_bytes=4096, **kw)
    assert summary["shards"] > 1 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    ref = M.merge_state_dicts(method, [load_sd(ckpts[m]) for m in models],
                              base=load_sd(ckpts[base]) if base else None, **kw)
    merged = CommandA.from_pretrained(out).eval()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-6, atol=1e-6, msg=k)
    ref_model = CommandA(PRESETS["micro"]).eval()
    ref_model.load_state_dict(ref)
    ids = torch.tensor([[5, 9, 2, 7, 1, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), ref_model(ids), rtol=1e-5, atol=1e-5)
    src = ckpts[base] if method == "interpolate" else ckpts["m0"]
    with open(os.path.join(out, "tokenizer.json"), "rb") as f, open(os.path.join(src, "tokenizer.json"), "rb") as g:
        assert f.read() == g.read()
    assert Tokenizer.load(out).encode("merged") == Tokenizer.load(src).encode("merged")
    rec = json.load(open(os.path.join(out, "merge.json")))
    assert rec["method"] == method
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp dirs left behind


def test_identity_merge_of_a_checkpoint_reproduces_its_logits(ckpts, tmp_path):
    M.merge("linear", [ckpts["m0"], ckpts["m0"]], out=str(tmp_path / "o"), progress=False)
    a, b = CommandA.from_pretrained(ckpts["m0"]).eval(), CommandA.from_pretrained(str(tmp_path / "o")).eval()
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_output_dtype_follows_the_first_model_or_dtype(ckpts, tmp_path):
    m = CommandA.from_pretrained(ckpts["m0"])
    m.save_pretrained(str(tmp_path / "bf"), dtype=torch.bfloat16)
    M.merge("linear", [str(tmp_path / "bf"), str(tmp_path / "bf")], out=str(tmp_path / "o1"), progress=False)
    t = load_file(str(tmp_path / "o1" / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    assert json.load(open(tmp_path / "o1" / "config.json"))["torch_dtype"] == "bfloat16"
    M.merge("linear", [str(tmp_path / "bf")], out=str(tmp_path / "o2"), dtype="float32", progress=False)
    t2 = load_file(str(tmp_path / "o2" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in t2.values())
    assert torch.equal(t2["model.norm.weight"], t["model.norm.weight"].float())


def test_overwrite_replaces_an_existing_output(ckpts, tmp_path):
    out = str(tmp_path / "o")
    M.merge("linear", [ckpts["m0"]], out=out, progress=False, max_shard_bytes=100_000)
    with pytest.raises(M.MergeError, match="not empty"):
        M.merge("linear", [ckpts["m1"]], out=out, progress=False)
    M.merge("linear", [ckpts["m1"]], out=out, progress=False, overwrite=True)
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["model.safetensors"]  # no stale shards
    assert torch.equal(load_sd(out)["model.norm.weight"], load_sd(ckpts["m1"])["model.norm.weight"])


PEAK_SCRIPT = r"""
import json, re, sys
import torch, merge as M
torch.set_num_threads(1)
root = sys.argv[1]


def status(key):  # bytes, from the kernel's own accounting of this process
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


M.merge("ties", [root + "/warm"], base=root + "/warm", out=root + "/warm_out", progress=False)  # code paths, small
deltas = {}
for method, chunk in (("linear", 64 * 1024), ("ties", 2**28)):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS, so each merge is measured on its own
    before = status("VmRSS")
    kw = {"base": root + "/big2", "density": 0.5} if method in M.NEEDS_BASE else {}
    M.merge(method, [root + "/big0", root + "/big1"], out=root + "/out_" + method, progress=False, chunk_bytes=chunk,
            max_shard_bytes=8 * 2**20, **kw)
    deltas[method] = status("VmHWM") - before
print(json.dumps(deltas))
"""


@pytest.mark.slow
def test_peak_memory_is_a_few_tensors_not_the_model(ckpts, tmp_path):
    """Peak resident memory (the kernel's VmHWM, reset before each merge; tracemalloc cannot see torch storage)
    of a fresh process merging 37 MiB checkpoints of 110 tensors in 5 shards each: the growth over the resident
    size before the merge is a few of the largest tensor, not the model."""
    cfg = ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=12,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=16, max_position_embeddings=256)
    for i in range(3):
        torch.manual_seed(i)
        CommandA(cfg).save_pretrained(str(tmp_path / f"big{i}"), max_shard_bytes=8 * 2**20)
    CommandA(PRESETS["micro"]).save_pretrained(str(tmp_path / "warm"))
    model_bytes = cfg.num_params() * 4
    largest = 1024 * 256 * 4  # the embedding, 1 MiB
    assert len([f for f in os.listdir(tmp_path / "big0") if f.endswith(".safetensors")]) >= 4
    r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    deltas = json.loads(r.stdout.strip().splitlines()[-1])
    print({k: f"{v / 2**20:.1f} MiB" for k, v in deltas.items()}, f"model {model_bytes / 2**20:.1f} MiB")
    # linear streams 64 KiB row blocks: well under a few tensors; TIES holds whole tensors plus its running sums
    assert deltas["linear"] < 4 * largest
    assert deltas["ties"] < 16 * largest
    assert max(deltas.values()) < model_bytes / 2


# ------------------------------------------------------------------------------- bad input: clear, nothing written


def write_variant(src, dst, edit_config=None, edit_tensors=None):
    """A copy of checkpoint src as one safetensors file, with config / tensors edited."""
    os.makedirs(dst)
    cfg = json.load(open(os.path.join(src, "config.json")))
    t = load_sd(src)
    if edit_config:
        edit_config(cfg)
    if edit_tensors:
        edit_tensors(t)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(dst, "model.safetensors"))
    return dst


def assert_refused(tmp_path, match, *args, **kw):
    out = str(tmp_path / "never")
    before = set(os.listdir(tmp_path))
    with pytest.raises(M.MergeError, match=match):
        M.merge(*args, out=out, progress=False, **kw)
    assert not os.path.exists(out)
    assert set(os.listdir(tmp_path)) == before  # no temp dirs either


def test_different_architecture_is_refused(ckpts, tmp_path):
    cfg = ModelConfig(**{**PRESETS["micro"].__dict__, "intermediate_size": 128})
    CommandA(cfg).save_pretrained(str(tmp_path / "wide"))
    assert_refused(tmp_path, "different architectures: intermediate_size", "linear",
                   [ckpts["m0"], str(tmp_path / "wide")])
    rope = write_variant(ckpts["m1"], str(tmp_path / "rope"), edit_config=lambda c: c.update(rope_theta=1.0))
    assert_refused(tmp_path, "rope_theta", "linear", [ckpts["m0"], rope])


def test_wrong_shape_missing_and_extra_tensors_are_refused(ckpts, tmp_path):
    k = "model.layers.1.mlp.down_proj.weight"
    shape = write_variant(ckpts["m1"], str(tmp_path / "shape"), edit_tensors=lambda t: t.update({k: t[k][:, :10]}))
    assert_refused(tmp_path, f"{k} has shape", "linear", [ckpts["m0"], shape])
    missing = write_variant(ckpts["m1"], str(tmp_path / "missing"), edit_tensors=lambda t: t.pop(k))
    assert_refused(tmp_path, "missing 1 tensor", "linear", [ckpts["m0"], missing])
    assert_refused(tmp_path, "missing 1 tensor", "ties", [ckpts["m0"]], base=missing)
    extra = write_variant(ckpts["m1"], str(tmp_path / "extra"),
                          edit_tensors=lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3)}))
    assert_refused(tmp_path, "does not have", "linear", [ckpts["m0"], extra])
    head = write_variant(ckpts["m1"], str(tmp_path / "head"),
                         edit_tensors=lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    assert_refused(tmp_path, "lacks", "linear", [ckpts["m0"], head])  # a tensor only one input has


def test_truncated_or_missing_shard_is_refused_before_writing(ckpts, tmp_path):
    import shutil
    bad = str(tmp_path / "bad")
    shutil.copytree(ckpts["m1"], bad)
    shard = sorted(f for f in os.listdir(bad) if f.endswith(".safetensors"))[-1]
    with open(os.path.join(bad, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(bad, shard)) - 100)
    assert_refused(tmp_path, "truncated", "linear", [ckpts["m0"], bad])
    os.remove(os.path.join(bad, shard))
    assert_refused(tmp_path, "missing", "linear", [ckpts["m0"], bad])
    assert_refused(tmp_path, "not a checkpoint directory", "linear", [ckpts["m0"], str(tmp_path / "nope")])


def test_different_tokenizers_are_refused(ckpts, tmp_path):
    import shutil
    other = str(tmp_path / "other")
    shutil.copytree(ckpts["m1"], other)
    Tokenizer.train(["a completely different corpus of words and more words " * 20], 290).save(other)
    assert_refused(tmp_path, "different tokenizer.json", "linear", [ckpts["m0"], other])


@pytest.mark.parametrize("args,kw,match", [
    (("linear", ["m0", "m1"]), {"weights": [1]}, "1 weight.* for 2 model"),
    (("linear", ["m0", "m1"]), {"weights": [1, 2, 3]}, "3 weight.* for 2 model"),
    (("linear", ["m0", "m1"]), {"weights": [1, -1]}, ">= 0"),
    (("linear", ["m0", "m1"]), {"weights": [0, 0]}, "all weights are zero"),
    (("linear", ["m0", "m1"]), {"weights": [1, float("nan")]}, "finite"),
    (("ties", ["m0", "m1"]), {}, "needs a base model"),
    (("task_arithmetic", ["m0"]), {}, "needs a base model"),
    (("dare", ["m0"]), {}, "needs a base model"),
    (("interpolate", ["m0"]), {}, "needs a base model"),
    (("linear", ["m0"]), {"base": "p"}, "does not use a base"),
    (("slerp", ["m0", "m1", "p"]), {}, "exactly 2 models"),
    (("interpolate", ["m0", "m1"]), {"base": "p"}, "exactly 1 model"),
    (("soup", ["m0", "m1"]), {"weights": [1, 2]}, "uniform"),
    (("ties", ["m0", "m1"]), {"base": "p", "density": 0.0}, "density"),
    (("dare", ["m0", "m1"]), {"base": "p", "density": 1.5}, "density"),
    (("slerp", ["m0", "m1"]), {"t": 1.2}, "t must be"),
    (("fisher", ["m0", "m1"]), {}, "unknown merge method"),
])
def test_bad_arguments_are_refused_before_anything_is_written(ckpts, tmp_path, args, kw, match):
    method, models = args
    kw = dict(kw)
    if "base" in kw:
        kw["base"] = ckpts[kw["base"]]
    assert_refused(tmp_path, match, method, [ckpts[m] for m in models], **kw)


def test_output_that_would_overwrite_an_input_is_refused(ckpts):
    root = ckpts["root"]
    snapshot = {p: sorted(os.listdir(ckpts[p])) for p in ("m0", "m1", "p")}
    for out in (ckpts["m1"], os.path.join(ckpts["m0"], "sub"), str(root)):
        with pytest.raises(M.MergeError, match="would overwrite the input"):
            M.merge("linear", [ckpts["m0"], ckpts["m1"]], out=out, progress=False)
    with pytest.raises(M.MergeError, match="would overwrite the input"):
        M.merge("ties", [ckpts["m0"]], base=ckpts["p"], out=ckpts["p"], progress=False, overwrite=True)
    assert snapshot == {p: sorted(os.listdir(ckpts[p])) for p in ("m0", "m1", "p")}


def test_failure_mid_merge_leaves_no_output_and_keeps_the_old_one(ckpts, tmp_path, monkeypatch):
    out = str(tmp_path / "o")
    calls = {"n": 0}
    real = M.merge_tensor

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 12:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(M, "merge_tensor", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        M.merge("linear", [ckpts["m0"], ckpts["m1"]], out=out, progress=False, max_shard_bytes=100_000)
    assert os.listdir(tmp_path) == []                     # neither the output nor its temp directory
    monkeypatch.setattr(M, "merge_tensor", real)
    M.merge("linear", [ckpts["m0"]], out=out, progress=False)
    old = load_sd(out)
    calls["n"] = 0
    monkeypatch.setattr(M, "merge_tensor", flaky)
    with pytest.raises(RuntimeError):
        M.merge("linear", [ckpts["m1"]], out=out, progress=False, overwrite=True)
    assert os.listdir(tmp_path) == ["o"]
    assert all(torch.equal(v, old[k]) for k, v in load_sd(out).items())  # the previous merge is intact


# ------------------------------------------------------------------------------- search, leave-one-out, top-k


def one_hot_experts():
    return [{"w": torch.eye(3)[i].clone()} for i in range(3)]


def toy_scores(merged):
    """Domain scores of a merge of one-hot experts (merged weights m = the share of each expert):
    code = m0, math = m1 + m0 / 2, safety = m2. The mean is best with everything on expert 0, but then
    safety is 0; with a floor of 0.2 the optimum is m = (0.8, 0, 0.2)."""
    m = merged["w"].tolist()
    return {"code": m[0], "math": m[1] + 0.5 * m[0], "safety": m[2]}


def test_grid_search_finds_the_best_merge_that_respects_the_floor(tmp_path):
    calls = []
    fn = lambda m: calls.append(1) or toy_scores(m)
    res = M.search_weights(one_hot_experts(), fn, floor=0.2, grid=[0, 1, 2, 3, 4], progress=False)
    best = res["best"]
    assert best.feasible and best.weights == pytest.approx([0.8, 0.0, 0.2])
    assert len(calls) == res["evaluations"] == len({tuple(r.weights) for r in res["rows"]})  # each merge scored once
    unconstrained = M.search_weights(one_hot_experts(), toy_scores, floor=0.0, grid=[0, 1], progress=False)["best"]
    assert unconstrained.weights == pytest.approx([1.0, 0.0, 0.0])
    table = M.format_search_table(res, ["code", "math", "safety"])
    assert "| 0.80 | 0.00 | 0.20 |" in table.splitlines()[2]
    with pytest.raises(M.MergeError, match="max_evals"):
        M.search_weights(one_hot_experts(), toy_scores, grid=[0, 1, 2, 3, 4], max_evals=10, progress=False)


def test_greedy_search_improves_on_uniform_within_the_floor():
    res = M.search_weights(one_hot_experts(), toy_scores, floor=0.2, method="greedy", progress=False)
    uniform = toy_scores({"w": torch.full((3,), 1 / 3)})
    best = res["best"]
    assert best.feasible and min(best.scores.values()) >= 0.2 - 1e-6
    assert best.mean > sum(uniform.values()) / 3 + 0.05
    assert best.weights == pytest.approx([0.8, 0.0, 0.2], abs=0.02)  # the grid's optimum, mean 0.467
    assert res["evaluations"] < 60


def test_leave_one_out_shows_which_expert_carries_which_domain(tmp_path):
    loo = M.leave_one_out(one_hot_experts(), toy_scores, names=["code", "math", "safety"])
    assert loo["delta"]["safety"]["safety"] < 0    # leaving the safety expert out costs safety
    assert loo["delta"]["safety"]["code"] > 0      # ... and its share goes to the others
    assert loo["delta"]["math"]["math"] < 0
    assert loo["delta"]["code"]["math"] == pytest.approx(0, abs=1e-6)  # math's gain replaces code's half share
    table = M.format_loo_table(loo)
    assert "| safety |" in table and "-0.333" in table
    res = M.search_weights(one_hot_experts(), toy_scores, floor=0.2, grid=[0, 1, 2], progress=False)
    png = str(tmp_path / "s.png")
    M.plot_search(res, png, loo)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000


def test_search_on_checkpoint_paths_scores_merged_directories(ckpts):
    seen = []

    def score(path):
        seen.append(path)
        norm = CommandA.from_pretrained(path).model.norm.weight.mean().item()  # m0 has 1.0, m1 has 2.0
        return {"a": norm, "b": 3.0 - norm}

    res = M.search_weights([ckpts["m0"], ckpts["m1"]], score, floor=1.2, grid=[0, 1], progress=False)
    assert res["evaluations"] == 3 and res["best"].weights == pytest.approx([0.5, 0.5])
    assert not any(os.path.exists(p) for p in seen)  # candidates are temporary


def test_topk_merge_soups_the_best_k(ckpts, tmp_path):
    cands = [ckpts["m0"], ckpts["m1"], ckpts["p"]]  # norm weights 1, 2, 3
    score = lambda p: CommandA.from_pretrained(p).model.norm.weight.mean().item()
    summary, ranking = M.topk_merge(cands, score, k=2, out=str(tmp_path / "o"), progress=False)
    assert [r[0] for r in ranking] == [ckpts["p"], ckpts["m1"], ckpts["m0"]]
    ref = M.merge_state_dicts("soup", [load_sd(ckpts["p"]), load_sd(ckpts["m1"])])
    got = load_sd(summary["out"])
    assert all(torch.allclose(got[k], ref[k]) for k in ref)
    with pytest.raises(M.MergeError, match="k must be"):
        M.topk_merge(cands, score, k=4, out=str(tmp_path / "o2"))


# ------------------------------------------------------------------------------- CLI


def run_cli(args, capsys):
    summary = M.main(args + ["--no-progress", "--threads", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(summary))
    return summary


def test_cli_merges_and_prints_a_json_summary(ckpts, tmp_path, capsys):
    out = str(tmp_path / "o")
    s = run_cli(["--method", "ties", "--models", ckpts["m0"], ckpts["m1"], "--base", ckpts["p"], "--density", "0.5",
                 "--weights", "1", "2", "--out", out], capsys)
    assert s["method"] == "ties" and s["tensors"] == len(CommandA(PRESETS["micro"]).state_dict())
    ref = M.merge_state_dicts("ties", [load_sd(ckpts["m0"]), load_sd(ckpts["m1"])], [1, 2],
                              base=load_sd(ckpts["p"]), density=0.5)
    assert all(torch.allclose(v, ref[k]) for k, v in load_sd(out).items())


def test_cli_bad_input_exits_2_with_a_message(ckpts, tmp_path, capsys):
    out = str(tmp_path / "o")
    with pytest.raises(SystemExit) as e:
        M.main(["--method", "linear", "--models", ckpts["m0"], ckpts["m1"], "--weights", "1", "--out", out])
    assert e.value.code == 2 and "1 weight(s) for 2 model(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        M.main(["--method", "linear", "--models", ckpts["m0"], "--out", out, "--rank-by", "code"])
    assert "--rank-by is used by" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        M.main(["--method", "linear", "--models", ckpts["m0"], ckpts["m1"], "--density", "0.5", "--out", out])
    assert "--density has no effect on --method linear" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_cli_rank_by_without_tasks_py_is_a_clear_error(ckpts, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tasks", None)  # import tasks -> ImportError, whether or not tasks.py exists
    out = str(tmp_path / "o")
    with pytest.raises(SystemExit):
        M.main(["--method", "topk", "--k", "1", "--models", ckpts["m0"], ckpts["m1"], "--rank-by", "code",
                "--out", out])
    assert "needs tasks.py" in capsys.readouterr().err
    assert not os.path.exists(out)


@pytest.fixture
def fake_tasks(monkeypatch):
    """Stands in for tasks.evaluate (the agreed interface); scores read off the final norm weight."""
    calls = []

    def evaluate(model, tokenizer, suites, n, seed, split):
        assert split == "test" and isinstance(tokenizer, Tokenizer)
        calls.append((tuple(suites), n, seed))
        v = model.model.norm.weight.mean().item()  # m0: 1, m1: 2, p: 3
        return {"code": v / 3, "safety": 1 - v / 6}  # the mean rises with v, safety falls

    monkeypatch.setitem(sys.modules, "tasks", types.SimpleNamespace(evaluate=evaluate))
    return calls


def test_cli_topk_ranks_with_tasks_evaluate(ckpts, tmp_path, capsys, fake_tasks):
    s = run_cli(["--method", "topk", "--k", "2", "--models", ckpts["m0"], ckpts["m1"], ckpts["p"],
                 "--rank-by", "code", "--n", "5", "--out", str(tmp_path / "o")], capsys)
    assert s["chosen"] == [ckpts["p"], ckpts["m1"]]
    assert [r["model"] for r in s["ranking"]] == [ckpts["p"], ckpts["m1"], ckpts["m0"]]
    assert fake_tasks[0] == (("code",), 5, 0)
    assert CommandA.from_pretrained(str(tmp_path / "o")).model.norm.weight.mean().item() == pytest.approx(2.5)


def test_cli_search_and_leave_one_out_write_table_plot_and_best_merge(ckpts, tmp_path, capsys, fake_tasks):
    out = str(tmp_path / "o")
    s = run_cli(["--method", "linear", "--models", ckpts["m0"], ckpts["p"], "--search", "grid", "--grid", "0,1,3",
                 "--floor", "0.6", "--loo", "--rank-by", "code,safety", "--out", out], capsys)
    # v = 1 + 2 w_p; the mean rises with v but safety = 1 - v/6 >= 0.6 caps v at 2.4 (w_p <= 0.7): of the grid's
    # w_p in {0, .25, .5, .75, 1}, 0.5 is best
    assert s["best"]["weights"] == pytest.approx([0.5, 0.5]) and s["best"]["feasible"]
    report = json.load(open(os.path.join(out, "merge_search.json")))
    assert report["search"][0]["weights"] == s["best"]["weights"] and set(report["leave_one_out"]["delta"]) == {
        os.path.basename(ckpts["m0"]), os.path.basename(ckpts["p"])}
    assert os.path.getsize(os.path.join(out, "merge_search.png")) > 10_000
    assert CommandA.from_pretrained(out).model.norm.weight.mean().item() == pytest.approx(2.0)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_cli_as_a_script_shows_progress_and_ends_with_json(ckpts, tmp_path):
    out = str(tmp_path / "o")
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "merge.py"), *a, "--threads", "1"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=120)
    r = run("--method", "slerp", "--models", ckpts["m0"], ckpts["m1"], "--t", "0.25", "--out", out)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["method"] == "slerp"
    assert "merge slerp" in r.stderr and "100%" in r.stderr  # the tqdm bar
    r = run("--method", "ties", "--models", ckpts["m0"], ckpts["m1"], "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "needs a base model" in r.stderr and not os.path.exists(tmp_path / "bad")
