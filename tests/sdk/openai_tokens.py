"""The OpenAI SDK, unmodified, through tollgate on a tier with token limits (driven by
tests/it/tokens.rs), compared with the same calls made directly to the upstream.

Usage: openai_tokens.py PROXIED_BASE DIRECT_BASE KEY TINY_KEY — prints `ok` when every check passes.
"""
import sys
import time

import openai

proxied_base, direct_base, key, tiny_key = sys.argv[1:5]
mock = {"x-mock": "openai"}
proxied = openai.OpenAI(base_url=proxied_base + "/v1", api_key=key, default_headers=mock, max_retries=0)
direct = openai.OpenAI(base_url=direct_base + "/v1", api_key="unused", default_headers=mock, max_retries=0)
messages = [{"role": "user", "content": "hi"}]

# A JSON completion: the upstream's usage, unchanged.
c = proxied.chat.completions.create(model="mock-model", messages=messages)
assert c.choices[0].message.content == "hello", c
assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (9, 2), c.usage
raw = proxied.chat.completions.with_raw_response.create(model="mock-model", messages=messages)
assert raw.headers["x-ratelimit-limit-tokens"] == "100000", dict(raw.headers)
assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 100000

# Streams: what the SDK yields is the same with and without tollgate — without usage asked
# (tollgate asks for it and removes the usage chunk) and with it (passed through).
for options in [None, {"include_usage": False}, {"include_usage": True}]:
    extra = {} if options is None else {"stream_options": options}
    via = [ch.model_dump() for ch in proxied.chat.completions.create(model="mock-model", messages=messages, stream=True, **extra)]
    plain = [ch.model_dump() for ch in direct.chat.completions.create(model="mock-model", messages=messages, stream=True, **extra)]
    assert via == plain, (options, via, plain)
    asked = bool(options and options.get("include_usage"))
    assert (via[-1]["usage"] is not None) == asked, (options, via[-1])
    assert "".join(ch["choices"][0]["delta"]["content"] or "" for ch in via if ch["choices"]) == "hello world"

# Embeddings.
e = proxied.embeddings.create(model="mock-model", input="hi")
assert e.usage.prompt_tokens == 5 and len(e.data) == 1

# A tier of 600 tokens a minute (10 a second): a request reserving all of it (max_tokens 590
# + its prompt, clamped to 600) passes and settles 11; the next one is refused with
# RateLimitError and a Retry-After; the SDK's own retry waits for it, then succeeds.
tiny = openai.OpenAI(base_url=proxied_base + "/v1", api_key=tiny_key, default_headers=mock, max_retries=0)
tiny.chat.completions.create(model="mock-model", messages=messages, max_tokens=590)
try:
    tiny.chat.completions.create(model="mock-model", messages=messages, max_tokens=590)
    raise AssertionError("a second full reservation was admitted")
except openai.RateLimitError as err:
    assert err.status_code == 429
    assert err.body["details"]["limit"] == "tokens_per_minute", err.body
    wait = int(err.response.headers["retry-after"])
    assert 1 <= wait <= 3, wait
    assert err.response.headers.get("x-should-retry") != "false"
retrying = openai.OpenAI(base_url=proxied_base + "/v1", api_key=tiny_key, default_headers=mock, max_retries=3)
start = time.monotonic()
retrying.chat.completions.create(model="mock-model", messages=messages, max_tokens=590)
took = time.monotonic() - start
assert took >= 1.0, took
print(f"retried after {took:.2f}s")
print("ok")
