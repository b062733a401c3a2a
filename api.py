"""
The HTTP front door of serve.py's engine (Command A, Cohere, arXiv 2504.00698: the model is served with
tools, documents/citations and safety modes): Cohere's v2 Chat API (`POST /v2/chat`) and OpenAI's chat
completions (`POST /v1/chat/completions`, `GET /v1/models`), streamed as server-sent events, and an
interactive terminal chat.

  - requests are validated at the boundary into tokenizer.py's message format (roles, tool calls,
    documents, safety modes, sampling ranges) and rejected with a 4xx JSON error that names the field;
    user text never becomes a special token (tokenizer.py renders it as plain text)
  - completions are parsed back by tokenizer.parse_completion into text, tool calls and citations;
    ChatDecoder streams deltas only once they can no longer change, through an incremental UTF-8 decoder
  - every stream ends (`message-end` / `data: [DONE]`), also when the engine fails or the client leaves,
    and a dropped client frees its batch slot
  - for deployment: `GET /health` (no key needed), `GET /metrics` (Prometheus text), one access-log line per
    request (logger `api.access`), `--api-key` (Bearer, every route but /health), a body limit answered
    with a 413 the client can read, and JSON nested past the parser's depth answered with a 400

References: Cohere v2 Chat API and OpenAI Chat Completions API references (shapes).

    python api.py --ckpt DIR --port 8000          # serves on 127.0.0.1 unless --host says otherwise
    python api.py --ckpt DIR --chat               # terminal chat
"""
from __future__ import annotations

import argparse
import bisect
import codecs
import collections
import hmac
import http.server
import ipaddress
import itertools
import json
import logging
import os
import queue
import re
import select
import signal
import socket
import sys
import threading
import time
import uuid

import torch

from model import tune_malloc
from serve import Engine, Request, load
from tokenizer import parse_completion

# ----------------------------------------------------------------------------------------------------------
# Chat: validating API requests into tokenizer.py's format, and turning tokens back into text / events


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _need(ok, msg, status=400):
    if not ok:
        raise BadRequest(msg, status)


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_tools(tools) -> list:
    """Cohere v2 / OpenAI tools: {"type": "function", "function": {"name", "description", "parameters"}}
    (a bare {"name", ...} is accepted too). parameters must be a JSON-Schema object."""
    _need(isinstance(tools, list), "'tools' must be a list")
    out = []
    for i, t in enumerate(tools):
        _need(isinstance(t, dict), f"tools[{i}] must be an object")
        if "function" in t or "type" in t:
            _need(t.get("type", "function") == "function", f"tools[{i}].type must be 'function'")
            t = t.get("function")
            _need(isinstance(t, dict), f"tools[{i}].function must be an object")
        name, params = t.get("name"), t.get("parameters", {"type": "object", "properties": {}})
        _need(isinstance(name, str) and TOOL_NAME.match(name), f"tools[{i}]: name must match {TOOL_NAME.pattern}")
        _need(isinstance(t.get("description", ""), str), f"tools[{i}].description must be a string")
        _need(isinstance(params, dict) and params.get("type", "object") == "object",
              f"tools[{i}].parameters must be a JSON-Schema object ({{\"type\": \"object\", ...}})")
        _need(isinstance(params.get("properties", {}), dict), f"tools[{i}].parameters.properties must be an object")
        _need(isinstance(params.get("required", []), list), f"tools[{i}].parameters.required must be a list")
        out.append({"name": name, "description": t.get("description", ""), "parameters": params})
    return out


def _check_documents(docs) -> tuple[list, list]:
    """Cohere v2 documents: strings or {"id": ..., "data": {...}}. Returns (what the model reads, ids)."""
    _need(isinstance(docs, list), "'documents' must be a list")
    out, ids = [], []
    for i, d in enumerate(docs):
        if isinstance(d, str):
            out.append({"text": d})
            ids.append(f"doc_{i}")
        else:
            _need(isinstance(d, dict), f"documents[{i}] must be a string or an object")
            data = d.get("data", {k: v for k, v in d.items() if k != "id"})
            _need(isinstance(data, dict) and data, f"documents[{i}].data must be a non-empty object")
            out.append(data)
            ids.append(str(d.get("id", f"doc_{i}")))
    return out, ids


def _check_messages(msgs) -> list:
    """API messages -> tokenizer.py messages. Tool calls arrive as {"id", "function": {"name", "arguments":
    JSON string}} in both APIs; tool results as {"role": "tool", "tool_call_id", "content"}."""
    _need(isinstance(msgs, list) and msgs, "'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        _need(isinstance(m, dict), f"messages[{i}] must be an object")
        role = m.get("role")
        _need(role in ("system", "user", "assistant", "tool", "developer"),
              f"messages[{i}]: unknown role {role!r}; use system, user, assistant or tool")
        role = "system" if role == "developer" else role
        content = m.get("content")
        if isinstance(content, list):  # content blocks: text (both APIs) or document (Cohere tool results)
            parts = []
            for b in content:
                ok = isinstance(b, dict) and ((b.get("type") == "text" and isinstance(b.get("text"), str)) or
                                              (b.get("type") == "document" and isinstance(b.get("document"), dict)))
                _need(ok, f"messages[{i}].content blocks must be {{'type': 'text', 'text': str}} or "
                          f"{{'type': 'document', 'document': {{...}}}}")
                parts.append(b["text"] if b["type"] == "text" else b["document"].get("data", b["document"]))
            content = parts if role == "tool" else "".join(str(p) for p in parts)
        _need(content is None or isinstance(content, (str, list)) or (role == "tool" and isinstance(content, dict)),
              f"messages[{i}].content must be a string or a list of content blocks")
        msg = {"role": role, "content": content}
        if role in ("user", "system"):
            _need(isinstance(content, str), f"messages[{i}].content must be a string")
        if role == "assistant":
            calls = []
            for j, c in enumerate(m.get("tool_calls") or []):
                fn = c.get("function") if isinstance(c, dict) else None
                _need(isinstance(fn, dict) and isinstance(fn.get("name"), str),
                      f"messages[{i}].tool_calls[{j}] needs function.name")
                try:
                    args = fn.get("arguments") or "{}"
                    args = args if isinstance(args, dict) else json.loads(args)
                except (TypeError, ValueError):
                    raise BadRequest(f"messages[{i}].tool_calls[{j}].function.arguments is not a JSON string")
                _need(isinstance(args, dict), f"messages[{i}].tool_calls[{j}] arguments must be a JSON object")
                calls.append({"tool_call_id": str(c.get("id", j)), "tool_name": fn["name"], "parameters": args})
            if calls:
                msg["tool_calls"] = calls
            if isinstance(m.get("tool_plan"), str):
                msg["thinking"] = m["tool_plan"]
        if role == "tool":
            msg["tool_call_id"] = str(m.get("tool_call_id", ""))
        out.append(msg)
    return out


def check_sampling(body: dict, engine: Engine, n_prompt: int, default_max: int) -> dict:
    """max_tokens / temperature / top_k (k in Cohere) / top_p (p) / seed, each type- and range-checked."""
    mt = body.get("max_tokens", body.get("max_completion_tokens"))
    room = engine.max_len - n_prompt
    _need(room >= 1, f"the prompt has {n_prompt} tokens; the context holds {engine.max_len}")
    if mt is None:
        mt = min(default_max, room)
    _need(_is_int(mt) and mt >= 1, "max_tokens must be a positive integer")
    _need(mt <= room, f"max_tokens={mt} does not fit: prompt {n_prompt} + max_tokens > context {engine.max_len}")
    t = body.get("temperature", 0.3)
    _need(_is_num(t) and 0 <= t <= 5, "temperature must be a number in [0, 5]")
    k, p = body.get("k", body.get("top_k")), body.get("p", body.get("top_p"))
    _need(k is None or (_is_int(k) and 0 <= k <= engine.cfg.vocab_size), "k/top_k must be an integer >= 0")
    _need(p is None or (_is_num(p) and 0 < p <= 1), "p/top_p must be a number in (0, 1]")
    seed = body.get("seed")
    _need(seed is None or (_is_int(seed) and 0 <= seed < 2**63), "seed must be a non-negative integer")
    return {"max_new_tokens": mt, "temperature": float(t), "top_k": k or None, "top_p": p, "seed": seed}


# The fields each endpoint reads. Any other is a 400 that names it: nothing a client sends is silently ignored.
SAMPLING = {"max_tokens", "temperature", "seed", "model", "stream"}
FIELDS = {
    "cohere": SAMPLING | {"messages", "tools", "documents", "safety_mode", "k", "p", "stop_sequences"},
    "openai": SAMPLING | {"messages", "tools", "documents", "safety_mode", "top_k", "top_p", "stop", "n",
                          "stream_options", "max_completion_tokens", "logprobs", "top_logprobs", "user"},
    "completions": SAMPLING | {"prompt", "top_k", "top_p", "stop", "n", "logprobs", "echo", "user"},
}


def check_fields(body: dict, api: str, where: str):
    extra = sorted(set(body) - FIELDS[api])
    _need(not extra, f"{where} does not support the field(s) {', '.join(map(repr, extra))}")


def check_stop(value, name: str) -> list:
    """OpenAI's `stop` / Cohere's `stop_sequences`: up to 4 non-empty strings, matched in the decoded text."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    _need(isinstance(stops, list) and len(stops) <= 4 and all(isinstance(x, str) and x for x in stops),
          f"{name} must be a non-empty string or a list of at most 4 non-empty strings")
    return stops


def check_logprobs(body: dict) -> int | None:
    """Chat: `logprobs: true` and `top_logprobs` (0-20) -> how many alternatives per token, or None (off)."""
    on, top = body.get("logprobs", False), body.get("top_logprobs")
    _need(isinstance(on, bool), "logprobs must be a boolean")
    _need(top is None or (_is_int(top) and 0 <= top <= 20), "top_logprobs must be an integer in [0, 20]")
    _need(top is None or on, "top_logprobs needs logprobs: true")
    _need(not (on and body.get("stream")), "logprobs with stream is not supported; ask without stream")
    return (top or 0) if on else None


def token_text(tok, t: int) -> str:
    return tok.decode([t])


class ChatDecoder:
    """Tokens -> the chat message so far: an incremental UTF-8 decoder (never half a character), then
    tokenizer.parse_completion on the text so far. Deltas are emitted only for text that can no longer change
    (a trailing '<' may still become a citation tag, so it waits)."""

    def __init__(self, tokenizer, stops=()):
        self.tok, self.utf8 = tokenizer, codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent = "", {"response": "", "thinking": ""}
        self.stops, self.stopped = list(stops), False    # stop strings; True once one appeared (text cut there)

    def feed(self, token: int | None) -> dict:
        """Returns {"response": new text, "thinking": new text}; token None flushes at the end."""
        if self.stopped:
            return {}
        if token is None:
            self.text += self.utf8.decode(b"", final=True)
        else:
            self.text += self.utf8.decode(self.tok.decode_bytes([token]))
        text = self.text
        at = [i for i in (text.find(x) for x in self.stops) if i >= 0]
        if at:                                  # a stop string: nothing from its first character on is sent
            self.text = text = text[:min(at)]
            self.stopped, token = True, None
        elif token is not None and self.stops:  # the tail may be the start of a stop string: hold it back
            text = text[:max(0, len(text) - max(map(len, self.stops)) + 1)]
        cut = text.rfind("<")
        if token is not None and cut >= 0 and ">" not in text[cut:] and len(text) - cut < 64:
            text = text[:cut]                   # maybe the start of <co> / </co: ...>: hold it back
        parsed, deltas = parse_completion(text), {}
        for key in ("response", "thinking"):
            now = parsed[key] or ""
            if now.startswith(self.sent[key]) and len(now) > len(self.sent[key]):
                deltas[key] = now[len(self.sent[key]):]
                self.sent[key] = now
        return deltas

    def result(self) -> dict:
        return parse_completion(self.text)


def cohere_message(parsed: dict, doc_ids: list, has_docs: bool) -> tuple[dict, str | None]:
    """parse_completion() output -> Cohere v2 assistant message (tool calls with JSON-string arguments,
    citations whose sources name the documents) and the finish reason it implies."""
    msg = {"role": "assistant"}
    if parsed["thinking"]:
        msg["tool_plan"] = parsed["thinking"]
    calls = [{"id": str(c.get("tool_call_id", i)), "type": "function",
              "function": {"name": str(c.get("tool_name", "")), "arguments": json.dumps(c.get("parameters", {}))}}
             for i, c in enumerate(parsed["tool_calls"])]
    if calls:
        msg["tool_calls"] = calls
    msg["content"] = [{"type": "text", "text": parsed["response"]}] if parsed["response"] or not calls else []
    cites = []
    for c in parsed["citations"]:
        sources = []
        for cid, k in c["sources"]:
            if has_docs and cid == "0" and 0 <= k < len(doc_ids):   # tool call 0 injected the documents
                sources.append({"type": "document", "id": doc_ids[k]})
            else:
                sources.append({"type": "tool", "id": f"{cid}:{k}"})
        cites.append({"start": c["start"], "end": c["end"], "text": c["text"], "sources": sources})
    if cites:
        msg["citations"] = cites
    return msg, ("TOOL_CALL" if calls else None)


# ----------------------------------------------------------------------------------------------------------
# Operations: Prometheus metrics, the access log, who may bind where


ACCESS = logging.getLogger("api.access")    # one line per request, at INFO; the CLI sends it to stderr
ROUTES = {"/v2/chat", "/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)          # seconds
DECODE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)           # seconds per token


class Histogram:
    """Prometheus histogram: counts per bucket (upper bounds `le`), exposed cumulatively, with sum and count."""

    def __init__(self, buckets):
        self.le, self.counts, self.sum = [float(b) for b in buckets], [0] * (len(buckets) + 1), 0.0

    def observe(self, x: float):
        self.counts[bisect.bisect_left(self.le, x)] += 1       # first bucket with x <= le; the last one is +Inf
        self.sum += x

    def lines(self, name: str) -> list:
        les, acc = [repr(b) for b in self.le] + ["+Inf"], list(itertools.accumulate(self.counts))
        return ([f'{name}_bucket{{le="{le}"}} {n}' for le, n in zip(les, acc)] +
                [f"{name}_sum {self.sum!r}", f"{name}_count {acc[-1]}"])


class Metrics:
    """What GET /metrics exposes, in Prometheus' text format 0.0.4. Handler threads update the counters and
    histograms under one lock once a response is written; the gauges are read off the engine at scrape time.
    Decode latency is per request: (response written - first token) / (tokens - 1), for requests of 2 or
    more tokens, so one observation per request whatever its length."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = collections.Counter()             # (route, status) -> count; unknown paths are "other"
        self.prompt_tokens = self.completion_tokens = 0
        self.ttft, self.decode = Histogram(TTFT_BUCKETS), Histogram(DECODE_BUCKETS)

    def record(self, path: str, status: int, n_prompt: int, n_out: int, reqs: list, t_end: float):
        with self.lock:
            self.requests[(path if path in ROUTES else "other", status)] += 1
            self.prompt_tokens += n_prompt
            self.completion_tokens += n_out
            for r in reqs:
                if r.t_first is not None:
                    self.ttft.observe(r.t_first - r.t_submit)
                    if len(r.out) >= 2:
                        self.decode.observe((t_end - r.t_first) / (len(r.out) - 1))

    def render(self, engine: Engine) -> str:
        out = []

        def family(name, kind, text, v):            # v: one value, a Histogram, or the sample lines
            name = "command_a_" + name
            lines = v.lines(name) if isinstance(v, Histogram) else v if isinstance(v, list) else [f"{name} {v}"]
            out.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"] + lines)

        with self.lock:
            family("requests_total", "counter", "HTTP requests by route and status.",
                   [f'command_a_requests_total{{path="{p}",status="{c}"}} {n}'
                    for (p, c), n in sorted(self.requests.items())])
            family("prompt_tokens_total", "counter", "Prompt tokens of handled requests.", self.prompt_tokens)
            family("completion_tokens_total", "counter", "Generated tokens of handled requests.",
                   self.completion_tokens)
            family("time_to_first_token_seconds", "histogram", "Submit to first token, per request.", self.ttft)
            family("decode_seconds_per_token", "histogram", "Per request: (end - first token) / (tokens - 1).",
                   self.decode)
        family("queue_depth", "gauge", "Requests waiting for a batch slot.", len(engine.waiting))
        family("active_requests", "gauge", "Requests in the batch (prefilling or decoding).", len(engine.active))
        family("kv_cache_bytes", "gauge", "Bytes allocated for the KV cache, all slots.", engine.cache.nbytes())
        family("prefix_cache_bytes", "gauge", "Bytes of cached prompt prefixes.", engine.stats["prefix_bytes"])
        return "\n".join(out) + "\n"


def bind_warning(host: str, api_key: str | None) -> str | None:
    """A server reachable from other machines with no key serves anyone who finds it: say so."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:          # a host name or "" (every interface)
        loopback = False
    return None if loopback or api_key else (
        f"warning: serving on {host or 'every interface'} with no authentication: anyone who can reach it can use "
        f"the model. Pass --api-key KEY (or set COMMAND_A_API_KEY) to require a Bearer key.")


# ----------------------------------------------------------------------------------------------------------
# The HTTP server: Cohere v2 /v2/chat, OpenAI /v1/chat/completions + /v1/models, SSE streaming


FINISH_OPENAI = {"COMPLETE": "stop", "STOP_SEQUENCE": "stop", "MAX_TOKENS": "length", "TOOL_CALL": "tool_calls",
                 "ERROR": "stop"}


class ChatServer(http.server.ThreadingHTTPServer):
    """One thread per connection; all of them feed the one engine thread, which batches their requests."""
    daemon_threads = True

    def __init__(self, engine: Engine, tokenizer, host="127.0.0.1", port=0, model_name="command-a-local",
                 max_body=1 << 20, default_max_tokens=512, verbose=False, api_key=None):
        super().__init__((host, port), ChatHandler)
        self.engine, self.tok, self.model_name = engine.start(), tokenizer, model_name
        self.max_body, self.default_max_tokens, self.verbose = max_body, default_max_tokens, verbose
        self.api_key, self.metrics = api_key or None, Metrics()

    @property
    def url(self):
        return f"http://{self.server_address[0]}:{self.server_address[1]}"


class ChatHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ChatServer

    def log_message(self, fmt, *args):       # http.server's own lines; the access log is _record's
        if self.server.verbose:
            super().log_message(fmt, *args)

    # --- one request: timing, status, the body we did not read, then the access log and metrics ---------------
    def handle_one_request(self):
        self._t0, self._status, self._usage, self._reqs, self._unread = None, None, (0, 0), [], 0
        self.command, self.path = None, ""
        try:
            super().handle_one_request()
        finally:
            if self._t0 is not None:
                self._record()
            if self._unread:
                self.close_connection = True
                self._linger()

    def parse_request(self):
        self._t0 = time.perf_counter()        # the request line is in: the clock starts (not while idle)
        return super().parse_request()

    def send_response(self, code, message=None):
        self._status = code
        super().send_response(code, message)

    def _record(self):
        now, path = time.perf_counter(), self.path.split("?")[0]
        status = self._status or 499          # no response: the client left first (nginx's "client closed")
        n_in, n_out = self._usage
        if ACCESS.isEnabledFor(logging.INFO):
            shown = re.sub(r"[^\x21-\x7e]", "?", path[:200])   # no control characters into the log
            ACCESS.info("%s %s %s %d prompt_tokens=%d completion_tokens=%d %.1fms", self.client_address[0],
                        self.command or "-", shown, status, n_in, n_out, (now - self._t0) * 1e3)
        self.server.metrics.record(path, status, n_in, n_out, self._reqs, now)

    def _linger(self):
        """Read and drop the body we answered without reading (413, 401, 404). Closing a socket that holds
        unread bytes sends a TCP reset, and a client still sending would see the reset, not our answer.
        Bounded: 64x the body limit, 5 s without a byte, 30 s in all; past that the client may see a reset."""
        n, deadline = min(self._unread, 64 * self.server.max_body), time.monotonic() + 30
        try:
            self.connection.settimeout(5)
            while n > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(n, 1 << 16))
                if not chunk:
                    break
                n -= len(chunk)
        except OSError:
            pass

    # --- plumbing ------------------------------------------------------------------------------------------
    def _send(self, status: int, data: bytes, ctype: str, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, obj: dict, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _error(self, status: int, msg: str, api: str, headers: dict | None = None):
        if api == "openai":
            self._json(status, {"error": {"message": msg, "type": "invalid_request_error", "code": status}}, headers)
        else:
            self._json(status, {"message": msg}, headers)

    def _authorized(self, path: str, api: str) -> bool:
        """With an API key, every route but /health needs `Authorization: Bearer KEY`; otherwise a 401 is sent.
        compare_digest takes the same time however much of a guess is right."""
        key = self.server.api_key
        if key is None or path == "/health":
            return True
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1", "replace"),
                                                              key.encode()):
            return True
        self.close_connection |= self._unread > 0      # the body stays unread: _linger drops it
        self._error(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", api,
                    {"WWW-Authenticate": "Bearer"})
        return False

    def _body(self) -> dict:
        n = self.headers.get("Content-Length")
        if n is None:
            self.close_connection = True
            raise BadRequest("a Content-Length header is required", 411)
        self.close_connection |= not n.isdigit()   # a body of unknown length: so is where the next request starts
        _need(n.isdigit(), "bad Content-Length")
        if int(n) > self.server.max_body:
            self.close_connection = True      # answered unread: _linger drops it, then the connection closes
            raise BadRequest(f"body of {n} bytes exceeds the limit of {self.server.max_body}", 413)
        raw, self._unread = self.rfile.read(int(n)), 0
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"malformed JSON: {e}")
        _need(isinstance(body, dict), "the body must be a JSON object")
        return body

    def _client_gone(self) -> bool:
        """A readable socket that returns no bytes is a closed one (the client went away)."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            return bool(r) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _sse(self, obj, event: str | None = None):
        data = obj if isinstance(obj, str) else json.dumps(obj)
        self.wfile.write(((f"event: {event}\n" if event else "") + f"data: {data}\n\n").encode())
        self.wfile.flush()

    # --- routes ----------------------------------------------------------------------------------------------
    def do_GET(self):
        path, srv = self.path.split("?")[0], self.server
        api = "openai" if path.startswith("/v1") else "cohere"
        if not self._authorized(path, api):
            return
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": srv.model_name, "object": "model",
                                                         "created": 0, "owned_by": "local"}]})
        elif path == "/health":
            self._json(200, {"status": "ok", **srv.engine.stats})
        elif path == "/metrics":
            self._send(200, srv.metrics.render(srv.engine).encode(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._error(404, f"no route GET {path}", api)

    def do_POST(self):
        path = self.path.split("?")[0]
        api = "openai" if path.startswith("/v1") else "cohere"
        n = self.headers.get("Content-Length", "")
        self._unread = int(n) if n.isdigit() else 0     # until _body reads it; unread bytes are _linger's
        if not self._authorized(path, api):
            return
        try:
            if path not in ("/v2/chat", "/v1/chat/completions", "/v1/completions"):
                self.close_connection = True
                raise BadRequest(f"no route POST {path}", 404)
            if path == "/v1/completions":
                self._completions(self._body())
            else:
                self._chat(self._body(), api)
        except BadRequest as e:
            self._error(e.status, str(e), api)
        except RecursionError:    # JSON nested past the interpreter's stack (json.loads recurses per level)
            self._error(400, "the JSON nests too deeply", api)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug must cost one request a 500, not the connection thread a traceback
            self.close_connection = True
            try:
                self._error(500, f"internal error: {e!r}", api)
            except OSError:
                pass

    def _chat(self, body: dict, api: str):
        srv, tok = self.server, self.server.tok
        check_fields(body, api, "/v2/chat" if api == "cohere" else "/v1/chat/completions")
        messages = _check_messages(body.get("messages"))
        tools = _check_tools(body["tools"]) if body.get("tools") is not None else None
        docs, doc_ids = _check_documents(body["documents"]) if body.get("documents") is not None else ([], [])
        mode = body.get("safety_mode") or "CONTEXTUAL"
        _need(isinstance(mode, str) and mode.upper() in ("CONTEXTUAL", "STRICT"),
              "safety_mode must be CONTEXTUAL or STRICT")
        stream = body.get("stream", False)
        _need(isinstance(stream, bool), "stream must be a boolean")
        _need(body.get("n", 1) == 1, "n must be 1")
        stops = check_stop(body.get("stop"), "stop") if api == "openai" else \
            check_stop(body.get("stop_sequences"), "stop_sequences")
        logprobs = check_logprobs(body) if api == "openai" else None
        try:
            ids = tok.render_chat(messages, documents=docs or None, tools=tools, safety_mode=mode.upper())
        except ValueError as e:
            raise BadRequest(str(e))
        sampling = check_sampling(body, srv.engine, len(ids), srv.default_max_tokens)
        sink = queue.Queue()
        req = srv.engine.submit(ids, sink=sink, logprobs=logprobs, **sampling)
        self._usage, self._reqs = (len(ids), 0), [req]         # what the access log and metrics count
        rid = ("chatcmpl-" if api == "openai" else "") + uuid.uuid4().hex
        meta = {"id": rid, "n_prompt": len(ids), "doc_ids": doc_ids, "has_docs": bool(docs), "stops": stops,
                "include_usage": bool((body.get("stream_options") or {}).get("include_usage"))}
        try:
            if stream:
                self._stream(req, sink, api, meta)
            else:
                while not req.done.wait(0.05):
                    if self._client_gone():
                        srv.engine.cancel(req)
                        self.close_connection = True
                        return
                self._respond(req, api, meta)
        except (BrokenPipeError, ConnectionResetError, OSError):
            srv.engine.cancel(req)                 # the client went away: free its batch slot
            self.close_connection = True

    # --- /v1/completions: raw text in, text out, with the log-probs evaluation harnesses read ---------------
    def _prompts(self, prompt) -> list:
        """A string, a list of token ids, or a list of either: each one prompt. Text is encoded as plain text
        (a string spelling a control token stays text); ids are checked against the vocabulary."""
        tok, V = self.server.tok, self.server.engine.cfg.vocab_size
        is_ids = lambda p: isinstance(p, list) and p and all(_is_int(t) for t in p)
        many = isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt)
        prompts = prompt if many and not is_ids(prompt) else [prompt]
        out = []
        for p in prompts:
            _need(isinstance(p, str) or is_ids(p), "prompt must be a string, a list of token ids, or a list of these")
            ids = tok.encode(p) if isinstance(p, str) else p
            _need(ids and all(0 <= t < V for t in ids), f"prompt tokens must be in [0, {V}) and not empty")
            out.append(ids)
        _need(len(out) <= 64, "at most 64 prompts per request")
        return out

    def _completions(self, body: dict):
        srv = self.server
        check_fields(body, "completions", "/v1/completions")
        _need(body.get("n", 1) == 1, "n must be 1")
        _need(not body.get("stream", False), "stream is not supported on /v1/completions")
        echo, lp = body.get("echo", False), body.get("logprobs")
        _need(isinstance(echo, bool), "echo must be a boolean")
        _need(lp is None or (_is_int(lp) and 0 <= lp <= 20), "logprobs must be an integer in [0, 20]")
        stops, prompts = check_stop(body.get("stop"), "stop"), self._prompts(body.get("prompt"))
        mt = body.get("max_tokens", 16)
        _need(_is_int(mt) and (mt >= 1 or (mt == 0 and echo)), "max_tokens must be >= 1 (0 only with echo)")
        reqs = []
        for ids in prompts:
            if mt == 0:
                reqs.append(None)
                continue
            sampling = check_sampling({"temperature": 1.0, **body, "max_tokens": mt}, srv.engine, len(ids),
                                      srv.default_max_tokens)     # OpenAI's default temperature here: 1
            reqs.append(srv.engine.submit(ids, logprobs=lp, **sampling))
        self._reqs = [r for r in reqs if r is not None]
        choices, n_in, n_out = [], 0, 0
        for i, (ids, req) in enumerate(zip(prompts, reqs)):
            if req is not None:
                while not req.done.wait(0.05):
                    if self._client_gone():
                        for r in (r for r in reqs[i:] if r is not None):
                            srv.engine.cancel(r)
                        raise BrokenPipeError
                if req.finish_reason == "error":
                    raise BadRequest(f"generation failed: {req.error}", 500)
            choices.append(self._completion_choice(i, ids, req, echo, lp, stops))
            n_in, n_out = n_in + len(ids), n_out + (len(req.out) if req else 0)
        self._usage = (n_in, n_out)
        self._json(200, {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
                         "model": srv.model_name, "choices": choices,
                         "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}})

    def _completion_choice(self, i: int, ids: list, req, echo: bool, lp, stops: list) -> dict:
        """One choice: the text (the prompt's too with echo), cut at the first stop string, and in OpenAI's
        legacy log-prob layout the tokens, their log-probs, the top alternatives and their text offsets."""
        tok = self.server.tok
        toks, lps = list(ids) if echo else [], []
        if echo and lp is not None:
            lps = self.server.engine.prompt_logprobs(ids, lp)
        out = req.out if req else []
        text_of = lambda ts: tok.decode(ts)
        gen = text_of(out)
        at = [j for j in (gen.find(x) for x in stops) if j >= 0]
        reason = "stop" if at or (req and req.finish_reason == "stop") else "length"
        if at:                                    # keep the tokens that end before the stop string
            gen = gen[:min(at)]
            out = [t for k, t in enumerate(out) if len(text_of(out[:k + 1])) <= len(gen)]
        toks += out
        lps += (req.token_logprobs[:len(out)] if req and lp is not None else [])
        choice = {"index": i, "text": (text_of(ids) if echo else "") + gen, "finish_reason": reason}
        if lp is not None:
            offsets, pos = [], 0
            for t in toks:
                offsets.append(pos)
                pos += len(text_of([t]))
            choice["logprobs"] = {
                "tokens": [token_text(tok, t) for t in toks], "token_logprobs": [v for v, _ in lps],
                "top_logprobs": [None if v is None else {token_text(tok, a): b for a, b in alts} for v, alts in lps],
                "text_offset": offsets}
        else:
            choice["logprobs"] = None
        return choice

    def _finish(self, req: Request, dec: "ChatDecoder", meta: dict):
        msg, reason = cohere_message(dec.result(), meta["doc_ids"], meta["has_docs"])
        if req.finish_reason == "error":
            reason = "ERROR"
        elif dec.stopped:
            reason = reason or "STOP_SEQUENCE"
        reason = reason or ("MAX_TOKENS" if req.finish_reason == "length" else "COMPLETE")
        n_out = len(req.out) + (req.finish_reason == "stop")     # the stop token was generated too
        self._usage = (meta["n_prompt"], n_out)
        return msg, reason, n_out

    def _respond(self, req: Request, api: str, meta: dict):
        dec = ChatDecoder(self.server.tok, meta["stops"])
        kept = 0                                  # output tokens before a stop string (their log-probs count)
        for t in req.out:
            if dec.stopped:
                break
            dec.feed(t)
            kept += 1
        dec.feed(None)
        msg, reason, n_out = self._finish(req, dec, meta)
        if req.finish_reason == "error":
            raise BadRequest(f"generation failed: {req.error}", 500)
        if api == "cohere":
            usage = {"input_tokens": meta["n_prompt"], "output_tokens": n_out}
            self._json(200, {"id": meta["id"], "finish_reason": reason, "message": msg,
                             "usage": {"billed_units": usage, "tokens": usage}})
            return
        text = "".join(c["text"] for c in msg.get("content", []))
        omsg = {"role": "assistant", "content": text if text or "tool_calls" not in msg else None}
        if "tool_calls" in msg:
            omsg["tool_calls"] = msg["tool_calls"]
        if "citations" in msg:
            omsg["citations"] = msg["citations"]     # an extension: OpenAI's schema has no citations
        choice = {"index": 0, "message": omsg, "finish_reason": FINISH_OPENAI[reason]}
        if req.logprobs is not None:
            choice["logprobs"] = {"content": [self._logprob_entry(t, lp, alts) for t, (lp, alts)
                                              in zip(req.out[:kept], req.token_logprobs)]}
        self._json(200, {"id": meta["id"], "object": "chat.completion", "created": int(time.time()),
                         "model": self.server.model_name, "choices": [choice],
                         "usage": {"prompt_tokens": meta["n_prompt"], "completion_tokens": n_out,
                                   "total_tokens": meta["n_prompt"] + n_out}})

    def _logprob_entry(self, t: int, lp: float, alts: list) -> dict:
        """OpenAI's per-token log-prob object (every generated token, control tokens included)."""
        tok = self.server.tok
        one = lambda i, v: {"token": token_text(tok, i), "logprob": v, "bytes": list(tok.decode_bytes([i]))}
        return {**one(t, lp), "top_logprobs": [one(i, v) for i, v in alts]}

    def _stream(self, req: Request, sink: queue.Queue, api: str, meta: dict):
        self.close_connection = True          # no Content-Length: the end of the stream is the end of the body
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        oa = {"id": meta["id"], "object": "chat.completion.chunk", "created": int(time.time()),
              "model": self.server.model_name}

        def chunk(delta, finish=None):
            self._sse({**oa, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        if api == "cohere":
            self._sse({"type": "message-start", "id": meta["id"], "delta": {"message": {"role": "assistant"}}},
                      "message-start")
        else:
            chunk({"role": "assistant", "content": ""})
        dec, started = ChatDecoder(self.server.tok, meta["stops"]), False
        while True:
            try:
                _, t = sink.get(timeout=1.0)
            except queue.Empty:           # nothing for a second: is anyone still listening?
                if self._client_gone():
                    raise BrokenPipeError
                continue
            deltas = dec.feed(t)
            if api == "cohere":
                if "thinking" in deltas:
                    self._sse({"type": "tool-plan-delta", "delta": {"message": {"tool_plan": deltas["thinking"]}}},
                              "tool-plan-delta")
                if "response" in deltas:
                    if not started:
                        self._sse({"type": "content-start", "index": 0, "delta": {"message": {"content": {
                            "type": "text", "text": ""}}}}, "content-start")
                        started = True
                    self._sse({"type": "content-delta", "index": 0, "delta": {"message": {"content": {
                        "text": deltas["response"]}}}}, "content-delta")
            elif "response" in deltas:
                chunk({"content": deltas["response"]})
            if t is None:
                break
            if dec.stopped:                       # a stop string: free the slot; nothing past it is sent
                self.server.engine.cancel(req)
                req.done.wait(5)
                break
        msg, reason, n_out = self._finish(req, dec, meta)
        usage = {"input_tokens": meta["n_prompt"], "output_tokens": n_out}
        calls = msg.get("tool_calls", [])
        if api == "cohere":
            if started:
                self._sse({"type": "content-end", "index": 0}, "content-end")
            for i, c in enumerate(calls):
                self._sse({"type": "tool-call-start", "index": i, "delta": {"message": {"tool_calls": c}}},
                          "tool-call-start")
                self._sse({"type": "tool-call-end", "index": i}, "tool-call-end")
            for i, c in enumerate(msg.get("citations", [])):
                self._sse({"type": "citation-start", "index": i, "delta": {"message": {"citations": c}}},
                          "citation-start")
                self._sse({"type": "citation-end", "index": i}, "citation-end")
            end = {"finish_reason": reason, "usage": {"billed_units": usage, "tokens": usage}}
            if req.error:
                end["error"] = req.error
            self._sse({"type": "message-end", "delta": end}, "message-end")
            return
        if calls:
            chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
        if req.error:
            self._sse({"error": {"message": f"generation failed: {req.error}", "type": "server_error"}})
        chunk({}, FINISH_OPENAI[reason])
        if meta["include_usage"]:
            self._sse({**oa, "choices": [], "usage": {"prompt_tokens": meta["n_prompt"], "completion_tokens": n_out,
                                                     "total_tokens": meta["n_prompt"] + n_out}})
        self._sse("[DONE]")


# ----------------------------------------------------------------------------------------------------------
# Interactive terminal chat


def chat_repl(engine: Engine, tok, max_tokens=512, temperature=0.3, top_p=0.95, safety_mode="CONTEXTUAL"):
    print("chat: /reset clears the conversation, /quit (or Ctrl-D) leaves", file=sys.stderr)
    history = []
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/reset" or not line.strip():
            history = [] if line.strip() else history
            continue
        history.append({"role": "user", "content": line})
        ids = tok.render_chat(history, safety_mode=safety_mode)
        room = engine.max_len - len(ids)
        if room < 2:
            print("(the conversation fills the context; /reset)", file=sys.stderr)
            history.pop()
            continue
        dec = ChatDecoder(tok)
        print("bot> ", end="", flush=True)
        for _, t in engine.generate_stream([ids], min(max_tokens, room), temperature, top_p=top_p):
            print(dec.feed(t).get("response", ""), end="", flush=True)
        print(dec.feed(None).get("response", ""))
        history.append({"role": "assistant", "content": dec.result()["response"]})


# ----------------------------------------------------------------------------------------------------------
# CLI


def main():
    ap = argparse.ArgumentParser(description="Command A chat server (Cohere v2 + OpenAI APIs) or an interactive "
                                 "terminal chat, on serve.py's engine.")
    ap.add_argument("--ckpt", required=True, help="checkpoint directory (config.json + safetensors + tokenizer.json)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (0 = any free port)")
    ap.add_argument("--chat", action="store_true", help="interactive terminal chat instead of a server")
    ap.add_argument("--max-batch", type=int, default=32, help="concurrent sequences in the batch")
    ap.add_argument("--max-len", type=int, default=None, help="context length (default min(model max, 4096))")
    ap.add_argument("--max-tokens", type=int, default=512, help="default max new tokens per request")
    ap.add_argument("--temperature", type=float, default=0.3, help="sampling temperature for --chat")
    ap.add_argument("--model-name", default="command-a-local", help="model id reported by /v1/models")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--fp8", action="store_true", help="FP8 matmuls (model.py's fp8_linear; real speed on Hopper)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (slow first requests)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="replay decode steps as CUDA graphs, one per batch bucket (CUDA only)")
    ap.add_argument("--verbose", action="store_true", help="also http.server's own log lines (protocol errors)")
    ap.add_argument("--quiet", action="store_true", help="no access log (default: one line per request on stderr)")
    ap.add_argument("--api-key", default=os.environ.get("COMMAND_A_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on every route but /health "
                         "(default: $COMMAND_A_API_KEY; unset = no authentication)")
    ap.add_argument("--max-body-mb", type=float, default=1.0, help="largest request body accepted (413 above)")
    ap.add_argument("--prefix-cache-mb", type=float, default=256,
                    help="memory for cached prompt prefixes (the shared chat preamble), LRU-evicted; 0 = off")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks: start with torchrun --nproc_per_node "
                    "N (NCCL on GPUs, gloo on CPU); rank 0 serves, the others replay its model calls")
    args = ap.parse_args()
    tune_malloc()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cuda_graphs and device != "cuda":
        ap.error("--cuda-graphs needs a CUDA GPU")
    if args.tp > 1:
        if os.environ.get("WORLD_SIZE") != str(args.tp):
            ap.error(f"--tp {args.tp} runs under torchrun --nproc_per_node {args.tp} (WORLD_SIZE is "
                     f"{os.environ.get('WORLD_SIZE', 'unset')})")
        import torch.distributed as dist
        from parallel import init_distributed, shard_for_decode
        device = init_distributed().type
    model, tok = load(args.ckpt, device, args.fp8)
    group = None
    if args.tp > 1:                     # this rank's heads and MLP columns; one all-reduce per layer
        shard_for_decode(model)
        group = dist.group.WORLD
    engine = Engine(model, tok, max_batch=args.max_batch, max_len=args.max_len, compile=args.compile,
                    cuda_graphs=args.cuda_graphs, prefix_cache_mb=args.prefix_cache_mb, tp_group=group)
    if group is not None and dist.get_rank() != 0:
        # torchrun passes Ctrl-C to every rank; a follower leaves when rank 0's engine stops, not before (an
        # interrupted collective would leave rank 0 unable to release the others)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        engine.follow()
        return shutdown(engine, group)
    if args.chat:
        chat_repl(engine, tok, args.max_tokens, args.temperature)
        shutdown(engine, group)
        print(json.dumps({"mode": "chat", **engine.stats}))
        return
    server = ChatServer(engine, tok, args.host, args.port, args.model_name, max_body=int(args.max_body_mb * 2**20),
                        default_max_tokens=args.max_tokens, verbose=args.verbose, api_key=args.api_key)
    if not args.quiet:          # the access log at INFO; every other logger stays at WARNING
        logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(message)s")
        ACCESS.setLevel(logging.INFO)
    print(f"serving {args.ckpt} on {server.url}  (POST /v2/chat, POST /v1/chat/completions, POST /v1/completions, "
          f"GET /v1/models, GET /health, GET /metrics)", file=sys.stderr)
    if warning := bind_warning(args.host, args.api_key):
        print(warning, file=sys.stderr)
    # Ctrl-C (SIGINT) stops the server cleanly, also when it was started as a background job (`api.py ... &`
    # from a script): a non-interactive shell starts those with SIGINT ignored, and Python keeps an inherited
    # ignore, so `kill -INT` would do nothing. SIGTERM stops it the same way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: signal.default_int_handler(signal.SIGINT, None))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        shutdown(engine, group)
    print(json.dumps({"mode": "server", "url": server.url, **engine.stats}))


def shutdown(engine: Engine, group):
    """Stop the engine (under TP, rank 0's stop releases the other ranks); every rank then reaches teardown
    before the process group goes (a rank tearing gloo down under a peer's pending call aborts the peer)."""
    if group is not None:           # a second Ctrl-C (torchrun forwards one too) must not cut the release short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    engine.stop()
    if group is not None:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
