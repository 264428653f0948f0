//! `rlsproxy demo`, the quickstart: a throwaway Postgres with the sample RLS
//! schema, the development issuer and the proxy, all on loopback, driven by
//! `proxy.toml`. It prints psql commands for two users and anonymous and
//! removes everything it made when stopped. Development only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Map;

use crate::config::{ClaimsMode, Config};
use crate::devissuer::{DEFAULT_AUDIENCE, DevIssuer};
use crate::listener::Proxy;

/// The example config; used when no config file is given or found.
pub const EXAMPLE_CONFIG: &str = include_str!("../proxy.toml");
const STANDIN_NOTE: &str = "sql/pg_session_jwt_standin.sql";
const DEMO_SQL: &str = include_str!("../sql/demo.sql");
const AUTH_GUC_SQL: &str = include_str!("../sql/auth_guc.sql");
/// Passwords used for `${VAR}`s the environment does not set.
const DEMO_ENV: &[(&str, &str)] = &[
    (
        "RLSPROXY_AUTHENTICATED_PASSWORD",
        "demo-authenticated-password",
    ),
    ("RLSPROXY_ANONYMOUS_PASSWORD", "demo-anonymous-password"),
];
/// Where `rlsproxy token` looks for the dev issuer key by default.
pub const DEFAULT_KEY_FILE: &str = ".rlsproxy/dev-issuer.key";

/// Options of `rlsproxy demo`.
pub struct DemoOptions {
    /// Config file; the built-in example when it does not exist.
    pub config: Option<PathBuf>,
    /// Run the sample queries, report, clean up and exit instead of waiting.
    pub check: bool,
}

/// Runs the quickstart until Ctrl-C (or once, with `check`).
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let (mut config, source) = load_config(options.config.as_deref())?;
    let issuer_addr = dev_issuer_addr(&config)?;
    let bin = find_pg_bin().context(
        "PostgreSQL server binaries not found on PATH or under /usr/lib/postgresql/*/bin; \
         install them (Debian: apt-get install postgresql)",
    )?;
    println!(
        "rlsproxy demo: config {source}, PostgreSQL binaries in {}",
        bin.display()
    );

    let cluster = Cluster::start(&bin, config.upstream.port)?;
    let has_extension = cluster
        .try_sql("CREATE EXTENSION IF NOT EXISTS pg_session_jwt")
        .is_ok();
    if has_extension {
        println!("claims: pg_session_jwt extension found; claims are signed per connection");
    } else {
        config.claims.mode = ClaimsMode::Guc;
        println!(
            "claims: pg_session_jwt is not installed on this server, so the demo uses the \
             \"guc\" claims mode (request.jwt.claims; clients that run SQL could spoof it). \
             With the extension the proxy signs claims per connection ({STANDIN_NOTE} shows \
             its interface)."
        );
        cluster.sql(AUTH_GUC_SQL)?;
    }
    cluster.sql(&roles_sql(&config))?;
    cluster.sql(DEMO_SQL)?;

    let key_file = PathBuf::from(DEFAULT_KEY_FILE);
    let created_key_dir = !key_file.exists() && !Path::new(".rlsproxy").exists();
    let issuer_url = config.issuers[0].issuer.clone();
    let issuer = Arc::new(DevIssuer::load_or_create(&key_file, &issuer_url)?);
    let listener = tokio::net::TcpListener::bind(issuer_addr)
        .await
        .with_context(|| format!("dev issuer cannot bind {issuer_addr}"))?;
    let issuer_task = tokio::spawn(issuer.clone().serve(listener));

    let listen = config.listen.addr;
    let config_admin = config.admin.addr;
    crate::admin::metrics_handle();
    let proxy = Proxy::bind(config)
        .await
        .with_context(|| format!("proxy cannot bind {listen}"))?;
    let ready = tokio::time::Instant::now() + Duration::from_secs(10);
    while !proxy.has_keys() && tokio::time::Instant::now() < ready {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let admin_addr = config_admin;
    let admin = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("admin endpoint cannot bind {admin_addr}"))?;
    let admin_task = tokio::spawn(crate::admin::serve(admin, proxy.handle()));
    let proxy_task = tokio::spawn(proxy.run(std::future::pending()));

    let audience = DEFAULT_AUDIENCE;
    let ttl = Duration::from_secs(3600);
    let alice = issuer.mint("alice", audience, ttl, &Map::new());
    let bob = issuer.mint("bob", audience, ttl, &Map::new());
    let psql = psql_path(&bin);
    let users = [
        ("alice", Some(&alice)),
        ("bob", Some(&bob)),
        ("anonymous", None),
    ];

    let result = if options.check {
        check_samples(&psql, listen, &users)
    } else {
        print_instructions(listen, config_admin, &users);
        // Any way of stopping (Ctrl-C, kill, a closed terminal) cleans up.
        wait_for_stop().await?;
        println!("\nstopping: removing the demo cluster");
        Ok(())
    };

    proxy_task.abort();
    admin_task.abort();
    issuer_task.abort();
    drop(cluster);
    if created_key_dir {
        let _ = std::fs::remove_dir_all(".rlsproxy");
    }
    result
}

fn load_config(path: Option<&Path>) -> anyhow::Result<(Config, String)> {
    let env = |var: &str| {
        std::env::var(var).ok().or_else(|| {
            DEMO_ENV
                .iter()
                .find(|(name, _)| *name == var)
                .map(|(_, v)| (*v).to_owned())
        })
    };
    let (text, source) = match path {
        Some(p) if p.exists() => (std::fs::read_to_string(p)?, p.display().to_string()),
        _ => (
            EXAMPLE_CONFIG.to_owned(),
            "the built-in example proxy.toml".to_owned(),
        ),
    };
    let config = Config::parse(&text, &env).with_context(|| source.clone())?;
    Ok((config, source))
}

/// The dev issuer serves where the first issuer's JWKS URL points.
fn dev_issuer_addr(config: &Config) -> anyhow::Result<SocketAddr> {
    let issuer = config
        .issuers
        .first()
        .context("the demo needs one [[issuers]] entry")?;
    let url = issuer
        .jwks_url
        .as_deref()
        .context("the demo issuer needs a jwks_url")?;
    let url = reqwest::Url::parse(url)?;
    let addrs = url.socket_addrs(|| Some(80))?;
    match addrs.first() {
        Some(a) if a.ip().is_loopback() && url.scheme() == "http" => Ok(*a),
        _ => bail!("the demo's issuer must be http on loopback, not {url}"),
    }
}

fn roles_sql(config: &Config) -> String {
    let mut sql = String::from("SET client_min_messages = warning;\n");
    for (name, role) in &config.roles {
        let password = role
            .password
            .as_deref()
            .unwrap_or_default()
            .replace('\'', "''");
        let name = name.replace('"', "\"\"");
        sql.push_str(&format!(
            "DROP ROLE IF EXISTS \"{name}\"; CREATE ROLE \"{name}\" LOGIN PASSWORD '{password}';\n"
        ));
    }
    sql
}

async fn wait_for_stop() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
        _ = hangup.recv() => {}
    }
    Ok(())
}

fn print_instructions(listen: SocketAddr, admin: SocketAddr, users: &[(&str, Option<&String>)]) {
    let (host, port) = (listen.ip(), listen.port());
    println!("\nrlsproxy is listening on {listen}. Each user sees only their own todos:\n");
    for (user, token) in users {
        match token {
            Some(t) => println!(
                "  # {user}\n  psql \"postgresql://authenticated:{t}@{host}:{port}/postgres\" \
                 -c 'SELECT auth.user_id(), * FROM todos'\n"
            ),
            None => println!(
                "  # anonymous (no token)\n  psql \"postgresql://anonymous@{host}:{port}/postgres\" \
                 -c 'SELECT * FROM todos'\n"
            ),
        }
    }
    let exe =
        std::env::current_exe().map_or_else(|_| "rlsproxy".into(), |p| p.display().to_string());
    let key = std::fs::canonicalize(DEFAULT_KEY_FILE)
        .map_or_else(|_| DEFAULT_KEY_FILE.into(), |p| p.display().to_string());
    println!("  # a token for anyone else (add claims with --claim key=value):");
    println!("  {exe} token --key-file {key} --sub carol\n");
    println!("Metrics and health: http://{admin}/metrics, /healthz, /readyz");
    println!("Press Ctrl-C to stop and remove the demo cluster.");
}

/// Runs each sample as a user would and checks what RLS lets them see.
fn check_samples(
    psql: &Path,
    listen: SocketAddr,
    users: &[(&str, Option<&String>)],
) -> anyhow::Result<()> {
    let expected = [
        ("alice", "alice|alice: buy milk,alice: water the plants"),
        ("bob", "bob|bob: fix the bike"),
        ("anonymous", "|everyone: read the README"),
    ];
    for ((user, token), (_, want)) in users.iter().zip(expected) {
        let role = if token.is_some() {
            "authenticated"
        } else {
            "anonymous"
        };
        let conn = format!(
            "host={} port={} user={role} dbname=postgres",
            listen.ip(),
            listen.port()
        );
        let output = Command::new(psql)
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", &conn, "-c"])
            .arg("SELECT coalesce(auth.user_id(), ''), string_agg(title, ',' ORDER BY id) FROM todos")
            .env("PGPASSWORD", token.map(String::as_str).unwrap_or_default())
            .output()
            .context("running psql")?;
        let got = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if got != want {
            bail!(
                "{user}: expected {want:?}, got {got:?} {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        println!("ok: {user} sees {got}");
    }
    println!("demo check passed");
    Ok(())
}

fn psql_path(bin: &Path) -> PathBuf {
    let local = bin.join("psql");
    if local.exists() {
        local
    } else {
        PathBuf::from("psql")
    }
}

/// The directory with `initdb`: PATH first, then the newest /usr/lib/postgresql/*/bin.
pub fn find_pg_bin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                // Follow a symlinked initdb to its real directory, where
                // psql and the server's libraries sit beside it.
                let real = std::fs::canonicalize(dir.join("initdb")).ok();
                return real
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .or(Some(dir));
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let entry = e.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// A throwaway cluster; dropping it stops the server and deletes its files.
struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// Server programs run as the `postgres` user when we are root.
    as_postgres: bool,
    /// The superuser's password.
    password: String,
}

impl Cluster {
    fn start(bin: &Path, port: u16) -> anyhow::Result<Cluster> {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            bail!("port {port} is in use; change [upstream] port in the config");
        }
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("rlsproxy-demo-")
            .tempdir_in("/tmp")?;
        // A fresh superuser password per run, readable only by the server's
        // user: other local users must not log in to the demo cluster.
        let password: String = (0..24)
            .map(|_| char::from(b'a' + rand::random_range(0..26u8)))
            .collect();
        let cluster = Cluster {
            dir,
            bin: bin.to_owned(),
            port,
            as_postgres,
            password,
        };
        let pwfile = cluster.dir.path().join("pwfile");
        std::fs::write(&pwfile, &cluster.password)?;
        let private = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600);
        std::fs::set_permissions(&pwfile, private)?;
        if as_postgres {
            run_command(
                Command::new("chown")
                    .args(["-R", "postgres"])
                    .arg(cluster.dir.path()),
                "chown",
            )?;
        }
        let data = cluster.data();
        run_command(
            cluster
                .server_command("initdb")
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "-A",
                    "scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ])
                .arg(format!("--pwfile={}", pwfile.display())),
            "initdb",
        )?;
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n",
            cluster.dir.path().display()
        );
        if bin.join("../lib/pg_session_jwt.so").exists() {
            conf.push_str("shared_preload_libraries = 'pg_session_jwt'\n");
        }
        let main_conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&main_conf)?;
        text.push_str(&conf);
        std::fs::write(&main_conf, text)?;
        let log = cluster.dir.path().join("server.log");
        run_command(
            cluster
                .server_command("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "start"]),
            "pg_ctl start",
        )?;
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn server_command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        // postgres may not be allowed into the caller's working directory.
        c.current_dir(self.dir.path());
        c
    }

    fn try_sql(&self, sql: &str) -> anyhow::Result<()> {
        let conn = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        );
        let output = Command::new(psql_path(&self.bin))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", &conn])
            .env("PGPASSWORD", &self.password)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(sql.as_bytes())?;
                }
                child.wait_with_output()
            })
            .context("running psql")?;
        check(&output, "psql")
    }

    fn sql(&self, sql: &str) -> anyhow::Result<()> {
        self.try_sql(sql)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn run_command(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {what}"))?;
    check(&output, what)
}

fn check(output: &Output, what: &str) -> anyhow::Result<()> {
    if output.status.success() {
        return Ok(());
    }
    bail!(
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    )
}
