//! `tollgate store copy`: every key and audit event of one configured store into another —
//! typically the SQLite file of one pod into the PostgreSQL database of a fleet (§11) — so
//! that the same tokens keep working. Idempotent: what the target has is left as it is.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use tracing_subscriber::EnvFilter;

use crate::config::{self, Config};
use crate::store::{CopyReport, KeyStore};

#[derive(Subcommand)]
pub(super) enum StoreCommand {
    /// Copy every key and audit event from one store into another.
    ///
    /// Keys the target already has are left as they are (a different record there is reported
    /// as a conflict, on stderr); running it again copies nothing. Prints what it copied.
    Copy {
        /// The config whose `store` is copied from.
        #[arg(long)]
        from_config: PathBuf,
        /// The config whose `store` is copied into (its schema is created if need be).
        #[arg(long)]
        to_config: PathBuf,
    },
}

pub(super) fn run(command: StoreCommand) -> Result<ExitCode, String> {
    let StoreCommand::Copy { from_config, to_config } = command;
    // Both configs first: a mistake in either is reported before any store is touched.
    let from = Config::load(&from_config).map_err(|e| format!("--from-config: {e}"))?;
    let to = Config::load(&to_config).map_err(|e| format!("--to-config: {e}"))?;
    for w in mismatches(&from, &to) {
        eprintln!("tollgate: warning: {w}");
    }
    // Diagnostics go to stderr: stdout carries only the summary.
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(EnvFilter::new("warn")).init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(copy(&from_config, &from.store, &to_config, &to.store))
}

async fn copy(
    from_path: &Path,
    from: &config::Store,
    to_path: &Path,
    to: &config::Store,
) -> Result<ExitCode, String> {
    if same_store(from, to) {
        return Err(format!(
            "--from-config {} and --to-config {} name the same store, {}",
            from_path.display(),
            to_path.display(),
            from.describe()
        ));
    }
    // Opening a SQLite path creates the file: a mistyped source path would copy an empty store
    // and report success.
    if let config::Store::Sqlite(path) = from {
        if !path.exists() {
            return Err(format!(
                "--from-config {}: store.sqlite: there is no key store file at {}",
                from_path.display(),
                path.display()
            ));
        }
    }
    let source = open("--from-config", from_path, from).await?;
    let target = open("--to-config", to_path, to).await?;
    let all = source.export().await.map_err(|e| {
        format!("--from-config {}: cannot read {}: {e}", from_path.display(), from.describe())
    })?;
    let report = target.import(&all.keys, &all.events).await.map_err(|e| {
        format!("--to-config {}: nothing was copied into {}: {e}", to_path.display(), to.describe())
    })?;
    for c in &report.conflicts {
        eprintln!(
            "tollgate: conflict: key {} is in the target with a different record ({}); left as it is, \
             {} of its audit events not copied",
            c.id,
            c.fields.join(", "),
            c.events_skipped
        );
    }
    print!("{}", summary(from, to, &report));
    Ok(ExitCode::SUCCESS)
}

/// Opens one side; errors name the flag and the file (and the store, never its URL).
async fn open(
    flag: &str,
    path: &Path,
    store: &config::Store,
) -> Result<std::sync::Arc<dyn KeyStore>, String> {
    crate::store::open(store).await.map_err(|e| format!("{flag} {}: {e}", path.display()))
}

/// Whether both configs name one store: the same SQLite file, or PostgreSQL URLs alike. (A
/// copy onto itself would copy nothing; this says why instead.)
fn same_store(a: &config::Store, b: &config::Store) -> bool {
    match (a, b) {
        (config::Store::Sqlite(a), config::Store::Sqlite(b)) => {
            a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
        }
        (config::Store::Postgres(a), config::Store::Postgres(b)) => {
            matches!((std::env::var(&a.url_env), std::env::var(&b.url_env)), (Ok(a), Ok(b)) if a == b)
        }
        _ => false,
    }
}

/// Settings of the two configs that would make the copied keys fail under the new one: a
/// token carries its prefix, and a deployment's workspace refuses keys of any other. Warned
/// of, not refused: the operator may mean it (a new workspace, say).
fn mismatches(from: &Config, to: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let (a, b) = (&from.auth, &to.auth);
    if a.key_prefix != b.key_prefix {
        out.push(format!(
            "auth.key_prefix differs (`{}` → `{}`): tokens issued under the old one will not verify \
             under the new config",
            a.key_prefix, b.key_prefix
        ));
    }
    if b.workspace.is_some() && a.workspace != b.workspace {
        out.push(format!(
            "auth.workspace differs ({} → {}): the new config refuses keys of any other workspace",
            a.workspace.as_deref().unwrap_or("none"),
            b.workspace.as_deref().unwrap_or("none")
        ));
    }
    out
}

/// The summary on stdout, one line per kind, stable for scripts.
fn summary(from: &config::Store, to: &config::Store, r: &CopyReport) -> String {
    let mut events = format!("events: {} copied, {} already present", r.events_copied, r.events_present);
    if !r.conflicts.is_empty() {
        events += &format!(", {} not copied (of conflicting keys)", r.events_skipped());
    }
    format!(
        "copied {} → {}\nkeys: {} copied, {} already present, {} conflicting\n{events}\n",
        from.describe(),
        to.describe(),
        r.keys_copied,
        r.keys_present,
        r.conflicts.len()
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_prefix_or_workspace_is_warned_of() {
        let cfg = |auth: &str| Config::from_yaml(&format!("auth: {auth}\n"), "t").unwrap();
        assert!(mismatches(&cfg("{}"), &cfg("{}")).is_empty());
        let w = mismatches(&cfg("{}"), &cfg("{ key_prefix: acme }"));
        assert!(w.len() == 1 && w[0].starts_with("auth.key_prefix differs (`tg` → `acme`)"), "{w:?}");
        let w = mismatches(&cfg("{}"), &cfg("{ workspace: prod }"));
        assert!(w.len() == 1 && w[0].starts_with("auth.workspace differs (none → prod)"), "{w:?}");
        // Dropping a workspace restriction refuses nothing.
        assert!(mismatches(&cfg("{ workspace: prod }"), &cfg("{}")).is_empty());
    }
}
