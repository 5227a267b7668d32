//! The official `openai` Python SDK against tollgate: exceptions for 401/403, success for a valid
//! key, streaming included. `.ci/test` installs the SDK into `.venv`; `TOLLGATE_PYTHON` points
//! at that interpreter.

use std::process::Command;

use crate::harness::*;
use crate::upstream::Upstream;

/// The interpreter with the SDK. A missing SDK fails the test, in CI and out of it: a test that
/// passes by skipping proves nothing.
pub fn python_with_openai() -> String {
    let python = std::env::var("TOLLGATE_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success());
    assert!(ok, "the openai SDK is not installed for {python}: run `bash .ci/test`, which installs it");
    python
}

pub fn run_script(python: &str, script: &str, args: &[&str]) {
    let path = format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python).arg(path).args(args).output().expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_openai_sdk_authenticates_and_raises_the_right_errors() {
    let python = python_with_openai();
    let up = Upstream::start().await;
    let tg = Tollgate::builder(&up.url()).start();
    let reader = tg.create_key(&["--org", "acme", "--tier", "audit", "--scope", "inference:read"]);
    let base = format!("http://{}", tg.addr);
    tokio::task::spawn_blocking(move || run_script(&python, "openai_sdk.py", &[&base, &tg.key, &reader]))
        .await
        .unwrap();
}
