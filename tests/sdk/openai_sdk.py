"""The official OpenAI Python SDK against a running tollgate (driven by tests/it/sdk.rs).

Usage: openai_sdk.py BASE_URL GOOD_KEY READ_ONLY_KEY
Prints `ok` and exits 0 when every check passes.
"""
import sys

import openai

base, good, reader = sys.argv[1:4]
url = base + "/v1"
mock = {"x-mock": "openai"}

client = openai.OpenAI(base_url=url, api_key=good, default_headers=mock, max_retries=0)
assert [m.id for m in client.models.list().data] == ["mock-model"]
reply = client.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "hi"}])
assert reply.choices[0].message.content == "hello", reply
stream = client.chat.completions.create(
    model="mock-model", messages=[{"role": "user", "content": "hi"}], stream=True
)
text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
assert text == "hello world", text

wrong = good[:-10] + ("A" if good[-10] != "A" else "B") + good[-9:]
for key in [wrong, "not-a-key"]:
    try:
        openai.OpenAI(base_url=url, api_key=key, default_headers=mock, max_retries=0).models.list()
        raise AssertionError("a bad key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401
        assert e.code == "unauthorized", e.body

try:
    openai.OpenAI(base_url=url, api_key=reader, default_headers=mock, max_retries=0).chat.completions.create(
        model="mock-model", messages=[{"role": "user", "content": "hi"}]
    )
    raise AssertionError("a read-only key could write")
except openai.PermissionDeniedError as e:
    assert e.status_code == 403
    assert e.code == "forbidden", e.body

print("ok")
