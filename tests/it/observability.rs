//! The Prometheus side (§10): every metric the dashboard and the alert rules query is one that
//! tollgate really exports, and a real Prometheus server scrapes a running tollgate.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use http_body_util::Full;

use crate::harness::*;
use crate::upstream::Upstream;

/// Drives traffic that makes every metric family appear: ok, 401, 429, upstream error, reload.
async fn exercise(tg: &Tollgate) {
    let client = h1();
    assert_eq!(send(&client, tg.get("/v1/models").body(Full::default()).unwrap()).await.status(), 200);
    let wrong = tollgate::keys::assemble("tg", tg.key.split('_').nth(1).unwrap(), &"Q".repeat(32));
    let req = get(&tg.url("/v1/models")).header("authorization", format!("Bearer {wrong}"));
    assert_eq!(send(&client, req.body(Full::default()).unwrap()).await.status(), 401);
    let tiny = tg.create_key(&["--org", "small", "--tier", "tiny", "--scope", "inference:read"]);
    for _ in 0..3 {
        let req = get(&tg.url("/v1/models")).header("authorization", format!("Bearer {tiny}"));
        send(&client, req.body(Full::default()).unwrap()).await;
    }
    let req = tg.get("/v1/models").header("x-mock", "hang").body(Full::default()).unwrap();
    assert_eq!(send(&client, req).await.status(), 504);
    tokio::time::sleep(Duration::from_millis(200)).await;
}

fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

fn queried_metrics(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("tollgate_") {
        let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[i + name.len()..];
        out.insert(name);
    }
    out
}

fn start(up: &Upstream) -> Tollgate {
    Tollgate::builder(&up.url())
        .section("upstream", &format!("{{ url: \"{}\", timeout: 300ms }}", up.url()))
        .section(
            "tiers",
            "{ enterprise: { requests_per_second: 1000 }, tiny: { requests_per_second: 1, burst: 1 } }",
        )
        .start()
}

#[tokio::test]
async fn every_metric_in_the_dashboard_and_alerts_is_exported() {
    let up = Upstream::start().await;
    let tg = start(&up);
    exercise(&tg).await;
    let exported = families(&get_text(&tg.admin_url("/metrics")).await);
    let root = env!("CARGO_MANIFEST_DIR");
    for file in ["deploy/grafana/tollgate.json", "deploy/prometheus/alerts.yaml"] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let queried = queried_metrics(&text);
        assert!(queried.len() >= 5, "{file} queries almost nothing: {queried:?}");
        for m in &queried {
            assert!(exported.contains(m), "{file} queries {m}, which tollgate does not export: {exported:?}");
        }
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_tollgate() {
    // Missing, the test fails (in CI and out of it): it never passes by skipping.
    let prometheus = crate::proxy::which("prometheus")
        .expect("prometheus is missing: `bash .ci/test` installs Debian's package");
    let up = Upstream::start().await;
    let tg = start(&up);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: [\"{}/deploy/prometheus/alerts.yaml\"]\nscrape_configs:\n  - job_name: tollgate\n    static_configs: [{{ targets: [\"{}\"] }}]\n",
            env!("CARGO_MANIFEST_DIR"),
            tg.admin
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = std::process::Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    exercise(&tg).await;
    let url = format!("http://127.0.0.1:{port}/api/v1/query?query=sum(tollgate_requests_total)");
    let start = Instant::now();
    let mut last = String::new();
    let found = loop {
        if let Ok(Ok(rsp)) = tokio::time::timeout(
            Duration::from_secs(2),
            h1().request(get(&url).body(Full::default()).unwrap()),
        )
        .await
        {
            use http_body_util::BodyExt;
            let body = rsp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            last = String::from_utf8_lossy(&body).into_owned();
            let v: serde_json::Value = serde_json::from_str(&last).unwrap_or_default();
            let value = v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse::<f64>().ok());
            if value.is_some_and(|n| n >= 5.0) {
                break true;
            }
        }
        if start.elapsed() > Duration::from_secs(60) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(found, "Prometheus never returned tollgate_requests_total: {last}");
}
