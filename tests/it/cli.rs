//! `tollgate check` and start-up failures.

use std::process::Command;

use crate::harness::BIN;

#[test]
fn check_reports_every_problem_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "listen: nowhere\nupstream:\n  url: ftp://x\n  tiemout: 5s\ntiers:\n  gold: { requests_per_second: fast }\n",
    )
    .unwrap();
    let out = Command::new(BIN).args(["check", "--config"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for want in
        ["listen:", "upstream.url:", "upstream.tiemout: unknown field", "tiers.gold.requests_per_second:"]
    {
        assert!(err.contains(want), "missing {want} in\n{err}");
    }

    let good = dir.path().join("good.yaml");
    std::fs::write(&good, "upstream: { url: http://127.0.0.1:9 }\n").unwrap();
    let out = Command::new(BIN).args(["check", "--config"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn serve_refuses_a_bad_config_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "limits: { max_body_bytes: huge }\n").unwrap();
    let out = Command::new(BIN).args(["serve", "--config"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.max_body_bytes"));

    // An empty file is a mistake, not a request for the embedded defaults.
    std::fs::write(&path, "\n# nothing here\n").unwrap();
    for cmd in ["serve", "check"] {
        let out = Command::new(BIN).args([cmd, "--config"]).arg(&path).output().unwrap();
        assert!(!out.status.success(), "{cmd} accepted an empty file");
        assert!(String::from_utf8_lossy(&out.stderr).contains("the file is empty"), "{cmd}");
    }
}
