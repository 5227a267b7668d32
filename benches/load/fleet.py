#!/usr/bin/env python3
"""Fleet store benchmark: tollgate's key store in SQLite vs PostgreSQL, in one run.

    python3 benches/load/fleet.py            # full run (≈ 3.5 min after the build), writes benches/results/<date>-<host>-fleet.md
    python3 benches/load/fleet.py --smoke    # ≈ 40 s smoke run (CI): every step once, short

- F1 cached-key throughput: two tollgates identical but for the store, one cached key each,
  `wrk -t1 -c64` (HTTP/1.1) of run.py's S1 request, interleaved rounds (sqlite, postgres, …).
- F2 cold-key verification: N keys created by the CLI (default Argon2id parameters) and never
  used; the first request of each (a store read and one Argon2id verification) and a second,
  cached one, sequentially on one connection, alternating between the stores.
- F3 revocation lag: three replicas on one PostgreSQL database with `revocation_poll: 1h` (only
  the LISTEN/NOTIFY push can deliver): a used key revoked with the CLI, each replica polled
  every ~2 ms on a connection of its own until it answers 401, the time from the CLI's exit
  taken per replica; restored, and 200 awaited on all. Then the same on one SQLite tollgate
  with `revocation_poll: 1s` (the poll path). The PostgreSQL series runs twice: with a key of
  the default Argon2id parameters (the refusing request verifies it) and with a cheap one.

Needs a PostgreSQL server at 127.0.0.1:5432 (user postgres, trust auth; `--pg-host`, `--pg-port`) and
psql; the benchmark creates a database of its own (random name) and drops it at the end. The
helpers (build, spawn and pinning, configs, wrk) are run.py's. Pinning as in run.py: every
tollgate on CPU 1, the upstream, wrk, this script and the CLI on CPU 0; the PostgreSQL server
is a system service and runs where the kernel puts it.
"""
import argparse
import datetime
import http.client
import os
import queue
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (run.py beside this file: build, spawn, configs, wrk)

URL_ENV = "TOLLGATE_BENCH_POSTGRES_URL"
PATH = "/v1/chat/completions"
# The CLI's defaults for new keys (config `auth.argon2`, not set here): the real cost.
ARGON2 = "m=19456 KiB, t=2, p=1"
# F3's second PostgreSQL series: a hash that costs nothing, so that the lag is the delivery and
# one store read (as in tests/it/fleet.rs).
CHEAP = "argon2: { memory_kib: 64, iterations: 1, parallelism: 1 }"
# F2's unknown ids are failed authentications: the per-source block must not stop them.
NO_BLOCK = "failed_auth: { per_second: 1000000, burst: 1000000 }"


def loadavg():
    return " / ".join(open("/proc/loadavg").read().split()[:3])


def pct(values, p):
    """Nearest rank, as run.py's S3 does (with 60 values p99 is the maximum)."""
    v = sorted(values)
    return v[min(len(v) - 1, int(p * len(v)))]


def ms(seconds):
    return f"{seconds * 1000:.2f} ms"


class Conn:
    """One keep-alive connection to a tollgate, reopened if tollgate closes it."""

    def __init__(self, port):
        self.port, self.conn = port, None

    def post(self, key):
        headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self.conn.request("POST", PATH, body=run.BODY, headers=headers)
                rsp = self.conn.getresponse()
                rsp.read()
                if rsp.will_close:
                    self.close()
                return rsp.status
            except (http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise

    def close(self):
        if self.conn:
            self.conn.close()
        self.conn = None


class Poller(threading.Thread):
    """Polls one replica, on one connection, every `interval` until it answers `want`; reports
    the time from the given start and whether the very first answer was already it."""

    def __init__(self, port, key, interval=0.002):
        super().__init__(daemon=True)
        self.c, self.key, self.interval = Conn(port), key, interval
        self.jobs, self.done = queue.Queue(), queue.Queue()

    def run(self):
        while True:
            t0, want, timeout = self.jobs.get()
            try:
                first, tick = True, time.monotonic()
                while True:
                    status = self.c.post(self.key)
                    now = time.monotonic()
                    if status == want:
                        self.done.put((now - t0, first))
                        break
                    if status not in (200, 401) or now - t0 > timeout:
                        raise RuntimeError(f"replica :{self.c.port}: {status} after {now - t0:.1f} s, waiting for {want}")
                    first = False
                    tick += self.interval
                    time.sleep(max(0.0, tick - time.monotonic()))
            except Exception as e:  # noqa: BLE001  (handed to the main thread)
                self.done.put(e)

    def start_job(self, t0, want, timeout):
        self.jobs.put((t0, want, timeout))

    def result(self):
        r = self.done.get()
        if isinstance(r, Exception):
            raise r
        return r


class Fleet(run.Bench):
    def __init__(self, args):
        super().__init__(args)
        self.db = f"tollgate_bench_{secrets.token_hex(6)}"
        self.db_created = False
        self.loads = {}

    def psql(self, sql):
        run.sh("psql", "-h", self.args.pg_host, "-p", str(self.args.pg_port), "-U", "postgres", "-d", "postgres",
               "-v", "ON_ERROR_STOP=1", "-Atqc", sql)

    def create_db(self):
        self.psql(f"CREATE DATABASE {self.db}")
        self.db_created = True
        os.environ[URL_ENV] = f"postgres://postgres@{self.args.pg_host}:{self.args.pg_port}/{self.db}"

    def drop_db(self):
        if self.db_created:
            self.psql(f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)")
            self.db_created = False

    def store(self, kind, name):
        if kind == "postgres":
            return f"{{ postgres: {{ url_env: {URL_ENV}, pool_size: 8, connect_timeout: 2s, statement_timeout: 2s }} }}"
        return f'{{ sqlite: "{self.tmp}/{name}.db" }}'

    def tollgate(self, name, kind, auth=""):
        """Writes a config (does not start it): a Target without pid, and the config's path."""
        port, admin = run.free_port(), run.free_port()
        config = os.path.join(self.tmp, f"{name}.yaml")
        run.write_config(config, port, admin, self.up, self.tmp, f"auth: {{ {auth} }}\n" if auth else "",
                         store=self.store(kind, name))
        t = run.Target(name, port, port, None, "")
        t.admin, t.config = admin, config
        return t

    def serve(self, t):
        p = self.spawn([self.tollgate_bin, "serve", "--config", t.config], 1)
        t.pid, t.proc = p.pid, p
        run.wait_port(t.h1_port)
        return t

    def halt(self, *targets):
        for t in targets:
            t.proc.terminate()
        for t in targets:
            t.proc.wait(timeout=10)
            self.procs.remove(t.proc)

    def cli(self, t, *args):
        return run.sh(self.tollgate_bin, "keys", "--config", t.config, *args)

    def mark(self, name, since):
        self.loads[name] = {"seconds": time.monotonic() - since, "loadavg": loadavg()}

    def setup(self):
        self.up = run.free_port()
        self.spawn([self.upstream_bin, f"127.0.0.1:{self.up}"], 0)
        run.wait_port(self.up)
        self.loads["start"] = loadavg()
        # F1 and F2 share two tollgates, identical but for the store; their keys are created
        # before they start (F2's: N + 1, the first of which only warms the verifier).
        self.pair = [self.tollgate("sqlite", "sqlite", NO_BLOCK), self.tollgate("postgres", "postgres", NO_BLOCK)]
        started = time.monotonic()
        self.cold = {}
        for t in self.pair:
            t.auth = self.create_key(t.config)
            self.cold[t.name] = [self.create_key(t.config) for _ in range(self.args.keys + 1)]
        self.results["create_s"] = (time.monotonic() - started) / (2 * (self.args.keys + 2))
        for t in self.pair:
            self.serve(t)
            for _ in range(2):  # the first verifies and caches the key
                assert Conn(t.h1_port).post(t.auth) == 200, t.name
        time.sleep(0.5)

    # -- F1 -------------------------------------------------------------------------------
    def f1(self):
        started = time.monotonic()
        for _ in range(self.args.rounds):
            for t in self.pair:  # interleaved: sqlite, postgres, sqlite, …
                before = self.metric("tollgate_auth_cache_misses_total", t.admin)
                r = self.wrk(t)
                r["misses"] = self.metric("tollgate_auth_cache_misses_total", t.admin) - before
                assert Conn(t.h1_port).post(t.auth) == 200, t.name
                self.results.setdefault("f1", {}).setdefault(t.name, []).append(r)
                print(f"F1 {t.name:8} {r['rps']:10.0f} req/s  cpu {r['cpu_ms_per_1000']:6.1f} ms/1k  "
                      f"cache misses {r['misses']:.0f}", flush=True)
        self.mark("f1", started)

    # -- F2 -------------------------------------------------------------------------------
    def f2(self):
        started = time.monotonic()
        conns = {t.name: Conn(t.h1_port) for t in self.pair}
        out = {t.name: {"first": [], "second": [], "unknown": []} for t in self.pair}
        argon0 = {t.name: self.metric("tollgate_argon2_verifications_total", t.admin) for t in self.pair}
        for i in range(self.args.keys + 1):
            for t in self.pair:  # alternating, so that drift hits both stores alike
                key, c = self.cold[t.name][i], conns[t.name]
                for which in ("first", "second"):
                    t0 = time.perf_counter()
                    status = c.post(key)
                    took = time.perf_counter() - t0
                    assert status == 200, (t.name, which, status)
                    if i:  # key 0 only warms the verifier's working buffer
                        out[t.name][which].append(took)
                # A well-formed key of an unknown id: one store read, no Argon2id (401).
                t0 = time.perf_counter()
                status = c.post(run.well_formed_key())
                took = time.perf_counter() - t0
                assert status == 401, (t.name, "unknown", status)
                if i:
                    out[t.name]["unknown"].append(took)
        for t in self.pair:
            r = out[t.name]
            r["argon2"] = self.metric("tollgate_argon2_verifications_total", t.admin) - argon0[t.name]
            self.results.setdefault("f2", {})[t.name] = r
            print(f"F2 {t.name:8} first request p50 {ms(pct(r['first'], .5))} p99 {ms(pct(r['first'], .99))}; "
                  f"cached p50 {ms(pct(r['second'], .5))} p99 {ms(pct(r['second'], .99))}; "
                  f"unknown id p50 {ms(pct(r['unknown'], .5))} p99 {ms(pct(r['unknown'], .99))}; "
                  f"{r['argon2']:.0f} Argon2id verifications", flush=True)
        self.mark("f2", started)

    # -- F3 -------------------------------------------------------------------------------
    def revocations(self, name, replicas, argon2, key_config=None):
        """`--revocations` times: revoke with the CLI, time each replica's 401 from the CLI's
        exit; restore, and wait for 200 on all. The key is created with `key_config`'s Argon2id
        parameters (default: the replicas')."""
        key = self.create_key(key_config or replicas[0].config)
        key_id = key.split("_")[1]
        pollers = [Poller(t.h1_port, key) for t in replicas]
        for p in pollers:
            p.start()
            p.start_job(time.monotonic(), 200, 10)
        for p in pollers:
            p.result()
        lags, first, cli = [], 0, []
        rnd = random.Random(1)
        for i in range(self.args.revocations):
            # A pause of 0–1 s, so that the revocations do not fall at one phase of the 1 s poll
            # (the restore before is seen at a poll, and 200 awaited right after it).
            time.sleep(rnd.random())
            t_cli = time.monotonic()
            self.cli(replicas[i % len(replicas)], "revoke", key_id)
            t0 = time.monotonic()
            cli.append(t0 - t_cli)
            for p in pollers:
                p.start_job(t0, 401, 10)
            for p in pollers:
                lag, already = p.result()
                lags.append(lag)
                first += already
            self.cli(replicas[(i + 1) % len(replicas)], "restore", key_id)
            t0 = time.monotonic()
            for p in pollers:
                p.start_job(t0, 200, 10)
            for p in pollers:
                p.result()
        for p in pollers:
            p.c.close()
        r = {"replicas": len(replicas), "lags": lags, "first": first, "argon2": argon2, "cli": cli}
        self.results.setdefault("f3", {})[name] = r
        print(f"F3 {name}: {len(lags)} measurements, p50 {ms(pct(lags, .5))} p99 {ms(pct(lags, .99))} "
              f"max {ms(max(lags))}; 401 on the first poll {first}×", flush=True)

    def f3(self):
        started = time.monotonic()
        self.halt(*self.pair)
        fleet = [self.tollgate(f"replica-{i}", "postgres", "revocation_poll: 1h") for i in range(3)]
        for t in fleet:
            self.serve(t)
        push = "postgres, 3 replicas, push (revocation_poll: 1h)"
        self.revocations(push, fleet, ARGON2)
        cheap = self.tollgate("cheap-keys", "postgres", CHEAP)  # the CLI's config only
        self.revocations(push + ", cheap hash", fleet, "m=64 KiB, t=1, p=1", cheap.config)
        self.halt(*fleet)
        single = self.serve(self.tollgate("sqlite-poll", "sqlite", "revocation_poll: 1s"))
        self.revocations("sqlite, 1 instance, poll (revocation_poll: 1s)", [single], ARGON2)
        self.halt(single)
        self.mark("f3", started)

    # -- report ---------------------------------------------------------------------------
    def report(self, command):
        a = self.args
        lines = [f"# Fleet store benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
                 f"{socket.gethostname()}", "", "Command: `" + command + "`", ""]
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        pg = run.version(["psql", "-h", a.pg_host, "-p", str(a.pg_port), "-U", "postgres", "-d", "postgres", "-Atc",
                          "SHOW server_version"])
        lines += [f"- machine: {os.cpu_count()} CPUs ({cpu}), kernel {os.uname().release}",
                  f"- tollgate {run.sh('git', '-C', run.ROOT, 'rev-parse', '--short', 'HEAD').strip()}; "
                  f"PostgreSQL {pg} (unpinned system service); {run.version(['wrk', '-v'])}",
                  "- every tollgate pinned to CPU 1 (one runtime worker, one Argon2id verifier thread); upstream, wrk, "
                  "this script and the CLI on CPU 0",
                  f"- keys created by the CLI with the default Argon2id parameters ({ARGON2}), "
                  f"{self.results['create_s'] * 1000:.0f} ms per `keys create` on average",
                  f"- load average (1 / 5 / 15 min) at the start {self.loads['start']}; after F1 "
                  f"{self.loads['f1']['loadavg']}, F2 {self.loads['f2']['loadavg']}, F3 {self.loads['f3']['loadavg']} "
                  "(other work shares this machine; the ratios are within this run)", ""]
        f1 = self.results["f1"]
        med = {n: statistics.median(r["rps"] for r in rs) for n, rs in f1.items()}
        lines += [f"## F1 cached-key throughput (`wrk -t1 -c64`, HTTP/1.1, {a.rounds} interleaved round(s) of {a.duration} s)",
                  "", "| store | req/s (median) | req/s per round | CPU-ms / 1k req | cache misses during wrk |",
                  "|---|---|---|---|---|"]
        for n, rs in f1.items():
            rounds = ", ".join(f"{r['rps']:.0f}" for r in rs)
            lines.append(f"| {n} | {med[n]:.0f} | {rounds} | "
                         f"{statistics.median(r['cpu_ms_per_1000'] for r in rs):.1f} (median) | {sum(r['misses'] for r in rs):.0f} |")
        per_round = ", ".join(f"{p['rps'] / q['rps']:.2f}" for q, p in zip(f1["sqlite"], f1["postgres"]))
        cpu = {n: statistics.median(r["cpu_ms_per_1000"] for r in rs) for n, rs in f1.items()}
        lines += ["", f"postgres / sqlite, req/s (medians): **{med['postgres'] / med['sqlite']:.2f}**; per round: {per_round}. "
                  f"CPU-ms per 1k requests, postgres / sqlite: {cpu['postgres'] / cpu['sqlite']:.2f} (the work per request, "
                  "less moved by other load on the machine than req/s).", ""]
        f2 = self.results["f2"]
        lines += [f"## F2 cold-key verification ({a.keys} keys never used, one connection, sequential, stores alternating)",
                  "", "| store | first request p50 | p99 | second (cached) p50 | p99 | unknown id (store read, no Argon2id) p50 | p99 | Argon2id verifications |",
                  "|---|---|---|---|---|---|---|---|"]
        for n, r in f2.items():
            lines.append(f"| {n} | {ms(pct(r['first'], .5))} | {ms(pct(r['first'], .99))} | {ms(pct(r['second'], .5))} | "
                         f"{ms(pct(r['second'], .99))} | {ms(pct(r['unknown'], .5))} | {ms(pct(r['unknown'], .99))} | "
                         f"{r['argon2']:.0f} |")
        ratio = pct(f2["postgres"]["first"], .5) / pct(f2["sqlite"]["first"], .5)
        lines += ["", f"First request, postgres / sqlite p50: **{ratio:.2f}**. One more key per store, not counted, warmed "
                  "the verifier's working buffer first (the verification count includes it). After each key's two "
                  "requests, a well-formed key of an unknown id (401) times a store read without the hash.", ""]
        f3 = self.results["f3"]
        lines += [f"## F3 revocation lag (CLI revoke → 401, from the CLI's exit; each replica polled every ~2 ms)", "",
                  "| store, path | key's Argon2id | replicas | revocations | measurements | p50 | p99 | max | 401 already at the first poll | CLI `revoke` run time (median) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for n, r in f3.items():
            lags = r["lags"]
            lines.append(f"| {n} | {r['argon2']} | {r['replicas']} | {len(lags) // r['replicas']} | {len(lags)} | "
                         f"{ms(pct(lags, .5))} | {ms(pct(lags, .99))} | {ms(max(lags))} | {r['first']} | "
                         f"{ms(statistics.median(r['cli']))} |")
        lines += ["", "A lag is the time from the CLI's exit to the 401 response's arrival: it includes up to one "
                  "polling interval and the request that gets the 401, which is a cache miss (the change evicted "
                  "the key): one store read and one Argon2id verification (a revoked key's secret is verified "
                  "before its revocation is told), the three replicas' at once on their one shared CPU. The cheap-hash "
                  "series leaves the hash out. Each revocation follows a random pause of 0–1 s (off the SQLite poll's phase). A 401 already at the first poll means the change had arrived before "
                  "the CLI had exited. Percentiles are nearest-rank.", ""]
        return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per F1 run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved F1 rounds")
    ap.add_argument("--keys", type=int, default=200, help="F2 cold keys per store")
    ap.add_argument("--revocations", type=int, default=20, help="F3 revocations per store")
    ap.add_argument("--smoke", action="store_true", help="1 round of 2 s, 10 keys, 3 revocations, no results file")
    ap.add_argument("--pg-host", default="127.0.0.1")
    ap.add_argument("--pg-port", type=int, default=5432)
    ap.add_argument("--out", default=os.path.join(run.ROOT, "benches", "results"))
    args = ap.parse_args()
    if args.smoke:
        args.duration, args.rounds, args.keys, args.revocations = 2, 1, 10, 3
    for tool in ("wrk", "taskset", "psql"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed: apt-get install wrk util-linux postgresql-client")
    # A SIGTERM (CI's timeout, a ^C in a wrapper) still stops the processes and drops the database.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    bench = Fleet(args)
    bench.build()
    os.sched_setaffinity(0, {0})  # this script (the F2 client, the F3 pollers) and the CLI: CPU 0
    try:
        bench.create_db()
        bench.setup()
        bench.f1()
        bench.f2()
        bench.f3()
    finally:
        bench.stop()
        bench.drop_db()
    report = bench.report(" ".join(["python3", "benches/load/fleet.py"] + sys.argv[1:]))
    print(report)
    print(f"({time.monotonic() - started:.0f} s in all)")
    if not args.smoke:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"{datetime.date.today()}-{socket.gethostname()}-fleet.md")
        with open(path, "w") as f:
            f.write(report)
        print(f"written to {path}")


if __name__ == "__main__":
    main()
