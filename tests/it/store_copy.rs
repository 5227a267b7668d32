//! `tollgate store copy`: a SQLite store built with the CLI (and used by a real server, for
//! `last_used_at`), copied into a fresh PostgreSQL database of the test's own, then checked
//! through the CLI, the stores themselves and a real tollgate on the copy.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tollgate::store::postgres::PostgresStore;
use tollgate::store::sqlite::SqliteStore;
use tollgate::store::{Export, KeyCopy};

use crate::harness::*;
use crate::pg::TestDb;
use crate::upstream::Upstream;

/// Cheap Argon2id parameters: the copy must carry whatever parameters each hash was made with.
const AUTH: &str = "{ revocation_poll: 1h, argon2: { memory_kib: 64, iterations: 1, parallelism: 1 } }";

/// A SQLite config and a PostgreSQL config (URL in `TG_TEST_PG_URL`) in `dir`.
struct Configs {
    old: PathBuf,
    new: PathBuf,
    db_file: PathBuf,
    env: Vec<(String, String)>,
}

impl Configs {
    fn write(dir: &Path, db: &TestDb) -> Configs {
        let db_file = dir.join("old.db");
        let old = dir.join("old.yaml");
        std::fs::write(&old, format!("store: {{ sqlite: \"{}\" }}\nauth: {AUTH}\n", db_file.display()))
            .unwrap();
        let new = dir.join("new.yaml");
        std::fs::write(&new, format!("store: {{ postgres: {{ url_env: TG_TEST_PG_URL }} }}\nauth: {AUTH}\n"))
            .unwrap();
        Configs { old, new, db_file, env: vec![("TG_TEST_PG_URL".into(), db.url.clone())] }
    }

    /// `tollgate store copy --from-config OLD --to-config NEW`.
    fn copy(&self) -> Output {
        copy_cli(&self.old, &self.new, &self.env)
    }

    fn old_keys(&self, args: &[&str]) -> Output {
        keys_cli(&self.old, args)
    }

    fn new_keys(&self, args: &[&str]) -> Output {
        keys_cli_env(&self.new, &self.env, args)
    }
}

fn copy_cli(from: &Path, to: &Path, env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["store", "copy", "--from-config"]).arg(from).arg("--to-config").arg(to);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run tollgate store copy")
}

#[track_caller]
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn id_of(key: &str) -> String {
    key.split('_').nth(1).unwrap().to_string()
}

/// `keys list --json`, by id (the order of equal creation times is the database's collation).
fn list(out: Output) -> Vec<serde_json::Value> {
    let mut v: Vec<serde_json::Value> = serde_json::from_str(&ok(&out)).unwrap();
    v.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    v
}

/// `keys audit ID --json`: one JSON object a line.
fn trail(out: Output) -> Vec<serde_json::Value> {
    ok(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Everything in a store, keys by id, events as stored (their order is the point).
async fn export(store: &dyn KeyCopy) -> Export {
    let mut all = store.export().await.unwrap();
    all.keys.sort_by(|a, b| a.record.id.cmp(&b.record.id));
    all
}

async fn models(client: &TestClient, tg: &Tollgate, key: &str) -> u16 {
    send(client, call(tg, "GET", "/v1/models", key, None)).await.status().as_u16()
}

/// A SQLite store as a user has it after a while: keys created, used by a server, rotated,
/// revoked, restored. Returns (used, revoked, rotated-to, restored) plaintexts.
async fn build_sqlite_store(up: &Upstream, c: &Configs) -> [String; 4] {
    // A server on the SQLite file, so that a key has a last_used_at (flushed at shutdown).
    let mut server = Tollgate::builder(&up.url())
        .section("store", &format!("{{ sqlite: \"{}\" }}", c.db_file.display()))
        .section("auth", AUTH)
        .start();
    let client = h1();
    let used = server.key.clone();
    assert_eq!(models(&client, &server, &used).await, 200);

    let revoked = create_key(
        &c.old,
        &[
            "--org",
            "acme",
            "--tier",
            "audit",
            "--scope",
            "inference:read",
            "--name",
            "alpha",
            "--expires-in",
            "90d",
        ],
    );
    let rotated = ok(&c.old_keys(&["rotate", &id_of(&revoked)])).lines().next().unwrap().to_string();
    ok(&c.old_keys(&["revoke", &id_of(&revoked)]));
    let restored =
        create_key(&c.old, &["--org", "globex", "--tier", "enterprise", "--scope", "inference:read"]);
    ok(&c.old_keys(&["revoke", &id_of(&restored)]));
    ok(&c.old_keys(&["restore", &id_of(&restored)]));

    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(10)).await.is_some_and(|s| s.success()));
    let shown: serde_json::Value = serde_json::from_str(&ok(&c.old_keys(&["show", &id_of(&used)]))).unwrap();
    assert!(shown["last_used_at"].is_string(), "{shown}");
    [used, revoked, rotated, restored]
}

/// The whole migration: every key and event arrives exactly (ids, hashes, every timestamp,
/// the audit order), a second copy changes nothing, and tollgate on the copy accepts the
/// SQLite-era keys and refuses the revoked one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_copied_to_postgres_keeps_every_key_and_its_trail() {
    let up = Upstream::start().await;
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let c = Configs::write(dir.path(), &db);
    let [used, revoked, rotated, restored] = build_sqlite_store(&up, &c).await;

    let sqlite = SqliteStore::open(&c.db_file).await.unwrap();
    let before = export(&sqlite).await;
    assert_eq!(before.keys.len(), 4);
    let n_events = before.events.len();
    assert!(n_events >= 7, "{:?}", before.events);

    let out = c.copy();
    let stdout = ok(&out);
    assert!(stdout.contains("keys: 4 copied, 0 already present, 0 conflicting"), "{stdout}");
    assert!(stdout.contains(&format!("events: {n_events} copied, 0 already present")), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for text in [&stdout, &*stderr] {
        assert!(!text.contains(&db.url) && !text.contains("postgres://"), "a URL was printed: {text}");
    }

    // Exactly, as stored: ids, hashes, created/updated/last-used/revoked/expiry, rotated_from,
    // and every event in order.
    let pg = PostgresStore::open_url(&db.url, &crate::store::pg_config()).await.unwrap();
    let copied = export(&pg).await;
    assert_eq!(copied, before);
    assert!(copied.keys.iter().any(|k| k.updated_at != k.record.created_at), "a changed key is copied");

    // And as the CLI shows them.
    assert_eq!(list(c.new_keys(&["list", "--json"])), list(c.old_keys(&["list", "--json"])));
    for key in [&used, &revoked, &rotated, &restored] {
        let id = id_of(key);
        let (old, new) =
            (trail(c.old_keys(&["audit", &id, "--json"])), trail(c.new_keys(&["audit", &id, "--json"])));
        assert!(!old.is_empty());
        assert_eq!(new, old, "audit trail of {id}");
    }

    // Again: nothing copied, nothing changed.
    let stdout = ok(&c.copy());
    assert!(stdout.contains("keys: 0 copied, 4 already present, 0 conflicting"), "{stdout}");
    assert!(stdout.contains(&format!("events: 0 copied, {n_events} already present")), "{stdout}");
    assert_eq!(export(&pg).await, before);

    // tollgate on the copy: the same plaintexts verify against the copied hashes.
    let tg = Tollgate::builder(&up.url()).postgres(&db.url, "").section("auth", AUTH).start();
    let client = h1();
    for key in [&used, &rotated, &restored] {
        assert_eq!(models(&client, &tg, key).await, 200, "{}", id_of(key));
    }
    let (rsp, body) = send_json(&client, call(&tg, "GET", "/v1/models", &revoked, None)).await;
    assert_error(&rsp, &body, 401, "unauthorized");
    assert_eq!(body["error"]["message"], "This API key has been revoked.");
}

/// A replica already running on PostgreSQL hears of the copied keys as of any other change
/// (pushed: `revocation_poll` is an hour). A key changed in the source since the first copy is
/// a conflict: reported, left as it is in the target, its new events not copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_replica_hears_the_copy_and_a_later_source_change_is_a_conflict() {
    let up = Upstream::start().await;
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let c = Configs::write(dir.path(), &db);
    let a = create_key(&c.old, &["--org", "acme", "--tier", "audit", "--scope", "inference:read"]);
    let b = create_key(&c.old, &["--org", "acme", "--tier", "audit", "--scope", "inference:read"]);
    ok(&c.old_keys(&["revoke", &id_of(&b)]));

    let tg = Tollgate::builder(&up.url()).postgres(&db.url, "").section("auth", AUTH).start();
    let client = h1();
    let applied = || tg.metric("tollgate_key_change_lag_seconds_count");
    let seen = applied().await.unwrap_or(0.0);
    let stdout = ok(&c.copy());
    assert!(stdout.contains("keys: 2 copied, 0 already present, 0 conflicting"), "{stdout}");
    assert!(stdout.contains("events: 3 copied, 0 already present"), "{stdout}");
    let start = Instant::now();
    while applied().await.unwrap_or(0.0) < seen + 2.0 {
        assert!(start.elapsed() < Duration::from_secs(2), "the copied keys were not pushed to the replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(models(&client, &tg, &a).await, 200);
    assert_eq!(models(&client, &tg, &b).await, 401);

    // The source moves on after the migration (a stale pod revokes `a` in the old file).
    ok(&c.old_keys(&["revoke", &id_of(&a)]));
    let out = c.copy();
    let stdout = ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("keys: 0 copied, 1 already present, 1 conflicting"), "{stdout}");
    assert!(stdout.contains("events: 0 copied, 3 already present, 1 not copied"), "{stdout}");
    assert!(stderr.contains(&format!("conflict: key {}", id_of(&a))), "{stderr}");
    assert!(stderr.contains("revoked_at"), "{stderr}");
    // Left as it is: still active in the target, its trail the target's own.
    assert_eq!(models(&client, &tg, &a).await, 200);
    let actions: Vec<String> = trail(c.new_keys(&["audit", &id_of(&a), "--json"]))
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(actions, ["create"]);
}

/// Failures name the flag, the file and the field or variable, exit non-zero, and print no URL.
#[tokio::test]
async fn copy_failures_say_which_config_and_never_print_a_url() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.yaml");
    let db_file = dir.path().join("old.db");
    std::fs::write(&old, format!("store: {{ sqlite: \"{}\" }}\n", db_file.display())).unwrap();
    create_key(&old, &["--org", "acme", "--tier", "audit", "--scope", "inference:read"]);
    let secret_url = "postgres://tollgate:s3cret@127.0.0.1:1/tollgate";
    let env = [("TG_COPY_PRESENT_URL".to_string(), secret_url.to_string())];
    let assert_fails = |to: &Path, want: &[&str]| {
        let out = copy_cli(&old, to, &env);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "succeeded: {stdout}");
        for w in want {
            assert!(stderr.contains(w), "missing `{w}` in: {stderr}");
        }
        assert!(!stderr.contains("s3cret") && !stderr.contains("postgres://"), "{stderr}");
        assert!(!stdout.contains("copied"), "{stdout}");
    };

    // The variable url_env names is not set.
    let unset = dir.path().join("unset.yaml");
    std::fs::write(&unset, "store: { postgres: { url_env: TG_COPY_UNSET_URL } }\n").unwrap();
    let unset_name = unset.display().to_string();
    assert_fails(&unset, &["--to-config", &unset_name, "TG_COPY_UNSET_URL", "store.postgres.url_env"]);

    // Set, but nothing listens there: the config is named, the URL is not printed.
    let refused = dir.path().join("refused.yaml");
    std::fs::write(
        &refused,
        "store: { postgres: { url_env: TG_COPY_PRESENT_URL, connect_timeout: 300ms } }\n",
    )
    .unwrap();
    assert_fails(&refused, &["--to-config", &refused.display().to_string(), "$TG_COPY_PRESENT_URL"]);

    // A bad field: the file and the field's path.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "store: { postgres: { url_env: TG_COPY_PRESENT_URL, pool_sise: 4 } }\n").unwrap();
    assert_fails(&bad, &["--to-config", &bad.display().to_string(), "store.postgres.pool_sise"]);

    // A mistyped source file is not an empty store.
    let missing = dir.path().join("missing.yaml");
    std::fs::write(&missing, format!("store: {{ sqlite: \"{}\" }}\n", dir.path().join("nope.db").display()))
        .unwrap();
    let out = copy_cli(&missing, &old, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no key store file"), "{out:?}");
    assert!(!dir.path().join("nope.db").exists());
}
