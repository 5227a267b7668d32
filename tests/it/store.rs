//! One suite, two stores: every behaviour of §2/§6 against a real SQLite file and a real
//! PostgreSQL database (the server at 127.0.0.1:5432, or `TOLLGATE_TEST_POSTGRES`; each test
//! has a database of its own with a random name, dropped at the end, so tests run in
//! parallel). Then what only PostgreSQL does: migrations racing, the transaction-id watermark,
//! the push feed.

use std::sync::Arc;
use std::time::Duration;

use tollgate::config;
use tollgate::keys::record::{AuditEvent, KeyRecord};
use tollgate::store::postgres::PostgresStore;
use tollgate::store::sqlite::SqliteStore;
use tollgate::store::{Change, KeyAdmin, KeyStore, KeyUpkeep, Pushed, StoreError};

use crate::pg;

pub fn pg_config() -> config::Postgres {
    config::Postgres {
        url_env: "UNUSED".into(),
        pool_size: 4,
        connect_timeout: Duration::from_secs(2),
        statement_timeout: Duration::from_secs(2),
    }
}

/// A store of one backend, and a way to open another instance on the same data (a second
/// replica, or the CLI).
enum Place {
    Sqlite(tempfile::TempDir),
    Postgres(pg::TestDb),
}

impl Place {
    async fn new(backend: &str) -> Place {
        match backend {
            "sqlite" => Place::Sqlite(tempfile::tempdir().unwrap()),
            _ => Place::Postgres(pg::TestDb::create().await),
        }
    }

    async fn open(&self) -> Arc<dyn KeyStore> {
        match self {
            Place::Sqlite(dir) => Arc::new(SqliteStore::open(&dir.path().join("t.db")).await.unwrap()),
            Place::Postgres(db) => Arc::new(PostgresStore::open_url(&db.url, &pg_config()).await.unwrap()),
        }
    }
}

const BACKENDS: [&str; 2] = ["sqlite", "postgres"];

fn rec(id: &str, org: &str) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        name: "n".into(),
        org: org.into(),
        workspace: "default".into(),
        tier: "audit".into(),
        scopes: vec!["inference:read".into(), "inference:write".into()],
        secret_hash: "$argon2id$x".into(),
        created_at: 1000,
        expires_at: None,
        last_used_at: None,
        revoked_at: None,
        revoked_by: None,
        rotated_from: None,
    }
}

fn ev(id: &str, action: &str, at: i64) -> AuditEvent {
    AuditEvent {
        key_id: id.into(),
        org: "acme".into(),
        action: action.into(),
        actor: "cli".into(),
        at,
        detail: None,
    }
}

/// The ids of `changes`, sorted.
fn ids(changes: &[Change]) -> Vec<String> {
    let mut v: Vec<String> = changes.iter().map(|c| c.id.clone()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn round_trip_revoke_restore_purge_and_audit() {
    for backend in BACKENDS {
        let place = Place::new(backend).await;
        let s = place.open().await;
        let start = s.changes(None).await.unwrap().1;
        s.insert(&rec("a", "acme"), &ev("a", "create", 1000)).await.unwrap();
        s.insert(&rec("b", "other"), &ev("b", "create", 1000)).await.unwrap();
        assert!(
            matches!(s.insert(&rec("a", "acme"), &ev("a", "create", 1)).await, Err(StoreError::Conflict(_))),
            "{backend}"
        );
        assert_eq!(s.get("a").await.unwrap().unwrap(), rec("a", "acme"), "{backend}");
        assert_eq!(s.get("zz").await.unwrap(), None, "{backend}");
        assert_eq!(s.list(Some("acme")).await.unwrap(), [rec("a", "acme")], "{backend}");
        assert_eq!(s.list(None).await.unwrap().len(), 2, "{backend}");

        assert!(s.set_revoked("a", Some((2000, "cli")), &ev("a", "revoke", 2000)).await.unwrap());
        assert!(!s.set_revoked("zz", Some((2000, "cli")), &ev("zz", "revoke", 2000)).await.unwrap());
        let a = s.get("a").await.unwrap().unwrap();
        assert_eq!((a.revoked_at, a.revoked_by.as_deref()), (Some(2000), Some("cli")), "{backend}");

        s.touch(&[("b".into(), 5000)]).await.unwrap();
        s.touch(&[("b".into(), 4000)]).await.unwrap();
        s.touch(&[]).await.unwrap();
        assert_eq!(s.get("b").await.unwrap().unwrap().last_used_at, Some(5000), "{backend}: never backwards");

        assert!(
            s.purge(2000, 9000).await.unwrap().is_empty(),
            "{backend}: revoked at 2000 is not before 2000"
        );
        assert_eq!(s.purge(2001, 9000).await.unwrap(), ["a"], "{backend}");
        assert!(s.get("a").await.unwrap().is_none(), "{backend}");
        let actions: Vec<String> = s.audit("a").await.unwrap().into_iter().map(|e| e.action).collect();
        assert_eq!(actions, ["create", "revoke", "purge"], "{backend}");
        let purge = s.audit("a").await.unwrap().pop().unwrap();
        assert_eq!(
            (purge.actor.as_str(), purge.at, purge.org.as_str()),
            ("system", 9000, "acme"),
            "{backend}"
        );
        s.record(&ev("b", "show", 9500)).await.unwrap();
        assert_eq!(s.audit("b").await.unwrap().len(), 2, "{backend}");

        // Reopening applies no migration twice, and keeps what was written.
        drop(s);
        let s = place.open().await;
        assert!(s.get("b").await.unwrap().is_some(), "{backend}");
        // The changes since the start: b (created, then only used: a use is not a change);
        // a was purged, so it has no row left to report.
        let changes = s.changes(Some(start)).await.unwrap().0;
        if backend == "postgres" {
            assert_eq!(changes, [Change { id: "b".into(), at: 1000, created: true }]);
        }
    }
}

/// Changes since a cursor, on both backends: a revocation and a restore are reported with
/// their stamps, a creation as a creation, and a use not at all.
#[tokio::test]
async fn changes_report_revocations_restores_and_creations() {
    for backend in BACKENDS {
        let place = Place::new(backend).await;
        let s = place.open().await;
        s.insert(&rec("a", "acme"), &ev("a", "create", 1000)).await.unwrap();
        let now = tollgate::clock::now_ms();
        let cursor = s.changes(None).await.unwrap().1;
        s.set_revoked("a", Some((now, "cli")), &ev("a", "revoke", now)).await.unwrap();
        let mut b = rec("b", "acme");
        (b.created_at, b.last_used_at) = (now, None);
        s.insert(&b, &ev("b", "create", now)).await.unwrap();
        let (changes, next) = s.changes(Some(cursor)).await.unwrap();
        let a = changes.iter().find(|c| c.id == "a").unwrap();
        assert_eq!((a.at, a.created), (now, false), "{backend}");
        let b = changes.iter().find(|c| c.id == "b").unwrap();
        assert_eq!((b.at, b.created), (now, true), "{backend}");
        s.touch(&[("a".into(), now + 5)]).await.unwrap();
        // A use is not a change: whatever is reported again (a time cursor re-reads its
        // overlap; a transaction-id cursor re-reads while any transaction of the cluster that
        // began before is still open) carries the revocation's stamp, not a new one.
        let again = s.changes(Some(next)).await.unwrap().0;
        assert!(again.iter().all(|c| c.id != "a" || c.at == now), "{backend}: {again:?}");
        let later = now + 10;
        s.set_revoked("a", None, &ev("a", "restore", later)).await.unwrap();
        let changes = s.changes(Some(next)).await.unwrap().0;
        assert!(
            changes.contains(&Change { id: "a".into(), at: later, created: false }),
            "{backend}: {changes:?}"
        );
    }
}

/// Two replicas purging the same store at once: each key is deleted and audited once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_purges_audit_each_key_once() {
    for backend in BACKENDS {
        let place = Place::new(backend).await;
        let one = place.open().await;
        let two = place.open().await;
        let ids: Vec<String> = (0..20).map(|i| format!("k{i:02}")).collect();
        for id in &ids {
            one.insert(&rec(id, "acme"), &ev(id, "create", 1000)).await.unwrap();
            one.set_revoked(id, Some((2000, "cli")), &ev(id, "revoke", 2000)).await.unwrap();
        }
        let (a, b) = tokio::join!(
            tokio::spawn({
                let one = one.clone();
                async move { one.purge(3000, 9000).await.unwrap() }
            }),
            tokio::spawn({
                let two = two.clone();
                async move { two.purge(3000, 9000).await.unwrap() }
            }),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.len() + b.len(), ids.len(), "{backend}: every key purged by exactly one: {a:?} {b:?}");
        assert!(two.purge(3000, 9000).await.unwrap().is_empty(), "{backend}: nothing left, nothing written");
        for id in &ids {
            let purges = one.audit(id).await.unwrap().into_iter().filter(|e| e.action == "purge").count();
            assert_eq!(purges, 1, "{backend}: {id}");
        }
    }
}

/// Replicas starting together against an empty database all come up: the migrations take
/// turns under their lock, and the schema is created once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_at_once_migrate_an_empty_database_once() {
    let db = pg::TestDb::create().await;
    let cfg = pg_config();
    let open = || PostgresStore::open_url(&db.url, &cfg);
    let (a, b, c, d) = tokio::join!(open(), open(), open(), open());
    for r in [a, b, c, d] {
        r.unwrap();
    }
    let s = PostgresStore::open_url(&db.url, &pg_config()).await.unwrap();
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM schema_version").fetch_all(&pool).await.unwrap();
    assert_eq!(versions, [1]);
    s.insert(&rec("a", "acme"), &ev("a", "create", 1000)).await.unwrap();
}

/// The trap of a time or sequence watermark: a change whose transaction began before a poll
/// and committed after it (stamped, as the writer's clock said, long before) is still reported
/// by the next poll, because the cursor is the oldest transaction the poll could not see.
#[tokio::test]
async fn a_change_committed_after_a_poll_that_began_before_it_is_not_skipped() {
    let db = pg::TestDb::create().await;
    let s = PostgresStore::open_url(&db.url, &pg_config()).await.unwrap();
    s.insert(&rec("a", "acme"), &ev("a", "create", 1000)).await.unwrap();
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let mut slow = pool.begin().await.unwrap();
    // Stamped 1500: older than anything a time watermark would still look at.
    sqlx::query("UPDATE keys SET revoked_at = 1500, revoked_by = 'cli', updated_at = 1500 WHERE id = 'a'")
        .execute(&mut *slow)
        .await
        .unwrap();
    let (before, cursor) = s.changes(Some(0)).await.unwrap();
    assert_eq!(ids(&before), ["a"], "the creation");
    assert!(before.iter().all(|c| c.created), "the revocation is not committed yet: {before:?}");
    let (meanwhile, cursor2) = s.changes(Some(cursor)).await.unwrap();
    assert!(!meanwhile.iter().any(|c| !c.created), "{meanwhile:?}");
    slow.commit().await.unwrap();
    let after = s.changes(Some(cursor2)).await.unwrap().0;
    assert!(after.contains(&Change { id: "a".into(), at: 1500, created: false }), "skipped: {after:?}");
}

async fn recv(feed: &mut tokio::sync::mpsc::Receiver<Pushed>) -> Option<Pushed> {
    tokio::time::timeout(Duration::from_secs(5), feed.recv()).await.expect("nothing pushed within 5 s")
}

/// Changes are pushed: the feed opens with a `Gap` (catch up once), then each change made by
/// another instance (the CLI, another replica) arrives within a second; a last-used write
/// pushes nothing.
#[tokio::test]
async fn changes_are_pushed_to_every_subscriber() {
    let db = pg::TestDb::create().await;
    let here = PostgresStore::open_url(&db.url, &pg_config()).await.unwrap();
    let elsewhere = PostgresStore::open_url(&db.url, &pg_config()).await.unwrap();
    let mut feed = here.subscribe().unwrap();
    assert!(here.subscribe().is_none(), "one feed per store");
    assert_eq!(recv(&mut feed).await, Some(Pushed::Gap));
    elsewhere.insert(&rec("a", "acme"), &ev("a", "create", 1000)).await.unwrap();
    assert_eq!(
        recv(&mut feed).await,
        Some(Pushed::Change(Change { id: "a".into(), at: 1000, created: true }))
    );
    elsewhere.touch(&[("a".into(), 5000)]).await.unwrap();
    let started = std::time::Instant::now();
    elsewhere.set_revoked("a", Some((6000, "cli")), &ev("a", "revoke", 6000)).await.unwrap();
    assert_eq!(
        recv(&mut feed).await,
        Some(Pushed::Change(Change { id: "a".into(), at: 6000, created: false })),
        "the use pushed nothing; the revocation did"
    );
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(elsewhere.purge(7000, 9000).await.unwrap(), ["a"]);
    let purged = recv(&mut feed).await.unwrap();
    assert!(matches!(&purged, Pushed::Change(c) if c.id == "a" && !c.created), "{purged:?}");
}
