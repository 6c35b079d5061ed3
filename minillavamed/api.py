"""The chat-completions client of the self-instruct data (paper §3) and of the GPT-4 judge (paper §5).

Any OpenAI-compatible endpoint (OpenAI, Azure, a local server such as serve.py) through the `openai` package,
asynchronous so that many requests are in flight, with our own retries: 429 waits at least the server's
Retry-After, 5xx, timeouts, connection errors and malformed replies back off exponentially with jitter, other
4xx fail the request at once, and errors no retry can fix (authentication, an unknown model) stop the run.
API keys never reach a log, an output file or an exception message (`redact`). This is the only file that
imports `openai`: training and sampling never load it.
"""

import asyncio
import email.utils
import os
import random
import time
from dataclasses import dataclass

import openai

SECRET_ENV_VARS = ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY")


def redact(text: str) -> str:
    """Remove API keys from any text that may reach a log, an output file or an exception message."""
    for var in SECRET_ENV_VARS:
        key = os.environ.get(var)
        if key:
            text = text.replace(key, "[redacted]")
    return text


class APIFailure(Exception):
    """A request that failed for good (retries exhausted, or an error retrying cannot fix); str() is safe to log.
    `kind` says what failed last: "connection" (no server answered, so nothing was paid for: a re-run
    retries it), "timeout", "rate_limit", "server", "malformed", "client" (another 4xx) or "refusal"."""

    def __init__(self, message: str, kind: str = "client"):
        super().__init__(message)
        self.kind = kind


class _MalformedResponse(Exception):
    """A 200 response without a usable message: retried like a server error."""


class FatalAPIError(Exception):
    """Authentication, permission or unknown-model errors: every further request would fail the same way."""


@dataclass
class ClientConfig:
    model: str
    base_url: str | None = None  # None: Azure if AZURE_OPENAI_ENDPOINT is set, else the openai default
    temperature: float = 0.7
    max_tokens: int = 1024
    timeout: float = 60.0  # seconds per request
    max_retries: int = 5
    backoff_base: float = 1.0  # seconds; attempt k waits about base * 2**k (with jitter)
    backoff_max: float = 60.0


def make_openai_client(base_url: str | None, timeout: float) -> openai.AsyncOpenAI:
    # Retries are ours (max_retries=0): we honour Retry-After, count attempts per record and report reasons.
    if base_url is None and os.environ.get("AZURE_OPENAI_ENDPOINT"):
        # Reads AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY and OPENAI_API_VERSION; --model is the deployment.
        return openai.AsyncAzureOpenAI(timeout=timeout, max_retries=0)
    if not os.environ.get("OPENAI_API_KEY"):
        raise FatalAPIError("OPENAI_API_KEY is not set (for a local server without keys set it to any value)")
    return openai.AsyncOpenAI(base_url=base_url, api_key=os.environ["OPENAI_API_KEY"], timeout=timeout,
                              max_retries=0)


def retry_after_seconds(headers) -> float | None:
    """Server-requested wait from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    if headers is None:
        return None
    if headers.get("retry-after-ms"):
        try:
            return float(headers["retry-after-ms"]) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class ChatClient:
    """Chat completions with retries: 429 (waits at least Retry-After), 5xx, timeouts, connection errors and
    malformed responses are retried with exponential backoff and jitter; other 4xx fail the request at once;
    auth/model errors abort the run. Counts tokens for progress and cost."""

    def __init__(self, cfg: ClientConfig, api: openai.AsyncOpenAI | None = None):
        self.cfg = cfg
        self.api = api or make_openai_client(cfg.base_url, cfg.timeout)
        self.prompt_tokens = self.completion_tokens = self.requests = 0

    def backoff(self, attempt: int) -> float:
        delay = min(self.cfg.backoff_max, self.cfg.backoff_base * 2 ** attempt)
        return delay / 2 + random.uniform(0, delay / 2)  # jitter spreads out workers that failed together

    async def complete(self, messages: list[dict]) -> str:
        last, kind = "no attempt made", "connection"
        for attempt in range(self.cfg.max_retries + 1):
            wait = self.backoff(attempt)
            try:
                self.requests += 1
                resp = await self.api.chat.completions.create(
                    model=self.cfg.model, messages=messages, temperature=self.cfg.temperature,
                    max_tokens=self.cfg.max_tokens, timeout=self.cfg.timeout)
                return self._reply_text(resp)
            except openai.RateLimitError as e:
                server_wait = retry_after_seconds(e.response.headers)
                wait = max(wait, server_wait or 0.0)
                last, kind = f"HTTP 429 rate limited (Retry-After {server_wait})", "rate_limit"
            except openai.APITimeoutError:
                last, kind = f"timed out after {self.cfg.timeout}s", "timeout"
            except openai.APIConnectionError as e:
                cause = f" ({e.__cause__})" if e.__cause__ is not None else ""
                last, kind = f"connection error: {e}{cause}", "connection"
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                raise FatalAPIError(redact(f"HTTP {e.status_code}: {e.message}")) from None
            except openai.APIStatusError as e:
                if e.status_code < 500 and e.status_code not in (408, 409):
                    raise APIFailure(redact(f"HTTP {e.status_code}: {e.message}")) from None
                last, kind = f"HTTP {e.status_code}: {e.message}", "server"
            except (openai.APIResponseValidationError, ValueError, _MalformedResponse) as e:
                last, kind = f"malformed response: {e}", "malformed"
            if attempt < self.cfg.max_retries:
                await asyncio.sleep(wait)
        raise APIFailure(redact(f"gave up after {self.cfg.max_retries + 1} attempts; last error: {last}"), kind)

    def _reply_text(self, resp) -> str:
        usage = getattr(resp, "usage", None)
        if usage is not None:
            self.prompt_tokens += usage.prompt_tokens or 0
            self.completion_tokens += usage.completion_tokens or 0
        choices = getattr(resp, "choices", None)
        if not choices:
            raise _MalformedResponse("no choices in the response")
        choice = choices[0]
        if getattr(choice.message, "refusal", None):
            raise APIFailure(redact(f"refusal: {choice.message.refusal[:200]}"), "refusal")
        if choice.finish_reason == "content_filter":
            raise APIFailure("refusal: stopped by the content filter", "refusal")
        if not isinstance(choice.message.content, str) or not choice.message.content.strip():
            raise _MalformedResponse("empty message content")
        return choice.message.content

    async def close(self) -> None:
        await self.api.close()
