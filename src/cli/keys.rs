//! `tollgate keys …`: the key lifecycle (§6) against the configured store, as the operator
//! (actor `cli`). Shares `keys::lifecycle` with the HTTP API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use tracing_subscriber::EnvFilter;

use crate::config::Config;
use crate::keys::lifecycle::{self, Actor, NewKeySpec};
use crate::keys::{KeyRecord, Token};

#[derive(Subcommand)]
pub(super) enum KeysCommand {
    /// Create a key; prints the plaintext key alone on the first line of stdout.
    Create {
        #[arg(long)]
        org: String,
        #[arg(long)]
        tier: String,
        /// A scope, or a preset: read-only, read-write, admin. Repeatable. Omitted: the
        /// config's `default_scopes`.
        #[arg(long = "scope")]
        scopes: Vec<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        workspace: Option<String>,
        /// Lifetime, such as `90d` or `12h`.
        #[arg(long)]
        expires_in: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show one key.
    Show { id: String },
    /// Revoke a key (reversible within auth.revocation_retention).
    Revoke { id: String },
    /// Restore a revoked key.
    Restore { id: String },
    /// Create a new key with the same org, tier and scopes; the old one stays valid until revoked.
    Rotate {
        id: String,
        /// The new key's scopes instead of the old key's (repeatable; presets as for create).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print a key's audit trail.
    Audit {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn run(path: Option<PathBuf>, command: KeysCommand) -> Result<ExitCode, String> {
    let config = match &path {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    // Diagnostics (audit lines included) go to stderr: stdout carries only the output.
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(EnvFilter::new("warn")).init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(run_keys(config, command))
}

async fn run_keys(config: Config, command: KeysCommand) -> Result<ExitCode, String> {
    let store = crate::store::open(&config.store).await.map_err(|e| e.to_string())?;
    let store = store.as_ref();
    let err = |e: lifecycle::ManageError| e.to_string();
    let print_key = |record: &KeyRecord, token: &Token, json: bool| {
        if json {
            let mut v = record.to_json();
            v["key"] = serde_json::json!(token.expose());
            println!("{v}");
        } else {
            println!("{}", token.expose());
            println!(
                "# id {}  org {}  tier {}  scopes {}",
                record.id,
                record.org,
                record.tier,
                record.scopes.join(",")
            );
            println!("# This is the only time the key is shown. Store it in your secret manager now.");
        }
    };
    match command {
        KeysCommand::Create { org, tier, scopes, name, workspace, expires_in, json } => {
            let expires_in = expires_in
                .map(|s| crate::config::parse_duration(&s).map_err(|e| format!("--expires-in: {e}")))
                .transpose()?;
            let spec = NewKeySpec { org, tier, scopes, name, workspace, expires_in };
            let (record, token) =
                lifecycle::create(store, &config, spec, &Actor::Cli, None).await.map_err(err)?;
            print_key(&record, &token, json);
        }
        KeysCommand::Rotate { id, scopes, json } => {
            let scopes = (!scopes.is_empty()).then_some(scopes);
            let (record, token) =
                lifecycle::rotate(store, &config, &id, &Actor::Cli, scopes).await.map_err(err)?;
            print_key(&record, &token, json);
        }
        KeysCommand::List { org, json } => {
            let keys = store.list(org.as_deref()).await.map_err(|e| e.to_string())?;
            if json {
                let v: Vec<_> = keys.iter().map(|k| k.to_json()).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(
                    "{:<12}  {:<16}  {:<12}  {:<8}  {:<24}  NAME",
                    "ID", "ORG", "TIER", "STATUS", "SCOPES"
                );
                let now = crate::clock::now_ms();
                for k in keys {
                    let scopes = k.scopes.join(",");
                    println!(
                        "{:<12}  {:<16}  {:<12}  {:<8}  {scopes:<24}  {}",
                        k.id,
                        k.org,
                        k.tier,
                        k.status(now),
                        k.name
                    );
                }
            }
        }
        KeysCommand::Show { id } => {
            let r = lifecycle::fetch(store, &id, None).await.map_err(err)?;
            let v = r.to_json_with(config.auth.revocation_retention);
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        KeysCommand::Revoke { id } => {
            let (r, _) = lifecycle::revoke(store, &id, &Actor::Cli).await.map_err(err)?;
            println!("revoked {} (restorable for {}s)", r.id, config.auth.revocation_retention.as_secs());
        }
        KeysCommand::Restore { id } => {
            let (r, _) = lifecycle::restore(store, &config, &id, &Actor::Cli).await.map_err(err)?;
            println!("restored {}", r.id);
        }
        KeysCommand::Audit { id, json } => {
            let events = store.audit(&id).await.map_err(|e| e.to_string())?;
            if events.is_empty() {
                lifecycle::fetch(store, &id, None).await.map_err(err)?;
            }
            for e in events {
                if json {
                    println!("{}", e.to_json());
                } else {
                    let at = crate::clock::rfc3339(e.at);
                    println!("{at}  {:<8}  actor={}  {}", e.action, e.actor, e.detail.unwrap_or_default());
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
