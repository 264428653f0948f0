//! A throwaway PostgreSQL cluster per test: initdb into a temp dir, listen on
//! 127.0.0.1 only, stop and delete everything on drop. Also the test schema
//! (roles, RLS tables) and the pg_session_jwt extension or its stand-in.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::{env, fs};

use tempfile::TempDir;
use tokio_postgres::{Client, Config, NoTls};

use super::free_port;

pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PASSWORD: &str = "superuser-secret";
pub const AUTHENTICATED_PASSWORD: &str = "authenticated-secret";
pub const ANONYMOUS_PASSWORD: &str = "anonymous-secret";
/// `md5_role` logs in with md5 (its password is stored as md5).
pub const MD5_PASSWORD: &str = "md5-secret";
/// `plain_role` logs in with cleartext `password` auth.
pub const PLAIN_PASSWORD: &str = "plain-secret";
/// `trust_role` has a password, but pg_hba trusts it without asking.
pub const TRUST_PASSWORD: &str = "trust-secret";
/// The database every test uses.
pub const DATABASE: &str = "postgres";

/// Overrides where the server binaries are looked for.
const BIN_DIR_ENV: &str = "RLSPROXY_TEST_PG_BIN";
/// The system user the server runs as when the tests run as root.
const OS_USER: &str = "postgres";
/// Attempts to find a port no other process grabs before Postgres binds it.
const START_ATTEMPTS: usize = 5;
/// `pg_ctl -t`, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";

const STANDIN_SQL: &str = include_str!("../../sql/pg_session_jwt_standin.sql");
const SCHEMA_SQL: &str = include_str!("schema.sql");

/// Which implementation of pg_session_jwt [`Postgres::setup_schema`] installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionJwt {
    /// The real extension: signatures are checked.
    Extension,
    /// `sql/pg_session_jwt_standin.sql`: same API and errors, no signature
    /// check, so forged-claims tests must not rely on it.
    StandIn,
}

/// A running cluster. Dropping it kills the server and deletes its files.
pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    /// Run server programs through `runuser -u postgres` (we are root).
    as_os_user: bool,
}

impl Postgres {
    /// initdb + start, off the async runtime's thread.
    pub async fn start() -> Postgres {
        tokio::task::spawn_blocking(Self::start_blocking)
            .await
            .expect("start Postgres")
    }

    pub fn start_blocking() -> Postgres {
        let bin = find_bin_dir();
        let as_os_user = running_as_root();
        if as_os_user {
            ensure_os_user();
        }
        // As root, $TMPDIR may sit under a home the postgres user cannot enter.
        let parent = if as_os_user {
            PathBuf::from("/tmp")
        } else {
            env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("rlsproxy-pg-")
            .tempdir_in(parent)
            .expect("temp dir");
        let mut pg = Postgres {
            dir,
            bin,
            port: 0,
            as_os_user,
        };

        fs::create_dir(pg.socket_dir()).expect("create socket dir");
        fs::write(pg.dir.path().join("pwfile"), SUPERUSER_PASSWORD).expect("write pwfile");
        pg.chown();
        pg.initdb();

        for attempt in 1..=START_ATTEMPTS {
            pg.port = free_port();
            pg.write_config();
            let log_before = pg.log().len();
            if pg.try_start() {
                return pg;
            }
            let log = pg.log();
            let this_attempt = log.get(log_before..).unwrap_or(&log);
            let port_taken = this_attempt.contains("could not bind")
                || this_attempt.contains("could not create any TCP/IP sockets");
            assert!(
                port_taken && attempt < START_ATTEMPTS,
                "Postgres did not start:\n{log}"
            );
        }
        unreachable!("the loop returns or panics")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The unix socket directory (inside the temp dir).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server log so far, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// A TCP connection config for `user` on 127.0.0.1.
    pub fn config(&self, user: &str, password: &str) -> Config {
        let mut config = Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .dbname(DATABASE)
            .user(user);
        config.password(password);
        config
    }

    /// Connects and spawns the connection task on the current runtime.
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        connect(&self.config(user, password)).await
    }

    pub async fn superuser(&self) -> Client {
        let client = self.connect(SUPERUSER, SUPERUSER_PASSWORD).await;
        client.unwrap_or_else(|e| panic!("superuser connect: {}", describe(&e)))
    }

    /// Runs `sql` (any number of statements) as the superuser.
    pub async fn exec(&self, sql: &str) {
        let client = self.superuser().await;
        if let Err(e) = client.batch_execute(sql).await {
            panic!("{}\nwhile running:\n{sql}", describe(&e));
        }
    }

    /// Creates roles, pg_session_jwt (real or stand-in) and the RLS tables.
    /// Call once per cluster.
    pub async fn setup_schema(&self) -> SessionJwt {
        let client = self.superuser().await;
        run(&client, &roles_sql()).await;

        let session_jwt = match client
            .batch_execute("CREATE EXTENSION pg_session_jwt")
            .await
        {
            Ok(()) => SessionJwt::Extension,
            Err(e) => {
                eprintln!(
                    "pg_session_jwt unavailable ({}), using the stand-in",
                    describe(&e)
                );
                run(&client, STANDIN_SQL).await;
                SessionJwt::StandIn
            }
        };
        eprintln!("pg_session_jwt: {session_jwt:?}");

        run(&client, SCHEMA_SQL).await;
        session_jwt
    }

    /// Turns TLS on with this certificate and key (PEM); plain TCP still works.
    pub async fn enable_ssl(&self, cert_pem: &str, key_pem: &str) {
        let data = self.data_dir();
        fs::write(data.join("server.crt"), cert_pem).expect("write server.crt");
        let key = data.join("server.key");
        fs::write(&key, key_pem).expect("write server.key");
        // Postgres refuses a key readable by others.
        let private = <fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600);
        fs::set_permissions(&key, private).expect("chmod key");
        self.chown();
        self.exec("ALTER SYSTEM SET ssl = on").await;
        self.exec("SELECT pg_reload_conf()").await;
        // The reload is asynchronous; wait until new connections see it.
        for _ in 0..100 {
            let client = self.superuser().await;
            let on: String = client
                .query_one("SHOW ssl", &[])
                .await
                .expect("show ssl")
                .get(0);
            if on == "on" {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("ssl did not turn on:\n{}", self.log());
    }

    /// Stops (terminating sessions) and starts again on the same port.
    /// Blocks the thread: on a current-thread runtime nothing else (e.g. a
    /// proxy under test) runs until it returns.
    pub fn restart(&self) {
        self.pg_ctl(&["restart", "-m", "fast"]);
    }

    /// Stops the server (terminating sessions); see [`Self::resume`].
    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "fast"]);
    }

    /// Starts a server stopped with [`Self::stop`] on the same port.
    pub fn resume(&self) {
        assert!(
            self.try_start(),
            "Postgres did not start again:\n{}",
            self.log()
        );
    }

    fn initdb(&self) {
        let data = self.data_dir();
        let pwfile = self.dir.path().join("pwfile");
        let output = self
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", SUPERUSER, "-A", "scram-sha-256", "-E", "UTF8"])
            .args(["--no-locale", "--no-sync", "--no-instructions"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("run initdb");
        check(&output, "initdb");
    }

    fn write_config(&self) {
        let data = self.data_dir();
        fs::write(data.join("pg_hba.conf"), HBA_CONF).expect("write pg_hba.conf");

        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n",
            self.port,
            self.socket_dir().display()
        );
        conf.push_str(SERVER_SETTINGS);
        if let Some(lib) = self.session_jwt_library() {
            // The real extension reads pg_session_jwt.jwk from the startup
            // packet, so it must be loaded before any session starts.
            writeln!(conf, "shared_preload_libraries = '{lib}'").expect("write to String");
        }
        fs::write(data.join("harness.conf"), conf).expect("write harness.conf");

        let main_conf = data.join("postgresql.conf");
        let mut main = fs::read_to_string(&main_conf).expect("read postgresql.conf");
        if !main.contains("include = 'harness.conf'") {
            main.push_str("\ninclude = 'harness.conf'\n");
            fs::write(&main_conf, main).expect("write postgresql.conf");
        }
        self.chown();
    }

    /// `pg_session_jwt` when the real extension's library is installed.
    fn session_jwt_library(&self) -> Option<&'static str> {
        let output = Command::new(self.bin.join("pg_config"))
            .arg("--pkglibdir")
            .output()
            .ok()?;
        let libdir = String::from_utf8(output.stdout).ok()?;
        let installed = Path::new(libdir.trim()).join("pg_session_jwt.so").exists();
        installed.then_some("pg_session_jwt")
    }

    /// `pg_ctl start`; false if the server did not come up (see the log).
    fn try_start(&self) -> bool {
        self.pg_ctl_output(&["start"]).status.success()
    }

    fn pg_ctl(&self, args: &[&str]) {
        let output = self.pg_ctl_output(args);
        if !output.status.success() {
            panic!(
                "pg_ctl {args:?} failed: {}\n{}",
                stderr(&output),
                self.log()
            );
        }
    }

    /// pg_ctl, waiting for the outcome, server output to our log file.
    fn pg_ctl_output(&self, args: &[&str]) -> Output {
        let mut command = self.command("pg_ctl");
        command
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_file());
        command.args(["-w", "-t", PG_CTL_TIMEOUT_SECS]).args(args);
        command.output().expect("run pg_ctl")
    }

    /// A server program, run as the `postgres` OS user when we are root
    /// (initdb, pg_ctl and postgres refuse to run as root).
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = if self.as_os_user {
            let mut c = Command::new("runuser");
            c.args(["-u", OS_USER, "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        // The postgres user may not be allowed into the test's cwd.
        command.current_dir(self.dir.path());
        for var in [
            "PGDATA",
            "PGPORT",
            "PGHOST",
            "PGUSER",
            "PGOPTIONS",
            "PGDATABASE",
        ] {
            command.env_remove(var);
        }
        command.env("LC_ALL", "C");
        command
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn chown(&self) {
        if !self.as_os_user {
            return;
        }
        let output = Command::new("chown")
            .args(["-R", &format!("{OS_USER}:")])
            .arg(self.dir.path())
            .output()
            .expect("run chown");
        check(&output, "chown");
    }

    /// The postmaster pid, if it is running.
    fn postmaster_pid(&self) -> Option<u32> {
        let pid_file = fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        pid_file.lines().next()?.trim().parse().ok()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let pid = self.postmaster_pid();
        let _ = self.pg_ctl_output(&["stop", "-m", "immediate"]);

        // If pg_ctl failed, make sure our postmaster does not outlive us. The
        // data dir in its command line tells it from a recycled pid.
        let Some(pid) = pid else { return };
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let data = self.data_dir();
        if String::from_utf8_lossy(&cmdline).contains(&*data.to_string_lossy()) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .output();
        }
    }
}

/// Connects with `config` and spawns the connection task.
pub async fn connect(config: &Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        // Errors surface on the client's next call; nothing to do here.
        let _ = connection.await;
    });
    Ok(client)
}

/// A tokio_postgres error with the server's message, detail and SQLSTATE.
pub fn describe(e: &tokio_postgres::Error) -> String {
    let Some(db) = e.as_db_error() else {
        return format!("{e:#}: {:?}", std::error::Error::source(e));
    };
    let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    if let Some(detail) = db.detail() {
        write!(text, " (DETAIL: {detail})").expect("write to String");
    }
    text
}

/// The startup `options` that set the pg_session_jwt public key, as the
/// proxy sends them (compact JSON: Postgres splits options on spaces).
pub fn jwk_options(jwk: &serde_json::Value) -> String {
    let json = serde_json::to_string(jwk).expect("serialize JWK");
    assert!(
        !json.contains(' '),
        "JWK JSON must not contain spaces: {json}"
    );
    format!("-c pg_session_jwt.jwk={json}")
}

/// The password [`Postgres::setup_schema`] gave `role`.
pub fn password_of(role: &str) -> &'static str {
    match role {
        SUPERUSER => SUPERUSER_PASSWORD,
        "authenticated" => AUTHENTICATED_PASSWORD,
        "anonymous" => ANONYMOUS_PASSWORD,
        "md5_role" => MD5_PASSWORD,
        "plain_role" => PLAIN_PASSWORD,
        "trust_role" => TRUST_PASSWORD,
        other => panic!("no test role {other}"),
    }
}

async fn run(client: &Client, sql: &str) {
    if let Err(e) = client.batch_execute(sql).await {
        panic!("{}", describe(&e));
    }
}

/// md5_role, plain_role and trust_role exist to exercise the upstream login
/// methods. They are members of `authenticated` (INHERIT), so they get its
/// table rights and fall under its RLS policies without a second copy of
/// every grant and policy.
fn roles_sql() -> String {
    format!(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE authenticated LOGIN PASSWORD '{AUTHENTICATED_PASSWORD}';
         CREATE ROLE anonymous LOGIN PASSWORD '{ANONYMOUS_PASSWORD}';
         CREATE ROLE plain_role LOGIN PASSWORD '{PLAIN_PASSWORD}' IN ROLE authenticated;
         CREATE ROLE trust_role LOGIN PASSWORD '{TRUST_PASSWORD}' IN ROLE authenticated;
         SET password_encryption = 'md5';
         CREATE ROLE md5_role LOGIN PASSWORD '{MD5_PASSWORD}' IN ROLE authenticated;
         RESET password_encryption;"
    )
}

/// One login method per test role; scram for everything else. The local
/// socket lives in our 0700 temp dir, so trusting it admits only root and
/// the server's own user.
const HBA_CONF: &str = "\
# TYPE  DATABASE  USER        ADDRESS       METHOD
local   all       all                       trust
host    all       trust_role  127.0.0.1/32  trust
host    all       md5_role    127.0.0.1/32  md5
host    all       plain_role  127.0.0.1/32  password
host    all       all         127.0.0.1/32  scram-sha-256
";

/// Durability off, room for many pooled connections, little memory.
const SERVER_SETTINGS: &str = "\
max_connections = 200
shared_buffers = '16MB'
fsync = off
synchronous_commit = off
full_page_writes = off
password_encryption = 'scram-sha-256'
lc_messages = 'C'
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
";

/// The directory holding initdb, pg_ctl and postgres: `$RLSPROXY_TEST_PG_BIN`,
/// else the first on PATH, else the newest `/usr/lib/postgresql/*/bin`.
fn find_bin_dir() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(dir) = env::var_os(BIN_DIR_ENV) {
            let dir = PathBuf::from(dir);
            assert!(
                has_server(&dir),
                "{BIN_DIR_ENV}: no initdb/pg_ctl/postgres in {dir:?}"
            );
            return dir;
        }
        let found =
            bin_dir_on_path().or_else(|| highest_debian_version().filter(|d| has_server(d)));
        found.unwrap_or_else(|| {
            panic!("no PostgreSQL server binaries on PATH or in /usr/lib/postgresql/*/bin")
        })
    })
    .clone()
}

/// On PATH, initdb may be a symlink into the real bin dir (or, on Debian, a
/// wrapper script with no pg_ctl beside it, which we skip).
fn bin_dir_on_path() -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path).find_map(|dir| {
        let initdb = fs::canonicalize(dir.join("initdb")).ok()?;
        initdb
            .parent()
            .filter(|d| has_server(d))
            .map(Path::to_path_buf)
    })
}

fn has_server(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|p| dir.join(p).is_file())
}

/// `/usr/lib/postgresql/<highest version>/bin`.
fn highest_debian_version() -> Option<PathBuf> {
    let versions = fs::read_dir("/usr/lib/postgresql").ok()?;
    let best = versions
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let number: f64 = name.parse().ok()?;
            Some((number, name))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))?;
    Some(Path::new("/usr/lib/postgresql").join(best.1).join("bin"))
}

/// Effective uid 0, from /proc (no libc: unsafe code is forbidden).
fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        if let Ok(status) = fs::read_to_string("/proc/self/status") {
            let uid_line = status.lines().find_map(|l| l.strip_prefix("Uid:"));
            if let Some(effective) = uid_line.and_then(|l| l.split_whitespace().nth(1)) {
                return effective == "0";
            }
        }
        let output = Command::new("id").arg("-u").output().expect("run id -u");
        String::from_utf8_lossy(&output.stdout).trim() == "0"
    })
}

/// Creates the `postgres` system user if it is missing.
fn ensure_os_user() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let exists = || {
            Command::new("id")
                .arg(OS_USER)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if exists() {
            return;
        }
        let output = Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home", OS_USER])
            .output()
            .expect("run useradd");
        // Another test process may have created it in the meantime.
        assert!(exists(), "useradd {OS_USER} failed: {}", stderr(&output));
    });
}

fn check(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        stderr(output),
        String::from_utf8_lossy(&output.stdout)
    );
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
