//! Runs tollgate as users do: the real binary, a real config file, real sockets. Each instance
//! binds `127.0.0.1:0` for both listeners and reports the ports in its JSON `listening` log line.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

pub struct Builder {
    sections: BTreeMap<String, String>,
    env: Vec<(String, String)>,
}

impl Builder {
    /// Sets a top-level config section, as YAML text (flow or block), replacing the default.
    pub fn section(mut self, name: &str, yaml: &str) -> Self {
        self.sections.insert(name.to_string(), yaml.to_string());
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Keys in the PostgreSQL database at `url` (a test's own), its URL in the environment as
    /// tollgate wants it; `extra` is added to `store.postgres` (flow YAML fields).
    pub fn postgres(self, url: &str, extra: &str) -> Self {
        let sep = if extra.is_empty() { "" } else { ", " };
        self.section("store", &format!("{{ postgres: {{ url_env: TG_TEST_PG_URL{sep}{extra} }} }}"))
            .env("TG_TEST_PG_URL", url)
    }

    pub fn yaml(&self) -> String {
        self.sections.iter().map(|(k, v)| format!("{k}: {v}\n")).collect()
    }

    pub fn start(mut self) -> Tollgate {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("tollgate.yaml");
        if !self.sections.contains_key("store") {
            let db = dir.path().join("tollgate.db");
            self.sections.insert("store".into(), format!("{{ sqlite: \"{}\" }}", db.display()));
        }
        std::fs::write(&config, self.yaml()).expect("write config");
        // Every instance starts with one ordinary inference key (created before the server, as an
        // operator would).
        let key = create_key_env(
            &config,
            &self.env,
            &[
                "--org",
                "acme",
                "--tier",
                "enterprise",
                "--scope",
                "inference:read",
                "--scope",
                "inference:write",
            ],
        );
        let mut tg = Tollgate::spawn(dir, config, &self.env);
        tg.key = key;
        tg.env = self.env;
        tg
    }
}

pub struct Tollgate {
    child: Child,
    /// A valid key of org `acme`, tier `enterprise`, scopes `inference:read` + `inference:write`.
    pub key: String,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
    /// The environment it was started with, also given to `keys` (the store's URL).
    pub env: Vec<(String, String)>,
    logs: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Tollgate {
    pub fn builder(upstream: &str) -> Builder {
        let mut sections = BTreeMap::new();
        sections.insert("listen".into(), "127.0.0.1:0".into());
        sections.insert("admin_listen".into(), "127.0.0.1:0".into());
        sections.insert("log".into(), "{ format: json, level: debug }".into());
        sections.insert("upstream".into(), format!("{{ url: \"{upstream}\" }}"));
        sections.insert("shutdown".into(), "{ drain_delay: 0s, timeout: 10s }".into());
        Builder { sections, env: Vec::new() }
    }

    fn spawn(dir: tempfile::TempDir, config: PathBuf, env: &[(String, String)]) -> Tollgate {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").arg("--config").arg(&config).current_dir(dir.path());
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn tollgate");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let logs = logs.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if line.contains("\"listening\"") {
                        let _ = tx.send(line.clone());
                    }
                    logs.lock().expect("lock").push(line);
                }
            });
        }
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("tollgate did not start: {:?}", logs.lock().expect("lock"));
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        let addr = v["public"].as_str().expect("public").parse().expect("addr");
        let admin = v["admin"].as_str().expect("admin").parse().expect("addr");
        Tollgate { child, key: String::new(), addr, admin, config, env: Vec::new(), logs, _dir: dir }
    }

    /// `tollgate keys …` against this instance's config.
    pub fn keys(&self, args: &[&str]) -> std::process::Output {
        keys_cli_env(&self.config, &self.env, args)
    }

    /// Creates a key with the CLI and returns its plaintext.
    pub fn create_key(&self, args: &[&str]) -> String {
        create_key_env(&self.config, &self.env, args)
    }

    /// GET with this instance's default key.
    pub fn get(&self, path: &str) -> http::request::Builder {
        get(&self.url(path)).header("authorization", format!("Bearer {}", self.key))
    }

    /// POST of JSON with this instance's default key.
    pub fn post(&self, path: &str) -> http::request::Builder {
        post_json(&self.url(path)).header("authorization", format!("Bearer {}", self.key))
    }

    /// A streamed chat completion from the test upstream: `events` SSE events `interval_ms`
    /// apart, then `data: [DONE]`.
    pub fn sse(&self, events: u32, interval_ms: u64) -> Request<Full<Bytes>> {
        self.post("/v1/chat/completions")
            .header("x-mock", "sse")
            .header("x-mock-events", events.to_string())
            .header("x-mock-interval-ms", interval_ms.to_string())
            .body(Full::from(r#"{"stream":true}"#))
            .expect("request")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().expect("lock").join("\n")
    }

    /// Waits until a log line contains `needle`.
    pub async fn wait_log(&self, needle: &str, within: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < within {
            if self.logs().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit, up to `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// The current value of a metric series (exact line prefix, labels in Prometheus order).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = get_text(&self.admin_url("/metrics")).await;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn keys_cli(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    keys_cli_env(config, &[], args)
}

/// `tollgate keys …` with extra environment (a PostgreSQL store's URL).
pub fn keys_cli_env(
    config: &std::path::Path,
    env: &[(String, String)],
    args: &[&str],
) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("keys").arg("--config").arg(config).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run tollgate keys")
}

pub fn create_key(config: &std::path::Path, args: &[&str]) -> String {
    create_key_env(config, &[], args)
}

pub fn create_key_env(config: &std::path::Path, env: &[(String, String)], args: &[&str]) -> String {
    let mut full = vec!["create"];
    full.extend_from_slice(args);
    let out = keys_cli_env(config, env, &full);
    assert!(out.status.success(), "keys create failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().next().expect("key line").to_string()
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// HTTP/1.1 client, pooled.
pub fn h1() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// HTTP/2 with prior knowledge (h2c).
pub fn h2c() -> TestClient {
    Client::builder(TokioExecutor::new()).http2_only(true).build(HttpConnector::new())
}

pub fn get(url: &str) -> http::request::Builder {
    Request::get(url)
}

pub fn post_json(url: &str) -> http::request::Builder {
    Request::post(url).header("content-type", "application/json")
}

pub async fn send(client: &TestClient, req: Request<Full<Bytes>>) -> Response<Incoming> {
    tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("response within 30s")
        .expect("response")
}

/// Sends and reads the whole body as JSON.
pub async fn send_json(client: &TestClient, req: Request<Full<Bytes>>) -> (Response<()>, serde_json::Value) {
    let rsp = send(client, req).await;
    let (parts, body) = rsp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)));
    (Response::from_parts(parts, ()), v)
}

pub async fn get_text(url: &str) -> String {
    let rsp = send(&h1(), get(url).body(Full::default()).expect("req")).await;
    let bytes = rsp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

pub async fn status_of(url: &str) -> u16 {
    send(&h1(), get(url).body(Full::default()).expect("req")).await.status().as_u16()
}

/// Asserts the §5 error shape and returns the body.
#[track_caller]
pub fn assert_error(rsp: &Response<()>, body: &serde_json::Value, status: u16, code: &str) {
    assert_eq!(rsp.status().as_u16(), status, "status; body {body}");
    assert_eq!(rsp.headers()["content-type"], "application/json");
    assert_eq!(rsp.headers()["x-tollgate-error"], code);
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
    assert!(body["error"]["details"].is_object(), "{body}");
}

/// A request to `tg` with `key` as its Bearer token and an optional JSON body.
pub fn call(
    tg: &Tollgate,
    method: &str,
    path: &str,
    key: &str,
    body: Option<serde_json::Value>,
) -> Request<Full<bytes::Bytes>> {
    Request::builder()
        .method(method)
        .uri(tg.url(path))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(body.map_or_else(Full::default, |b| Full::from(b.to_string())))
        .unwrap()
}
