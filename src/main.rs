//! The `rlsproxy` command: run the proxy, check a config, or use the
//! development issuer (serve its JWKS, mint tokens).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Map;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

use rlsproxy::config::{Config, parse_duration};
use rlsproxy::devissuer::{self, DevIssuer};
use rlsproxy::listener::Proxy;

/// PostgreSQL proxy that turns a JWT password into a row-level-security session.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Config file.
    #[arg(long, short, global = true, default_value = "proxy.toml")]
    config: PathBuf,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Runtime worker threads (default: one per CPU). 1 runs everything on
    /// one thread, which can win on small machines shared with Postgres.
    #[arg(long, global = true, env = "RLSPROXY_WORKER_THREADS")]
    worker_threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the config file and exit non-zero if it is wrong.
    Check,
    /// Quickstart: throwaway Postgres + dev issuer + proxy, with sample RLS data.
    Demo {
        /// Run the sample queries, report and exit (for CI) instead of waiting for Ctrl-C.
        #[arg(long)]
        check: bool,
    },
    /// Serve a development issuer's JWKS on loopback (not for production).
    DevIssuer {
        #[command(flatten)]
        issuer: IssuerArgs,
        /// Address to serve on.
        #[arg(long, default_value = devissuer::DEFAULT_ADDR)]
        listen: std::net::SocketAddr,
    },
    /// Mint a token from the development issuer's key.
    Token {
        #[command(flatten)]
        issuer: IssuerArgs,
        /// The `sub` claim (the user id your RLS policies see).
        #[arg(long)]
        sub: String,
        /// The `aud` claim.
        #[arg(long, default_value = devissuer::DEFAULT_AUDIENCE)]
        audience: String,
        /// Lifetime, such as "1h" or "10m".
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// Extra claim as key=value (value parsed as JSON if it can be); repeatable.
        #[arg(long = "claim", value_parser = devissuer::parse_claim)]
        claims: Vec<(String, serde_json::Value)>,
    },
}

#[derive(clap::Args)]
struct IssuerArgs {
    /// The development issuer's private key (created on first use).
    #[arg(long, default_value = rlsproxy::demo::DEFAULT_KEY_FILE)]
    key_file: PathBuf,
    /// The issuer URL, used as the tokens' `iss`.
    #[arg(long, default_value = concat!("http://", "127.0.0.1:9931"))]
    issuer: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match build_runtime(cli.worker_threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rlsproxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            load(&cli.config).and_then(|c| runtime.block_on(run(c, cli.config.clone())))
        }
        Command::Check => load(&cli.config).and_then(|c| check(&c, &cli.config)),
        Command::Demo { check } => {
            let options = rlsproxy::demo::DemoOptions {
                config: Some(cli.config.clone()),
                check,
            };
            runtime.block_on(rlsproxy::demo::run(options))
        }
        Command::DevIssuer { issuer, listen } => runtime.block_on(dev_issuer(&issuer, listen)),
        Command::Token {
            issuer,
            sub,
            audience,
            ttl,
            claims,
        } => token(&issuer, &sub, &audience, ttl, claims),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rlsproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn build_runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
        None => tokio::runtime::Runtime::new(),
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).with_context(|| format!("{}", path.display()))
}

fn check(config: &Config, path: &Path) -> anyhow::Result<()> {
    rlsproxy::auth::Authenticator::new(config)?;
    if let Some(tls) = &config.tls {
        rlsproxy::tls::acceptor(tls)?;
    }
    let upstream = &config.upstream;
    rlsproxy::tls::upstream_connector(upstream.sslmode, upstream.root_cert.as_deref())?;
    println!("{}: ok", path.display());
    Ok(())
}

async fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};

    rlsproxy::admin::metrics_handle();
    let admin_addr = config.admin.addr;
    let proxy = Proxy::bind(config).await?;
    let handle = proxy.handle();
    let admin = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("admin endpoint cannot bind {admin_addr}"))?;
    info!(addr = %admin_addr, "admin endpoint: /metrics /healthz /readyz");
    tokio::spawn(rlsproxy::admin::serve(admin, handle.clone()));

    let mut hangups = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            // A broken file must not take the running proxy down: refuse
            // it, say why, keep serving with what we have.
            let reloaded = match Config::load(&path) {
                Ok(config) => handle.reload(config).await,
                Err(e) => Err(e.into()),
            };
            if let Err(e) = reloaded {
                error!(error = %format!("{e:#}"), "reload refused; the running configuration stays");
            }
        }
    });

    let mut terminate = signal(SignalKind::terminate())?;
    proxy
        .run(async move {
            tokio::select! {
                _ = terminate.recv() => info!("SIGTERM: shutting down"),
                _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
            }
        })
        .await;
    Ok(())
}

async fn dev_issuer(args: &IssuerArgs, listen: std::net::SocketAddr) -> anyhow::Result<()> {
    let issuer = Arc::new(DevIssuer::load_or_create(&args.key_file, &args.issuer)?);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    info!(jwks = %DevIssuer::jwks_url(listen), iss = %issuer.issuer, "development issuer serving");
    tokio::select! {
        served = issuer.serve(listener) => served?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

fn token(
    args: &IssuerArgs,
    sub: &str,
    audience: &str,
    ttl: Duration,
    claims: Vec<(String, serde_json::Value)>,
) -> anyhow::Result<()> {
    let issuer = DevIssuer::load_or_create(&args.key_file, &args.issuer)?;
    let extra: Map<String, serde_json::Value> = claims.into_iter().collect();
    println!("{}", issuer.mint(sub, audience, ttl, &extra));
    Ok(())
}
