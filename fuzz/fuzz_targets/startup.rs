//! The startup phase over an in-memory socket: whatever the first bytes,
//! `negotiate` returns (the input ends in EOF, so it cannot wait) and
//! never panics; a session it accepts names a user.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

use rlsproxy::startup::{self, Encryption, Startup};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        // Room for every answer the proxy could write, so it never blocks.
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        client.write_all(data).await.expect("write input");
        client.shutdown().await.expect("close input");
        // The first byte picks the TLS state, so every branch is explored.
        let encryption = match data.first().map(|b| b % 3) {
            Some(0) => Encryption::Offered,
            Some(1) => Encryption::Established,
            _ => Encryption::Unavailable,
        };
        match startup::negotiate(&mut server, encryption).await {
            Ok(Startup::Session(params)) => {
                assert!(!params.user.is_empty() && !params.database.is_empty());
            }
            Ok(Startup::TlsRequested) => assert_eq!(encryption, Encryption::Offered),
            _ => {}
        }
    });
});
