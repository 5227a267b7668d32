"""The OpenAI SDK against a 1 request/s, burst 1 tier (driven by tests/it/ratelimit.rs).

Usage: openai_retry.py BASE_URL KEY — prints `ok` when every check passes.
"""
import sys
import time

import openai

base, key = sys.argv[1:3]
mock = {"x-mock": "openai"}
no_retry = openai.OpenAI(base_url=base + "/v1", api_key=key, default_headers=mock, max_retries=0)

no_retry.models.list()
try:
    no_retry.models.list()
    raise AssertionError("the second request within a second was admitted")
except openai.RateLimitError as e:
    assert e.status_code == 429
    assert e.code == "rate_limited", e.body
    assert e.response.headers["retry-after"] == "1"

# The SDK's own retry waits for Retry-After (1 s) and then succeeds.
retrying = openai.OpenAI(base_url=base + "/v1", api_key=key, default_headers=mock, max_retries=3)
start = time.monotonic()
models = retrying.models.list()
assert [m.id for m in models.data] == ["mock-model"]
print(f"retried for {time.monotonic() - start:.2f}s")
print("ok")
