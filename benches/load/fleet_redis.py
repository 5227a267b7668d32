#!/usr/bin/env python3
"""Fleet rate limits benchmark (F4): tollgate with `rate_limits.backend: redis` vs `local`, in one run.

    python3 benches/load/fleet_redis.py            # full run (≈ 4.5 min after the build), writes benches/results/<date>-<host>-redis.md
    python3 benches/load/fleet_redis.py --smoke    # ≈ 40 s smoke run (CI): every step once, short

Three tollgates identical but for `rate_limits.backend` (`redis`: `timeout: 20ms`,
`on_error: local`; `debit`: the same with debited leases, `debit_requests: 128, debit_within: 5ms`, or
$TG_BENCH_DEBIT),
on a tier that never limits in practice (10⁹ req/s, burst 10⁹), so every request is one Redis
decision (one round trip, the decision script) without debits, and a batch of up to 128 with them:

- F4a throughput: `wrk -t1 -c64` (HTTP/1.1) of run.py's S1 request, interleaved rounds (local,
  redis, debit, …): req/s medians, redis / local, tollgate's CPU-ms per 1,000 requests and redis-server's
  (separately); the decisions each request took (`tollgate_ratelimit_decisions_total` by source).
- F4b added latency: with oha installed, `oha -q RATE --latency-correction` (open loop, as run.py's
  S2) at `--rate` (default: half the local tollgate's F4a median); without it, `wrk -t1 -c1
  --latency` (closed loop, one connection: one request at a time, tens of thousands of samples per
  round); interleaved rounds, p50 and p99 medians; added = redis − local. Also the Redis round
  trip as tollgate times it (`tollgate_ratelimit_backend_duration_seconds`).
- F4c round trips under refusals: a tollgate (redis) per tier of `--limit-rps` (10,000, 1,000 and
  10 req/s by default, burst `--limit-burst`), in turn — below what wrk offers, so that a part is
  refused; a refusal's wait is remembered and the requests during it are refused without asking
  Redis (`source="local_cache"`). The share of decisions that needed a round trip:
  `source="redis"` / all.

redis-server (Debian's package) is the benchmark's own: a free port, `--save '' --appendonly no`,
stopped at the end, also when a step fails or the script gets SIGTERM (and killed with the script,
PR_SET_PDEATHSIG); never the shared server at 6379. Pinning as in run.py and fleet.py: every
tollgate on CPU 1, the upstream, wrk and this script on CPU 0; redis-server unpinned (as
fleet.py's PostgreSQL: the kernel places it).
"""
import argparse
import ctypes
import datetime
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fleet  # noqa: E402  (fleet.py beside this file: loadavg, percentiles, one connection)
import run  # noqa: E402  (run.py beside this file: build, spawn, configs, wrk)

URL_ENV = "TOLLGATE_BENCH_REDIS_URL"
REDIS = f"rate_limits: {{ backend: redis, redis: {{ url_env: {URL_ENV}, timeout: 20ms, on_error: local }} }}\n"
LOCAL = "rate_limits: { backend: local }\n"
DECISIONS = "tollgate_ratelimit_decisions_total"
DEBIT_FIELDS = os.environ.get("TG_BENCH_DEBIT", "debit_requests: 128, debit_within: 5ms")
DEBIT = REDIS.replace("on_error: local", "on_error: local, " + DEBIT_FIELDS)
SOURCES = ("redis", "local_cache", "debit", "fallback_local", "fallback_open", "fallback_closed")
FALLBACKS = SOURCES[3:]
DURATION = "tollgate_ratelimit_backend_duration_seconds"


def us(seconds):
    return f"{seconds * 1e6:.0f} µs"


def unpinned_child():
    """redis-server: on every CPU (this script is pinned to CPU 0) and killed with this script."""
    os.sched_setaffinity(0, range(os.cpu_count()))
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def cpu_times(cpu):
    """(idle, total) jiffies of one CPU, from /proc/stat."""
    for line in open("/proc/stat"):
        if line.startswith(f"cpu{cpu} "):
            v = [int(x) for x in line.split()[1:]]
            return v[3] + v[4], sum(v[:8])
    raise RuntimeError(f"no cpu{cpu} in /proc/stat")


def per_round_rps(rs):
    return ", ".join(f"{r['rps']:.0f}" for r in rs)


def wrk_latency(out):
    """wrk --latency's 50 % and 99 % lines, in seconds."""
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
    found = {int(p): float(v) * scale[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    if set(found) != {50, 99}:
        raise RuntimeError(f"no latency distribution in wrk's output: {out}")
    return found[50], found[99]


class FleetRedis(run.Bench):
    def __init__(self, args):
        super().__init__(args)
        self.redis = None
        self.loads = {}

    # -- redis-server ---------------------------------------------------------------------
    def start_redis(self):
        port = run.free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.tmp, "--logfile", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=unpinned_child)
        run.wait_port(port)
        os.environ[URL_ENV] = f"redis://127.0.0.1:{port}"
        self.redis_port = port

    def stop_redis(self):
        if self.redis and self.redis.poll() is None:
            self.redis.terminate()
            try:
                self.redis.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.redis.kill()
                self.redis.wait()
        self.redis = None

    # -- tollgates ------------------------------------------------------------------------
    def tollgate(self, name, backend, tier=run.NEVER_LIMITS):
        port, admin = run.free_port(), run.free_port()
        file = re.sub(r"[^a-z0-9]+", "-", name)
        config = os.path.join(self.tmp, f"{file}.yaml")
        run.write_config(config, port, admin, self.up, self.tmp, backend, store=f'{{ sqlite: "{self.tmp}/{file}.db" }}',
                         tier=tier)
        key = self.create_key(config)
        p = self.spawn([self.tollgate_bin, "serve", "--config", config], 1)
        run.wait_port(port)
        t = run.Target(name, port, port, p.pid, key)
        t.admin, t.proc = admin, p
        for _ in range(2):  # the first verifies and caches the key
            status = fleet.Conn(port).post(key)
            assert status == 200, (name, status)
        return t

    def setup(self):
        self.up = run.free_port()
        self.spawn([self.upstream_bin, f"127.0.0.1:{self.up}"], 0)
        run.wait_port(self.up)
        self.start_redis()
        self.loads["start"] = fleet.loadavg()
        self.pair = [self.tollgate("local", LOCAL), self.tollgate("redis", REDIS), self.tollgate("debit", DEBIT)]
        time.sleep(0.5)
        for t in self.pair:  # warm-up (connections, allocator), not counted
            run.sh("taskset", "-c", "0", "wrk", "-t1", "-c64", "-d1s", "-s", self.post_script(t), t.url())

    def decisions(self, t):
        return {s: self.metric(f'{DECISIONS}{{source="{s}"}}', t.admin) for s in SOURCES}

    def histogram(self, t):
        """The backend duration histogram: (sum, count, {le: cumulative count})."""
        c = http.client.HTTPConnection("127.0.0.1", t.admin, timeout=5)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        buckets, total, count = {}, 0.0, 0.0
        for line in text.splitlines():
            if line.startswith(DURATION + "_bucket"):
                le = re.search(r'le="([^"]+)"', line).group(1)
                buckets[float(le)] = float(line.rsplit(" ", 1)[1])
            elif line.startswith(DURATION + "_sum"):
                total = float(line.rsplit(" ", 1)[1])
            elif line.startswith(DURATION + "_count"):
                count = float(line.rsplit(" ", 1)[1])
        return total, count, buckets

    @staticmethod
    def round_trips(before, after):
        """Mean and bucket bounds (p50, p99: the upper bound of the bucket holding them) of the
        round trips between two histogram readings."""
        n = after[1] - before[1]
        if n <= 0:
            return {"n": 0}
        bounds = {}
        for q in (0.5, 0.99):
            bounds[q] = next(le for le in sorted(after[2]) if after[2][le] - before[2].get(le, 0) >= q * n)
        return {"n": n, "mean": (after[0] - before[0]) / n, "p50_le": bounds[0.5], "p99_le": bounds[0.99]}

    def with_redis_cpu(self, measure):
        ticks0 = run.cpu_ticks(self.redis.pid)
        r = measure()
        r["redis_cpu_ms_per_1000"] = ((run.cpu_ticks(self.redis.pid) - ticks0) * 1000 / os.sysconf("SC_CLK_TCK")
                                      * 1000 / max(r["requests"], 1))
        return r

    def mark(self, name):
        self.loads[name] = fleet.loadavg()

    # -- F4a ------------------------------------------------------------------------------
    def f4a(self):
        for _ in range(self.args.rounds):
            for t in self.pair:  # interleaved: local, redis, local, …
                d0, h0, c0 = self.decisions(t), self.histogram(t), cpu_times(1)
                r = self.with_redis_cpu(lambda: self.wrk(t))
                c1, d1 = cpu_times(1), self.decisions(t)
                r["cpu1_idle"] = (c1[0] - c0[0]) / max(c1[1] - c0[1], 1)
                r["busy"] = r["rps"] * r["cpu_ms_per_1000"] / 1e6
                r["decisions"] = {s: d1[s] - d0[s] for s in SOURCES}
                r["round_trips"] = self.round_trips(h0, self.histogram(t))
                self.results.setdefault("f4a", {}).setdefault(t.name, []).append(r)
                print(f"F4a {t.name:6} {r['rps']:9.0f} req/s  tollgate cpu {r['cpu_ms_per_1000']:5.1f} ms/1k  "
                      f"redis-server cpu {r['redis_cpu_ms_per_1000']:5.1f} ms/1k  "
                      f"decisions {r['decisions']['redis']:.0f} redis / {r['requests']} requests, "
                      f"{sum(r['decisions'][s] for s in FALLBACKS):.0f} fallbacks; tollgate {r['busy']:.0%} of a core, "
                      f"CPU 1 idle {r['cpu1_idle']:.0%}", flush=True)
        self.mark("f4a")

    # -- F4b ------------------------------------------------------------------------------
    def f4b(self):
        oha = shutil.which("oha") or os.path.expanduser("~/.cargo/bin/oha")
        self.oha = os.path.exists(oha)
        if self.oha:
            rate = self.args.rate or max(1, int(statistics.median(r["rps"] for r in self.results["f4a"]["local"]) / 2))
            self.results["f4b_rate"] = rate
        for _ in range(self.args.rounds):
            for t in self.pair:
                h0 = self.histogram(t)
                if self.oha:
                    cmd = ["taskset", "-c", "0", oha, "-z", f"{self.args.duration}s", "-q", str(rate), "--latency-correction",
                           "-c", "32", "--no-tui", "--output-format", "json", "-m", "POST", "-d", run.BODY,
                           "-H", "content-type: application/json", "-H", f"authorization: Bearer {t.auth}", t.url()]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode != 0:
                        raise RuntimeError(f"oha failed: {out.stderr}")
                    pct = json.loads(out.stdout)["latencyPercentiles"]
                    r = {"p50": pct["p50"], "p99": pct["p99"], "rps": None}
                else:
                    cmd = ["taskset", "-c", "0", "wrk", "-t1", "-c1", "--latency", f"-d{self.args.duration}s",
                           "-s", self.post_script(t), t.url()]
                    out = run.sh(*cmd)
                    p50, p99 = wrk_latency(out)
                    r = {"p50": p50, "p99": p99, "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
                         "requests": int(re.search(r"(\d+) requests in", out).group(1))}
                r["round_trips"] = self.round_trips(h0, self.histogram(t))
                self.results.setdefault("f4b", {}).setdefault(t.name, []).append(r)
                print(f"F4b {t.name:6} p50 {us(r['p50']):>8}  p99 {us(r['p99']):>8}"
                      + (f"  ({r['requests']} requests, {r['rps']:.0f} req/s on one connection)" if r["rps"] else ""),
                      flush=True)
        self.mark("f4b")

    # -- F4c ------------------------------------------------------------------------------
    def f4c(self):
        """One tollgate (redis) per tier of `--limit-rps`, in turn, while the pair idles."""
        for rps in self.args.limit_rps:
            t = self.tollgate(f"redis, {rps} req/s", REDIS, f"{{ requests_per_second: {rps}, burst: {self.args.limit_burst} }}")
            d0 = self.decisions(t)
            r = self.with_redis_cpu(lambda: self.wrk_counted(t))
            d1 = self.decisions(t)
            r["decisions"], r["tier_rps"] = {s: d1[s] - d0[s] for s in SOURCES}, rps
            self.results.setdefault("f4c", []).append(r)
            dec = r["decisions"]
            total = sum(dec.values())
            print(f"F4c tier {rps} req/s: {r['rps']:.0f} req/s offered, {r['refused']} of {r['requests']} refused; "
                  "decisions: " + ", ".join(f"{s} {dec[s]:.0f}" for s in SOURCES)
                  + f"; Redis round trips {dec['redis'] / max(total, 1):.1%} of decisions", flush=True)
            t.proc.terminate()
            t.proc.wait(timeout=10)
            self.procs.remove(t.proc)
        self.mark("f4c")

    def wrk_counted(self, t):
        """run.Bench.wrk's run, with the refused responses counted as well (wrk's non-2xx)."""
        script = self.post_script(t)
        cmd = ["taskset", "-c", "0", "wrk", "-t1", "-c64", f"-d{self.args.duration}s", "-s", script, t.url()]
        refused = []

        def count(out):
            m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
            refused.append(int(m.group(1)) if m else 0)
            return int(re.search(r"(\d+) requests in", out).group(1))
        r = self.measured(t, cmd, lambda out: float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), count)
        r["refused"] = refused[0]
        return r

    # -- report ---------------------------------------------------------------------------
    def report(self, command):
        a = self.args
        lines = [f"# Fleet rate limits benchmark (Redis), {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
                 f"{socket.gethostname()}", "", "Command: `" + command + "`", ""]
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        lines += [f"- machine: {os.cpu_count()} CPUs ({cpu}), kernel {os.uname().release}",
                  f"- tollgate {run.sh('git', '-C', run.ROOT, 'rev-parse', '--short', 'HEAD').strip()}; "
                  f"{run.version(['redis-server', '--version'])} (the benchmark's own, loopback, `--save '' --appendonly no`, "
                  f"unpinned); {run.version(['wrk', '-v'])}",
                  "- every tollgate pinned to CPU 1 (one runtime worker); upstream, wrk and this script on CPU 0",
                  f"- `rate_limits: {{ backend: redis, redis: {{ timeout: 20ms, on_error: local }} }}` against "
                  "`{ backend: local }`, otherwise identical; F4a/F4b tier 10⁹ req/s, burst 10⁹ (never limits: "
                  "every request is one Redis decision)",
                  f"- load average (1 / 5 / 15 min) at the start {self.loads['start']}; after F4a {self.loads['f4a']}, "
                  f"F4b {self.loads['f4b']}, F4c {self.loads['f4c']} (other work shares this machine; the ratios are "
                  "within this run)", ""]
        f4a = self.results["f4a"]
        med = {n: statistics.median(r["rps"] for r in rs) for n, rs in f4a.items()}
        cpu = {n: statistics.median(r["cpu_ms_per_1000"] for r in rs) for n, rs in f4a.items()}
        lines += [f"## F4a throughput (`wrk -t1 -c64`, HTTP/1.1, {a.rounds} interleaved round(s) of {a.duration} s)", "",
                  "| backend | req/s (median) | req/s per round | tollgate CPU-ms / 1k req | redis-server CPU-ms / 1k req | "
                  "tollgate's CPU time, share of a core (median) | CPU 1 idle (median) | "
                  "Redis decisions / requests | fallback decisions | Redis round trip as tollgate times it (mean) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for n, rs in f4a.items():
            requests = sum(r["requests"] for r in rs)
            redis = sum(r["decisions"]["redis"] for r in rs)
            fallbacks = sum(r["decisions"][s] for r in rs for s in FALLBACKS)
            trips = [r["round_trips"] for r in rs if r["round_trips"]["n"]]
            mean = us(sum(t["mean"] * t["n"] for t in trips) / sum(t["n"] for t in trips)) if trips else "–"
            lines.append(f"| {n} | {med[n]:.0f} | {per_round_rps(rs)} | "
                         f"{cpu[n]:.1f} | {statistics.median(r['redis_cpu_ms_per_1000'] for r in rs):.1f} | "
                         f"{statistics.median(r['busy'] for r in rs):.0%} | {statistics.median(r['cpu1_idle'] for r in rs):.0%} | "
                         f"{redis:.0f} / {requests} | {fallbacks:.0f} | {mean} |")
        rounds = [q["rps"] / p["rps"] for p, q in zip(f4a["local"], f4a["redis"])]
        ratio = statistics.median(rounds)
        debit_rounds = [q["rps"] / p["rps"] for p, q in zip(f4a["local"], f4a["debit"])]
        debit_ratio = statistics.median(debit_rounds)
        debit_requests = sum(r["requests"] for r in f4a["debit"])
        # Round trips as the backend's duration histogram counts them: decisions and refills ahead.
        debit_trips = sum(r["round_trips"]["n"] for r in f4a["debit"])
        per_round = ", ".join(f"{x:.2f}" for x in rounds)
        lines += ["", f"redis / local, req/s, median of the rounds' ratios (each round's pair run back to back): "
                  f"**{ratio:.2f}** (goal ≥ 0.85: {'met' if ratio >= 0.85 else 'not met'}); per round: {per_round}; "
                  f"ratio of the medians {med['redis'] / med['local']:.2f} (moved by drift across rounds). tollgate's CPU-ms per 1k requests, redis / local: {cpu['redis'] / cpu['local']:.2f}, "
                  f"so where tollgate's core is the bottleneck (it was not, if it had time to spare: the share of a core "
                  f"and CPU 1's idle time above) the ratio would be about **{cpu['local'] / cpu['redis']:.2f}**; "
                  "redis-server's CPU is its own (with the local backend it idles). wrk counts requests completed "
                  "in the run; the decisions counter a few more (the connections' requests in flight at the end).", "",
                  f"With debited leases (`{DEBIT_FIELDS}`, off by default): debit / local "
                  f"**{debit_ratio:.2f}** (goal ≥ 0.85: {'met' if debit_ratio >= 0.85 else 'not met'}); per round: "
                  + ", ".join(f"{x:.2f}" for x in debit_rounds)
                  + f"; {debit_trips:.0f} Redis round trips for {debit_requests} requests "
                  f"({debit_trips / max(debit_requests, 1):.1%}), tollgate's CPU-ms per 1k requests debit / local "
                  f"{cpu['debit'] / cpu['local']:.2f}.", ""]
        f4b = self.results["f4b"]
        if self.oha:
            how = (f"`oha -q {self.results['f4b_rate']} --latency-correction -c 32` (open loop, half the local "
                   f"tollgate's F4a median unless `--rate`)")
        else:
            how = ("`wrk -t1 -c1 --latency` (oha is not installed: closed loop, one connection, one request at a "
                   "time)")
        p50 = {n: statistics.median(r["p50"] for r in rs) for n, rs in f4b.items()}
        p99 = {n: statistics.median(r["p99"] for r in rs) for n, rs in f4b.items()}
        lines += [f"## F4b added latency: {how}, {a.rounds} interleaved round(s) of {a.duration} s", "",
                  "| backend | p50 (median of rounds) | p99 (median of rounds) | p50 / p99 per round | requests per round | "
                  "Redis round trip as tollgate times it: mean, p50 bucket, p99 bucket |", "|---|---|---|---|---|---|"]
        for n, rs in f4b.items():
            trips = [r["round_trips"] for r in rs if r["round_trips"]["n"]]
            rt = (f"{us(statistics.median(t['mean'] for t in trips))}, ≤ {us(max(t['p50_le'] for t in trips))}, "
                  f"≤ {us(max(t['p99_le'] for t in trips))}") if trips else "–"
            lines.append(f"| {n} | {us(p50[n])} | {us(p99[n])} | "
                         f"{', '.join(us(r['p50']) + ' / ' + us(r['p99']) for r in rs)} | "
                         f"{', '.join(str(r['requests']) for r in rs) if not self.oha else '–'} | {rt} |")
        added50, added99 = p50["redis"] - p50["local"], p99["redis"] - p99["local"]
        debit50, debit99 = p50["debit"] - p50["local"], p99["debit"] - p99["local"]
        paired = {q: [r[q] - l[q] for l, r in zip(f4b["local"], f4b["redis"])] for q in ("p50", "p99")}
        lines += ["", f"Added by Redis (redis − local, of the medians): p50 **{added50 * 1e6:+.0f} µs** (goal ≤ 100 µs: "
                  f"{'met' if added50 <= 100e-6 else 'not met'}), p99 **{added99 * 1e6:+.0f} µs** (goal ≤ 1 ms: "
                  f"{'met' if added99 <= 1e-3 else 'not met'}); per round, p50 "
                  + ", ".join(f"{x * 1e6:+.0f}" for x in paired["p50"]) + " µs, p99 "
                  + ", ".join(f"{x * 1e6:+.0f}" for x in paired["p99"]) + " µs. The buckets are the histogram's "
                  "(100 µs, 250 µs, 500 µs, 1 ms, …): a bound, not a value. With debited leases (debit − local): "
                  f"p50 **{debit50 * 1e6:+.0f} µs**, p99 **{debit99 * 1e6:+.0f} µs** (at one request at a time a "
                  "lease rarely outlives the next request: most still take a round trip).", ""]
        lines += [f"## F4c Redis round trips with refusals (a tollgate per tier, burst {a.limit_burst}; "
                  f"`wrk -t1 -c64`, {a.duration} s each)", "",
                  "| tier req/s | offered req/s | requests | refused (429) | admitted per second | decisions: redis | "
                  "local_cache | fallback | **share with a Redis round trip** | tollgate CPU-ms / 1k req | "
                  "redis-server CPU-ms / 1k req |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.results["f4c"]:
            dec = r["decisions"]
            total = sum(dec.values())
            admitted = r["requests"] - r["refused"]
            lines.append(f"| {r['tier_rps']} | {r['rps']:.0f} | {r['requests']} | {r['refused']} "
                         f"({r['refused'] / max(r['requests'], 1):.0%}) | {admitted / a.duration:.0f} | {dec['redis']:.0f} | "
                         f"{dec['local_cache']:.0f} | {sum(dec[s] for s in FALLBACKS):.0f} | "
                         f"**{dec['redis'] / max(total, 1):.1%}** | {r['cpu_ms_per_1000']:.1f} | "
                         f"{r['redis_cpu_ms_per_1000']:.1f} |")
        lines += ["", "Every admitted request takes one round trip. A refused one takes none while its "
                  "organisation's refusal is remembered (`local_cache`, until the wait Redis gave is over), and one "
                  "otherwise: the first after a wait ran out, and every request that arrives while the refusing "
                  "round trip is still under way (up to wrk's 64 connections at once) — so the shorter the wait "
                  "(≈ 1 / tier req/s), the larger the share. With F4a's tier every request was admitted, so each "
                  "took one (F4a's table).", ""]
        return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk (or oha) run")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved F4a and F4b rounds")
    ap.add_argument("--rate", type=int, default=0, help="F4b's open-loop rate with oha (default: half the local F4a median)")
    ap.add_argument("--limit-rps", type=lambda v: [int(x) for x in v.split(",")], default=[10000, 1000, 10],
                    help="F4c's tiers, requests per second, comma-separated (a tollgate each)")
    ap.add_argument("--limit-burst", type=int, default=100, help="F4c's tier: burst")
    ap.add_argument("--smoke", action="store_true", help="1 round of 2 s, no results file")
    ap.add_argument("--out", default=os.path.join(run.ROOT, "benches", "results"))
    args = ap.parse_args()
    if args.smoke:
        args.duration, args.rounds = 2, 1
    for tool in ("wrk", "taskset", "redis-server"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed: apt-get install wrk util-linux redis-server")
    # A SIGTERM (CI's timeout, a ^C in a wrapper) still stops the processes and redis-server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    bench = FleetRedis(args)
    bench.build()
    os.sched_setaffinity(0, {0})  # this script: CPU 0
    try:
        bench.setup()
        bench.f4a()
        bench.f4b()
        bench.f4c()
    finally:
        bench.stop()
        bench.stop_redis()
    report = bench.report(" ".join(["python3", "benches/load/fleet_redis.py"] + sys.argv[1:]))
    print(report)
    print(f"({time.monotonic() - started:.0f} s in all)")
    if not args.smoke:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"{datetime.date.today()}-{socket.gethostname()}-redis.md")
        with open(path, "w") as f:
            f.write(report)
        print(f"written to {path}")


if __name__ == "__main__":
    main()
