"""Tests for minillavamed/api.py: Retry-After, key redaction, retries and error kinds against a local stub
server over real HTTP, and how the client is made from the environment."""

import asyncio
import email.utils
import sys
import time
from pathlib import Path

import pytest

from minillavamed import api

sys.path.insert(0, str(Path(__file__).parent))
from openai_stub import StubServer  # noqa: E402


def test_retry_after_parsing():
    assert api.retry_after_seconds({"retry-after": "2.5"}) == 2.5
    assert api.retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < api.retry_after_seconds({"retry-after": date}) <= 30
    assert api.retry_after_seconds({"retry-after": "soon"}) is None
    assert api.retry_after_seconds({}) is None


def test_redact(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-abc123")
    assert api.redact("Bearer sk-abc123 failed") == "Bearer [redacted] failed"


def test_client_retries_and_classifies_errors(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unit-SECRET")
    plan = {"r500": ["500", "500", "ok"], "dead": ["500"], "refuse": ["refusal"], "mal": ["malformed", "ok"],
            "leak": ["echo_auth"], "auth": ["401"], "slow": ["slow", "ok"]}

    async def go(url):
        client = api.ChatClient(api.ClientConfig(model="m", base_url=url, timeout=0.3, max_retries=2,
                                                 backoff_base=0.01))
        out = {}
        for key in plan:
            try:
                out[key] = await client.complete([{"role": "user", "content": key}])
            except (api.APIFailure, api.FatalAPIError) as e:
                out[key] = e
        await client.close()
        return out, client

    with StubServer(plan=plan, slow_s=2.0) as stub:
        out, client = asyncio.run(go(stub.url))
        counts = {k: len(stub.requests_for(k)) for k in plan}
    assert isinstance(out["r500"], str) and counts["r500"] == 3
    assert isinstance(out["dead"], api.APIFailure) and counts["dead"] == 3 and "500" in str(out["dead"])
    assert isinstance(out["refuse"], api.APIFailure) and "refusal" in str(out["refuse"]) and counts["refuse"] == 1
    assert isinstance(out["mal"], str) and counts["mal"] == 2
    assert isinstance(out["slow"], str) and counts["slow"] == 2
    assert isinstance(out["leak"], api.APIFailure) and counts["leak"] == 1  # 400: not retried
    assert "sk-unit-SECRET" not in str(out["leak"]) and "[redacted]" in str(out["leak"])
    assert isinstance(out["auth"], api.FatalAPIError)
    # Usage (100 in / 20 out per 200 reply) is counted for the 3 answered requests and the refusal: paid too.
    assert client.prompt_tokens == 100 * 4 and client.completion_tokens == 20 * 4


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("AZURE_OPENAI_ENDPOINT", raising=False)
    with pytest.raises(api.FatalAPIError, match="OPENAI_API_KEY is not set"):
        api.make_openai_client("http://127.0.0.1:1/v1", 1.0)


def test_azure_client_from_environment(monkeypatch):
    import openai
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://example-resource.openai.azure.com")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-secret")
    monkeypatch.setenv("OPENAI_API_VERSION", "2024-06-01")
    client = api.make_openai_client(None, 5.0)
    assert isinstance(client, openai.AsyncAzureOpenAI) and client.max_retries == 0
    # An explicit --base_url wins over the Azure variables.
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    assert not isinstance(api.make_openai_client("http://127.0.0.1:1/v1", 5.0), openai.AsyncAzureOpenAI)
