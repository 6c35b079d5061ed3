"""The assistant behind OpenAI's chat-completions API (paper §5's chatbot, as local tools expect to reach one).

    python sample.py --model DIR --serve [--host 127.0.0.1] [--port 8000] [--image_root DIR] [--api_key KEY]

`POST /v1/chat/completions` and `GET /v1/models` on the standard library's ThreadingHTTPServer. Each HTTP
thread turns its request into a `Job` (the prompt built by `Assistant.prompt_ids`, as sample.py builds it)
and hands it to the `Scheduler`, the one thread that touches the model. The scheduler decodes every running
job in one batch (continuous batching): each step it prefills the jobs that arrived (together, with
`LlavaMed.prefill`, as `LlavaMed.generate` begins), merges their KV-cache rows into the running batch,
samples one token per row with `sample_next`, drops the rows that finished (or whose client went away) and
runs one cached decode step for the rest. Rows are kept right-aligned in one KVCache, so that every row's
next token lands in the same column; left padding is masked, and rotary positions count each row's real
tokens only, so a row decodes as it would alone: at temperature 0 each answer is the one `Assistant.answer`
gives for it by itself.

At most `max_batch` jobs decode together and as many again wait; past that the server answers 503.
Errors carry OpenAI's shape, {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import ipaddress
import json
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from PIL import Image

from minillavamed.config import IMAGE_TOKEN_INDEX
from minillavamed.conversation import IMAGE
from minillavamed.data import to_rgb
from minillavamed.decoder import KVCache
from minillavamed.inference import Assistant
from minillavamed.llava import StopStrings, sample_next

MAX_STOP_STRINGS = 4  # as OpenAI's API


class APIError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "invalid_request_error", 503: "server_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ServeConfig:
    name: str  # the model id clients must ask for
    image_root: Path | None = None  # image_url parts may name files under it; nothing else is read
    max_batch: int = 8
    max_body_bytes: int = 32 * 2**20  # a base64 image of a few MB fits
    api_key: str | None = None


@dataclass
class Job:
    """One chat completion: its prompt, sampling settings, and what it has generated so far."""

    prompt: list[int]  # token ids with one image sentinel where the image goes
    pixels: torch.Tensor | None
    prompt_tokens: int  # positions the model sees (the image counted as its patches)
    max_tokens: int
    temperature: float
    top_p: float
    stops: StopStrings  # the template's stop strings, then the request's
    generator: torch.Generator | None
    stream: bool  # send text as it is generated ("delta" events), not only the whole reply
    # ("delta", text)s (the first, "", at the first token), then ("done", reply, finish_reason, completion_tokens),
    # ("error", status, message) or ("cancelled",)
    events: queue.Queue = field(default_factory=queue.Queue)
    tokens: list[int] = field(default_factory=list)
    shown: str = ""  # text already streamed: always a prefix of the final reply
    started: bool = False  # its first token is out (streams send their first chunk then)
    cancelled: bool = False  # set by the HTTP thread when its client disconnects
    finished: bool = False  # its last event is out and it no longer counts against the queue


# ----------------------------------------------------------------------------- requests -> jobs


def _content_parts(content, k: int) -> tuple[str, list[dict]]:
    """A message's text and its image_url parts (content is a string or a list of typed parts)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise APIError(400, f"messages[{k}].content must be a string or a list of parts", "messages")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict) and isinstance(
                part["image_url"].get("url"), str):
            images.append(part["image_url"])
        else:
            raise APIError(400, f"messages[{k}]: parts must be {{'type': 'text', 'text'}} or "
                                f"{{'type': 'image_url', 'image_url': {{'url'}}}}, got {str(part)[:80]}", "messages")
    return "\n".join(texts), images


def parse_messages(messages) -> tuple[str | None, list[tuple[str, str]], str, dict | None]:
    """(system, earlier (question, answer) turns, the last question, the image part or None)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    system, turns, images = [], [], []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{k}] needs a role: system, user or assistant", "messages")
        text, parts = _content_parts(m.get("content") or "", k)
        if m["role"] in ("system", "developer"):
            if turns:
                raise APIError(400, f"messages[{k}]: system messages must come before the conversation", "messages")
            system.append(text)
            continue
        if parts and m["role"] != "user":
            raise APIError(400, f"messages[{k}]: only user messages can hold images", "messages")
        images += parts
        turns.append((m["role"], text))
    if not any(role == "user" for role, _ in turns):
        raise APIError(400, "the conversation has no user message", "messages")
    if [r for r, _ in turns] != ["user", "assistant"] * (len(turns) // 2) + ["user"] * (len(turns) % 2) or \
            turns[-1][0] != "user":
        raise APIError(400, "messages must alternate user and assistant (after any system messages) and end "
                            "with a user message", "messages")
    if len(images) > 1:
        raise APIError(400, "one image per conversation: the model was trained with one", "messages")
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    return ("\n".join(system) if system else None), history, turns[-1][1], (images[0] if images else None)


def load_image_part(part: dict, image_root: Path | None) -> Image.Image:
    """A data: URL (base64 PNG or JPEG), or a file under `image_root`; the server fetches nothing else."""
    url = part["url"]
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise APIError(400, "image data: URLs must be base64 (data:image/png;base64,...)", "messages")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "the image's data: URL is not valid base64", "messages", "invalid_base64") from None
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.format not in ("PNG", "JPEG"):
                    raise APIError(400, f"images must be PNG or JPEG, got {im.format}", "messages", "invalid_image")
                im.load()
                return to_rgb(im)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise APIError(400, f"the image does not decode: {e}", "messages", "invalid_image") from None
    if "://" in url and not url.startswith("file://"):
        raise APIError(400, "the server fetches no URLs: send the image as a data: URL (or a file path under the "
                            "server's --image_root)", "messages")
    if image_root is None:
        raise APIError(400, "this server has no --image_root: send images as data: URLs", "messages")
    root = image_root.resolve()
    path = (root / url.removeprefix("file://")).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise APIError(404, f"no image {url!r} under the server's --image_root", "messages", "image_not_found")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise APIError(400, f"the image {url!r} does not decode: {e}", "messages", "invalid_image") from None


def _number(body: dict, key: str, default, kind, lo=None, hi=None):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind) or (lo is not None and value < lo) or \
            (hi is not None and value > hi):
        bounds = f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}" if lo is not None else ""
        raise APIError(400, f"'{key}' must be a{'n integer' if kind is int else ' number'}{bounds}, got {value!r}",
                       key)
    return value


def make_job(assistant: Assistant, body: dict, cfg: ServeConfig) -> Job:
    """Validate a chat-completions request body and build its Job (prompt, image, sampling settings)."""
    if body.get("model") != cfg.name:
        raise APIError(404, f"model {body.get('model')!r} does not exist; this server serves {cfg.name!r}",
                       "model", "model_not_found")
    if _number(body, "n", 1, int, 1) != 1:
        raise APIError(400, "'n' must be 1", "n")
    system, history, question, image_part = parse_messages(body.get("messages"))
    temperature = float(_number(body, "temperature", 1.0, (int, float), 0, 2))
    top_p = float(_number(body, "top_p", 1.0, (int, float), 0, 1))
    seed = _number(body, "seed", None, int)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings",
                       "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", "stream")
    image = None if image_part is None else load_image_part(image_part, cfg.image_root)
    prompt = assistant.prompt_ids(question, image is not None, history, system)
    if prompt.count(IMAGE_TOKEN_INDEX) != (image is not None):
        raise APIError(400, f"the text may not contain {IMAGE!r}: the server places the image itself", "messages")
    prompt_tokens = len(prompt) + (assistant.model.cfg.vision.tokens_per_image - 1 if image is not None else 0)
    context = assistant.model.cfg.decoder.max_seq_len
    if prompt_tokens >= context:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens; the model's context is {context} tokens",
                       "messages", "context_length_exceeded")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": limit}, "max_tokens", context - prompt_tokens, int, 1)
    generator = None
    if temperature > 0:  # each request draws from its own generator, so a seed repeats its answer
        generator = torch.Generator(device=assistant.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
    pixels = None
    if image is not None:
        pixels = assistant.processor(image).to(assistant.device, next(assistant.model.parameters()).dtype)
    return Job(prompt, pixels, prompt_tokens, min(max_tokens, context - prompt_tokens), temperature, top_p,
               assistant.stops(stop), generator, stream)


# ----------------------------------------------------------------------------- the scheduler


class Scheduler(threading.Thread):
    """The one thread that runs the model: continuous batching over one right-aligned KV cache."""

    def __init__(self, assistant: Assistant, max_batch: int):
        super().__init__(name="scheduler", daemon=True)
        self.assistant, self.model, self.max_batch = assistant, assistant.model, max_batch
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.stopping = threading.Event()
        self.in_flight = 0  # jobs accepted and not yet finished (waiting or decoding)
        self.lock = threading.Lock()
        self.rows: list[Job] = []  # the decoding batch, in cache row order
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, cache.length) bool: real tokens, a suffix of each row
        self.logits: torch.Tensor | None = None  # (rows, vocab): where each row's next token comes from
        self.arriving: list[Job] = []  # taken from the inbox, not yet rows
        tok = assistant.tokenizer
        self.decode, self.eos_id = tok.decode, tok.eos_id

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.in_flight >= 2 * self.max_batch:
                raise APIError(503, f"the server is busy ({self.max_batch} requests decoding and as many waiting); "
                                    "retry later", code="overloaded")
            self.in_flight += 1
        self.inbox.put(job)

    def _finish(self, job: Job, *event) -> None:
        if job.finished:  # a job that finished just before a failing step is not failed again
            return
        job.finished = True
        job.events.put(event)
        with self.lock:
            self.in_flight -= 1

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.step()
            except Exception:  # a bug: fail the jobs it touched rather than hang their connections
                traceback.print_exc()
                for job in self.rows + self.arriving:
                    self._finish(job, "error", 500, "internal error while decoding (see the server's log)")
                self.rows, self.arriving, self.cache, self.mask, self.logits = [], [], None, None, None

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting jobs, sample one token for every row, drop finished rows, run one decode step."""
        arrived = self.arriving = []
        try:
            if not self.rows:  # idle: wait for work
                arrived.append(self.inbox.get(timeout=0.1))
            while len(self.rows) + len(arrived) < self.max_batch:
                arrived.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        for job in [j for j in arrived if j.cancelled]:
            self._finish(job, "cancelled")
        arrived = [j for j in arrived if not j.cancelled]
        if arrived:
            self.admit(arrived)
        self.arriving = []
        if not self.rows:
            return
        vocab = self.assistant.tokenizer.vocab_size  # rows past it (llava-hf's image token) have no text
        tokens = sample_next(self.logits, 0.0, 0, 1.0, vocab_size=vocab)  # greedy rows; sampled rows are redrawn
        for b, job in enumerate(self.rows):  # with their own settings and generator, one row at a time
            if job.temperature > 0:
                tokens[b] = sample_next(self.logits[b:b + 1], job.temperature, 0, job.top_p, job.generator, vocab)[0]
        keep = [b for b, (job, t) in enumerate(zip(self.rows, tokens.tolist())) if not self.advance(job, t)]
        if not keep:
            self.rows, self.cache, self.mask, self.logits = [], None, None, None
            return
        if len(keep) < len(self.rows):
            self.cache, self.mask = self._pack([(self.cache, self.mask, keep)], [self.rows[b] for b in keep])
            tokens, self.rows = tokens[keep], [self.rows[b] for b in keep]
        self.decode_step(tokens)

    def admit(self, jobs: list[Job]) -> None:
        """Prefill the arrived jobs together (as LlavaMed.generate begins) and join their rows."""
        pixels = [j.pixels for j in jobs if j.pixels is not None]
        logits, cache, mask, _ = self.model.prefill([j.prompt for j in jobs], torch.stack(pixels) if pixels else None)
        parts = [(cache, mask, list(range(len(jobs))))]
        if self.rows:
            parts.insert(0, (self.cache, self.mask, list(range(len(self.rows)))))
            logits = torch.cat([self.logits, logits])
        self.rows += jobs
        self.cache, self.mask = self._pack(parts, self.rows)
        self.logits = logits

    def _pack(self, parts, jobs: list[Job]) -> tuple[KVCache, torch.Tensor]:
        """A new cache holding the given rows of each (cache, mask, rows) part, right-aligned and trimmed of
        columns that are padding in every row, with room for the longest remaining reply."""
        real = [mask[rows].sum(-1) for _, mask, rows in parts]  # each row's real tokens: the last ones
        width = max(int(r.max()) for r in real)
        room = max(j.max_tokens - len(j.tokens) for j in jobs)
        device = self.assistant.device
        out = KVCache(self.model.cfg.decoder, len(jobs), width + room, parts[0][0].k[0].dtype, device)
        for t in out.k + out.v:  # left padding must be finite: masked keys still multiply their values by 0
            t.zero_()
        out.length = width
        mask = torch.zeros(len(jobs), width, dtype=torch.bool, device=device)
        start = 0
        for (cache, part_mask, rows), n in zip(parts, real):
            w = int(n.max())  # this part's rows, trimmed to its own width, sit at the right end
            span = slice(start, start + len(rows))
            for layer in range(len(out.k)):
                out.k[layer][span, width - w:width] = cache.k[layer][rows, cache.length - w:cache.length]
                out.v[layer][span, width - w:width] = cache.v[layer][rows, cache.length - w:cache.length]
            mask[span, width - w:] = part_mask[rows, part_mask.shape[1] - w:]
            start += len(rows)
        return out, mask

    def decode_step(self, tokens: torch.Tensor) -> None:
        positions = self.mask.sum(-1, keepdim=True)  # rotary positions count real tokens only
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        keys = None if bool(self.mask.all()) else self.mask
        self.logits = self.model.decode_step(tokens, positions, keys, self.cache)

    def advance(self, job: Job, token: int) -> bool:
        """Take a row's new token; stream what is safe to show; True when the row is done (or abandoned)."""
        if job.cancelled:
            self._finish(job, "cancelled")
            return True
        if job.stream and not job.started:
            job.started = True
            job.events.put(("delta", ""))
        finish = None
        if token == self.eos_id:
            finish = "stop"
        else:
            job.tokens.append(token)
            if job.stops.reached(job.tokens):
                finish = "stop"
            elif len(job.tokens) >= job.max_tokens:
                finish = "length"
        if finish is None and not job.stream:
            return False
        text = self.decode(job.tokens)
        if finish is not None:
            # What was streamed is a prefix of the reply (StopStrings.visible); the rest goes out now.
            self._finish(job, "done", job.stops.cut(text), finish, len(job.tokens))
            return True
        safe = job.stops.visible(text)
        if len(safe) > len(job.shown):
            job.events.put(("delta", safe[len(job.shown):]))
            job.shown = safe
        return False


# ----------------------------------------------------------------------------- HTTP


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def _handler(assistant: Assistant, cfg: ServeConfig, scheduler: Scheduler):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive for the openai client's connection pool
        server_version = "minillavamed"
        timeout = 60  # seconds a client may stall mid-request before its connection is dropped

        def log_message(self, fmt, *args):  # one line per request on stderr, without the default's noise
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

        def send_json(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def send_error_json(self, e: APIError) -> None:
            self.send_json(e.status, e.body(), {"Retry-After": "1"} if e.status == 503 else None)

        def authorize(self) -> None:
            if cfg.api_key is None:
                return
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
                raise APIError(401, "missing or wrong API key (send it as 'Authorization: Bearer KEY')",
                               code="invalid_api_key")

        def do_GET(self):
            try:
                self.authorize()
                if self.path.rstrip("/") != "/v1/models":
                    raise APIError(404, f"no route GET {self.path}; this server has GET /v1/models and "
                                        "POST /v1/chat/completions", code="not_found")
                self.send_json(200, {"object": "list", "data": [
                    {"id": cfg.name, "object": "model", "created": int(time.time()), "owned_by": "minillavamed"}]})
            except APIError as e:
                self.send_error_json(e)

        def do_POST(self):
            try:
                self.authorize()
                if self.path.rstrip("/") != "/v1/chat/completions":
                    raise APIError(404, f"no route POST {self.path}; this server has POST /v1/chat/completions",
                                   code="not_found")
                body = self.read_body()
                job = make_job(assistant, body, cfg)
                include_usage = job.stream and bool((body.get("stream_options") or {}).get("include_usage"))
                scheduler.submit(job)
            except APIError as e:
                self.send_error_json(e)
                return
            except Exception:  # a bug: say so rather than drop the connection
                traceback.print_exc()
                self.send_error_json(APIError(500, "internal error (see the server's log)"))
                return
            if job.stream:
                self.stream(job, include_usage)
            else:
                self.complete(job)

        def read_body(self) -> dict:
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.close_connection = True
                raise APIError(411, "the request needs a Content-Length header") from None
            if length > cfg.max_body_bytes:
                self.close_connection = True  # the body is never read: the connection cannot be reused
                raise APIError(413, f"the request body is {length} bytes; this server takes at most "
                                    f"{cfg.max_body_bytes}", code="request_too_large")
            try:
                body = json.loads(self.rfile.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(400, f"the request body is not JSON: {e}") from None
            if not isinstance(body, dict):
                raise APIError(400, "the request body must be a JSON object")
            return body

        def wait(self, job: Job):
            while True:
                try:
                    return job.events.get(timeout=1.0)
                except queue.Empty:
                    if scheduler.stopping.is_set():
                        return ("error", 503, "the server is shutting down")

        def complete(self, job: Job) -> None:
            event = self.wait(job)
            while event[0] == "delta":
                event = self.wait(job)
            if event[0] == "error":
                self.send_error_json(APIError(event[1], event[2]))
                return
            _, reply, finish, completion_tokens = event
            self.send_json(200, {
                "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": cfg.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                             "finish_reason": finish, "logprobs": None}],
                "usage": usage(job, completion_tokens)})

        def stream(self, job: Job, include_usage: bool) -> None:
            """Server-sent events as OpenAI sends them: a role chunk at the first token, content chunks, a
            finish_reason chunk, optionally a usage chunk, then [DONE]. The body ends when the connection closes."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            head = {"id": completion_id(), "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": cfg.name}

            def send(delta: dict | None, finish=None, usage_=None) -> None:
                chunk = {**head, "choices": [] if delta is None else
                         [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
                if usage_ is not None:
                    chunk["usage"] = usage_
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            try:
                event = self.wait(job)  # the first token (or an error): the role chunk goes out then
                send({"role": "assistant", "content": ""})
                while event[0] == "delta":
                    if event[1]:
                        send({"content": event[1]})
                    event = self.wait(job)
                if event[0] == "error":
                    self.wfile.write(f"data: {json.dumps(APIError(event[1], event[2]).body())}\n\n".encode())
                else:
                    _, reply, finish, completion_tokens = event
                    if len(reply) > len(job.shown):
                        send({"content": reply[len(job.shown):]})
                    send({}, finish)
                    if include_usage:
                        send(None, usage_=usage(job, completion_tokens))
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except OSError:  # broken pipe, reset, timeout
                job.cancelled = True  # the scheduler drops the row at its next step

    return Handler


def usage(job: Job, completion_tokens: int) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": job.prompt_tokens + completion_tokens}


def access_warning(host: str, api_key: str | None) -> str | None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if loopback or api_key is not None:
        return None
    return (f"warning: serving on {host}, beyond this machine, with no authentication: anyone who can reach it can "
            "use the model. Pass --api_key KEY to require 'Authorization: Bearer KEY'.")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default backlog of 5 drops connections when many clients connect at once


class Server:
    """The HTTP server and its scheduler; `start()` serves from background threads, `stop()` ends both."""

    def __init__(self, assistant: Assistant, cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000):
        self.scheduler = Scheduler(assistant, cfg.max_batch)
        self.httpd = _HTTPServer((host, port), _handler(assistant, cfg, self.scheduler))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "Server":
        self.scheduler.start()
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.scheduler.stopping.set()
        self.scheduler.join(timeout=10)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(assistant: Assistant, cfg: ServeConfig, host: str, port: int) -> None:
    """sample.py --serve: serve until interrupted."""
    if (warning := access_warning(host, cfg.api_key)) is not None:
        print(warning, file=sys.stderr)
    server = Server(assistant, cfg, host, port).start()
    print(f"serving {cfg.name!r} at {server.url} (POST /chat/completions, GET /models); Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def default_name(model_dir: os.PathLike) -> str:
    return os.path.basename(os.path.normpath(model_dir))
