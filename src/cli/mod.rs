//! The `tollgate` command line: `serve`, `check`, `keys …` (`keys.rs`), `store copy`
//! (`store.rs`). The binary's `main` is this module's `main`: `run()` → `ExitCode`, every error
//! printed once, on stderr, with its cause.

mod keys;
mod store;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer};

use crate::config::{Config, LogFormat};
use keys::KeysCommand;
use store::StoreCommand;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Auth and rate-limit sidecar for OpenAI-compatible inference APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (public listener + admin listener) until SIGTERM/SIGINT.
    Serve {
        /// Config file; without one, the embedded defaults are used.
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a config file and print every problem with its field path.
    Check {
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
    },
    /// Manage API keys in the configured store (actor `cli` in the audit trail).
    Keys {
        /// Config file (for the store, key prefix, tiers and Argon2id parameters).
        #[arg(long, env = "TOLLGATE_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Work on whole key stores: `store copy` moves every key and audit event into another.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

pub fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tollgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode, String> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => Ok(check(&config)),
        Command::Serve { config } => serve(config),
        Command::Keys { config, command } => keys::run(config, command),
        Command::Store { command } => store::run(command),
    }
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(_) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(path: Option<PathBuf>) -> Result<ExitCode, String> {
    let config = match &path {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let log_level = init_logging(config.log.format, &config.log.level)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime
        .block_on(crate::serve(config, path, Some(log_level), shutdown_signal()))
        .map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
    }
}

/// Logs go to stdout (the container convention); the filter is reloadable.
fn init_logging(format: LogFormat, level: &str) -> Result<crate::reload::LogLevelHook, String> {
    let filter = EnvFilter::builder().parse(level).map_err(|e| format!("log.level: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stdout).with_ansi(ansi);
    let fmt = match format {
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(false).boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .map_err(|e| format!("cannot start logging: {e}"))?;
    Ok(Box::new(move |level: &str| {
        let f = EnvFilter::builder().parse(level).map_err(|e| e.to_string())?;
        handle.reload(f).map_err(|e| e.to_string())
    }))
}
