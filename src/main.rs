//! `ociedge serve | check-config | backfill | prewarm | verify`: command-line dispatch into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use ociedge::config::{env, Config};

/// glibc's allocator took ~12% of the CPU of small answers (malloc/free and arena locks between
/// the runtime's threads); mimalloc's thread-local free lists do the same work for much less.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Copy what engine TO lacks from engine FROM (default: the push engine, else the local
    /// one). Resumable and idempotent; exit 1 if anything failed.
    Backfill {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        to: String,
        #[arg(long)]
        from: Option<String>,
        /// Only repositories matching this glob (`team/**`).
        #[arg(long)]
        repo: Option<String>,
    },
    /// Pull IMAGEs (as clients write them) through the pull path into the local engine, and with
    /// --replicate into every storage engine: the job `POST /_ociedge/prewarm` starts, run here
    /// with a progress bar. Running the same command again resumes it; what is present is not
    /// fetched again. Exit 1 if anything failed.
    Prewarm {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(required = true, value_name = "IMAGE")]
        images: Vec<String>,
        /// Also copy every manifest and blob into every other storage engine.
        #[arg(long)]
        replicate: bool,
        /// Eviction keeps what the job fetched this long (`48h`).
        #[arg(long, value_name = "DURATION")]
        pin_until: Option<String>,
        /// Only these platforms of a multi-platform image (repeatable); default: all.
        #[arg(long = "platform", value_name = "OS/ARCH[/VARIANT]")]
        platforms: Vec<String>,
    },
    /// Re-hash every blob of the local engine and remove those that do not match their digest
    /// (and anything in its blob tree that is not a regular file). Exit 0 when all were good,
    /// 1 when some were removed or could not be checked.
    Verify {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(env::LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: escape codes in a journal or a file are noise,
    // and styling every span's fields cost ~4% of the CPU of small answers.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

/// The config and a runtime for the commands that run one, or the exit code after saying why.
fn config_and_runtime(
    path: Option<&std::path::Path>,
) -> Result<(Config, tokio::runtime::Runtime), ExitCode> {
    let cfg = Config::load(path).map_err(|e| {
        eprintln!("ociedge: invalid config: {e}");
        ExitCode::FAILURE
    })?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("ociedge: cannot start runtime: {e}");
        ExitCode::FAILURE
    })?;
    Ok((cfg, rt))
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
        Cmd::Backfill {
            config,
            to,
            from,
            repo,
        } => {
            init_logs(LogFormat::Text);
            let (cfg, rt) = match config_and_runtime(config.as_deref()) {
                Ok(x) => x,
                Err(code) => return code,
            };
            match rt.block_on(backfill(cfg, to, from, repo)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("ociedge: backfill: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Prewarm {
            config,
            images,
            replicate,
            pin_until,
            platforms,
        } => {
            init_logs(LogFormat::Text);
            let (cfg, rt) = match config_and_runtime(config.as_deref()) {
                Ok(x) => x,
                Err(code) => return code,
            };
            let done = rt.block_on(prewarm(cfg, images, replicate, pin_until, platforms));
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            match done {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("ociedge: prewarm: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Verify { config } => {
            init_logs(LogFormat::Text);
            let (cfg, rt) = match config_and_runtime(config.as_deref()) {
                Ok(x) => x,
                Err(code) => return code,
            };
            match rt.block_on(verify(cfg)) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("ociedge: verify: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Serve { config, log_format } => {
            init_logs(log_format);
            let (cfg, rt) = match config_and_runtime(config.as_deref()) {
                Ok(x) => x,
                Err(code) => return code,
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
    // Prewarm jobs a previous process left unfinished go on.
    tokio::spawn(app.prewarmer.clone().resume());
    let front = ociedge::http::server::Front::bind(&app.config).await?;
    tracing::info!(listen = %front.describe(), %region, "ociedge serving");
    ociedge::http::server::serve(app, front, shutdown_signal()).await?;
    Ok(())
}

/// Runs a backfill with a progress bar on a terminal and log lines otherwise. `Ok(false)` when
/// some items failed.
async fn backfill(
    cfg: Config,
    to: String,
    from: Option<String>,
    glob: Option<String>,
) -> Result<bool, Box<dyn std::error::Error>> {
    use ociedge::engine::storage::StorageEngine;
    use ociedge::engine::Engine;
    use std::io::IsTerminal;
    use std::sync::Arc;
    let from = from
        .or_else(|| cfg.push.engine.clone())
        .unwrap_or_else(|| cfg.storage.preference.clone());
    let open = |id: &str| -> Result<Arc<StorageEngine>, Box<dyn std::error::Error>> {
        let ec = cfg
            .storage
            .engines
            .get(id)
            .ok_or_else(|| format!("{id:?} is not a storage engine of this config"))?;
        Ok(Arc::new(StorageEngine::open(id, &ec.url, &ec.options)?))
    };
    if from == to {
        return Err("--from and --to name the same engine".into());
    }
    let src = open(&from)?;
    let dst: Arc<dyn Engine> = open(&to)?;
    let spool = std::env::temp_dir().join(format!("ociedge-backfill-{}", std::process::id()));
    let copier = ociedge::replicate::copy::Copier {
        spool_dir: spool.clone(),
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{bar:30}] {pos}/{len} repositories {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let started = std::time::Instant::now();
    let summary = ociedge::replicate::backfill::run(
        &src,
        &dst,
        glob.as_deref(),
        &copier,
        |i, total, repo, copied| {
            let msg = format!(
                "{} blobs, {} manifests, {:.1} MiB copied",
                copied.blobs,
                copied.manifests,
                copied.bytes as f64 / 1048576.0
            );
            match &bar {
                Some(b) => {
                    b.set_length(total as u64);
                    b.set_position(i as u64);
                    b.set_message(match repo {
                        Some(r) => format!("{r} — {msg}"),
                        None => msg,
                    });
                }
                None => match repo {
                    Some(r) => {
                        eprintln!("backfill {from} -> {to}: [{}/{total}] {r} ({msg})", i + 1)
                    }
                    None => eprintln!("backfill {from} -> {to}: done ({msg})"),
                },
            }
        },
    )
    .await;
    if let Some(b) = &bar {
        b.finish();
    }
    let _ = std::fs::remove_dir_all(&spool);
    let s = summary?;
    println!(
        "backfill {from} -> {to}: {} repositories, {} tags, {} blobs and {} manifests copied ({} bytes) in {:.1}s, {} failures",
        s.repositories,
        s.tags,
        s.copied.blobs,
        s.copied.manifests,
        s.copied.bytes,
        started.elapsed().as_secs_f64(),
        s.failures.len()
    );
    for f in &s.failures {
        eprintln!("failed: {f}");
    }
    Ok(s.failures.is_empty())
}

/// Runs a prewarm job in this process with a progress bar on a terminal (log lines otherwise).
/// The job's id is made from the images and platforms asked, so the same command resumes it.
/// `Ok(false)` when something failed.
async fn prewarm(
    cfg: Config,
    images: Vec<String>,
    replicate: bool,
    pin_until: Option<String>,
    platforms: Vec<String>,
) -> Result<bool, Box<dyn std::error::Error>> {
    use ociedge::prewarm::{parse_image, Spec};
    use std::io::IsTerminal;
    let pin_for = pin_until
        .map(|s| humantime::parse_duration(&s).map_err(|e| format!("--pin-until {s:?}: {e}")))
        .transpose()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let platforms = (!platforms.is_empty()).then_some(platforms);
    let spec = Spec::new(images, platforms, replicate, pin_for, now).map_err(|e| e.to_string())?;
    let app = ociedge::app::App::build(cfg).await?;
    for im in &spec.images {
        let (name, _) = parse_image(im)?;
        app.puller
            .engines()
            .route(&name, None)
            .map_err(|e| format!("{im}: {e}"))?;
    }
    let key = serde_json::json!({ "images": spec.images, "platforms": spec.platforms });
    let id = format!(
        "cli-{}",
        &ociedge::oci::Digest::sha256_of(key.to_string().as_bytes()).hex()[..32]
    );
    app.prewarmer.prepare(&id, spec).await?;
    let runner = {
        let p = app.prewarmer.clone();
        let id = id.clone();
        tokio::spawn(async move { p.run(&id).await })
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} blobs {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut last_line = std::time::Instant::now();
    while !runner.is_finished() {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let Ok(Some(r)) = app.prewarmer.get(&id).await else {
            continue;
        };
        let totals = r.totals();
        let done: u64 = totals.values().map(|c| c.blobs_done).sum();
        let total: u64 = totals.values().map(|c| c.blobs_total).sum();
        let bytes: u64 = totals.values().map(|c| c.bytes_transferred).sum();
        let images = r.images.iter().filter(|i| i.finished).count();
        let msg = format!(
            "{images}/{} images, {:.1} MiB transferred",
            r.images.len(),
            bytes as f64 / 1048576.0
        );
        match &bar {
            Some(b) => {
                b.set_length(total);
                b.set_position(done);
                b.set_message(msg);
            }
            None if last_line.elapsed() >= std::time::Duration::from_secs(5) => {
                last_line = std::time::Instant::now();
                eprintln!("prewarm {id}: {done}/{total} blobs, {msg}");
            }
            None => {}
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let r = runner
        .await
        .map_err(|e| format!("the job's task failed: {e}"))??;
    for (engine, c) in r.totals() {
        println!(
            "prewarm {id} {engine}: {}/{} blobs ({} bytes, {} transferred), {} manifests, {} errors",
            c.blobs_done,
            c.blobs_total,
            c.bytes_done,
            c.bytes_transferred,
            c.manifests_done,
            c.errors.len()
        );
    }
    for im in &r.images {
        for e in &im.errors {
            eprintln!("failed: {}: {e}", im.image);
        }
        for (engine, c) in &im.engines {
            for e in &c.errors {
                eprintln!("failed: {} in {engine}: {e}", im.image);
            }
        }
    }
    println!("prewarm {id}: {}", r.state());
    Ok(r.state() == "done")
}

/// Scrubs the local engine with a progress bar (bytes) on a terminal and a line per bad blob.
/// `Ok(false)` when something was removed or could not be checked.
async fn verify(cfg: Config) -> Result<bool, Box<dyn std::error::Error>> {
    use ociedge::engine::scrub;
    use ociedge::engine::storage::StorageEngine;
    use std::io::IsTerminal;
    let id = cfg.storage.preference.clone();
    let ec = cfg
        .storage
        .engines
        .get(&id)
        .ok_or_else(|| format!("{id:?} is not a storage engine of this config"))?;
    let engine = StorageEngine::open(&id, &ec.url, &ec.options)?;
    let started = std::time::Instant::now();
    let blobs = scrub::list(&engine).await?;
    let total: u64 = blobs.iter().map(|b| b.size).sum();
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let read = |n: u64| {
        if let Some(b) = &bar {
            b.inc(n);
        }
    };
    let checked = |f: &scrub::Found, bad: Option<&str>| {
        let name = f
            .digest
            .as_ref()
            .map(|d| d.to_string())
            .unwrap_or_else(|| f.key.clone());
        if let Some(why) = bad {
            let line = format!("bad: {name}: {why}");
            match &bar {
                Some(b) => b.println(line),
                None => eprintln!("{line}"),
            }
        }
        if let Some(b) = &bar {
            b.set_message(name);
        }
    };
    let s = scrub::run(&engine, &blobs, &read, &checked).await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    println!(
        "verify {id}: {} blobs ({} bytes) checked in {:.1}s: {} removed, {} not checked",
        s.blobs,
        s.bytes,
        started.elapsed().as_secs_f64(),
        s.removed.len(),
        s.errors.len()
    );
    for (key, why) in &s.removed {
        println!("removed: {key}: {why}");
    }
    for (key, why) in &s.errors {
        eprintln!("not checked: {key}: {why}");
    }
    Ok(s.removed.is_empty() && s.errors.is_empty())
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
