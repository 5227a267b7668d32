"""The key dashboard (SPEC §13) end to end in a real browser: Debian's chromium driven by
Playwright (never a browser of Playwright's own), headless, against the tollgate debug binary
and a real upstream (a small HTTP server here that answers /v1/models).

Run by `.ci/test` after the packaging tests. Under CI=true a missing chromium or playwright
fails the test; elsewhere it is skipped with the reason.
"""
import http.server
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOLLGATE = os.environ.get("TOLLGATE_BIN", str(ROOT / "target" / "debug" / "tollgate"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = pathlib.Path(os.environ.get("DASHBOARD_SCREENSHOT", "/tmp/tollgate-dashboard.png"))
CI = os.environ.get("CI", "").lower() == "true"

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError as e:  # pragma: no cover - depends on the machine
    sync_playwright = None
    IMPORT_ERROR = str(e)


def need(condition, why):
    """A missing tool fails under CI (where .ci/test installs it) and skips elsewhere."""
    if condition:
        return
    if CI:
        pytest.fail(why + " (CI=true: .ci/test installs it)")
    pytest.skip(why)


class Models(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/v1/models":
            body = json.dumps({"object": "list", "data": [{"id": "mock-model", "object": "model"}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
        else:
            body = b'{"error": "not here"}'
            self.send_response(404)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()


class Tollgate:
    def __init__(self, workdir, upstream_url):
        self.dir = pathlib.Path(workdir)
        self.config = self.dir / "tollgate.yaml"
        self.config.write_text(
            "listen: 127.0.0.1:0\n"
            "admin_listen: 127.0.0.1:0\n"
            "log: { format: json, level: info }\n"
            'upstream: { url: "%s" }\n'
            'store: { sqlite: "%s" }\n'
            "shutdown: { drain_delay: 0s, timeout: 5s }\n"
            "tiers:\n"
            "  audit: { requests_per_second: 50, burst: 200, daily_requests: 100000,\n"
            "           tokens_per_minute: 200000, daily_tokens: 20000000, max_concurrent_requests: 20,\n"
            "           scopes: [inference:read, inference:write, vetted:read, admin:keys] }\n"
            "  enterprise: { requests_per_second: 1000, burst: 4000 }\n" % (upstream_url, self.dir / "keys.db")
        )
        self.proc = None
        self.url = None
        self.lines = []

    def cli(self, *args):
        out = subprocess.run([TOLLGATE, "keys", "--config", str(self.config), *args], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def create(self, *args):
        return json.loads(self.cli("create", "--json", *args))

    def start(self):
        self.proc = subprocess.Popen(
            [TOLLGATE, "serve", "--config", str(self.config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=self.dir,
        )
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if '"listening"' in line:
                    self.url = "http://" + json.loads(line)["public"]
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        assert ready.wait(30), "tollgate did not start:\n" + "".join(self.lines)

    def stop(self):
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def tollgate(upstream):
    need(os.path.exists(TOLLGATE), "no tollgate binary at %s (cargo build)" % TOLLGATE)
    with tempfile.TemporaryDirectory() as d:
        tg = Tollgate(d, upstream)
        tg.admin = tg.create("--org", "acme", "--tier", "audit", "--name", "dashboard-admin",
                             "--scope", "admin:keys", "--scope", "inference:read", "--scope", "inference:write")
        tg.reader = tg.create("--org", "acme", "--tier", "audit", "--name", "read-only",
                              "--scope", "inference:read")
        tg.start()
        yield tg
        tg.stop()


def status(tg, path, key):
    req = urllib.request.Request(tg.url + path, headers={"Authorization": "Bearer " + key})
    try:
        with urllib.request.urlopen(req, timeout=10) as rsp:
            return rsp.status
    except urllib.error.HTTPError as e:
        return e.code


def api_message(tg, path, key):
    req = urllib.request.Request(tg.url + path, headers={"Authorization": "Bearer " + key})
    try:
        urllib.request.urlopen(req, timeout=10)
    except urllib.error.HTTPError as e:
        return json.loads(e.read())["error"]["message"]
    raise AssertionError("expected an error from " + path)


LEAKS = """() => ({
  local: JSON.stringify(Object.entries(window.localStorage)),
  session: JSON.stringify(Object.entries(window.sessionStorage)),
  cookie: document.cookie,
  href: location.href,
  inputs: Array.from(document.querySelectorAll('input')).map((i) => i.value).join(' '),
})"""


def assert_no_leak(page, secrets, where):
    """No key in web storage, cookies or the URL — ever; and none left in a form field."""
    seen = page.evaluate(LEAKS)
    for secret in secrets:
        for place, value in seen.items():
            assert secret not in value, "a key leaked into %s after %s" % (place, where)


def test_dashboard_end_to_end(tollgate):
    need(sync_playwright is not None, "python playwright is not installed")
    need(os.path.exists(CHROMIUM), "no chromium at %s (apt-get install chromium)" % CHROMIUM)
    tg = tollgate
    admin_key, admin_id = tg.admin["key"], tg.admin["id"]
    reader_key = tg.reader["key"]
    secrets = [admin_key, reader_key]

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where chromium's sandbox cannot start.
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1360, "height": 900})
        page = context.new_page()
        problems = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))

        rsp = page.goto(tg.url + "/dashboard")
        assert rsp.status == 200
        csp = rsp.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert rsp.headers["x-frame-options"] == "DENY"
        expect(page.get_by_label("Admin API key")).to_be_focused()

        # A key that is not one: the API's own 401 message.
        bogus = "tg_AAAAAAAAAAAA_" + "B" * 32
        page.get_by_label("Admin API key").fill(bogus)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#alert")).to_contain_text(api_message(tg, "/v1/limits", bogus))
        expect(page.locator("#app")).to_be_hidden()
        assert_no_leak(page, secrets + [bogus], "a wrong key")

        # A read-only key cannot manage keys, and the page says why (the API's 403 with it).
        page.get_by_label("Admin API key").fill(reader_key)
        page.get_by_role("button", name="Sign in").click()
        alert = page.locator("#alert")
        expect(alert).to_contain_text("cannot manage keys")
        expect(alert).to_contain_text(api_message(tg, "/v1/keys", reader_key))
        expect(alert).to_contain_text("admin:keys")
        expect(page.locator("#app")).to_be_hidden()
        assert_no_leak(page, secrets, "a read-only sign-in")

        # The admin signs in: its organisation's keys and limits.
        page.get_by_label("Admin API key").fill(admin_key)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#app")).to_be_visible()
        expect(page.locator("#whoami-text")).to_contain_text(admin_id)
        expect(page.locator("#limits-summary")).to_contain_text("Tier audit")
        expect(page.locator('#limits-body tr[data-limit="requests_per_second"]')).to_contain_text("50 per second, burst 200")
        expect(page.locator('#limits-body tr[data-limit="daily_requests"]')).to_contain_text("100,000 per day")
        expect(page.locator('#limits-body tr[data-limit="tokens_per_minute"]')).to_contain_text("200,000 tokens per minute")
        expect(page.locator('#limits-body tr[data-limit="tokens_per_minute"]')).to_contain_text("200,000 now")
        expect(page.locator('#limits-body tr[data-limit="daily_tokens"]')).to_contain_text("20,000,000 tokens per day")
        expect(page.locator('#limits-body tr[data-limit="concurrent_requests"]')).to_contain_text("20 at once")
        # The page's own listing of keys is in flight while it reads the limits, or not: 19 or 20 free.
        expect(page.locator('#limits-body tr[data-limit="concurrent_requests"]')).to_contain_text(re.compile(r"(19|20) free"))
        expect(page.locator("tr[data-key-id='%s']" % admin_id)).to_contain_text("this key")
        assert_no_leak(page, secrets, "sign-in")

        # Create a key with an individual scope; it is shown once, with the seeds' warning.
        page.get_by_role("button", name="Create key").click()
        page.get_by_label("Name").fill("e2e-backend")
        page.get_by_label("Individual scopes").check()
        page.locator("#create-scope-list").get_by_label("inference:read").check()
        page.locator("#create-expiry").select_option("30d")
        page.locator("#create-submit").click()
        dialog = page.locator("#secret-dialog")
        expect(dialog).to_be_visible()
        expect(dialog).to_contain_text("This key is shown once")
        expect(dialog).to_contain_text("store it securely")
        new_key = page.locator("#secret-value").input_value()
        assert new_key.startswith("tg_"), new_key
        secrets.append(new_key)
        page.locator("#secret-copy").click()
        expect(page.locator("#secret-copied")).not_to_be_empty()
        page.get_by_role("button", name="I have stored it — close").click()
        expect(dialog).to_be_hidden()
        # Gone from the page: not in any field, nor anywhere in the document.
        assert new_key not in page.content()
        assert_no_leak(page, secrets, "create")
        new_id = new_key.split("_")[1]
        row = page.locator("tr[data-key-id='%s']" % new_id)
        expect(row).to_contain_text("e2e-backend")
        expect(row).to_contain_text("inference:read")
        expect(row).to_contain_text("active")

        # The key works against the upstream.
        assert status(tg, "/v1/models", new_key) == 200

        # Revoke, with a confirmation naming the key → 401 at once.
        row.get_by_role("button", name="Revoke").click()
        confirm = page.locator("#confirm-dialog")
        expect(confirm).to_contain_text("e2e-backend")
        expect(confirm).to_contain_text(new_id)
        page.locator("#confirm-yes").click()
        expect(confirm).to_be_hidden()
        expect(page.locator("#status")).to_contain_text("can be restored until")
        expect(row).to_contain_text("revoked")
        expect(row).to_contain_text("Restorable until")
        assert_no_leak(page, secrets, "revoke")
        assert status(tg, "/v1/models", new_key) == 401

        # The filter: only revoked keys, then only active ones.
        page.get_by_label("Show").select_option("revoked")
        expect(row).to_be_visible()
        expect(page.locator("tr[data-key-id='%s']" % admin_id)).to_have_count(0)
        page.get_by_label("Show").select_option("active")
        expect(row).to_have_count(0)
        page.get_by_label("Show").select_option("all")

        # Restore → 200 again.
        row.get_by_role("button", name="Restore").click()
        expect(page.locator("#status")).to_contain_text("Restored")
        expect(row).to_contain_text("active")
        assert_no_leak(page, secrets, "restore")
        assert status(tg, "/v1/models", new_key) == 200

        # Rotate, inheriting the scopes: a new key shown once, and the reminder to revoke the old.
        row.get_by_role("button", name="Rotate").click()
        rotate = page.locator("#rotate-dialog")
        expect(rotate).to_be_visible()
        expect(rotate.get_by_label("inference:read")).to_be_checked()
        page.locator("#rotate-submit").click()
        expect(dialog).to_be_visible()
        expect(page.locator("#secret-rotate-note")).to_contain_text("revoke the old key")
        expect(page.locator("#secret-rotate-note")).to_contain_text(new_id)
        rotated_key = page.locator("#secret-value").input_value()
        assert rotated_key.startswith("tg_") and rotated_key != new_key
        secrets.append(rotated_key)
        page.keyboard.press("Escape")
        expect(dialog).to_be_hidden()
        assert rotated_key not in page.content()
        assert_no_leak(page, secrets, "rotate")
        assert status(tg, "/v1/models", rotated_key) == 200
        rotated_row = page.locator("tr[data-key-id='%s']" % rotated_key.split("_")[1])
        expect(rotated_row).to_contain_text("inference:read")

        # The audit trail: every action, by the admin's key id.
        row.get_by_role("button", name="Audit").click()
        audit = page.locator("#audit")
        expect(audit).to_be_visible()
        expect(page.locator("#audit-title")).to_be_focused()
        for action in ["create", "revoke", "restore", "rotate"]:
            expect(audit.locator("tr", has_text=action).first).to_contain_text(admin_id)
        expect(audit).to_contain_text("(you)")
        assert_no_leak(page, secrets, "audit")

        page.locator("#limits-refresh").click()
        expect(page.locator("#status")).to_contain_text("Limits refreshed")
        expect(page.locator('#limits-body tr[data-limit="daily_requests"]')).to_contain_text("used")

        # The main view, for a person to look at (not committed).
        page.locator("#audit-close").click()
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        # And on a phone-sized screen the tables become cards.
        page.set_viewport_size({"width": 390, "height": 844})
        page.screenshot(path=str(SCREENSHOT.with_name(SCREENSHOT.stem + "-narrow.png")), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        page.set_viewport_size({"width": 1360, "height": 900})

        # Sign-out forgets the key: the API is no longer reachable from the page.
        page.get_by_role("button", name="Sign out").click()
        expect(page.locator("#signin")).to_be_visible()
        expect(page.locator("#app")).to_be_hidden()
        expect(page.locator("#keys-body tr")).to_have_count(0)
        assert_no_leak(page, secrets, "sign-out")

        assert not [m for m in problems if "Content Security Policy" in m or "Refused" in m], problems
        browser.close()
