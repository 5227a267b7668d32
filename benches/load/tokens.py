#!/usr/bin/env python3
"""Token limits benchmark (SPEC §12): tollgate with the benchmarked tier's token limits on vs off.

    python3 benches/load/tokens.py           # full run (≈ 3 min after the build), writes benches/results/<date>-<host>-tokens.md
    python3 benches/load/tokens.py --smoke   # ≈ 30 s smoke run (CI): every step once, short

Two tollgates, identical but for the tier of their key: `tokens off` has run.py's tier (requests
per second only); `tokens on` adds `tokens_per_minute`, `daily_tokens` and
`max_concurrent_requests`, all too large to refuse anything, so every request pays for what
token limits cost: the JSON body read and parsed before admission (the estimate), the
reservation, the concurrency slot, the response's usage parsed as its bytes pass, the
settlement, the token headers. One mock upstream (`upstream.rs`) for both.

- T1 non-streaming throughput: `wrk -t1 -c64` (HTTP/1.1) of run.py's S1 request (a small JSON
  `POST /v1/chat/completions`; the upstream's completion carries `usage`), interleaved rounds
  (off, on, off, …); req/s medians, the on / off ratio, CPU-ms per 1,000 requests.
- T2 SSE added delay per event: as run.py's S3 (the upstream stamps each event with its send
  time; added = proxied receive delay − direct), direct, off and on interleaved per stream. The
  request is `"stream": true` without `stream_options`, so the `on` tollgate injects
  `"stream_options":{"include_usage":true}`, the upstream then ends with a usage-only chunk, and
  tollgate must strip it: the client counts the usage chunks it receives (must be 0), and the
  tokens settled (`tollgate_tokens_total`) show the upstream's usage was read.

The helpers (build, spawn and pinning, configs, CPU accounting) are run.py's. Pinning as in run.py:
both tollgates on CPU 1; the upstream, wrk and this script (the T2 client) on CPU 0.
"""
import argparse
import datetime
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (run.py beside this file: build, spawn, configs, CPU accounting)

PATH = "/v1/chat/completions"
TIER_OFF = "bench: { requests_per_second: 1000000000, burst: 1000000000 }"
# Large enough that nothing is ever refused (the validator's caps: 2^50 tokens, 10^6 requests).
TIER_ON = ("bench: { requests_per_second: 1000000000, burst: 1000000000, tokens_per_minute: 1000000000000, "
           "daily_tokens: 1000000000000000, max_concurrent_requests: 100000 }")
# T2's request: a stream without stream_options (the `on` tollgate injects include_usage).
STREAM_BODY = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "Say ok."}],
                          "max_tokens": 16, "stream": True})
ASKED_BODY = json.dumps({**json.loads(STREAM_BODY), "stream_options": {"include_usage": True}})


def loadavg():
    return " / ".join(open("/proc/loadavg").read().split()[:3])


def pct(values, p):
    """Nearest rank, as run.py's S3 does."""
    v = sorted(values)
    return v[min(len(v) - 1, int(p * len(v)))]


def stream(t, events, interval_ms, body):
    """One SSE stream: the receive delay of each stamped event (µs) and the usage chunks received."""
    conn = http.client.HTTPConnection("127.0.0.1", t.h1_port, timeout=30)
    headers = {"x-mock": "sse", "x-mock-events": str(events), "x-mock-interval-ms": str(interval_ms),
               "content-type": "application/json"}
    if t.auth:
        headers["authorization"] = f"Bearer {t.auth}"
    conn.request("POST", PATH, body=body, headers=headers)
    rsp = conn.getresponse()
    assert rsp.status == 200, (t.name, rsp.status, rsp.read())
    delays, usage_chunks, done = [], 0, False
    while True:
        line = rsp.fp.readline()
        if not line:
            break
        if line.startswith(b"data: [DONE]"):
            done = True
            break
        if line.startswith(b"data: "):
            now = time.time_ns()
            v = json.loads(line[6:])
            if "t" in v:
                delays.append((now - v["t"]) / 1000)
            elif v.get("choices") == [] and "usage" in v:
                usage_chunks += 1
            else:
                raise RuntimeError(f"{t.name}: unexpected event {line!r}")
    conn.close()
    assert done and len(delays) == events, (t.name, done, len(delays))
    return delays, usage_chunks


class Tokens(run.Bench):
    def __init__(self, args):
        super().__init__(args)
        self.loads = {}

    def tollgate(self, name, tier):
        port, admin = run.free_port(), run.free_port()
        store = os.path.join(self.tmp, name.replace(" ", "-"))
        os.makedirs(store)
        config = os.path.join(store, "tollgate.yaml")
        run.write_config(config, port, admin, self.direct.h1_port, store)
        text = open(config).read()
        assert TIER_OFF in text, "run.write_config's tier changed"
        with open(config, "w") as f:
            f.write(text.replace(TIER_OFF, tier))
        key = self.create_key(config)
        p = self.spawn([self.tollgate_bin, "serve", "--config", config], 1)
        run.wait_port(port)
        t = run.Target(name, port, port, p.pid, key)
        t.admin = admin
        return t

    def setup(self):
        up = run.free_port()
        self.spawn([self.upstream_bin, f"127.0.0.1:{up}"], 0)
        run.wait_port(up)
        self.direct = run.Target("direct", up, up, None, "")
        self.off = self.tollgate("tokens off", TIER_OFF)
        self.on = self.tollgate("tokens on", TIER_ON)
        self.loads["start"] = loadavg()
        # The first request verifies and caches each key; the token headers tell the tiers apart.
        for t in (self.off, self.on):
            c = http.client.HTTPConnection("127.0.0.1", t.h1_port, timeout=30)
            for _ in range(2):
                c.request("POST", PATH, body=run.BODY,
                          headers={"content-type": "application/json", "authorization": f"Bearer {t.auth}"})
                rsp = c.getresponse()
                body = rsp.read()
                assert rsp.status == 200, (t.name, rsp.status, body)
                assert json.loads(body)["usage"]["total_tokens"] == 6, body
            limit = rsp.getheader("x-ratelimit-limit-tokens")
            assert (limit is not None) == (t is self.on), (t.name, limit)
            t.token_header = limit
            c.close()
        time.sleep(0.5)

    def tokens_metric(self, t, kind):
        """`tollgate_tokens_total{tier="bench",kind=…}` (in whatever order the labels come)."""
        c = http.client.HTTPConnection("127.0.0.1", t.admin, timeout=5)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        c.close()
        want = {'tier="bench"', f'kind="{kind}"'}
        total = 0.0
        for line in text.splitlines():
            m = re.match(r"tollgate_tokens_total\{(.*)\} (\S+)$", line)
            if m and want <= set(m.group(1).split(",")):
                total += float(m.group(2))
        return total

    # -- T1 -------------------------------------------------------------------------------
    def wrk_checked(self, t):
        script = os.path.join(self.tmp, "post.lua")
        with open(script, "w") as f:
            f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(run.BODY)}\n'
                    f'wrk.headers["Content-Type"] = "application/json"\n'
                    f'wrk.headers["Authorization"] = "Bearer {t.auth}"\n')
        cmd = ["taskset", "-c", "0", "wrk", "-t1", "-c64", f"-d{self.args.duration}s", "-s", script, t.url()]

        def rate(out):
            # Nothing may be refused or fail: every request is a 200 that counted its tokens.
            if re.search(r"Non-2xx|Socket errors", out):
                raise RuntimeError(f"wrk saw errors for {t.name}: {out}")
            return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        return self.measured(t, cmd, rate, lambda out: int(re.search(r"(\d+) requests in", out).group(1)))

    def t1(self):
        started = time.monotonic()
        before = {t.name: self.tokens_metric(t, "prompt") for t in (self.off, self.on)}
        for _ in range(self.args.rounds):
            for t in (self.off, self.on):  # interleaved: off, on, off, …
                r = self.wrk_checked(t)
                self.results.setdefault("t1", {}).setdefault(t.name, []).append(r)
                print(f"T1 {t.name:10} {r['rps']:10.0f} req/s  cpu {r['cpu_ms_per_1000']:6.1f} ms/1k", flush=True)
        # The upstream reports 5 prompt tokens per completion: the settled prompt tokens ÷ 5 are
        # the requests whose usage was read (all of them, with limits on; none without).
        self.results["t1_settled"] = {t.name: (self.tokens_metric(t, "prompt") - before[t.name]) / 5
                                      for t in (self.off, self.on)}
        self.loads["t1"] = {"seconds": time.monotonic() - started, "loadavg": loadavg()}

    # -- T2 -------------------------------------------------------------------------------
    def t2(self):
        started = time.monotonic()
        targets = (self.direct, self.off, self.on)
        events, interval = self.args.events, 10
        out = {t.name: {"delays": [], "usage_chunks": 0} for t in targets}
        completion0 = self.tokens_metric(self.on, "completion")
        unreported0 = self.metric("tollgate_usage_unreported_total", self.on.admin)
        for _ in range(self.args.streams):
            for t in targets:  # interleaved per stream: direct, off, on, direct, …
                delays, chunks = stream(t, events, interval, STREAM_BODY)
                out[t.name]["delays"] += delays
                out[t.name]["usage_chunks"] += chunks
        settled = self.tokens_metric(self.on, "completion") - completion0
        unreported = self.metric("tollgate_usage_unreported_total", self.on.admin) - unreported0
        # Controls: the upstream does send the usage chunk when asked (direct), and tollgate
        # passes it on when the client asked for it itself (not stripped).
        _, direct_asked = stream(self.direct, events, interval, ASKED_BODY)
        _, on_asked = stream(self.on, events, interval, ASKED_BODY)
        self.results["t2"] = out
        self.results["t2_checks"] = {"streams": self.args.streams, "events": events, "interval_ms": interval,
                                     "settled_completion": settled, "unreported": unreported,
                                     "direct_asked": direct_asked, "on_asked": on_asked}
        for t in targets:
            d = out[t.name]["delays"]
            print(f"T2 sse {t.name:10} per-event delay p50 {pct(d, .5):7.0f} µs  p99 {pct(d, .99):7.0f} µs  "
                  f"usage chunks received {out[t.name]['usage_chunks']}", flush=True)
        print(f"T2 tokens on: completion tokens settled {settled:.0f} (expected {self.args.streams * events}), "
              f"unreported {unreported:.0f}; usage chunk when the client asks: direct {direct_asked}, tokens on {on_asked}",
              flush=True)
        self.loads["t2"] = {"seconds": time.monotonic() - started, "loadavg": loadavg()}
        assert out[self.on.name]["usage_chunks"] == 0, "the injected usage chunk reached the client"
        assert out[self.off.name]["usage_chunks"] == 0 and out["direct"]["usage_chunks"] == 0
        assert settled == self.args.streams * events and unreported == 0, (settled, unreported)
        assert direct_asked == 1 and on_asked == 1, (direct_asked, on_asked)

    # -- report ---------------------------------------------------------------------------
    def report(self, command):
        a = self.args
        lines = [f"# Token limits benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
                 f"{socket.gethostname()}", "", "Command: `" + command + "`", ""]
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        lines += [f"- machine: {os.cpu_count()} CPUs ({cpu}), kernel {os.uname().release}",
                  f"- tollgate {run.sh('git', '-C', run.ROOT, 'rev-parse', '--short', 'HEAD').strip()}; {run.version(['wrk', '-v'])}",
                  "- both tollgates pinned to CPU 1 (one runtime worker); upstream, wrk and this script (the T2 client) on CPU 0",
                  f"- `tokens off` tier: `{TIER_OFF}`; `tokens on` adds "
                  "`tokens_per_minute: 1000000000000, daily_tokens: 1000000000000000, max_concurrent_requests: 100000` "
                  f"(nothing refused; `x-ratelimit-limit-tokens: {self.on.token_header}` on its responses, none on the other's)",
                  f"- load average (1 / 5 / 15 min) at the start {self.loads['start']}; after T1 {self.loads['t1']['loadavg']}, "
                  f"after T2 {self.loads['t2']['loadavg']} (other work shares this 2-core machine; the ratios are within this run)",
                  ""]
        t1 = self.results["t1"]
        med = {n: statistics.median(r["rps"] for r in rs) for n, rs in t1.items()}
        cpu = {n: statistics.median(r["cpu_ms_per_1000"] for r in rs) for n, rs in t1.items()}
        lines += [f"## T1 non-streaming throughput (`wrk -t1 -c64`, HTTP/1.1, {a.rounds} interleaved round(s) of {a.duration} s)",
                  "", "| tollgate | req/s (median) | req/s per round | CPU-ms / 1k req (median) | usage settled |",
                  "|---|---|---|---|---|"]
        for n, rs in t1.items():
            total = sum(r["requests"] for r in rs)
            rounds = ", ".join(f"{r['rps']:.0f}" for r in rs)
            lines.append(f"| {n} | {med[n]:.0f} | {rounds} | "
                         f"{cpu[n]:.1f} | {self.results['t1_settled'][n]:.0f} of ≈ {total} requests |")
        per_round = ", ".join(f"{on['rps'] / off['rps']:.2f}" for off, on in zip(t1["tokens off"], t1["tokens on"]))
        lines += ["", f"on / off, req/s (medians): **{med['tokens on'] / med['tokens off']:.2f}**; per round: {per_round}. "
                  f"CPU-ms per 1k requests, on / off: **{cpu['tokens on'] / cpu['tokens off']:.2f}** (the work per request, "
                  "less moved by other load on the machine than req/s).", ""]
        t2, c = self.results["t2"], self.results["t2_checks"]
        base = t2["direct"]["delays"]
        lines += [f"## T2 SSE: added delay per event (proxied − direct; {c['streams']} streams × {c['events']} events, "
                  f"{c['interval_ms']} ms apart, per target, interleaved)", "",
                  "| target | delay p50 | p99 | added p50 | added p99 | usage chunks the client received |", "|---|---|---|---|---|---|"]
        for n, r in t2.items():
            d = r["delays"]
            added = (f"{pct(d, .5) - pct(base, .5):.0f} µs | {pct(d, .99) - pct(base, .99):.0f} µs" if n != "direct" else "– | –")
            lines.append(f"| {n} | {pct(d, .5):.0f} µs | {pct(d, .99):.0f} µs | {added} | {r['usage_chunks']} |")
        on, off = t2["tokens on"]["delays"], t2["tokens off"]["delays"]
        lines += ["", f"on − off: p50 {pct(on, .5) - pct(off, .5):+.0f} µs, p99 {pct(on, .99) - pct(off, .99):+.0f} µs. "
                  "The request is `\"stream\": true` without `stream_options`: `tokens on` injected "
                  "`include_usage`, the upstream ended each stream with a usage-only chunk and tollgate stripped it "
                  f"(0 received; {c['settled_completion']:.0f} completion tokens settled from those chunks, expected "
                  f"{c['streams'] * c['events']}; {c['unreported']:.0f} unreported). Controls: with `include_usage` in the "
                  f"client's own request, the chunk arrives directly ({c['direct_asked']}) and through `tokens on` "
                  f"({c['on_asked']}: not stripped). Percentiles are nearest-rank.", ""]
        return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per T1 run")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved T1 rounds")
    ap.add_argument("--streams", type=int, default=20, help="T2 streams per target")
    ap.add_argument("--events", type=int, default=100, help="T2 events per stream")
    ap.add_argument("--smoke", action="store_true", help="1 round of 2 s, 2 streams of 20 events, no results file")
    ap.add_argument("--out", default=os.path.join(run.ROOT, "benches", "results"))
    args = ap.parse_args()
    if args.smoke:
        args.duration, args.rounds, args.streams, args.events = 2, 1, 2, 20
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed: apt-get install wrk util-linux")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stops the processes
    started = time.monotonic()
    bench = Tokens(args)
    bench.build()
    os.sched_setaffinity(0, {0})  # this script (the T2 client) and the CLI: CPU 0
    try:
        bench.setup()
        bench.t1()
        bench.t2()
    finally:
        bench.stop()
    report = bench.report(" ".join(["python3", "benches/load/tokens.py"] + sys.argv[1:]))
    print(report)
    print(f"({time.monotonic() - started:.0f} s in all)")
    if not args.smoke:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"{datetime.date.today()}-{socket.gethostname()}-tokens.md")
        with open(path, "w") as f:
            f.write(report)
        print(f"written to {path}")


if __name__ == "__main__":
    main()
