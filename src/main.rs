//! `ociedge serve | check-config`: command-line dispatch into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use ociedge::config::{env, Config};

#[derive(Parser)]
#[command(
    name = "ociedge",
    version,
    about = "Edge pull-through cache for container images"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy (the embedded default config without --config).
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Validate and print the effective config (secrets masked); exit 1 on error.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(env::LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::CheckConfig { config } => match Config::load(config.as_deref()) {
            Ok(c) => {
                print!("{}", c.to_masked_yaml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ociedge: invalid config: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Serve { config, log_format } => {
            init_logs(log_format);
            let cfg = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ociedge: invalid config: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ociedge: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let served = rt.block_on(serve(cfg));
            // `serve` has already waited out the grace period for responses and fills; do not
            // let a task stuck in blocking I/O hold the exit.
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ociedge: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn serve(cfg: Config) -> Result<(), Box<dyn std::error::Error>> {
    let region = cfg.region.clone();
    let app = ociedge::app::App::build(cfg).await?;
    let front = ociedge::http::server::Front::bind(&app.config).await?;
    tracing::info!(listen = %front.describe(), %region, "ociedge serving");
    ociedge::http::server::serve(app, front, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
