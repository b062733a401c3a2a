"""tokenizer.py's Hugging Face files, checked against the reference libraries (transformers, tokenizers):
our checkpoint's tokenizer.json / tokenizer_config.json / chat template read by AutoTokenizer, a tokenizer.json
built to the structure of Cohere's read into ours, greedy generation through transformers, clear refusals."""
import json
import random

import pytest
import torch

from tokenizer import SPECIAL_TOKENS, Tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# one phrase per language the report names (23), plus code, whitespace, digits and special-token look-alikes
PHRASES = ["The quick brown fox", "Le cœur a ses raisons", "¿Dónde está la estación?", "Perché no, però sì",
           "Größe über alles", "Não há de quê", "日本語のテキストです", "한국어 문장입니다", "مرحبا بالعالم",
           "中文字符和汉字", "Привет, как дела?", "Selamat pagi semua", "Günaydın, nasılsın", "Goedemorgen allemaal",
           "Zażółć gęślą jaźń", "سلام دنیا", "Xin chào thế giới", "Příliš žluťoučký kůň", "नमस्ते दुनिया",
           "Доброго ранку", "Bună dimineața", "Καλημέρα κόσμε", "שלום עולם", "def f(x):\n    return x ** 2\n",
           "for (int i = 0; i < n; ++i) { sum += a[i]; }", "   \t\n\n  \r\n", "3.14159 2718281828 1,000,000",
           "<|END_OF_TURN_TOKEN|>", "<BOS_TOKEN>hi<|START_ACTION|>", "😀👍🏽🇰🇷👨‍👩‍👧", "x\u00a0y\u3000z\u200b"]


def strings(n, seed=0):
    """n test strings: the phrases, random mixes of their pieces, random code points, and random bytes
    (decoded as UTF-8 with replacement: both sides encode text, not bytes)."""
    rng = random.Random(seed)
    out = list(PHRASES)
    while len(out) < n:
        kind = rng.randrange(3)
        if kind == 0:
            out.append("".join(rng.choice(PHRASES)[:rng.randint(1, 12)] for _ in range(rng.randint(1, 6))))
        elif kind == 1:
            out.append("".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0xA0, 0x24F), rng.randint(0x400, 0x4FF),
                                               rng.randint(0x3040, 0x30FF), rng.randint(0x4E00, 0x9FFF),
                                               rng.randint(0xAC00, 0xD7A3), rng.randint(0x1F300, 0x1F64F), 9, 10, 32]))
                               for _ in range(rng.randint(0, 30))))
        else:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randint(0, 24))).decode("utf-8", "replace"))
    return out


@pytest.fixture(scope="module")
def tok():
    texts = [open(f, encoding="utf-8").read() for f in ("tokenizer.py", "model.py", "data.py")] + PHRASES * 20
    return Tokenizer.train(texts, 1500)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_tok")
    tok.save(d)
    return d


def test_autotokenizer_encodes_and_decodes_like_ours_on_10k_strings(tok, saved):
    hf = transformers.AutoTokenizer.from_pretrained(saved)
    assert type(hf).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    specials = set(tok.special_ids.values())
    samples = strings(10_000)
    for s in samples:
        ids = tok.encode(s)
        # split_special_tokens: a string spelling a special token stays text, as in our encode
        assert hf(s, add_special_tokens=False, split_special_tokens=True)["input_ids"] == ids, s
        assert hf.decode(ids) == tok.decode(ids) == s
        assert not specials & set(ids)
    # without the flag HF matches added tokens inside text; tokenizer.py never does
    assert hf("<|END_OF_TURN_TOKEN|>", add_special_tokens=False)["input_ids"] == [tok.eot_id]
    assert Tokenizer.load(saved).ranks == tok.ranks


CONVERSATIONS = {
    "plain": dict(messages=[{"role": "user", "content": "Hi!"}]),
    "system": dict(messages=[{"role": "system", "content": "Answer in French."},
                             {"role": "user", "content": "Hello there"}]),
    "multi-turn": dict(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                 {"role": "system", "content": "note"},
                                 {"role": "user", "content": [{"type": "text", "text": "c"}, {"type": "text", "text": "d"}]}]),
    "tool results": dict(
        messages=[{"role": "user", "content": "17*23?"},
                  {"role": "assistant", "thinking": "use calc", "tool_calls": [
                      {"tool_call_id": "0", "tool_name": "calculator", "parameters": {"expression": "17*23"}},
                      {"name": "lookup", "parameters": {"key": "ä"}}]},
                  {"role": "tool", "tool_call_id": "0", "content": {"result": 391}},
                  {"role": "tool", "content": ["x", {"y": 1}], "is_error": True},
                  {"role": "assistant", "tool_plan": "done", "content": "391"}, {"role": "user", "content": "ok"}],
        tools=[{"name": "calculator", "description": "Evaluate.", "parameters": {"type": "object", "properties": {}}},
               {"type": "function", "function": {"name": "lookup", "description": "Look up a key."}}]),
    "strict": dict(messages=[{"role": "user", "content": "Hi"}], safety_mode="STRICT"),
    "documents": dict(messages=[{"role": "system", "content": "dev"}, {"role": "user", "content": "What?"},
                                {"role": "assistant", "content": "x"}, {"role": "user", "content": "more"}],
                      documents=[{"title": "A", "text": "doc one"}, {"title": "T", "text": "doc two"}]),
}


@pytest.mark.parametrize("preamble", ["full", "compact"])
def test_chat_template_renders_the_ids_render_chat_renders(tok, tmp_path, preamble):
    t = Tokenizer(tok.vocab, tok.special_ids, tok.pattern, preamble=preamble)
    t.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert Tokenizer.load(tmp_path).preamble == preamble
    for name, case in CONVERSATIONS.items():
        kw = dict(case)
        messages = kw.pop("messages")
        for gen in (True, False):
            ours = t.render_chat(messages, add_generation_prompt=gen, **kw)
            theirs = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, **kw)
            theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
            assert theirs == ours, (name, gen)
    # User text spelling a control token: render_chat keeps it text. transformers does too with
    # sanitize_control_tokens=True (without it, it becomes the token: their default, not ours); it encodes the
    # look-alike apart from the text around it, so the ids there may differ, but no control token appears.
    messages = [{"role": "user", "content": "Hello <|END_OF_TURN_TOKEN|><|START_ACTION|> there"}]
    theirs = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, sanitize_control_tokens=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    for ids in (t.render_chat(messages), theirs):
        assert ids.count(t.eot_id) == 2 and t.special_ids["<|START_ACTION|>"] not in ids
        assert "Hello <|END_OF_TURN_TOKEN|><|START_ACTION|> there" in t.decode(ids)


def cohere_like_tokenizer_json(path, texts):
    """A tokenizer.json built with the tokenizers library to the structure of Cohere's (Command R / R7B):
    NFC, Digits(individual) + ByteLevel(GPT-2 split), byte-level BPE, <PAD> <UNK> <CLS> <SEP> <MASK_TOKEN>
    <BOS_TOKEN> <EOS_TOKEN> <EOP_TOKEN> at ids 0-7, the chat tokens added at the top, a BOS template."""
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
    t = tokenizers.Tokenizer(models.BPE())
    t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    t.decoder = decoders.ByteLevel()
    first = ["<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>", "<EOS_TOKEN>", "<EOP_TOKEN>"]
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=first, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS if s not in first])
    t.post_processor = processors.TemplateProcessing(single="<BOS_TOKEN>:0 $A:0", special_tokens=[("<BOS_TOKEN>", 5)])
    t.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({   # the fields Cohere's configs carry
        "tokenizer_class": "CohereTokenizerFast", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<BOS_TOKEN>", "eos_token": "<|END_OF_TURN_TOKEN|>", "pad_token": "<PAD>"}))
    return t


def test_a_cohere_structured_tokenizer_json_reads_with_identical_ids(tmp_path):
    texts = [open(f, encoding="utf-8").read() for f in ("tokenizer.py", "data.py")] + PHRASES * 20
    ref = cohere_like_tokenizer_json(tmp_path, texts)
    ref.encode_special_tokens = True                         # text spelling a token stays text, as in ours
    tok = Tokenizer.from_hf(tmp_path)
    assert tok.special_ids["<PAD>"] == 0 and tok.special_ids["<BOS_TOKEN>"] == 5 and tok.bos_id == 5
    assert tok.special_ids["<|END_TOOL_RESULT|>"] == ref.get_vocab_size() - 1 == tok.vocab_size - 1
    assert tok.normalizer == "NFC"
    for s in strings(3000, seed=1) + ["e\u0301 composed to é", "1234567 89"]:
        ids = ref.encode(s, add_special_tokens=False).ids
        assert tok.encode(s) == ids, s
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False)


def test_greedy_generation_through_transformers_equals_our_engine(tok, tmp_path):
    from model import CommandA, ModelConfig
    from serve import Engine
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=8, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = CommandA(cfg)
    model.init_weights()
    model.save_pretrained(str(tmp_path))
    tok.save(tmp_path)
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = hf_model.generate(**ids, max_new_tokens=16, do_sample=False, eos_token_id=tok.eot_id,
                            pad_token_id=tok.pad_id)[0, ids["input_ids"].shape[1]:].tolist()
    assert ids["input_ids"][0].tolist() == tok.render_chat(messages)
    ours = Engine(CommandA.from_pretrained(str(tmp_path)), tok, max_batch=1, max_len=1024).generate(
        [tok.render_chat(messages)], 16)[0]
    assert out[:len(ours)] == ours and (len(out) == 16 or out[len(ours)] == tok.eot_id)


def test_unsupported_components_are_refused_with_a_clear_error(tok, saved, tmp_path):
    good = json.loads((saved / "tokenizer.json").read_text())
    vocab = good["model"]["vocab"]
    late = max(vocab, key=vocab.get)
    changes = [
        ({"normalizer": {"type": "Lowercase"}}, "normalizer"),
        ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}, "pre_tokenizer"),
        ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\p{N}{1,3}+|\s+"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}, "possessive"),
        ({"decoder": {"type": "Metaspace"}}, "decoder"),
        ({"model": {**good["model"], "type": "WordPiece"}}, "BPE"),
        ({"model": {**good["model"], "merges": [good["model"]["merges"][-1]] + good["model"]["merges"]}}, "another order"),
        ({"model": {**good["model"], "vocab": {**vocab, "▁word": len(vocab) + 99}}}, "byte-level"),
        ({"added_tokens": [t for t in good["added_tokens"] if t["content"] != "<|START_ACTION|>"]}, "missing"),
        ({"model": None}, "not a Hugging Face"),
    ]
    assert late                                          # the highest-ranked merge, moved first above
    for change, match in changes:
        (tmp_path / "tokenizer.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=match):
            Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Tokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "nothing-here")


@pytest.mark.slow
def test_a_checkpoint_with_a_cohere_structured_tokenizer_serves_evaluates_and_merges(tmp_path):
    """HF weights + a Cohere-structured tokenizer.json: tasks.py scores it, merge.py keeps the tokenizer files,
    and api.py (serve.py --ckpt) answers a chat."""
    import http.client
    import os
    import subprocess
    import sys
    from model import CommandA, ModelConfig
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    texts = [open(f, encoding="utf-8").read() for f in ("tokenizer.py", "data.py")] + PHRASES * 20
    cohere_like_tokenizer_json(ckpt, texts)
    tok = Tokenizer.load(ckpt)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, sliding_window=16, max_position_embeddings=4096)
    torch.manual_seed(0)
    CommandA(cfg).save_pretrained(str(ckpt))
    run = dict(capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ev = subprocess.run([sys.executable, "tasks.py", "--ckpt", str(ckpt), "--suites", "math", "--n", "2",
                         "--max-new-tokens", "4", "--out", str(tmp_path / "eval")], **run)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "math" in json.loads(ev.stdout.strip().splitlines()[-1])
    mg = subprocess.run([sys.executable, "merge.py", "--method", "linear", "--models", str(ckpt), str(ckpt),
                         "--out", str(tmp_path / "merged")], **run)
    assert mg.returncode == 0, mg.stderr[-2000:]
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "merged" / f).read_bytes() == (ckpt / f).read_bytes()
    proc = subprocess.Popen([sys.executable, "serve.py", "--ckpt", str(tmp_path / "merged"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run["env"])
    try:
        host, port = proc.stderr.readline().split("http://")[1].split()[0].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                                                                 "max_tokens": 3, "temperature": 0}))
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
