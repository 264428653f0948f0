//! The first packets of a client connection: SSLRequest (handed back to the
//! caller when TLS is configured, else answered `N`), GSSENCRequest (always
//! `N`: GSSAPI encryption is not offered), CancelRequest, and the protocol
//! 3.x StartupMessage.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::error::ClientError;
use crate::wire::{self, Reader, WireError};

/// Largest startup packet accepted, as in Postgres itself.
pub const MAX_STARTUP_PACKET_BYTES: usize = 10_000;

/// Encryption requests a client may make before its StartupMessage.
const MAX_NEGOTIATIONS: usize = 2;

/// Where the connection stands on TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// No TLS configured: SSLRequest is answered `N`.
    Unavailable,
    /// TLS configured and not yet started: SSLRequest is returned to the caller.
    Offered,
    /// Already inside TLS: another SSLRequest is a protocol violation.
    Established,
}

/// What the client wants after the startup phase.
#[derive(Debug, PartialEq, Eq)]
pub enum Startup {
    /// The client asked for TLS; the caller answers `S` and does the handshake.
    TlsRequested,
    /// A new session.
    Session(StartupParams),
    /// A cancel request for the session that got this (pid, secret).
    Cancel { pid: i32, secret: i32 },
}

/// The parameters of a StartupMessage.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StartupParams {
    pub user: String,
    pub database: String,
    /// Every other parameter in the order sent (`application_name`, `options`, GUCs).
    pub params: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("{0}")]
    Refused(ClientError),
}

impl From<ClientError> for StartupError {
    fn from(e: ClientError) -> Self {
        StartupError::Refused(e)
    }
}

/// Reads packets until a StartupMessage or CancelRequest arrives, answering
/// encryption requests on the way.
pub async fn negotiate<S>(stream: &mut S, encryption: Encryption) -> Result<Startup, StartupError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut negotiations = 0;
    loop {
        let packet = wire::read_untyped(stream, MAX_STARTUP_PACKET_BYTES).await?;
        let mut r = Reader::new(&packet);
        let code = r.i32()?;
        match code {
            wire::SSL_REQUEST_CODE | wire::GSSENC_REQUEST_CODE => {
                // Refuse before answering: an `N` promises the client that
                // its next packet will be read.
                negotiations += 1;
                if negotiations > MAX_NEGOTIATIONS {
                    return Err(protocol("too many encryption requests").into());
                }
                if !r.is_empty() {
                    return Err(protocol("encryption request with trailing bytes").into());
                }
                match (code, encryption) {
                    (wire::SSL_REQUEST_CODE, Encryption::Offered) => {
                        return Ok(Startup::TlsRequested);
                    }
                    (wire::SSL_REQUEST_CODE, Encryption::Established) => {
                        return Err(protocol("SSLRequest on an encrypted connection").into());
                    }
                    // Plaintext continues on this socket; nothing has been
                    // read past the request, so no stuffed bytes are lost.
                    _ => stream.write_all(b"N").await.map_err(WireError::Io)?,
                }
            }
            wire::CANCEL_REQUEST_CODE => {
                let pid = r.i32()?;
                let secret = r.i32()?;
                return Ok(Startup::Cancel { pid, secret });
            }
            version => {
                return Ok(Startup::Session(
                    parse_startup(version, &mut r, stream).await?,
                ));
            }
        }
    }
}

async fn parse_startup<S>(
    version: i32,
    r: &mut Reader<'_>,
    stream: &mut S,
) -> Result<StartupParams, StartupError>
where
    S: AsyncWrite + Unpin,
{
    // The code as libpq writes it: two unsigned 16-bit halves.
    let (major, minor) = ((version as u32) >> 16, version & 0xffff);
    if major != 3 {
        return Err(ClientError::Unsupported(format!(
            "frontend protocol {major}.{minor} is not supported: this proxy speaks 3.0"
        ))
        .into());
    }

    let mut params = StartupParams::default();
    let mut unknown_protocol_options = Vec::new();
    loop {
        let name = r.cstr()?;
        if name.is_empty() {
            break;
        }
        let value = r.cstr()?;
        match name {
            "user" => params.user = value.to_owned(),
            "database" => params.database = value.to_owned(),
            "replication" if value != "false" && value != "0" && value != "off" => {
                return Err(ClientError::Unsupported("replication connections".into()).into());
            }
            "replication" => {}
            _ if name.starts_with("_pq_.") => unknown_protocol_options.push(name.to_owned()),
            _ => params.params.push((name.to_owned(), value.to_owned())),
        }
    }
    if !r.is_empty() {
        return Err(protocol("bytes after the startup parameters").into());
    }
    if params.user.is_empty() {
        return Err(protocol("no \"user\" in the startup message").into());
    }
    if params.database.is_empty() {
        params.database = params.user.clone();
    }

    // A newer 3.x minor or `_pq_` options: say what we speak and go on.
    if minor > 0 || !unknown_protocol_options.is_empty() {
        let mut out = BytesMut::new();
        wire::negotiate_protocol_version(&mut out, 0, &unknown_protocol_options);
        stream.write_all(&out).await.map_err(WireError::Io)?;
    }
    Ok(params)
}

fn protocol(what: &str) -> ClientError {
    ClientError::Protocol(what.to_owned())
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;
    use tokio::io::{AsyncReadExt, duplex};

    use super::*;

    fn packet(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_i32(i32::try_from(body.len() + 4).expect("small"));
        out.extend_from_slice(body);
        out
    }

    fn startup_body(version: i32, pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        body.put_i32(version);
        for (k, v) in pairs {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        body
    }

    async fn run(input: Vec<u8>) -> (Result<Startup, StartupError>, Vec<u8>) {
        let (mut client, mut server) = duplex(1 << 16);
        client.write_all(&input).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let result = negotiate(&mut server, Encryption::Unavailable).await;
        drop(server);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("read");
        (result, answer)
    }

    #[tokio::test]
    async fn ssl_then_startup() {
        let mut input = packet(&wire::SSL_REQUEST_CODE.to_be_bytes());
        input.extend(packet(&startup_body(
            wire::PROTOCOL_3_0,
            &[
                ("user", "authenticated"),
                ("database", "app"),
                ("application_name", "psql"),
            ],
        )));
        let (result, answer) = run(input).await;
        assert_eq!(answer, b"N");
        let Ok(Startup::Session(p)) = result else {
            panic!("{result:?}")
        };
        assert_eq!(
            (p.user.as_str(), p.database.as_str()),
            ("authenticated", "app")
        );
        assert_eq!(p.params, vec![("application_name".into(), "psql".into())]);
    }

    #[tokio::test]
    async fn gssenc_then_ssl_then_startup() {
        let mut input = packet(&wire::GSSENC_REQUEST_CODE.to_be_bytes());
        input.extend(packet(&wire::SSL_REQUEST_CODE.to_be_bytes()));
        input.extend(packet(&startup_body(wire::PROTOCOL_3_0, &[("user", "u")])));
        let (result, answer) = run(input).await;
        assert_eq!(answer, b"NN");
        let Ok(Startup::Session(p)) = result else {
            panic!("{result:?}")
        };
        assert_eq!(p.database, "u");
    }

    #[tokio::test]
    async fn cancel_request() {
        let mut body = wire::CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
        body.put_i32(7);
        body.put_i32(-9);
        let (result, _) = run(packet(&body)).await;
        assert_eq!(
            result.expect("cancel"),
            Startup::Cancel { pid: 7, secret: -9 }
        );
    }

    #[tokio::test]
    async fn newer_minor_gets_negotiate_protocol_version() {
        let body = startup_body(wire::PROTOCOL_3_0 + 2, &[("user", "u"), ("_pq_.x", "1")]);
        let (result, answer) = run(packet(&body)).await;
        assert!(matches!(result, Ok(Startup::Session(_))));
        assert_eq!(answer[0], b'v');
    }

    #[tokio::test]
    async fn refusals_never_panic() {
        let bad: Vec<Vec<u8>> = vec![
            packet(&startup_body(0x0001_0000, &[("user", "u")])),
            packet(&startup_body(0x0002_0000, &[("user", "u")])),
            packet(&startup_body(wire::PROTOCOL_3_0, &[])),
            packet(&[0, 3, 0, 0, b'u', b's']),
            0i32.to_be_bytes().to_vec(),
            3i32.to_be_bytes().to_vec(),
            i32::MAX.to_be_bytes().to_vec(),
            packet(&[1, 2]),
            vec![0, 0],
            vec![],
        ];
        for input in bad {
            let (result, _) = run(input.clone()).await;
            assert!(result.is_err(), "{input:?} gave {result:?}");
        }
    }

    #[tokio::test]
    async fn endless_encryption_requests_are_cut_off() {
        let mut input = Vec::new();
        for _ in 0..5 {
            input.extend(packet(&wire::SSL_REQUEST_CODE.to_be_bytes()));
        }
        let (result, answer) = run(input).await;
        assert!(result.is_err());
        assert_eq!(answer.first(), Some(&b'N'));
    }

    /// A third encryption request was answered `N` and only then refused.
    #[tokio::test]
    async fn third_encryption_request_is_refused_unanswered() {
        let mut input = Vec::new();
        for code in [
            wire::SSL_REQUEST_CODE,
            wire::GSSENC_REQUEST_CODE,
            wire::SSL_REQUEST_CODE,
        ] {
            input.extend(packet(&code.to_be_bytes()));
        }
        input.extend(packet(&startup_body(wire::PROTOCOL_3_0, &[("user", "u")])));
        let (result, answer) = run(input).await;
        assert!(result.is_err(), "{result:?}");
        assert_eq!(answer, b"NN");
    }
}
