//! The whole public stack, as `tollgate::serve` builds it: the hyper-util auto server
//! (HTTP/1.1 and h2c) of `server::serve_public`, the pipeline (target checks, authentication
//! against a real SQLite store with Argon2id, scopes, rate limits, the key API) and forwarding
//! to an upstream — here a small in-process HTTP/1.1 server on a loopback port.
//!
//! Input: the bytes a client sends on one connection (HTTP/1.1 requests, or the h2c
//! prior-knowledge preface and frames), written into one end of a `tokio::io::duplex` whose
//! other end is served. The responses are read until the server goes quiet, then the client
//! closes; the run ends when the server has closed its side. Errors are fine; panics — in the
//! proxy, the server or the upstream's checks below — and connections that outlive their client
//! are not.
//!
//! The upstream checks what the pipeline promises about what reaches it: the path passed the
//! target checks; the client's `Authorization` never arrives (the configured upstream key does,
//! once); identity headers (`x-tollgate-*`) are only the proxy's own, never on a public route.
//!
//! Fixture keys (`corpus/pipeline` uses them; `make_seeds.py` builds them the same way):
//! `tg_FuzzInfer001_…` (inference, org acme), `tg_FuzzAdmin001_…` (admin:keys and inference,
//! org fuzzadmin), `tg_FuzzLimit001_…` (tier `tight`: 1 request per second), `tg_FuzzRevkd001_…`
//! (revoked), `tg_FuzzExpir001_…` (expired), `tg_FuzzWkspc001_…` (another workspace).
//! Between runs the admin key is restored if an input revoked it, so that runs stay alike.
#![no_main]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

use tollgate::config::{Config, Limits};
use tollgate::net::Peer;
use tollgate::keys::{AuditEvent, KeyRecord};
use tollgate::proxy::Proxy;
use tollgate::state::{Snapshot, State};

/// How long the server may stay silent, with no request in flight, before the client hangs up.
/// Responses here take well under a millisecond; what is still waiting after this is waiting
/// for more input.
const QUIET: Duration = Duration::from_millis(3);
/// How long nothing at all may move before the client hangs up anyway: a request waiting for
/// the rest of its body, a window the client never opens. Store and Argon2id work take about a
/// millisecond here; `TOLLGATE_FUZZ_STALL_MS` sets another value.
const STALL: Duration = Duration::from_millis(20);
/// The longest a run may take in all.
const RUN_LIMIT: Duration = Duration::from_secs(8);
/// How long the server may keep a connection after its client has gone (generous: on a loaded
/// 2-core machine a closing connection waited more than 2 s once, with nothing wrong).
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

const UPSTREAM_KEY_ENV: &str = "TOLLGATE_FUZZ_UPSTREAM_KEY";
const UPSTREAM_KEY: &str = "upstream-secret";
const SECRET: &str = "S3cretS3cretS3cretS3cretS3cret00";
const ADMIN_ID: &str = "FuzzAdmin001";
const ORGS: &[&str] = &["acme", "fuzzadmin"];

struct Harness {
    rt: Runtime,
    stall: Duration,
    proxy: Proxy,
    state: Arc<State>,
    limits: Limits,
    _dir: tempfile::TempDir,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();
static PORT: AtomicU16 = AtomicU16::new(1024);

fn config_yaml(upstream: SocketAddr, db: &std::path::Path) -> String {
    format!(
        r#"
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
upstream:
  url: "http://{upstream}"
  connect_timeout: 500ms
  timeout: 2s
  api_key_env: {UPSTREAM_KEY_ENV}
limits:
  max_header_bytes: 4KiB
  max_body_bytes: 64KiB
  header_read_timeout: 2s
  stream_idle_timeout: 1s
store:
  sqlite: "{db}"
auth:
  key_prefix: tg
  workspace: prod
  negative_cache_ttl: 1s
  argon2: {{ memory_kib: 8, iterations: 1, parallelism: 1 }}
  failed_auth: {{ per_second: 1000000, burst: 1000000 }}
tiers:
  free: {{}}
  tight: {{ requests_per_second: 1, burst: 1, daily_requests: 1000000 }}
routes:
  - {{ method: GET, path: /v1/models, scope: inference:read }}
  - {{ method: GET, path: /v1/models/*, scope: inference:read }}
  - {{ method: POST, path: /v1/chat/completions, scope: inference:write }}
  - {{ method: POST, path: /v1/completions, scope: inference:write }}
  - {{ method: POST, path: /v1/embeddings, scope: inference:write }}
  - {{ method: GET, path: /health, public: true }}
  - {{ path: /v1/files/*, scope: files }}
"#,
        db = db.display()
    )
}

/// The fixture keys: (id, org, tier, scopes, workspace, revoked, expired).
#[allow(clippy::type_complexity)]
const KEYS: &[(&str, &str, &str, &[&str], &str, bool, bool)] = &[
    ("FuzzInfer001", "acme", "free", &["inference:read", "inference:write"], "prod", false, false),
    (
        ADMIN_ID,
        "fuzzadmin",
        "free",
        &["admin:keys", "files", "inference:read", "inference:write"],
        "prod",
        false,
        false,
    ),
    ("FuzzLimit001", "acme", "tight", &["inference:read", "inference:write"], "prod", false, false),
    ("FuzzRevkd001", "acme", "free", &["inference:read", "inference:write"], "prod", true, false),
    ("FuzzExpir001", "acme", "free", &["inference:read", "inference:write"], "prod", false, true),
    ("FuzzWkspc001", "acme", "free", &["inference:read", "inference:write"], "staging", false, false),
];

fn harness() -> &'static Harness {
    HARNESS.get_or_init(|| {
        // An access log that goes nowhere: the log paths (key redaction) run too.
        if std::env::var_os("TOLLGATE_FUZZ_LOG").is_some() {
            tracing_subscriber::fmt().with_env_filter("debug").with_writer(std::io::stderr).init();
        } else {
            tracing_subscriber::fmt().json().with_env_filter("info").with_writer(std::io::sink).init();
        }
        // Set before any other thread starts.
        std::env::set_var(UPSTREAM_KEY_ENV, UPSTREAM_KEY);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("fuzz.db");
        let (state, limits) = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
            let upstream = listener.local_addr().expect("upstream address");
            tokio::spawn(serve_upstream(listener));
            let config = Config::from_yaml(&config_yaml(upstream, &db), "fuzz").expect("fuzz config");
            let store = tollgate::store::open(&config.store).await.expect("store");
            let now = tollgate::clock::now_ms();
            let params = config.auth.argon2;
            for &(id, org, tier, scopes, workspace, revoked, expired) in KEYS {
                let record = KeyRecord {
                    id: id.into(),
                    name: format!("fuzz {id}"),
                    org: org.into(),
                    workspace: workspace.into(),
                    tier: tier.into(),
                    scopes: scopes.iter().map(|s| s.to_string()).collect(),
                    secret_hash: params.hash(SECRET).expect("hash"),
                    created_at: now - 1000,
                    expires_at: expired.then_some(now - 500),
                    last_used_at: None,
                    revoked_at: revoked.then_some(now - 500),
                    revoked_by: revoked.then(|| "cli".to_string()),
                    rotated_from: None,
                };
                store.insert(&record, &event(id, org, "create", now)).await.expect("insert fixture key");
            }
            let metrics = tollgate::metrics::Metrics::new().expect("metrics");
            let snapshot = Snapshot::build(config, None).expect("snapshot");
            let limits = snapshot.config.limits.clone();
            let auth =
                Arc::new(tollgate::auth::Authenticator::new(store, &snapshot.config.auth).expect("auth"));
            (Arc::new(State::new(snapshot, metrics, auth, None)), limits)
        });
        let stall = std::env::var("TOLLGATE_FUZZ_STALL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(STALL, Duration::from_millis);
        Harness { rt, stall, proxy: Proxy::new(state.clone()), state, limits, _dir: dir }
    })
}

fn event(id: &str, org: &str, action: &str, at: i64) -> AuditEvent {
    AuditEvent {
        key_id: id.into(),
        org: org.into(),
        action: action.into(),
        actor: "cli".into(),
        at,
        detail: None,
    }
}

// ---------------------------------------------------------------------------------------------
// The upstream.
// ---------------------------------------------------------------------------------------------

async fn serve_upstream(listener: tokio::net::TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(|req| async move { Ok::<_, Infallible>(upstream(req).await) });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// The pipeline's promises about what reaches the upstream; a broken one aborts the run.
fn check_upstream_request(req: &Request<Incoming>) {
    let path = req.uri().path();
    assert!(path.starts_with('/') && !path.contains("//") && !path.contains('\\'), "upstream got {path:?}");
    assert!(path.split('/').all(|s| s != "." && s != ".."), "upstream got {path:?}");
    let auth: Vec<_> = req.headers().get_all(header::AUTHORIZATION).iter().collect();
    assert_eq!(auth.len(), 1, "upstream got {} Authorization headers", auth.len());
    assert_eq!(
        auth[0].as_bytes(),
        format!("Bearer {UPSTREAM_KEY}").as_bytes(),
        "the client's Authorization reached the upstream"
    );
    let public = path == "/health";
    for (name, value) in req.headers() {
        if name.as_str().starts_with("x-tollgate-") {
            assert!(!public, "identity header {name} on a public route");
            assert_eq!(req.headers().get_all(name).iter().count(), 1, "{name} sent twice");
            if name == "x-tollgate-org" {
                assert!(ORGS.iter().any(|o| value == o), "x-tollgate-org: {value:?} did not come from a key");
            }
            if name == "x-tollgate-key-id" {
                assert!(KEYS.iter().any(|k| value == k.0), "x-tollgate-key-id: {value:?} is no fixture key");
            }
        }
    }
}

async fn upstream(req: Request<Incoming>) -> Response<UpBody> {
    check_upstream_request(&req);
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let status = query
        .split('&')
        .find_map(|p| p.strip_prefix("status="))
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    if path.ends_with("/slow") {
        // Longer than the client waits in silence (STALL): it hangs up while the pipeline waits.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut rsp = if path == "/v1/chat/completions" && body.windows(6).any(|w| w == b"stream") {
        // Server-sent events in several chunks, of unknown length.
        let mut r = Response::new(UpBody::Chunks(
            ["data: {\"a\":1}\n\n", "data: {\"b\":2}\n\n", "data: [DONE]\n\n"]
                .iter()
                .map(|s| Bytes::from_static(s.as_bytes()))
                .collect(),
        ));
        r.headers_mut().insert(header::CONTENT_TYPE, "text/event-stream".parse().expect("static"));
        r
    } else if path.ends_with("/hop") {
        // Hop-by-hop headers the proxy must not pass on.
        let mut r = Response::new(UpBody::Full(Full::new(body)));
        for (k, v) in [
            ("connection", "x-hop, keep-alive"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "x"),
        ] {
            r.headers_mut().insert(k, v.parse().expect("static"));
        }
        r
    } else {
        let echo = [path.as_bytes(), b"\n", &body].concat();
        Response::new(UpBody::Full(Full::new(Bytes::from(echo))))
    };
    *rsp.status_mut() = status;
    rsp
}

enum UpBody {
    Full(Full<Bytes>),
    Chunks(std::collections::VecDeque<Bytes>),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            UpBody::Full(b) => Pin::new(b).poll_frame(cx),
            UpBody::Chunks(c) => Poll::Ready(c.pop_front().map(|b| Ok(Frame::data(b)))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One client connection.
// ---------------------------------------------------------------------------------------------

async fn run(h: &Harness, data: &[u8]) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let graceful = GracefulShutdown::new();
    // A new source port per connection, one source address (the failed-auth budget is large).
    let port = PORT.fetch_add(1, Ordering::Relaxed).max(1024);
    let peer = Peer::new(SocketAddr::from(([127, 0, 0, 1], port)), false);
    let mut conn = tokio::spawn(tollgate::net::server::serve_public(
        server,
        peer,
        h.proxy.clone(),
        h.limits.clone(),
        graceful.watcher(),
    ));
    let (mut rd, mut wr) = tokio::io::split(client);
    let input = data.to_vec();
    let mut writer = tokio::spawn(async move {
        let _ = wr.write_all(&input).await;
        wr
    });
    let mut wr = None;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut eof = false;
    // Read while the server answers. Hang up once everything is written, no request is in
    // flight (the gauge counts requests whose response body has not ended) and the server has
    // been quiet for QUIET; or once nothing at all has moved for STALL (a request waiting for
    // the rest of its body, a window the client never opens).
    let mut last = tokio::time::Instant::now();
    let t0 = last;
    let mut why = "eof";
    loop {
        let idle = last.elapsed();
        let settled = wr.is_some() && h.state.metrics.inflight.get() == 0;
        if settled && idle >= QUIET {
            why = "settled";
            break;
        }
        if idle >= h.stall {
            why = "stall";
            break;
        }
        tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    received.extend_from_slice(&buf[..n]);
                    last = tokio::time::Instant::now();
                }
            },
            w = &mut writer, if wr.is_none() => {
                wr = Some(w.expect("writer task"));
                last = tokio::time::Instant::now();
            }
            _ = tokio::time::sleep(QUIET) => {}
        }
    }
    match wr {
        // Hang up (half-close), and read what is left until the server closes its side.
        Some(mut wr) if !eof => {
            let _ = wr.shutdown().await;
            let _ = tokio::time::timeout(CLOSE_LIMIT, async {
                while !matches!(rd.read(&mut buf).await, Ok(0) | Err(_)) {}
            })
            .await;
        }
        Some(wr) => drop(wr),
        None => writer.abort(),
    }
    drop(rd);
    let t1 = t0.elapsed();
    // The client is gone: the server must let go of the connection.
    if tokio::time::timeout(CLOSE_LIMIT, &mut conn).await.is_err() {
        panic!("the connection outlived its client by {CLOSE_LIMIT:?}");
    }
    drop(graceful);
    // Every request that started has ended, or ends soon (an HTTP/2 stream's task may still wait
    // for the upstream): the in-flight gauge is back at 0.
    let gauge = &h.state.metrics.inflight;
    let deadline = tokio::time::Instant::now() + CLOSE_LIMIT;
    while gauge.get() != 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(gauge.get(), 0, "tollgate_inflight_requests stays above 0 after the connection closed");
    if std::env::var_os("TOLLGATE_FUZZ_TIMES").is_some() {
        eprintln!("TIME {why} {:?} {:?}", t1, t0.elapsed());
    }
    if std::env::var_os("TOLLGATE_FUZZ_DUMP").is_some() {
        eprintln!(
            "---- {} bytes in, {} bytes out:\n{}",
            data.len(),
            received.len(),
            String::from_utf8_lossy(&received)
        );
    }
    // HTTP/1 answers start with a status line (h2c ones with a SETTINGS frame).
    if !received.is_empty() && !data.starts_with(b"PRI * HTTP/2.0") {
        let head = String::from_utf8_lossy(&received[..received.len().min(64)]);
        assert!(received.starts_with(b"HTTP/1."), "not an HTTP/1 response: {head:?}");
    }
}

/// The admin key may have been revoked by an input (`POST /v1/keys/FuzzAdmin001/revoke`):
/// restore it, so that the next input meets the same fixture.
async fn reset(h: &Harness) {
    let store = h.state.auth.store();
    if let Ok(Some(r)) = store.get(ADMIN_ID).await {
        if r.revoked_at.is_some() {
            let now = tollgate::clock::now_ms();
            let _ = store.set_revoked(ADMIN_ID, None, &event(ADMIN_ID, "fuzzadmin", "restore", now)).await;
            h.state.auth.invalidate(ADMIN_ID);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    h.rt.block_on(async {
        if tokio::time::timeout(RUN_LIMIT, run(h, data)).await.is_err() {
            panic!("one connection took more than {RUN_LIMIT:?}");
        }
        reset(h).await;
    });
});
