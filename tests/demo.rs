//! The quickstart as a user runs it: `rlsproxy demo --check` starts its own
//! Postgres, issuer and proxy, runs the sample queries with psql and exits.

mod common;

use std::process::Command;

/// The example config on free ports (so a developer's own services on
/// 6432/55432/9930/9931 do not collide); returns (dir, config path, pg port).
fn example_config() -> (tempfile::TempDir, std::path::PathBuf, u16) {
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"))
        .expect("example config");
    let pg_port = common::free_port();
    let free = || format!("127.0.0.1:{}", common::free_port());
    let config = example
        .replace("127.0.0.1:6432", &free())
        .replace("port = 55432", &format!("port = {pg_port}"))
        .replace("127.0.0.1:9930", &free())
        .replace("127.0.0.1:9931", &free());
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).expect("write config");
    (dir, path, pg_port)
}

#[test]
fn demo_check_runs_the_quickstart_end_to_end() {
    let (dir, path, _) = example_config();
    let output = Command::new(env!("CARGO_BIN_EXE_rlsproxy"))
        .args(["demo", "--check", "--config"])
        .arg(&path)
        .current_dir(dir.path())
        .env_remove("RLSPROXY_AUTHENTICATED_PASSWORD")
        .output()
        .expect("run rlsproxy demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("ok: alice sees alice|alice: buy milk,alice: water the plants"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok: bob sees bob|bob: fix the bike"),
        "{stdout}"
    );
    assert!(stdout.contains("demo check passed"), "{stdout}");
    assert!(
        !dir.path().join(".rlsproxy").exists(),
        "the demo removes the key it created"
    );
}

#[test]
fn sigterm_stops_the_demo_and_removes_its_cluster() {
    use std::io::BufRead;

    let (dir, path, pg_port) = example_config();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rlsproxy"))
        .args(["demo", "--config"])
        .arg(&path)
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run rlsproxy demo");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("line");
        let ready = line.contains("Press Ctrl-C");
        seen.push(line);
        if ready {
            break;
        }
    }
    assert!(seen.iter().any(|l| l.contains("Press Ctrl-C")), "{seen:?}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", pg_port)).is_ok(),
        "cluster is up"
    );

    let killed = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    assert!(killed.expect("kill").success());
    let status = child.wait().expect("wait");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(status.success(), "{status:?} {rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("removing the demo cluster")),
        "{rest:?}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", pg_port)).is_err(),
        "cluster still up"
    );
}
