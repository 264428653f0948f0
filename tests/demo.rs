//! The quickstart as a user runs it: `rlsproxy demo --check` starts its own
//! Postgres, issuer and proxy, runs the sample queries with psql and exits.

mod common;

use std::process::Command;

#[test]
fn demo_check_runs_the_quickstart_end_to_end() {
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"))
        .expect("example config");
    // Free ports instead of the example's fixed ones, so a developer's own
    // services on 6432/55432/9931 do not collide with the test.
    let config = example
        .replace(
            "127.0.0.1:6432",
            &format!("127.0.0.1:{}", common::free_port()),
        )
        .replace("port = 55432", &format!("port = {}", common::free_port()))
        .replace(
            "127.0.0.1:9931",
            &format!("127.0.0.1:{}", common::free_port()),
        );
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).expect("write config");

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
