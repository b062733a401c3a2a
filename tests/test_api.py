"""api.py's OpenAI surface that evaluation harnesses rely on: `stop` strings (plain and streamed),
`/v1/completions` (text or token-id prompts, echo, log-probs equal to the model's own forward), chat
log-probs, and a 400 naming every field the server does not support."""
import http.client
import json
import logging
import os
import re
import time

import pytest
import torch

from api import ChatDecoder, bind_warning
from serve import Engine
from test_serve import HI, ROOT, make, micro, post, serve, serving
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
    yield from serving(chat_model, tok)


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
    # OpenAI keys top_logprobs by token TEXT: two ids decoding to the same text (e.g. partial UTF-8) share a key
    assert all(1 <= len(d) <= 2 for d in lp["top_logprobs"][1:]) and r["choices"][0]["text"] == tok.decode(ids + out)
    assert sum(len(d) == 2 for d in lp["top_logprobs"][1:]) >= len(lp["top_logprobs"]) // 2
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


# ----------------------------------------------------------------------------------------------------------
# Deployment: body limits, nesting, the access log, /metrics, API keys


def get(server, path, headers=None):
    """-> (status, headers, body text)."""
    conn = http.client.HTTPConnection(*server.server_address, timeout=60)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, resp.headers, text


def counted(server, key=None) -> int:
    """Requests the server has counted so far: all, or those of one (route, status)."""
    with server.metrics.lock:
        return server.metrics.requests[key] if key else sum(server.metrics.requests.values())


def eventually(check, timeout=10.0):
    """The server logs and counts a request after its response is written, so a client can get there first."""
    t_end = time.monotonic() + timeout
    while not check() and time.monotonic() < t_end:
        time.sleep(0.01)
    return check()


@pytest.fixture(scope="module")
def keyed(chat_model, tok):
    yield from serving(chat_model, tok, api_key="s3cret-key")


def test_a_20mb_body_gets_a_readable_413_json_and_the_server_keeps_serving(server):
    body = b"x" * (20 << 20)
    for path, shape in (("/v1/chat/completions", "error"), ("/v2/chat", "message")):
        conn = http.client.HTTPConnection(*server.server_address, timeout=60)
        conn.request("POST", path, body, {"Content-Type": "application/json"})   # sends all 20 MB: no reset
        resp = conn.getresponse()
        r = json.loads(resp.read())
        conn.close()
        assert resp.status == 413 and shape in r and "limit" in json.dumps(r)
        assert resp.getheader("Connection") == "close"
    assert post(server, "/v2/chat", {"messages": HI, "max_tokens": 2})[0] == 200


def test_json_nested_50000_deep_is_a_400_not_a_500(server):
    deep = 50_000
    for raw in (b"[" * deep + b"]" * deep, b'{"messages": ' + b"[" * deep + b"]" * deep + b"}"):
        for path in ("/v2/chat", "/v1/chat/completions", "/v1/completions"):
            status, r = post(server, path, raw)
            msg = r["error"]["message"] if "error" in r else r["message"]
            assert status == 400 and "nest" in msg, (path, msg)
    assert post(server, "/v1/completions", {"prompt": "ok", "max_tokens": 1})[0] == 200


def test_access_log_is_one_line_per_request_with_status_tokens_and_ms(server, caplog):
    logged = lambda: sorted(rec.getMessage() for rec in caplog.records if rec.name == "api.access")
    with caplog.at_level(logging.INFO, logger="api.access"):
        status, r = post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 3, "temperature": 0})
        post(server, "/v2/chat", {"messages": "nope"})
        get(server, "/health")
        assert eventually(lambda: len(logged()) == 3), logged()
    health, chat, bad = logged()         # sorted: GET, POST /v1, POST /v2 (threads may log out of order)
    u = r["usage"]
    assert re.fullmatch(rf"127\.0\.0\.1 POST /v1/chat/completions 200 prompt_tokens={u['prompt_tokens']} "
                        rf"completion_tokens={u['completion_tokens']} \d+\.\dms", chat), chat
    assert " POST /v2/chat 400 " in bad and " GET /health 200 prompt_tokens=0 " in health
    caplog.clear()
    n = counted(server, ("/v2/chat", 400))
    post(server, "/v2/chat", {"messages": "nope"})     # off unless asked: nothing at the default level
    assert eventually(lambda: counted(server, ("/v2/chat", 400)) == n + 1)    # counted after the log
    assert not [rec for rec in caplog.records if rec.name == "api.access"]


SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*)\})? '
                    r'(\S+)')


def parse_prometheus(text: str) -> dict:
    """A strict reader of the text format: every sample's family has a # TYPE before it, names match their
    family's type (histograms: _bucket / _sum / _count), values are floats; histogram buckets rise with `le`,
    are cumulative and end with le="+Inf" equal to _count. -> {family: {"type", "help", "samples": [...]}}."""
    assert text.endswith("\n")
    fams, suffix = {}, {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    for line in text[:-1].split("\n"):
        if line.startswith("#"):
            kind, name, rest = re.fullmatch(r"# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.+)", line).groups()
            fam = fams.setdefault(name, {"samples": []})
            assert kind.lower() not in fam and not fam["samples"], f"{kind} of {name} twice or after samples"
            fam[kind.lower()] = rest
            assert kind == "HELP" or rest in suffix, line
            continue
        name, labels, value = SAMPLE.fullmatch(line).groups()
        float(value)                                   # "+Inf", "NaN" and floats all parse
        fam = next(f for f in fams if any(name == f + s for s in suffix[fams[f].get("type", "gauge")]))
        assert "type" in fams[fam], f"sample {name} before its # TYPE"
        fams[fam]["samples"].append((name, dict(re.findall(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"', labels or "")),
                                     float(value)))
    for name, fam in fams.items():
        assert "help" in fam and "type" in fam, name
        if fam["type"] == "histogram":
            les = [(float(lb["le"]), v) for n, lb, v in fam["samples"] if n == name + "_bucket"]
            assert les and les[-1][0] == float("inf") and [x for x, _ in les] == sorted({x for x, _ in les})
            assert all(a <= b for (_, a), (_, b) in zip(les, les[1:])), f"{name} buckets not cumulative"
            count = [v for n, _, v in fam["samples"] if n == name + "_count"]
            assert count == [les[-1][1]] and len([n for n, _, _ in fam["samples"] if n == name + "_sum"]) == 1
    return fams


def test_metrics_are_strict_prometheus_text_and_count_requests_tokens_and_latency(chat_model, tok):
    s = serve(chat_model, tok)                # its own server: the counts below start from zero
    try:
        status, r = post(s, "/v1/chat/completions", {"messages": HI, "max_tokens": 4, "temperature": 0})
        post(s, "/v2/chat", {"messages": HI, "max_tokens": 3, "temperature": 0, "stream": True})
        post(s, "/v2/chat", {"messages": "nope"})
        get(s, "/nowhere/" + "x" * 50)
        assert eventually(lambda: counted(s) == 4)
        status, headers, text = get(s, "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        fams = parse_prometheus(text)
        reqs = {(lb["path"], lb["status"]): v for _, lb, v in fams["command_a_requests_total"]["samples"]}
        assert reqs == {("/v1/chat/completions", "200"): 1, ("/v2/chat", "200"): 1, ("/v2/chat", "400"): 1,
                        ("other", "404"): 1}
        value = lambda name: fams[name]["samples"][0][2]
        assert value("command_a_completion_tokens_total") >= r["usage"]["completion_tokens"] + 1
        assert value("command_a_prompt_tokens_total") > r["usage"]["prompt_tokens"]
        ttft = {n: v for n, lb, v in fams["command_a_time_to_first_token_seconds"]["samples"] if "le" not in lb}
        assert ttft["command_a_time_to_first_token_seconds_count"] == 2
        assert ttft["command_a_time_to_first_token_seconds_sum"] > 0
        assert fams["command_a_decode_seconds_per_token"]["type"] == "histogram"
        assert value("command_a_queue_depth") == 0 and value("command_a_active_requests") == 0
        assert value("command_a_kv_cache_bytes") == s.engine.cache.nbytes() > 0
        assert value("command_a_prefix_cache_bytes") == s.engine.stats["prefix_bytes"]
        assert eventually(lambda: counted(s, ("/metrics", 200)) == 1)
        fams = parse_prometheus(get(s, "/metrics")[2])          # the first scrape counts too
        assert ("/metrics", "200") in {(lb["path"], lb["status"]) for _, lb, _ in
                                       fams["command_a_requests_total"]["samples"]}
    finally:
        s.shutdown()
        s.server_close()
        s.engine.stop()


def test_the_prometheus_reader_rejects_what_prometheus_would(server):
    good = '# HELP h x\n# TYPE h histogram\nh_bucket{le="1.0"} 2\nh_bucket{le="+Inf"} 3\nh_sum 4.5\nh_count 3\n'
    parse_prometheus(good)
    for bad in (good.replace('h_bucket{le="+Inf"} 3', 'h_bucket{le="+Inf"} 1'),     # not cumulative
                good.replace("h_count 3", "h_count 4"),                             # +Inf != count
                good.replace('h_bucket{le="+Inf"} 3\n', ""),                        # no +Inf bucket
                "# HELP g x\ng 1\n# TYPE g gauge\n",                                # sample before TYPE
                "# HELP g x\n# TYPE g gauge\ng{a=b} 1\n",                           # unquoted label
                "# HELP g x\n# TYPE g gauge\ng one\n"):                             # not a number
        with pytest.raises((AssertionError, AttributeError, ValueError, StopIteration)):
            parse_prometheus(bad)


def test_api_key_guards_every_route_but_health(keyed):
    auth = {"Authorization": "Bearer s3cret-key"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                    {"Authorization": "Basic s3cret-key"}):
        for path, shape in (("/v1/chat/completions", "error"), ("/v2/chat", "message"), ("/v1/completions", "error")):
            conn = http.client.HTTPConnection(*keyed.server_address, timeout=60)
            conn.request("POST", path, json.dumps({"messages": HI, "prompt": "x"}), headers)
            resp = conn.getresponse()
            r = json.loads(resp.read())
            conn.close()
            assert resp.status == 401 and shape in r and resp.getheader("WWW-Authenticate") == "Bearer", (path, r)
        for path in ("/v1/models", "/metrics"):
            assert get(keyed, path, headers)[0] == 401
    assert get(keyed, "/health")[0] == 200                               # load balancers probe without a key
    assert get(keyed, "/v1/models", auth)[0] == 200 and get(keyed, "/metrics", auth)[0] == 200
    assert post(keyed, "/v2/chat", {"messages": HI, "max_tokens": 2}, auth)[0] == 200
    status, r = post(keyed, "/v1/chat/completions", {"messages": HI, "max_tokens": 2}, auth)
    assert status == 200 and r["choices"][0]["message"]["role"] == "assistant"
    assert post(keyed, "/v1/completions", {"prompt": "ok", "max_tokens": 1}, auth)[0] == 200


def test_binding_beyond_loopback_without_a_key_warns():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert bind_warning(host, None) is None
    for host in ("0.0.0.0", "", "::", "192.168.1.7", "myhost.example"):
        assert "no authentication" in bind_warning(host, None) and "--api-key" in bind_warning(host, None)
        assert bind_warning(host, "k") is None


@pytest.mark.slow
def test_torchrun_tp2_server_answers_with_one_process_tokens_and_stops_cleanly(tmp_path, chat_model, tok):
    """torchrun --nproc_per_node 2 serve.py --tp 2 (CPU, gloo): rank 0 serves, rank 1 follows; greedy tokens
    and log-probs of a completion equal one process's, and Ctrl-C (SIGINT to the launcher) stops every rank."""
    import signal
    import subprocess
    import sys
    chat_model.save_pretrained(str(tmp_path))
    tok.save(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(ROOT, "serve.py"), "--tp", "2", "--ckpt", str(tmp_path), "--port", "0",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline, line = time.time() + 120, ""
        while "http://" not in line and time.time() < deadline:
            line = proc.stderr.readline()
        host, port = line.split("http://")[1].split()[0].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        prompt = tok.encode("def f(x):\n    return x * 2  # a prompt longer than the window of 16")
        conn.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                            "logprobs": 0, "echo": True}))
        r = json.loads(conn.getresponse().read())
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    ids = prompt + greedy(chat_model, tok, prompt, 6)
    assert r["choices"][0]["text"] == tok.decode(ids)
    torch.testing.assert_close(torch.tensor(r["choices"][0]["logprobs"]["token_logprobs"][1:]),
                               torch.tensor(forward_logprobs(chat_model, ids)), atol=1e-4, rtol=0)
    assert '"mode": "server"' in out                  # rank 0 released rank 1 and printed its summary
