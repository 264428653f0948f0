//! JWT structure and claims: `parse` and `check_claims` never panic on any
//! password, and a token they pass has an accepted algorithm and a string
//! `sub` that is not expired.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;

use rlsproxy::auth::verify::{self, ClaimsPolicy};

/// A fixed "now" so a run is reproducible.
const NOW: f64 = 1_800_000_000.0;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = verify::parse(token) else {
        return;
    };
    let policy = ClaimsPolicy {
        issuer: "https://issuer.example".into(),
        audience: vec!["app".into()],
        leeway: Duration::from_secs(30),
        require_exp: true,
    };
    if verify::check_claims(&parsed.claims, &policy, NOW).is_ok() {
        assert!(parsed.claims.get("sub").is_some_and(|s| s.is_string()));
        let exp = parsed.claims.get("exp").and_then(|e| e.as_f64());
        let exp = exp.expect("exp is a number");
        assert!(exp + 30.0 >= NOW);
    }
});
