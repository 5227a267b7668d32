#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into corpus/<target>/ (deterministic; run it
again after changing a seed, and commit the result). Keys use the fixture of
fuzz_targets/pipeline.rs: prefix `tg`, ids `Fuzz…001`, one secret, the CRC32 checksum of
src/keys.rs."""

import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
BASE62 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SECRET = "S3cretS3cretS3cretS3cretS3cret00"


def key(id_, prefix="tg", secret=SECRET):
    body = f"{prefix}_{id_}_{secret}"
    n = zlib.crc32(body.encode())
    out = bytearray(b"0" * 6)
    for i in range(5, -1, -1):
        out[i] = BASE62[n % 62]
        n //= 62
    return body + out.decode()


INFER, ADMIN, LIMIT = key("FuzzInfer001"), key("FuzzAdmin001"), key("FuzzLimit001")
REVOKED, EXPIRED, WORKSPACE = key("FuzzRevkd001"), key("FuzzExpir001"), key("FuzzWkspc001")
UNKNOWN = key("Unknown00001")
WRONG = key("FuzzInfer001", secret="WrongWrongWrongWrongWrongWrong00")
TYPO = INFER[:-1] + ("A" if INFER[-1] != "A" else "B")


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# --- keys: an Authorization value (a first 0x00 byte: two values split at the next 0x00) ---
for name, v in {
    "valid": f"Bearer {INFER}",
    "valid-lowercase-scheme": f"bearer {ADMIN}",
    "checksum-typo": f"Bearer {TYPO}",
    "other-prefix": "Bearer " + key("FuzzInfer001", prefix="sk0123456789ABCD"),
    "openai-style": "Bearer sk-proj-abcdefghijklmnopqrstuvwxyz0123456789",
    "basic": "Basic dXNlcjpwYXNz",
    "two-spaces": f"Bearer  {INFER}",
    "too-long": "Bearer tg_" + "a" * 80,
    "bare-key": INFER,
}.items():
    write("keys", name, v)
write("keys", "two-headers", b"\x00" + f"Bearer {INFER}".encode() + b"\x00" + f"Bearer {ADMIN}".encode())

# --- target: <flags: bit 0 HTTP/2, bit 1 send Host><target>[\n<Host>] ---
for name, v in {
    "origin-form": b"\x00/v1/chat/completions",
    "query": b"\x00/v1/models?limit=10&order=desc",
    "key-param": b"\x00/v1/models?api_key=" + INFER.encode(),
    "key-value": b"\x00/v1/models?q=" + INFER.encode(),
    "encoded-name": b"\x00/v1/models?api%5Fkey=x&a+b=c",
    "dot-segments": b"\x00/v1/../v1/keys",
    "encoded-dots": b"\x00/v1/%2e%2E/keys",
    "encoded-slash": b"\x00/v1/models%2Fx%20y",
    "absolute-same-host": b"\x02http://api.local/v1/models\napi.local",
    "absolute-other-host": b"\x02http://evil.example/v1/models\napi.local",
    "h2-authority": b"\x01https://api.local:8443/v1/embeddings",
    "asterisk": b"\x00*",
    "authority-form": b"\x00api.local:443",
}.items():
    write("target", name, v)

# --- config: YAML files ---
write("config", "empty", "")
write("config", "deploy", open(os.path.join(HERE, "../../deploy/kubernetes/tollgate/config.yaml")).read())
write("config", "full", """\
listen: 0.0.0.0:8080
admin_listen: 127.0.0.1:9090
upstream:
  url: http://127.0.0.1:8000
  connect_timeout: 2s
  timeout: 600s
  api_key_env: null
tls: null
limits:
  max_header_bytes: 16KiB
  max_body_bytes: 10MiB
  header_read_timeout: 10s
  stream_idle_timeout: 300s
shutdown: { drain_delay: 5s, timeout: 60s }
log: { format: json, level: "info,tollgate=debug" }
store: { sqlite: ./tollgate.db }
auth:
  key_prefix: tg
  workspace: prod
  cache_ttl: 5m
  cache_capacity: 100000
  negative_cache_ttl: 10s
  revocation_poll: 1s
  revocation_retention: 90d
  argon2: { memory_kib: 19456, iterations: 2, parallelism: 1 }
  failed_auth: { per_second: 1, burst: 20 }
rate_limits:
  per: key
  backend: local
  overrides:
    orgs: { acme: { requests_per_second: 500, burst: 2000 } }
    keys: { 4kQ0d1XbZr7m: { daily_requests: 1000 } }
tiers:
  audit:      { requests_per_second: 50,   burst: 200,  daily_requests: 100000 }
  enterprise: { requests_per_second: 1000, burst: 4000 }
  free: {}
routes: null
default_scope: null
""")
write("config", "routes", """\
upstream: { url: "http://[::1]:9000", timeout: 30s }
tls: { cert: /etc/tls/tls.crt, key: /etc/tls/tls.key }
routes:
  - { method: GET, path: /v1/models, scope: inference:read }
  - { method: POST, path: /v1/chat/completions, scope: inference:write }
  - { method: "*", path: /v1/files/*, scope: files }
  - { method: GET, path: /health, public: true }
default_scope: read
""")
write("config", "rest-and-errors", """\
routes: rest
limits: { max_header_bytes: 512, stream_idle_timeout: forever }
auth: { key_prefix: "t-g", argon2: { memory_kib: 4, parallelism: 1 } }
tiers: { "bad name": { burst: 5 } }
unknown_field: 1
""")
write("config", "anchors", """\
defaults: &tier { requests_per_second: 10, burst: 20 }
tiers:
  a: *tier
  b: { <<: *tier, daily_requests: 100 }
""")


# --- pipeline: what a client sends on one connection ---
def http1(method, path, headers=(), body=None, chunked=False):
    lines = [f"{method} {path} HTTP/1.1", "Host: api.local"]
    lines += [f"{k}: {v}" for k, v in headers]
    data = b""
    if body is not None:
        body = body.encode() if isinstance(body, str) else body
        if chunked:
            lines.append("Transfer-Encoding: chunked")
            half = len(body) // 2
            for part in (body[:half], body[half:]):
                data += f"{len(part):x}\r\n".encode() + part + b"\r\n"
            data += b"0\r\n\r\n"
        else:
            lines.append(f"Content-Length: {len(body)}")
            data = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def auth(k):
    return [("Authorization", f"Bearer {k}")]


CHAT = '{"model":"m","messages":[{"role":"user","content":"hi"}]}'
CHAT_STREAM = '{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
for name, v in {
    "models": http1("GET", "/v1/models", auth(INFER)),
    "models-hop": http1("GET", "/v1/models/hop?status=203", auth(INFER) + [("Connection", "close")]),
    "chat": http1("POST", "/v1/chat/completions", auth(INFER) + [("Content-Type", "application/json")], CHAT),
    "chat-stream": http1("POST", "/v1/chat/completions", auth(INFER) + [("Accept", "text/event-stream")], CHAT_STREAM),
    "embeddings-chunked": http1("POST", "/v1/embeddings", auth(INFER), '{"model":"e","input":"abc"}', chunked=True),
    "expect-continue": http1("POST", "/v1/completions", auth(INFER) + [("Expect", "100-continue")], '{"prompt":"x"}'),
    "public": http1("GET", "/health", [("X-Tollgate-Org", "evil"), ("Authorization", f"Bearer {INFER}")]),
    "files-any-method": http1("PUT", "/v1/files/a.txt", auth(ADMIN), "contents"),
    "keys-list": http1("GET", "/v1/keys", auth(ADMIN)),
    "keys-create": http1("POST", "/v1/keys", auth(ADMIN), '{"scopes":["inference:read"],"name":"n","expires_in":"1h"}'),
    "keys-get-audit": http1("GET", "/v1/keys/FuzzAdmin001", auth(ADMIN)) + http1("GET", "/v1/keys/FuzzAdmin001/audit", auth(ADMIN)),
    "keys-rotate": http1("POST", "/v1/keys/FuzzAdmin001/rotate", auth(ADMIN), ""),
    "keys-revoke-restore": http1("POST", "/v1/keys/FuzzAdmin001/revoke", auth(ADMIN), "") + http1("POST", "/v1/keys/FuzzAdmin001/restore", auth(ADMIN), ""),
    "scope-denied": http1("GET", "/v1/keys", auth(INFER)),
    "pipelined": http1("GET", "/v1/models", auth(INFER)) + http1("POST", "/v1/embeddings", auth(INFER), '{"input":"a"}') + http1("GET", "/nope", auth(INFER)),
    "rate-limited": http1("GET", "/v1/models", auth(LIMIT)) + http1("GET", "/v1/models", auth(LIMIT)),
    "bad-keys": b"".join(http1("GET", "/v1/models", h) for h in (
        [], auth(TYPO), auth(UNKNOWN), auth(WRONG), auth(REVOKED), auth(EXPIRED), auth(WORKSPACE),
        [("Authorization", "Basic dXNlcjpwYXNz")], auth(INFER) + auth(ADMIN))),
    "bad-targets": http1("GET", "/v1/models?api_key=" + INFER) + http1("GET", "/v1/%2e%2e/keys", auth(INFER))
    + http1("GET", "http://evil.example/v1/models", auth(INFER)),
    "big-header": http1("GET", "/v1/models", auth(INFER) + [("X-Big", "a" * 5000)]),
    "body-too-large": http1("POST", "/v1/chat/completions", auth(INFER) + [("Content-Length", "100000000")]),
    "http10": b"GET /v1/models HTTP/1.0\r\nAuthorization: Bearer " + INFER.encode() + b"\r\n\r\n",
    "upgrade-h2c": http1("GET", "/v1/models", auth(INFER) + [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")]),
}.items():
    write("pipeline", name, v)


# h2c with prior knowledge: the preface, SETTINGS, then HEADERS (HPACK literals without
# indexing or Huffman coding) and DATA frames.
def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack(headers):
    out = b""
    for k, v in headers:
        k, v = k.encode(), v.encode()
        assert len(k) < 127 and len(v) < 127
        out += b"\x00" + bytes([len(k)]) + k + bytes([len(v)]) + v
    return out


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = frame(4, 0, 0, struct.pack(">HI", 4, 65535))  # INITIAL_WINDOW_SIZE
SETTINGS_ACK = frame(4, 1, 0)
END_STREAM, END_HEADERS = 0x1, 0x4


def h2_request(stream, method, path, key=None, body=None, extra=()):
    hs = [(":method", method), (":scheme", "http"), (":authority", "api.local"), (":path", path)]
    if key:
        hs.append(("authorization", f"Bearer {key}"))
    hs += list(extra)
    if body is None:
        return frame(1, END_HEADERS | END_STREAM, stream, hpack(hs))
    hs.append(("content-length", str(len(body))))
    return frame(1, END_HEADERS, stream, hpack(hs)) + frame(0, END_STREAM, stream, body.encode())


h2 = PREFACE + SETTINGS + SETTINGS_ACK
for name, v in {
    "h2c-models": h2 + h2_request(1, "GET", "/v1/models", INFER),
    "h2c-chat-stream": h2 + h2_request(1, "POST", "/v1/chat/completions", INFER, CHAT_STREAM),
    "h2c-concurrent": h2 + h2_request(1, "GET", "/v1/models", INFER) + h2_request(3, "POST", "/v1/keys", ADMIN, '{"scopes":["files"]}')
    + h2_request(5, "GET", "/health") + h2_request(7, "GET", "/v1/models", LIMIT),
    "h2c-bad": h2 + h2_request(1, "GET", "/v1/models?token=x", INFER) + h2_request(3, "GET", "/v1/./models", INFER)
    + h2_request(5, "GET", "/v1/models", TYPO, extra=[("x-tollgate-org", "evil")]),
    "h2c-ping-goaway": h2 + frame(6, 0, 0, b"\x00" * 8) + h2_request(1, "GET", "/v1/models", INFER) + frame(7, 0, 0, b"\x00" * 8),
    "h2c-rst": h2 + frame(1, END_HEADERS, 1, hpack([(":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", "/v1/embeddings"), ("authorization", f"Bearer {INFER}")]))
    + frame(0, 0, 1, b'{"input":') + frame(3, 0, 1, struct.pack(">I", 8)),
}.items():
    write("pipeline", name, v)

# --- regressions: inputs that once failed, replayed by run.sh ---
def regression(target, name, data):
    d = os.path.join(HERE, "regressions", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# The in-flight gauge went up for good when a request was dropped before its response: the
# client reset its HTTP/2 stream, or hung up on HTTP/1.1 while the upstream took its time.
regression("pipeline", "inflight-leak-h2-reset", h2 + frame(1, END_HEADERS, 1, hpack([
    (":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", "/v1/embeddings"),
    ("authorization", f"Bearer {INFER}")])) + frame(0, 0, 1, b'{"input":') + frame(3, 0, 1, struct.pack(">I", 8)))
regression("pipeline", "inflight-leak-h1-hangup", http1("GET", "/v1/models/slow", auth(INFER)))

if __name__ == "__main__":
    for t in sorted(os.listdir(os.path.join(HERE, "corpus"))):
        print(t, len(os.listdir(os.path.join(HERE, "corpus", t))))
