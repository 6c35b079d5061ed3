"""Test helper: a tiny OpenAI-compatible chat-completions server on 127.0.0.1 with scriptable faults.

Each request is matched to a plan entry by a token found in its last user message (e.g. a pair_id written into
the caption); the entry is a list of behaviours used one per request, the last one repeating:
  "ok"         a normal completion whose text comes from `reply(messages)`
  "429"        HTTP 429 with a Retry-After header
  "500"        HTTP 500
  "slow"       sleeps `slow_s` before answering normally (so the client times out)
  "malformed"  HTTP 200 with a body that is not JSON
  "refusal"    HTTP 200 with `message.refusal` set and no content
  "sorry"      HTTP 200 with a plain-text refusal and no conversation in it
  "echo_auth"  HTTP 400 whose error message echoes the Authorization header (a leaky proxy)
  "401"        HTTP 401 invalid key
The server runs in a daemon thread and shuts itself down after `lifetime_s` at the latest.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_CONVERSATION = ("Sure, here is a conversation.\n\nUser: What imaging modality is shown?\n"
                        "Assistant: This is an axial CT slice of the chest.\n\n"
                        "User: Is there an abnormality?\nAssistant: There is a small nodule in the right lung.")


class StubServer:
    def __init__(self, plan: dict[str, list[str]] | None = None, reply=None, retry_after: str = "1",
                 slow_s: float = 3.0, ok_delay_s: float = 0.0, lifetime_s: float = 120.0):
        self.plan = {k: list(v) for k, v in (plan or {}).items()}
        self.reply = reply or (lambda messages: DEFAULT_CONVERSATION)
        self.retry_after, self.slow_s, self.ok_delay_s, self.lifetime_s = retry_after, slow_s, ok_delay_s, lifetime_s
        self.requests: list[dict] = []  # {"time", "auth", "key", "behaviour", "query", "messages"}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> "StubServer":
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        timer = threading.Timer(self.lifetime_s, self.stop)
        timer.daemon = True
        timer.start()
        return self

    def stop(self) -> None:
        if not self.stopping.is_set():
            self.stopping.set()
            self.httpd.shutdown()
            self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def requests_for(self, key: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["key"] == key]

    def _next_behaviour(self, text: str) -> tuple[str | None, str]:
        with self.lock:
            for key, steps in self.plan.items():
                if key in text:
                    return key, steps.pop(0) if len(steps) > 1 else steps[0]
        return None, "ok"

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _error(self, status: int, message: str, headers: dict | None = None):
                err = {"error": {"message": message, "type": "stub_error", "code": str(status)}}
                self._send(status, json.dumps(err).encode(), headers)

            def _completion(self, content, refusal=None, finish="stop"):
                body = {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
                        "model": "stub", "choices": [{"index": 0, "finish_reason": finish, "message": {
                            "role": "assistant", "content": content, "refusal": refusal}}],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}
                self._send(200, json.dumps(body).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                messages = body.get("messages", [])
                last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
                key, behaviour = stub._next_behaviour(last_user)
                with stub.lock:
                    stub.requests.append({"time": time.monotonic(), "auth": self.headers.get("Authorization"),
                                          "key": key, "behaviour": behaviour, "query": last_user,
                                          "messages": messages})
                if behaviour == "429":
                    return self._error(429, "rate limited", {"Retry-After": stub.retry_after})
                if behaviour == "500":
                    return self._error(500, "internal error")
                if behaviour == "401":
                    return self._error(401, "invalid api key")
                if behaviour == "echo_auth":
                    return self._error(400, f"bad request; you sent {self.headers.get('Authorization')}")
                if behaviour == "malformed":
                    return self._send(200, b'{"id": "chatcmpl-stub", "choices": [')
                if behaviour == "refusal":
                    return self._completion(None, refusal="I can't help with that request.")
                if behaviour == "sorry":
                    return self._completion("I'm sorry, but I can't assist with that.")
                if behaviour == "slow":
                    stub.stopping.wait(stub.slow_s)
                elif stub.ok_delay_s:
                    stub.stopping.wait(stub.ok_delay_s)
                return self._completion(stub.reply(messages))

        return Handler
