//! Hostile bytes in the startup phase, sent over raw TCP to the real proxy
//! while a real client logs in and queries in a loop beside them. Each kind
//! gets a clear FATAL or a close, never a panic; the valid client never fails.
//!
//! Buffer stuffing (CVE-2021-3935 in PgBouncer): the proxy here has no
//! client TLS configured, so an SSLRequest is answered `N` and the
//! connection goes on in plaintext; bytes sent in the same write as the
//! SSLRequest are read as the next startup packet, which is what a plaintext
//! client sends anyway: nothing was promised to be encrypted. With TLS
//! configured such bytes are refused before the handshake
//! (`tests/lifecycle.rs`, `bytes_stuffed_after_sslrequest_are_refused_with_tls`).

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::proxy::{
    Reply, Steady, TestProxy, closes_within, message, next_reply, packet, password, startup,
    startup_body,
};
use common::{JwksServer, Postgres, TestKey, claims};
use rlsproxy::wire::{CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, PROTOCOL_3_0, SSL_REQUEST_CODE};

/// How long a refusal or close may take (generous: the machine is shared).
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// How long a connection is watched to see that the proxy waits on it.
const WAITS_FOR: Duration = Duration::from_secs(1);
/// Silent connections held open while the valid client keeps working.
const SILENT_CONNECTIONS: usize = 50;

/// What the proxy must do with a case's bytes.
#[derive(Debug)]
enum Expect {
    /// A FATAL ErrorResponse with this SQLSTATE and message fragment, then close.
    Refused(&'static str, &'static str),
    /// Close without a message.
    Closed,
    /// Ask for the password (the startup was accepted), after a
    /// NegotiateProtocolVersion if `negotiated`.
    PasswordAsked { negotiated: bool },
    /// Keep waiting for more bytes (until `startup_timeout`, 10 s by
    /// default, which `tests/lifecycle.rs` covers).
    Waits,
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    /// Shut down our write side after sending (a client that hangs up).
    hang_up: bool,
    /// Single-byte answers expected first (`N` per encryption request).
    prefix: &'static [u8],
    expect: Expect,
}

fn case(name: &'static str, bytes: Vec<u8>, expect: Expect) -> Case {
    Case {
        name,
        bytes,
        hang_up: false,
        prefix: b"",
        expect,
    }
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn code_packet(code: i32) -> Vec<u8> {
    packet(&code.to_be_bytes())
}

fn version(major: i32, minor: i32) -> Vec<u8> {
    packet(&startup_body(
        (major << 16) | minor,
        &[("user", "authenticated"), ("database", "postgres")],
    ))
}

fn cases() -> Vec<Case> {
    use Expect::{Closed, PasswordAsked, Refused, Waits};
    let ssl = code_packet(SSL_REQUEST_CODE);
    let gss = code_packet(GSSENC_REQUEST_CODE);
    let auth = startup("authenticated");
    let truncated = auth[..6].to_vec();
    let bad_length = "message length";
    vec![
        case(
            "length 0",
            0i32.to_be_bytes().to_vec(),
            Refused("08P01", bad_length),
        ),
        case(
            "length 3",
            3i32.to_be_bytes().to_vec(),
            Refused("08P01", bad_length),
        ),
        case(
            "length 4, no version",
            4i32.to_be_bytes().to_vec(),
            Refused("08P01", bad_length),
        ),
        case(
            "length 2^31-1",
            i32::MAX.to_be_bytes().to_vec(),
            Refused("08P01", bad_length),
        ),
        case(
            "length 2^31",
            0x8000_0000u32.to_be_bytes().to_vec(),
            Refused("08P01", bad_length),
        ),
        case(
            "length -1",
            (-1i32).to_be_bytes().to_vec(),
            Refused("08P01", bad_length),
        ),
        case(
            "length 10001",
            10_001i32.to_be_bytes().to_vec(),
            Refused("08P01", bad_length),
        ),
        Case {
            hang_up: true,
            ..case("truncated packet then close", truncated.clone(), Closed)
        },
        case("truncated packet then hang", truncated, Waits),
        case("nothing at all", Vec::new(), Waits),
        case(
            "protocol 1.0",
            version(1, 0),
            Refused("0A000", "frontend protocol 1.0"),
        ),
        case(
            "protocol 2.0",
            version(2, 0),
            Refused("0A000", "frontend protocol 2.0"),
        ),
        case(
            "protocol 4.0",
            version(4, 0),
            Refused("0A000", "frontend protocol 4.0"),
        ),
        case(
            "protocol 3.9",
            version(3, 9),
            PasswordAsked { negotiated: true },
        ),
        case(
            "unknown _pq_ option",
            packet(&startup_body(
                PROTOCOL_3_0,
                &[("user", "authenticated"), ("_pq_.x", "1")],
            )),
            PasswordAsked { negotiated: true },
        ),
        Case {
            prefix: b"N",
            ..case(
                "ssl request with a stuffed startup packet",
                concat(&[&ssl, &auth]),
                PasswordAsked { negotiated: false },
            )
        },
        Case {
            prefix: b"N",
            ..case(
                "ssl request with stuffed http",
                concat(&[&ssl, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]),
                Refused("08P01", bad_length),
            )
        },
        case(
            "ssl request with trailing bytes inside",
            packet(&concat(&[&SSL_REQUEST_CODE.to_be_bytes(), b"xx"])),
            Refused("08P01", "trailing bytes"),
        ),
        Case {
            prefix: b"NN",
            ..case(
                "gssenc then ssl then startup",
                concat(&[&gss, &ssl, &auth]),
                PasswordAsked { negotiated: false },
            )
        },
        Case {
            prefix: b"NN",
            ..case(
                "three encryption requests",
                concat(&[&ssl, &gss, &ssl, &auth]),
                Refused("08P01", "too many encryption requests"),
            )
        },
        case(
            "tls client hello without ssl request",
            vec![
                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ],
            Refused("08P01", bad_length),
        ),
        case(
            "http request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            Refused("08P01", bad_length),
        ),
        case(
            "no user",
            packet(&startup_body(PROTOCOL_3_0, &[("database", "postgres")])),
            Refused("08P01", "no \"user\""),
        ),
        case(
            "parameter not utf-8",
            packet(&concat(&[
                &PROTOCOL_3_0.to_be_bytes(),
                b"user\0\xff\xfe\0\0",
            ])),
            Refused("08P01", "not UTF-8"),
        ),
        case(
            "parameter without terminator",
            packet(&concat(&[
                &PROTOCOL_3_0.to_be_bytes(),
                b"user\0authenticated",
            ])),
            Refused("08P01", "without terminator"),
        ),
        case(
            "bytes after the parameters",
            packet(&concat(&[
                &PROTOCOL_3_0.to_be_bytes(),
                b"user\0authenticated\0\0junk",
            ])),
            Refused("08P01", "bytes after the startup parameters"),
        ),
        case(
            "replication",
            packet(&startup_body(
                PROTOCOL_3_0,
                &[("user", "authenticated"), ("replication", "database")],
            )),
            Refused("0A000", "replication"),
        ),
        case(
            "unknown role",
            startup("postgres"),
            Refused("28000", "is not served"),
        ),
        case(
            "cancel request for an unknown key",
            packet(&concat(&[
                &CANCEL_REQUEST_CODE.to_be_bytes(),
                &7i32.to_be_bytes(),
                &9i32.to_be_bytes(),
            ])),
            Closed,
        ),
        case(
            "cancel request too short",
            packet(&concat(&[
                &CANCEL_REQUEST_CODE.to_be_bytes(),
                &7i32.to_be_bytes(),
            ])),
            Refused("08P01", "malformed"),
        ),
        case(
            "query instead of password",
            concat(&[&auth, &message(b'Q', b"select 1\0")]),
            Refused("08P01", "expected a password message"),
        ),
        case(
            "password length 2^31-1",
            concat(&[&auth, b"p", &i32::MAX.to_be_bytes()]),
            Refused("28000", "more than the 16384 allowed"),
        ),
        case(
            "password length 3",
            concat(&[&auth, b"p", &3i32.to_be_bytes()]),
            Refused("08P01", bad_length),
        ),
        case(
            "password length negative",
            concat(&[&auth, b"p", &(-5i32).to_be_bytes()]),
            Refused("08P01", bad_length),
        ),
        case(
            "password without terminator",
            concat(&[&auth, &message(b'p', b"abc")]),
            Refused("08P01", "without terminator"),
        ),
        Case {
            hang_up: true,
            ..case(
                "password truncated then close",
                concat(&[&auth, &password("a.b.c")[..7]]),
                Closed,
            )
        },
        case(
            "password truncated then hang",
            concat(&[&auth, &password("a.b.c")[..7]]),
            Waits,
        ),
    ]
}

/// Runs one case; returns the stream if the proxy must keep waiting on it.
async fn run(port: u16, case: Case) -> Option<tokio::net::TcpStream> {
    let name = case.name;
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream.write_all(&case.bytes).await.expect("send");
    if case.hang_up {
        stream.shutdown().await.expect("shutdown");
    }
    for want in case.prefix {
        let got = tokio::time::timeout(ANSWER_WITHIN, stream.read_u8()).await;
        let got = got.unwrap_or_else(|_| panic!("{name}: no answer to the encryption request"));
        assert_eq!(got.ok(), Some(*want), "{name}: encryption answer");
    }

    let password_request =
        |r: &Reply| matches!(r, Reply::Message(b'R', b) if b == &3i32.to_be_bytes());
    let mut reply = next_reply(&mut stream, ANSWER_WITHIN).await;
    match case.expect {
        Expect::Refused(code, fragment) => {
            if password_request(&reply) {
                reply = next_reply(&mut stream, ANSWER_WITHIN).await;
            }
            let Reply::Error(e) = reply else {
                panic!("{name}: expected {code} {fragment:?}, got {reply:?}")
            };
            assert_eq!(
                (e.severity.as_str(), e.code.as_str()),
                ("FATAL", code),
                "{name}: {e:?}"
            );
            assert!(
                e.message.contains(fragment),
                "{name}: {:?} lacks {fragment:?}",
                e.message
            );
            assert!(
                closes_within(&mut stream, ANSWER_WITHIN).await,
                "{name}: not closed after the error"
            );
            None
        }
        Expect::Closed => {
            if password_request(&reply) {
                reply = next_reply(&mut stream, ANSWER_WITHIN).await;
            }
            assert!(
                matches!(reply, Reply::Closed),
                "{name}: expected a close, got {reply:?}"
            );
            None
        }
        Expect::PasswordAsked { negotiated } => {
            if negotiated {
                let Reply::Message(b'v', body) = reply else {
                    panic!("{name}: expected NegotiateProtocolVersion, got {reply:?}")
                };
                assert_eq!(&body[..4], &0i32.to_be_bytes(), "{name}: newest minor is 0");
                reply = next_reply(&mut stream, ANSWER_WITHIN).await;
            }
            assert!(
                password_request(&reply),
                "{name}: expected a password request, got {reply:?}"
            );
            None
        }
        Expect::Waits => {
            let Reply::Silent = next_reply_after(reply, &mut stream).await else {
                panic!("{name}: expected the proxy to keep waiting")
            };
            Some(stream)
        }
    }
}

/// `Silent` if the first reply was silence and the proxy stays silent.
async fn next_reply_after(first: Reply, stream: &mut tokio::net::TcpStream) -> Reply {
    match first {
        Reply::Message(b'R', _) => next_reply(stream, WAITS_FOR).await,
        other => other,
    }
}

#[tokio::test]
async fn hostile_startup_bytes_are_refused_while_a_valid_client_is_served() {
    common::proxy::watch_panics();
    let pg = Postgres::start().await;
    pg.setup_schema().await;
    let key = TestKey::es256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let proxy = TestProxy::start(&jwks, common::proxy::ProxyOptions::new(pg.port())).await;
    let token = key.sign(&claims("steady", &jwks.issuer(), common::proxy::AUDIENCE));
    let steady = Steady::start(proxy.config("authenticated", Some(&token)), "steady");

    let mut waiting = Vec::new();
    for case in cases() {
        waiting.extend(run(proxy.port, case).await);
    }

    // Many silent clients at once hold a task each, but nothing else.
    for _ in 0..SILENT_CONNECTIONS {
        waiting.push(proxy.raw().await);
    }
    let ten_mb = ten_megabyte_startup_packet(proxy.port).await;
    let valid = proxy.connect("authenticated", Some(&token)).await;
    let valid = valid.unwrap_or_else(|e| {
        panic!(
            "a valid client beside {} silent ones: {}",
            waiting.len(),
            common::describe(&e)
        )
    });
    let row = valid
        .query_one("SELECT auth.user_id()", &[])
        .await
        .expect("query");
    assert_eq!(row.get::<_, String>(0), "steady");
    ten_mb.await;

    for stream in &mut waiting {
        assert!(
            !closes_within(stream, Duration::from_millis(20)).await,
            "the proxy kept waiting"
        );
    }
    let rounds = steady.finish().await;
    eprintln!("valid client served {rounds} times meanwhile");
    assert_eq!(common::proxy::panics(), 0, "a task panicked");
}

/// A 10 MB startup packet: refused from its length word with 08P01, or the
/// connection reset because the proxy closed with the body unread.
async fn ten_megabyte_startup_packet(port: u16) -> impl std::future::Future<Output = ()> {
    const LEN: usize = 10 * 1024 * 1024;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut bytes = vec![0u8; LEN];
        bytes[..4].copy_from_slice(&i32::try_from(LEN).expect("fits").to_be_bytes());
        bytes[4..8].copy_from_slice(&PROTOCOL_3_0.to_be_bytes());
        // Fails once the proxy has closed; that is the expected end.
        let _ = wr.write_all(&bytes).await;
    });
    async move {
        let reply =
            tokio::time::timeout(ANSWER_WITHIN, rlsproxy::wire::read_typed(&mut rd, 1 << 20)).await;
        match reply.expect("10 MB packet: an answer within the deadline") {
            Ok((b'E', body)) => {
                let e = rlsproxy::wire::ErrorFields::parse(&body);
                assert_eq!(e.code, "08P01", "10 MB packet: {e:?}");
                assert!(e.message.contains("10485760"), "10 MB packet: {e:?}");
            }
            Ok((tag, _)) => panic!("10 MB packet: unexpected message {:?}", tag as char),
            Err(_) => {} // reset before the error could be read
        }
        tokio::time::timeout(ANSWER_WITHIN, writer)
            .await
            .expect("10 MB packet: the writer is stopped by the close")
            .expect("writer task");
    }
}
