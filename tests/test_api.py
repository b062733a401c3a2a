"""api.py's OpenAI surface that evaluation harnesses rely on: `stop` strings (plain and streamed),
`/v1/completions` (text or token-id prompts, echo, log-probs equal to the model's own forward), chat
log-probs, and a 400 naming every field the server does not support."""
import os

import pytest
import torch

from api import ChatDecoder
from serve import Engine
from test_serve import HI, ROOT, make, micro, post, serve
from tokenizer import Tokenizer, parse_completion


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([open(os.path.join(ROOT, f), encoding="utf-8").read() for f in ("chat.py", "model.py")],
                           vocab_size=512)


@pytest.fixture(scope="module")
def chat_model(tok):
    return make(micro(vocab_size=tok.vocab_size, sliding_window=16, max_position_embeddings=2048))


@pytest.fixture(scope="module")
def server(chat_model, tok):
    s = serve(chat_model, tok)
    yield s
    s.shutdown()
    s.server_close()
    s.engine.stop()


def forward_logprobs(model, ids):
    """log p(ids[i] | ids[:i]) for i >= 1, from one plain forward of the model."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]))[0, :-1].float(), dim=-1)
    return lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def greedy(model, tok, ids, n):
    """What a greedy request without stops generates (the engine's tokens: stop token excluded)."""
    return Engine(model, tok, max_batch=1, max_len=2048).generate([ids], n)[0]


def test_stop_strings_cut_plain_and_streamed_responses_at_the_first_match(server, chat_model, tok):
    raw = tok.decode(greedy(chat_model, tok, tok.render_chat(HI), 24))
    stop = next(raw[i:i + 2] for i in range(4, len(raw) - 2) if "<" not in raw[i:i + 2] and raw[i:i + 2].strip())
    expected = parse_completion(raw[:raw.find(stop)])["response"]
    assert expected != parse_completion(raw)["response"]          # the stop string cuts the answer short
    body = {"messages": HI, "max_tokens": 24, "temperature": 0, "stop": [stop, "never-appears"]}
    status, r = post(server, "/v1/chat/completions", body)
    assert status == 200 and r["choices"][0]["message"]["content"] == expected
    assert r["choices"][0]["finish_reason"] == "stop"
    status, ev = post(server, "/v1/chat/completions", {**body, "stream": True})
    sent = "".join(c["choices"][0]["delta"].get("content", "") for _, c in ev[:-1] if c.get("choices"))
    assert status == 200 and sent == expected and stop not in sent
    status, r = post(server, "/v2/chat", {"messages": HI, "max_tokens": 24, "temperature": 0, "stop_sequences": [stop]})
    assert status == 200 and r["finish_reason"] == "STOP_SEQUENCE" and r["message"]["content"][0]["text"] == expected


def test_chat_decoder_never_sends_the_start_of_a_stop_string(tok):
    dec = ChatDecoder(tok, ["xyz"])
    sent = ""
    for t in tok.encode("abc xy") + tok.encode("z and more"):
        sent += dec.feed(t).get("response", "")
        assert "xy" not in sent or "xyz" not in sent
    assert dec.stopped and dec.text == "abc " and sent == "abc "


def test_completions_echo_logprobs_equal_the_models_forward(server, chat_model, tok):
    ids = tok.encode("def f(x):\n    return x + 1\n")
    status, r = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert status == 200
    lp = r["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), torch.tensor(forward_logprobs(chat_model, ids)),
                               atol=1e-4, rtol=0)
    assert r["choices"][0]["text"] == tok.decode(ids) and lp["text_offset"][0] == 0
    # generated tokens too: their log-probs are the model's on the prompt + what it wrote
    out = greedy(chat_model, tok, ids, 5)
    status, r = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 5, "echo": True, "logprobs": 2,
                                                 "temperature": 0})
    lp = r["choices"][0]["logprobs"]
    assert status == 200 and r["usage"]["completion_tokens"] == len(out) and len(lp["tokens"]) == len(ids + out)
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]),
                               torch.tensor(forward_logprobs(chat_model, ids + out)), atol=1e-4, rtol=0)
    assert all(len(d) == 2 for d in lp["top_logprobs"][1:]) and r["choices"][0]["text"] == tok.decode(ids + out)
    # a batch of prompts, text and ids, one choice each
    status, r = post(server, "/v1/completions", {"prompt": ["Hello", ids], "max_tokens": 2, "temperature": 0})
    assert status == 200 and [c["index"] for c in r["choices"]] == [0, 1] and r["choices"][0]["logprobs"] is None


def test_chat_logprobs_are_the_models_and_top_alternatives_are_ranked(server, chat_model, tok):
    status, r = post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 6, "temperature": 0,
                                                      "logprobs": True, "top_logprobs": 3})
    assert status == 200
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] or len(content) == r["usage"]["completion_tokens"] - 1
    for c in content:
        assert len(c["top_logprobs"]) == 3 and c["top_logprobs"][0]["logprob"] == c["logprob"]   # greedy = top 1
        assert [a["logprob"] for a in c["top_logprobs"]] == sorted((a["logprob"] for a in c["top_logprobs"]), reverse=True)


def test_every_unsupported_field_is_a_400_that_names_it(server):
    cases = [("/v1/chat/completions", {"messages": HI, "frequency_penalty": 0.5}, "frequency_penalty"),
             ("/v1/chat/completions", {"messages": HI, "tool_choice": "auto"}, "tool_choice"),
             ("/v1/chat/completions", {"messages": HI, "logprobs": True, "stream": True}, "stream"),
             ("/v1/chat/completions", {"messages": HI, "top_logprobs": 2}, "logprobs"),
             ("/v1/chat/completions", {"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
             ("/v2/chat", {"messages": HI, "citation_options": {}}, "citation_options"),
             ("/v2/chat", {"messages": HI, "logprobs": True}, "logprobs"),
             ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
             ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
             ("/v1/completions", {"prompt": "x", "stream": True}, "stream"),
             ("/v1/completions", {"prompt": [1, -3]}, "prompt"),
             ("/v1/completions", {"prompt": {"a": 1}}, "prompt")]
    for path, body, field in cases:
        status, r = post(server, path, body)
        msg = r["error"]["message"] if "error" in r else r["message"]
        assert status == 400 and field in msg, (path, body, msg)
    assert post(server, "/v1/completions", {"prompt": "ok", "max_tokens": 1})[0] == 200    # still serving
