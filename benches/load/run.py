#!/usr/bin/env python3
"""Whole-proxy load benchmark: direct upstream vs tollgate vs nginx vs haproxy, interleaved.

    python3 benches/load/run.py              # full run (~22 min), writes benches/results/<date>-<host>.md
    python3 benches/load/run.py --smoke      # ~1 min smoke run (CI): every step once, short

Every proxy is pinned to CPU 1 with one worker (tollgate's runtime sizes itself from its CPU
affinity; nginx `worker_processes 1`; haproxy `nbthread 1`); the upstream and the load
generators share CPU 0. Peers are configured fairly: nginx with `keepalive`,
`proxy_http_version 1.1`, `Connection ""` and `proxy_buffering off`; haproxy with keep-alive
to the server; no access logs anywhere (tollgate at `log.level: warn`).

Scenarios: S1 saturation (wrk, HTTP/1.1 keep-alive; h2load, h2c), S2 added latency at fixed
load (oha, open loop with latency correction; skipped when oha is not installed), S3 added
delay per SSE event, S4 key scaling (1 / 10,000 / 1,000,000 stored keys, up to 100,000 hot),
S5 auth flood, S6 a soak at saturation (RSS over --soak seconds, 10 minutes by default), and
proxy CPU-ms per 1,000 requests and RSS (idle / under load) from /proc.
Needs: wrk, h2load (nghttp2-client), nginx, haproxy (Debian packages); oha (cargo install oha).
"""
import argparse
import datetime
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BODY = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "Say ok."}], "max_tokens": 1})


BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def base62(n, width):
    out = ""
    for _ in range(width):
        n, r = divmod(n, 62)
        out = BASE62[r] + out
    return out


def well_formed_key(key_id=None, prefix="tg"):
    """A key with a valid checksum (SPEC §2): unknown id, or a wrong secret for `key_id`."""
    import random
    import zlib
    rnd = random.SystemRandom()
    key_id = key_id or "".join(rnd.choice(BASE62) for _ in range(12))
    body = f"{prefix}_{key_id}_" + "".join(rnd.choice(BASE62) for _ in range(32))
    return body + base62(zlib.crc32(body.encode()), 6)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def warm_key(port, key, created, timeout=60):
    """Until a request with `key` is answered 200, then past the revocation poll's overlap
    window (a key changed in the last 2 s is re-read once, dropping it from the cache): S1
    measures cached keys; a new key's first request (its Argon2id verification, at nice 19, so
    slow on a busy core) is S4's and F2's to measure."""
    deadline = time.time() + timeout
    while True:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            c.request("POST", "/v1/chat/completions", BODY,
                      {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            status = c.getresponse().status
        except OSError:
            status = None
        finally:
            c.close()
        if status == 200 and time.time() > created + 3:
            return
        if time.time() > deadline:
            raise RuntimeError(f"the benchmark key was not admitted within {timeout} s (last status {status})")
        time.sleep(0.2)


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def sh(*args, **kw):
    return subprocess.run(list(args), capture_output=True, text=True, check=True, **kw).stdout


def version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "not installed"


def family(pid):
    """The process and its children (nginx's and haproxy's workers are children of a master)."""
    pids = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            pids += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
        except OSError:
            pass
    return pids


def cpu_ticks(pid):
    total = 0
    for p in family(pid):
        fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def rss_kib(pid):
    total = 0
    for p in family(pid):
        for line in open(f"/proc/{p}/status"):
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


class Target:
    def __init__(self, name, h1_port, h2_port, pid, auth):
        self.name, self.h1_port, self.h2_port, self.pid, self.auth = name, h1_port, h2_port, pid, auth

    def url(self, h2=False, path="/v1/chat/completions"):
        return f"http://127.0.0.1:{self.h2_port if h2 else self.h1_port}{path}"


NEVER_LIMITS = "{ requests_per_second: 1000000000, burst: 1000000000 }"


def write_config(path, port, admin, upstream_port, store_dir, extra="", store=None, tier=NEVER_LIMITS):
    """A tollgate config for the benchmark: a tier that never limits (unless `tier` gives other
    limits, YAML flow text), logs at warn only. The store is SQLite in `store_dir` unless `store`
    gives another (YAML flow text)."""
    store = store or f'{{ sqlite: "{store_dir}/keys.db" }}'
    with open(path, "w") as f:
        f.write(f"""listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin}
upstream: {{ url: "http://127.0.0.1:{upstream_port}" }}
store: {store}
log: {{ format: json, level: warn }}
tiers: {{ bench: {tier} }}
""" + extra)


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="tollgate-load-")
        self.procs = []
        self.results = {}

    def spawn(self, cmd, cpu, **kw):
        p = subprocess.Popen(["taskset", "-c", str(cpu)] + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def build(self):
        subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "tollgate", "--example", "load-upstream"],
                       cwd=ROOT, check=True)
        self.tollgate_bin = os.path.join(ROOT, "target/release/tollgate")
        self.upstream_bin = os.path.join(ROOT, "target/release/examples/load-upstream")

    def create_key(self, config):
        return sh(self.tollgate_bin, "keys", "--config", config, "create", "--org", "bench", "--tier", "bench",
                  "--scope", "inference:read", "--scope", "inference:write").splitlines()[0]

    def start(self):
        up = free_port()
        self.spawn([self.upstream_bin, f"127.0.0.1:{up}"], 0)
        wait_port(up)
        self.direct = Target("direct", up, up, None, "")

        tg, tg_admin = free_port(), free_port()
        config = os.path.join(self.tmp, "tollgate.yaml")
        write_config(config, tg, tg_admin, up, self.tmp)
        key = self.create_key(config)
        created = time.time()
        p = self.spawn([self.tollgate_bin, "serve", "--config", config], 1)
        wait_port(tg)
        warm_key(tg, key, created)
        self.tollgate = Target("tollgate", tg, tg, p.pid, key)
        self.tollgate_admin = tg_admin

        # The same tollgate with the benchmarked route public (`public: true`): no key check, no
        # limits, no rate-limit headers — what tollgate's own features cost (S1 only).
        nk, nk_admin = free_port(), free_port()
        nk_config = os.path.join(self.tmp, "tollgate-nokey.yaml")
        write_config(nk_config, nk, nk_admin, up, self.tmp,
                     "routes:\n  - { method: POST, path: /v1/chat/completions, public: true }\n")
        p = self.spawn([self.tollgate_bin, "serve", "--config", nk_config], 1)
        wait_port(nk)
        self.tollgate_nokey = Target("tollgate (no key check)", nk, nk, p.pid, "")

        n1, n2 = free_port(), free_port()
        os.makedirs(os.path.join(self.tmp, "nginx"), exist_ok=True)
        location = f"""location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
                       proxy_buffering off; proxy_request_buffering off; }}"""
        nginx_conf = os.path.join(self.tmp, "nginx.conf")
        with open(nginx_conf, "w") as f:
            f.write(f"""worker_processes 1; daemon off; pid {self.tmp}/nginx.pid; error_log stderr error;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {self.tmp}/nginx/body; proxy_temp_path {self.tmp}/nginx/proxy;
  fastcgi_temp_path {self.tmp}/nginx/fcgi; uwsgi_temp_path {self.tmp}/nginx/uwsgi; scgi_temp_path {self.tmp}/nginx/scgi;
  keepalive_requests 1000000;
  upstream up {{ server 127.0.0.1:{up}; keepalive 128; keepalive_requests 1000000; }}
  server {{ listen 127.0.0.1:{n1}; {location} }}
  server {{ listen 127.0.0.1:{n2} http2; {location} }}
}}
""")
        p = self.spawn(["nginx", "-c", nginx_conf, "-p", self.tmp], 1)
        wait_port(n1)
        self.nginx = Target("nginx", n1, n2, p.pid, "")

        h1, h2 = free_port(), free_port()
        haproxy_cfg = os.path.join(self.tmp, "haproxy.cfg")
        with open(haproxy_cfg, "w") as f:
            f.write(f"""global
  nbthread 1
  maxconn 8192
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 600s
  option http-keep-alive
  option http-no-delay
  http-reuse always
frontend h1
  bind 127.0.0.1:{h1}
  default_backend up
frontend h2
  bind 127.0.0.1:{h2} proto h2
  default_backend up
backend up
  server up 127.0.0.1:{up}
""")
        p = self.spawn(["haproxy", "-f", haproxy_cfg], 1)
        wait_port(h1)
        self.haproxy = Target("haproxy", h1, h2, p.pid, "")
        self.targets = [self.direct, self.tollgate, self.nginx, self.haproxy]
        self.s1_targets = [self.direct, self.tollgate, self.tollgate_nokey, self.nginx, self.haproxy]
        time.sleep(0.5)
        for t in self.s1_targets:
            if t.pid:
                self.results.setdefault(t.name, {})["rss_idle_kib"] = rss_kib(t.pid)

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- S1 -------------------------------------------------------------------------------
    def post_script(self, t):
        """wrk's script for S1's request to `t` (with its key, if it has one)."""
        script = os.path.join(self.tmp, "post.lua")
        with open(script, "w") as f:
            f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\n'
                    f'wrk.headers["Content-Type"] = "application/json"\n')
            if t.auth:
                f.write(f'wrk.headers["Authorization"] = "Bearer {t.auth}"\n')
        return script

    def wrk(self, t):
        script = self.post_script(t)
        cmd = ["taskset", "-c", "0", "wrk", "-t1", "-c64", f"-d{self.args.duration}s", "-s", script, t.url()]
        return self.measured(t, cmd, lambda out: float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
                             lambda out: int(re.search(r"(\d+) requests in", out).group(1)))

    def h2load(self, t):
        data = os.path.join(self.tmp, "body.json")
        with open(data, "w") as f:
            f.write(BODY)
        cmd = ["taskset", "-c", "0", "h2load", "-c16", "-m16", "-D", str(self.args.duration), "-d", data,
               "-H", "content-type: application/json"]
        if t.auth:
            cmd += ["-H", f"authorization: Bearer {t.auth}"]
        cmd.append(t.url(h2=True))

        def reqs(out):
            m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
            assert m and int(m.group(2)) > 0, out
            return int(m.group(2))
        return self.measured(t, cmd, lambda out: float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1)), reqs)

    def measured(self, t, cmd, rate_of, count_of):
        ticks0 = cpu_ticks(t.pid) if t.pid else 0
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peak = 0
        while proc.poll() is None:
            if t.pid:
                peak = max(peak, rss_kib(t.pid))
            time.sleep(0.2)
        out = proc.stdout.read()
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[2]} failed for {t.name}: {out}")
        rate, n = rate_of(out), count_of(out)
        cpu_ms = (cpu_ticks(t.pid) - ticks0) * 1000 / os.sysconf("SC_CLK_TCK") if t.pid else 0
        return {"rps": rate, "requests": n, "cpu_ms_per_1000": cpu_ms * 1000 / max(n, 1), "rss_peak_kib": peak}

    def s1(self):
        for protocol, run in (("http1", self.wrk), ("h2c", self.h2load)):
            for _ in range(self.args.rounds):
                for t in self.s1_targets:  # interleaved: direct, tollgate, nginx, haproxy, direct, …
                    r = run(t)
                    self.results.setdefault(t.name, {}).setdefault(protocol, []).append(r)
                    print(f"S1 {protocol:5} {t.name:8} {r['rps']:10.0f} req/s  cpu {r['cpu_ms_per_1000']:6.1f} ms/1k", flush=True)

    # -- S2 -------------------------------------------------------------------------------
    def s2(self):
        oha = shutil.which("oha") or os.path.expanduser("~/.cargo/bin/oha")
        if not os.path.exists(oha):
            print("S2 skipped: oha is not installed (cargo install oha)")
            return
        saturation = statistics.median(r["rps"] for r in self.results["tollgate"]["http1"])
        for share in (0.25, 0.5, 0.75):
            rate = max(1, int(saturation * share))
            for t in self.targets:
                cmd = ["taskset", "-c", "0", oha, "-z", f"{self.args.duration}s", "-q", str(rate), "--latency-correction",
                       "-c", "32", "--no-tui", "--output-format", "json", "-m", "POST", "-d", BODY,
                       "-H", "content-type: application/json"]
                if t.auth:
                    cmd += ["-H", f"authorization: Bearer {t.auth}"]
                out = subprocess.run(cmd + [t.url()], capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(f"oha failed: {out.stderr}")
                pct = json.loads(out.stdout)["latencyPercentiles"]
                self.results.setdefault(t.name, {}).setdefault("s2", {})[share] = {"p50": pct["p50"], "p99": pct["p99"]}
                print(f"S2 {int(share * 100):3}% {t.name:8} p50 {pct['p50'] * 1e6:8.0f} µs  p99 {pct['p99'] * 1e6:8.0f} µs", flush=True)

    # -- S3 -------------------------------------------------------------------------------
    def s3(self):
        events = 20 if self.args.smoke else 100
        for t in self.targets:
            delays = []
            for _ in range(2 if self.args.smoke else 5):
                conn = http.client.HTTPConnection("127.0.0.1", t.h1_port, timeout=30)
                headers = {"x-mock": "sse", "x-mock-events": str(events), "x-mock-interval-ms": "10",
                           "content-type": "application/json"}
                if t.auth:
                    headers["authorization"] = f"Bearer {t.auth}"
                conn.request("POST", "/v1/chat/completions", body=BODY, headers=headers)
                rsp = conn.getresponse()
                assert rsp.status == 200, rsp.status
                while True:
                    line = rsp.fp.readline()
                    if not line or line.startswith(b"data: [DONE]"):
                        break
                    if line.startswith(b"data: "):
                        sent = json.loads(line[6:])["t"]
                        delays.append((time.time_ns() - sent) / 1000)
                conn.close()
            delays.sort()
            q = lambda p: delays[min(len(delays) - 1, int(p * len(delays)))]
            self.results.setdefault(t.name, {})["s3"] = {"p50_us": q(0.5), "p99_us": q(0.99)}
            print(f"S3 sse   {t.name:8} per-event delay p50 {q(0.5):7.0f} µs  p99 {q(0.99):7.0f} µs", flush=True)

    # -- S4 -------------------------------------------------------------------------------
    def s4(self):
        """Key scaling: 1, 10,000 and 1,000,000 keys in the store, up to 100,000 of them hot.

        Each size gets its own tollgate (pinned like the others) and SQLite file. The keys are
        clones of one key created by the CLI, under new ids: they share its secret, so one cheap
        Argon2id hash (m=8 KiB, t=1 — hashing cost is S5's subject, not this one's) serves them
        all, yet each is a distinct token with its own cache entry."""
        import sqlite3
        import zlib
        sizes = (1, 1000, 20000) if self.args.smoke else (1, 10_000, 1_000_000)
        hot_max = 2000 if self.args.smoke else 100_000
        for n in sizes:
            tmp = os.path.join(self.tmp, f"s4-{n}")
            os.makedirs(tmp)
            port, admin = free_port(), free_port()
            config = os.path.join(tmp, "tollgate.yaml")
            write_config(config, port, admin, self.direct.h1_port, tmp,
                         f"auth: {{ argon2: {{ memory_kib: 8, iterations: 1, parallelism: 1 }}, cache_capacity: {hot_max} }}\n")
            key = self.create_key(config)
            prefix, real_id, rest = key.split("_", 2)
            secret = rest[:-6]
            tokens = [key]
            db = sqlite3.connect(os.path.join(tmp, "keys.db"))
            cols = [r[1] for r in db.execute("PRAGMA table_info(keys)")]
            copy = ", ".join("?" if c == "id" else c for c in cols)
            ids = []
            for i in range(1, n):
                kid = "S4" + base62(i, 10)
                ids.append((kid, real_id))
                if len(tokens) < hot_max:
                    body = f"{prefix}_{kid}_{secret}"
                    tokens.append(body + base62(zlib.crc32(body.encode()), 6))
            with db:
                db.executemany(f"INSERT INTO keys ({', '.join(cols)}) SELECT {copy} FROM keys WHERE id = ?", ids)
                # Old changes: the revocation poll of a fresh tollgate must not see them as new
                # and invalidate the warm cache.
                db.execute("UPDATE keys SET updated_at = 0")
            stored = db.execute("SELECT count(*) FROM keys").fetchone()[0]
            db.close()
            proc = self.spawn([self.tollgate_bin, "serve", "--config", config], 1)
            wait_port(port)
            time.sleep(0.5)
            idle = rss_kib(proc.pid)
            script = os.path.join(tmp, "keys.lua")
            with open(script, "w") as f:
                f.write("local tokens = {" + ",".join(f'"{t}"' for t in tokens) + "}\n")
                f.write("local i = 0\n")
                f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\n'
                        'wrk.headers["Content-Type"] = "application/json"\n')
                f.write("request = function()\n  i = i % #tokens + 1\n"
                        "  wrk.headers[\"Authorization\"] = \"Bearer \" .. tokens[i]\n  return wrk.format()\nend\n")
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            target = Target(f"tollgate, {n} keys", port, port, proc.pid, "")
            # Warm-up: every hot key once (a cache miss, a store read and one Argon2id each).
            warm = ["taskset", "-c", "0", "wrk", "-t1", "-c64", f"-d{max(3, len(tokens) // 4000 + 3)}s", "-s", script, url]
            sh(*warm)
            verified = self.metric("tollgate_argon2_verifications_total", admin)
            warm_rss = rss_kib(proc.pid)
            cmd = ["taskset", "-c", "0", "wrk", "-t1", "-c64", f"-d{self.args.duration}s", "-s", script, url]
            r = self.measured(target, cmd, lambda out: float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
                              lambda out: int(re.search(r"(\d+) requests in", out).group(1)))
            proc.terminate()
            proc.wait(timeout=30)
            # Per cached key: growth beyond the one-key run's (connections, buffers, runtime).
            base = self.results["s4"][0]["rss_warm_kib"] if self.results.get("s4") else warm_rss
            per_key = (warm_rss - base) * 1024 / max(len(tokens) - 1, 1)
            self.results.setdefault("s4", []).append({
                "keys": stored, "hot": len(tokens), "verified": verified, "rps": r["rps"],
                "cpu_ms_per_1000": r["cpu_ms_per_1000"], "rss_idle_kib": idle, "rss_warm_kib": warm_rss,
                "rss_peak_kib": max(r["rss_peak_kib"], warm_rss), "bytes_per_key": per_key})
            print(f"S4 {stored:8} keys, {len(tokens):6} hot ({verified:.0f} verified): {r['rps']:8.0f} req/s, "
                  f"RSS idle {idle / 1024:.1f} MiB, warm {warm_rss / 1024:.1f} MiB, {per_key:.0f} B per cached key",
                  flush=True)

    # -- S5 -------------------------------------------------------------------------------
    def metric(self, name, admin=None):
        body = http.client.HTTPConnection("127.0.0.1", admin or self.tollgate_admin, timeout=5)
        body.request("GET", "/metrics")
        text = body.getresponse().read().decode()
        return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name))

    def s5(self):
        """Auth flood: random well-formed keys and wrong secrets for a real id while a valid key is
        measured at a fixed rate (open loop). Two floods: about --flood-rate requests/s (the
        goal's case: tollgate has CPU to spare, the valid key must not notice), then as fast as
        wrk goes (tollgate's core saturated: queueing is unavoidable; shown for the record)."""
        oha = shutil.which("oha") or os.path.expanduser("~/.cargo/bin/oha")
        if not os.path.exists(oha):
            print("S5 skipped: oha is not installed (cargo install oha)")
            return
        real_id = self.tollgate.auth.split("_")[1]
        tokens = [well_formed_key() for _ in range(5000)] + [well_formed_key(real_id) for _ in range(5000)]
        rate = 1000
        valid = ["taskset", "-c", "0", oha, "-z", f"{self.args.duration}s", "-q", str(rate), "--latency-correction",
                 "-c", "16", "--no-tui", "--output-format", "json", "-H", f"authorization: Bearer {self.tollgate.auth}",
                 self.tollgate.url(path="/v1/models")]
        base = json.loads(sh(*valid))["latencyPercentiles"]
        rows = []
        for flood_rate in (self.args.flood_rate, None):
            script = os.path.join(self.tmp, "flood.lua")
            with open(script, "w") as f:
                f.write("local tokens = {" + ",".join(f'"{t}"' for t in tokens) + "}\n")
                f.write("request = function()\n  local t = tokens[math.random(#tokens)]\n"
                        "  return wrk.format(\"GET\", \"/v1/models\", {[\"Authorization\"] = \"Bearer \" .. t})\nend\n")
                if flood_rate:
                    # 64 connections, each pausing between requests (wrk's delay hook, in ms).
                    f.write(f"delay = function() return {64 * 1000 / flood_rate:.3f} end\n")
            argon_before = self.metric("tollgate_argon2_verifications_total")
            flood = subprocess.Popen(["taskset", "-c", "0", "wrk", "-t1", "-c64", f"-d{self.args.duration + 2}s", "-s",
                                      script, self.tollgate.url(path="/v1/models")], stdout=subprocess.PIPE, text=True)
            time.sleep(1)
            under = json.loads(sh(*valid))["latencyPercentiles"]
            peak = rss_kib(self.tollgate.pid)
            out = flood.communicate()[0]
            flood_rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
            argon = self.metric("tollgate_argon2_verifications_total") - argon_before
            rows.append({"kind": f"paced (--flood-rate {flood_rate})" if flood_rate else "as fast as wrk goes",
                         "base_p99": base["p99"], "flood_p99": under["p99"], "flood_rps": flood_rps,
                         "argon2": argon, "rss_kib": peak})
            print(f"S5 flood {flood_rps:.0f} req/s of bad keys: valid p99 {base['p99'] * 1e6:.0f} -> "
                  f"{under['p99'] * 1e6:.0f} µs, argon2 verifications {argon:.0f}, RSS {peak / 1024:.1f} MiB", flush=True)
        self.results["s5"] = rows

    # -- S6 -------------------------------------------------------------------------------
    def s6(self):
        """Soak: tollgate at saturation (wrk, HTTP/1.1) for --soak seconds, RSS sampled every 10 s —
        the memory goal is RSS flat over a 10-minute run."""
        t = self.tollgate
        script = os.path.join(self.tmp, "soak.lua")
        with open(script, "w") as f:
            f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\n'
                    f'wrk.headers["Content-Type"] = "application/json"\n'
                    f'wrk.headers["Authorization"] = "Bearer {t.auth}"\n')
        proc = subprocess.Popen(["taskset", "-c", "0", "wrk", "-t1", "-c64", f"-d{self.args.soak}s", "-s", script, t.url()],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        samples, started = [], time.time()
        while proc.poll() is None:
            samples.append((time.time() - started, rss_kib(t.pid)))
            time.sleep(min(10, max(1, self.args.soak / 10)))
        out = proc.stdout.read()
        n = int(re.search(r"(\d+) requests in", out).group(1))
        # The first minute warms allocator arenas and pools; flatness is judged after it.
        settled = [r for at, r in samples if at >= min(60, self.args.soak / 2)] or [samples[-1][1]]
        self.results["s6"] = {"seconds": self.args.soak, "requests": n, "first": samples[0][1], "settled_min": min(settled),
                              "settled_max": max(settled), "last": samples[-1][1]}
        print(f"S6 soak {self.args.soak}s, {n} requests: RSS {samples[0][1] / 1024:.1f} MiB at start, "
              f"{min(settled) / 1024:.1f}–{max(settled) / 1024:.1f} MiB after the first minute, "
              f"{samples[-1][1] / 1024:.1f} MiB at the end", flush=True)

    # -- report ---------------------------------------------------------------------------
    def report(self, command):
        med = lambda name, proto: statistics.median(r["rps"] for r in self.results[name][proto])
        lines = [f"# Load benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {socket.gethostname()}", ""]
        lines += ["Command: `" + command + "`", ""]
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        lines += [f"- machine: {os.cpu_count()} CPUs ({cpu}), kernel {os.uname().release}",
                  f"- tollgate {sh('git', '-C', ROOT, 'rev-parse', '--short', 'HEAD').strip()}; "
                  f"{version(['nginx', '-v'])}; {version(['haproxy', '-v'])}; {version(['wrk', '-v'])}; "
                  f"{version(['h2load', '--version'])}",
                  f"- duration {self.args.duration}s per run, {self.args.rounds} interleaved round(s); proxies pinned to CPU 1, "
                  "upstream and load generators to CPU 0", ""]
        s1 = "http1" in self.results.get("direct", {})
        if s1:
            lines += ["## S1 saturation (median req/s) and proxy cost", "",
                      "| target | HTTP/1.1 req/s | × nginx | h2c req/s | × nginx | CPU-ms / 1k req (h1) | RSS idle | RSS peak |",
                      "|---|---|---|---|---|---|---|---|"]
        for t in self.s1_targets if s1 else []:
            r = self.results[t.name]
            h1, h2 = med(t.name, "http1"), med(t.name, "h2c")
            cpu_ms = statistics.median(x["cpu_ms_per_1000"] for x in r["http1"]) if t.pid else 0
            peak = max(x["rss_peak_kib"] for x in r["http1"] + r["h2c"]) if t.pid else 0
            lines.append(f"| {t.name} | {h1:.0f} | {h1 / med('nginx', 'http1'):.2f} | {h2:.0f} | {h2 / med('nginx', 'h2c'):.2f} | "
                         + (f"{cpu_ms:.1f} | {r['rss_idle_kib'] / 1024:.1f} MiB | {peak / 1024:.1f} MiB |" if t.pid else "– | – | – |"))
        if "s2" in self.results.get("direct", {}):
            lines += ["", "## S2 added latency at fixed load (proxied − direct), open loop", "",
                      "| load (share of tollgate's saturation) | target | added p50 | added p99 |", "|---|---|---|---|"]
            for share, base in self.results["direct"]["s2"].items():
                for t in self.targets[1:]:
                    s = self.results[t.name]["s2"][share]
                    lines.append(f"| {int(share * 100)}% | {t.name} | {(s['p50'] - base['p50']) * 1e6:.0f} µs | {(s['p99'] - base['p99']) * 1e6:.0f} µs |")
        if s1:
            own = lambda proto: med("tollgate", proto) / med("tollgate (no key check)", proto)
            lines += ["", f"tollgate with key check, limits and their headers ÷ tollgate without (public route): "
                      f"{own('http1'):.2f} (HTTP/1.1), {own('h2c'):.2f} (h2c)."]
        s3 = "s3" in self.results.get("direct", {})
        if s3:
            lines += ["", "## S3 SSE: added delay per event (proxied − direct)", "", "| target | added p50 | added p99 |", "|---|---|---|"]
            base = self.results["direct"]["s3"]
        for t in self.targets[1:] if s3 else []:
            s = self.results[t.name]["s3"]
            lines.append(f"| {t.name} | {s['p50_us'] - base['p50_us']:.0f} µs | {s['p99_us'] - base['p99_us']:.0f} µs |")
        if "s5" in self.results:
            lines += ["", "## S5 auth flood (random well-formed keys + wrong secrets for a real id)", "",
                      "| flood | flood req/s | valid-key p99 before | during | × | Argon2id verifications during the flood | tollgate RSS |",
                      "|---|---|---|---|---|---|---|"]
            for r in self.results["s5"]:
                lines.append(f"| {r['kind']} | {r['flood_rps']:.0f} | {r['base_p99'] * 1e6:.0f} µs | {r['flood_p99'] * 1e6:.0f} µs | "
                             f"{r['flood_p99'] / r['base_p99']:.2f} | {r['argon2']:.0f} | {r['rss_kib'] / 1024:.1f} MiB |")
        if "s4" in self.results:
            lines += ["", "## S4 key scaling (keys in the store, hot keys cycled by wrk, HTTP/1.1)", "",
                      "| keys stored | hot keys | Argon2id verifications (warm-up) | req/s | CPU-ms / 1k req | RSS idle | RSS warm | bytes per cached key (over the 1-key run) |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in self.results["s4"]:
                lines.append(f"| {r['keys']} | {r['hot']} | {r['verified']:.0f} | {r['rps']:.0f} | {r['cpu_ms_per_1000']:.1f} | "
                             f"{r['rss_idle_kib'] / 1024:.1f} MiB | {r['rss_warm_kib'] / 1024:.1f} MiB | {r['bytes_per_key']:.0f} |")
        if "s6" in self.results:
            r = self.results["s6"]
            lines += ["", f"## S6 soak: {r['seconds']} s at saturation (HTTP/1.1), tollgate RSS", "",
                      "| requests | RSS at start | RSS min / max after the first minute | RSS at the end |", "|---|---|---|---|",
                      f"| {r['requests']} | {r['first'] / 1024:.1f} MiB | {r['settled_min'] / 1024:.1f} / {r['settled_max'] / 1024:.1f} MiB | "
                      f"{r['last'] / 1024:.1f} MiB |"]
        lines.append("")
        return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="short runs, one round, no results file")
    ap.add_argument("--out", default=os.path.join(ROOT, "benches", "results"))
    ap.add_argument("--soak", type=int, default=600, help="seconds of the S6 soak run (smoke: 3)")
    ap.add_argument("--flood-rate", type=int, default=30000, help="S5 flood requests per second (about)")
    ap.add_argument("--only", default="s1,s2,s3,s4,s5,s6",
                    help="comma-separated scenarios to run (a partial run writes no results file)")
    args = ap.parse_args()
    if args.smoke:
        args.duration, args.rounds, args.soak = 1, 1, 3
    for tool in ("wrk", "h2load", "nginx", "haproxy", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed: apt-get install wrk nghttp2-client nginx-light haproxy util-linux")
    bench = Bench(args)
    bench.build()
    try:
        bench.start()
        only = set(args.only.split(","))
        for name in ("s1", "s2", "s3", "s4", "s5", "s6"):
            if name in only and not (name == "s2" and args.smoke):
                getattr(bench, name)()
    finally:
        bench.stop()
    report = bench.report(" ".join(["python3", "benches/load/run.py"] + sys.argv[1:]))
    print(report)
    if not args.smoke and only == {"s1", "s2", "s3", "s4", "s5", "s6"}:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"{datetime.date.today()}-{socket.gethostname()}.md")
        with open(path, "w") as f:
            f.write(report)
        print(f"written to {path}")


if __name__ == "__main__":
    main()
