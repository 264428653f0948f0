//! The relay after hand-over: bytes flow both ways unchanged while the
//! proxy watches message boundaries only, to stop at the client's Terminate
//! and to know whether the upstream ended idle (so it can be reused).

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Read buffer size per direction.
const BUFFER_BYTES: usize = 8192;

/// How the relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client sent Terminate.
    Terminate,
    /// The client closed its socket.
    ClientClosed,
    /// The client socket failed or sent a malformed frame.
    ClientError,
    /// The upstream closed or failed.
    UpstreamClosed,
    /// The proxy is shutting down and the drain time is over.
    Shutdown,
}

/// The relay's result: whether the upstream is reusable and what flowed.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub end: End,
    /// The upstream is at a message boundary with every request answered.
    pub idle: bool,
    /// Transaction status of the last ReadyForQuery seen.
    pub tx_status: u8,
    /// The client has seen only whole messages, so an error may follow.
    pub client_at_boundary: bool,
    pub bytes_from_client: u64,
    pub bytes_from_upstream: u64,
}

/// Walks message headers in a byte stream without copying bodies.
struct Framer {
    /// Body bytes of the current message not yet seen.
    remaining: usize,
    /// The next body byte is a ReadyForQuery status.
    want_status: bool,
    /// Status byte of the last ReadyForQuery.
    last_status: u8,
}

impl Default for Framer {
    fn default() -> Self {
        Framer {
            remaining: 0,
            want_status: false,
            last_status: b'I',
        }
    }
}

/// A length field below 4 cannot start a valid message.
#[derive(Debug, PartialEq, Eq)]
struct BadFrame;

impl Framer {
    /// Returns how many bytes of `data` may be forwarded now: whole messages
    /// and bodies in progress, never a partial header (it is kept for the
    /// next read). `on_message(tag)` sees each new message and may stop
    /// the scan before it by returning false.
    fn scan(
        &mut self,
        data: &[u8],
        mut on_message: impl FnMut(u8) -> bool,
    ) -> Result<usize, BadFrame> {
        let mut i = 0;
        loop {
            if self.remaining > 0 {
                let take = self.remaining.min(data.len() - i);
                if take == 0 {
                    return Ok(i);
                }
                if self.want_status {
                    self.last_status = data[i];
                    self.want_status = false;
                }
                i += take;
                self.remaining -= take;
                continue;
            }
            let Some(header) = data.get(i..i + 5) else {
                return Ok(i);
            };
            let tag = header[0];
            let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
            let body = usize::try_from(len)
                .ok()
                .and_then(|l| l.checked_sub(4))
                .ok_or(BadFrame)?;
            if !on_message(tag) {
                return Ok(i);
            }
            self.remaining = body;
            self.want_status = tag == b'Z' && body > 0;
            i += 5;
        }
    }
}

/// What the framer made of one byte stream: the tags seen, the bytes it
/// let through, the last ReadyForQuery status, and whether every length
/// word was valid.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub struct Framing {
    pub tags: Vec<u8>,
    pub forwarded: usize,
    pub last_status: u8,
    pub valid: bool,
}

/// Runs the relay's framer over `data` as if it arrived in reads ending at
/// `cuts` (out-of-range cuts are ignored). For the fuzz target, which
/// checks that how a stream is split across reads never changes what the
/// framer sees; the proxy itself does not call this.
#[doc(hidden)]
pub fn frame_reads(data: &[u8], cuts: &[usize]) -> Framing {
    let mut framer = Framer::default();
    let mut pending = Vec::new();
    let mut out = Framing {
        tags: Vec::new(),
        forwarded: 0,
        last_status: b'I',
        valid: true,
    };
    let mut start = 0;
    for end in cuts.iter().copied().chain([data.len()]) {
        if end < start || end > data.len() {
            continue;
        }
        pending.extend_from_slice(&data[start..end]);
        start = end;
        let tags = &mut out.tags;
        match framer.scan(&pending, |t| {
            tags.push(t);
            true
        }) {
            Ok(n) => {
                out.forwarded += n;
                pending.drain(..n);
            }
            Err(BadFrame) => {
                out.valid = false;
                break;
            }
        }
    }
    out.last_status = framer.last_status;
    out
}

/// What the client side has asked for since the start.
#[derive(Default)]
struct ClientSide {
    framer: Framer,
    /// Query, Sync and FunctionCall messages sent; each earns one ReadyForQuery.
    expect_ready: u64,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    bytes: u64,
}

#[derive(Default)]
struct UpstreamSide {
    framer: Framer,
    ready_seen: u64,
    tx_status: u8,
    bytes: u64,
}

/// Relays until the client terminates, either side closes or `shutdown`
/// resolves. `pending` holds upstream bytes already read during set-up.
pub async fn relay<C, U>(
    client: &mut C,
    upstream: &mut U,
    pending: &mut BytesMut,
    shutdown: impl std::future::Future<Output = ()>,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut cs = ClientSide::default();
    let mut us = UpstreamSide {
        tx_status: b'I',
        ..Default::default()
    };
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut up_rd, mut up_wr) = tokio::io::split(upstream);
    let mut up_buf = std::mem::take(pending);

    let end = {
        let to_upstream = client_to_upstream(&mut client_rd, &mut up_wr, &mut cs);
        let to_client = upstream_to_client(&mut up_rd, &mut client_wr, &mut us, &mut up_buf);
        tokio::select! {
            end = to_upstream => end,
            end = to_client => end,
            () = shutdown => End::Shutdown,
        }
    };

    let idle = matches!(end, End::Terminate | End::ClientClosed)
        && cs.framer.remaining == 0
        && us.framer.remaining == 0
        && up_buf.is_empty()
        && !cs.unsynced
        && cs.expect_ready == us.ready_seen;
    Outcome {
        end,
        idle,
        tx_status: us.tx_status,
        client_at_boundary: us.framer.remaining == 0,
        bytes_from_client: cs.bytes,
        bytes_from_upstream: us.bytes,
    }
}

async fn client_to_upstream<R, W>(rd: &mut R, wr: &mut W, side: &mut ClientSide) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(BUFFER_BYTES);
    loop {
        buf.reserve(BUFFER_BYTES / 2);
        match rd.read_buf(&mut buf).await {
            Ok(0) => {
                return if buf.is_empty() {
                    End::ClientClosed
                } else {
                    End::ClientError
                };
            }
            Ok(_) => {}
            Err(_) => return End::ClientError,
        }
        let mut terminate = false;
        let scanned = side.framer.scan(&buf, |tag| {
            match tag {
                b'X' => {
                    terminate = true;
                    return false;
                }
                b'Q' | b'F' => side.expect_ready += 1,
                b'S' => {
                    side.expect_ready += 1;
                    side.unsynced = false;
                }
                // COPY data and Flush do not need a Sync of their own.
                b'd' | b'c' | b'f' | b'H' => {}
                _ => side.unsynced = true,
            }
            true
        });
        let Ok(consumed) = scanned else {
            return End::ClientError;
        };
        side.bytes += consumed as u64;
        if wr.write_all(&buf[..consumed]).await.is_err() {
            return End::UpstreamClosed;
        }
        buf.advance(consumed);
        if terminate {
            return End::Terminate;
        }
    }
}

async fn upstream_to_client<R, W>(
    rd: &mut R,
    wr: &mut W,
    side: &mut UpstreamSide,
    buf: &mut BytesMut,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        if !buf.is_empty() {
            let ready_seen = &mut side.ready_seen;
            let scanned = side.framer.scan(buf, |tag| {
                *ready_seen += u64::from(tag == b'Z');
                true
            });
            let Ok(consumed) = scanned else {
                return End::UpstreamClosed;
            };
            side.tx_status = side.framer.last_status;
            side.bytes += consumed as u64;
            if wr.write_all(&buf[..consumed]).await.is_err() {
                return End::ClientError;
            }
            buf.advance(consumed);
        }
        buf.reserve(BUFFER_BYTES / 2);
        match rd.read_buf(buf).await {
            Ok(0) | Err(_) => return End::UpstreamClosed,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;
    use tokio::io::duplex;

    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.put_i32(i32::try_from(body.len() + 4).expect("small"));
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn framer_holds_back_partial_headers_and_reads_status() {
        let mut f = Framer::default();
        let mut stream = msg(b'D', &[7; 10]);
        stream.extend(msg(b'Z', b"T"));
        // Feed one byte at a time, as the worst TCP split would.
        let mut pending = Vec::new();
        let mut forwarded = 0;
        let mut tags = Vec::new();
        for b in &stream {
            pending.push(*b);
            let n = f.scan(&pending, |t| {
                tags.push(t);
                true
            });
            let n = n.expect("valid");
            forwarded += n;
            pending.drain(..n);
        }
        assert_eq!(forwarded, stream.len());
        assert_eq!(tags, vec![b'D', b'Z']);
        assert_eq!(f.last_status, b'T');
    }

    #[test]
    fn frame_reads_is_the_same_however_the_stream_is_split() {
        let mut stream = msg(b'T', &[1; 30]);
        stream.extend(msg(b'D', &[2; 300]));
        stream.extend(msg(b'Z', b"E"));
        let whole = frame_reads(&stream, &[]);
        assert_eq!(whole.tags, b"TDZ");
        assert_eq!((whole.forwarded, whole.last_status), (stream.len(), b'E'));
        let cuts: Vec<usize> = (0..stream.len()).collect();
        assert_eq!(frame_reads(&stream, &cuts), whole);
    }

    #[test]
    fn framer_refuses_short_length() {
        let mut f = Framer::default();
        assert_eq!(f.scan(&[b'Q', 0, 0, 0, 3], |_| true), Err(BadFrame));
    }

    #[tokio::test]
    async fn terminate_stops_the_relay_and_leaves_upstream_idle() {
        let (mut client, mut client_end) = duplex(1 << 16);
        let (mut upstream, mut upstream_end) = duplex(1 << 16);
        let task = tokio::spawn(async move {
            let mut pending = BytesMut::new();
            relay(
                &mut client_end,
                &mut upstream_end,
                &mut pending,
                std::future::pending(),
            )
            .await
        });

        client
            .write_all(&msg(b'Q', b"select 1\0"))
            .await
            .expect("write");
        let mut got = vec![0u8; 14];
        upstream
            .read_exact(&mut got)
            .await
            .expect("query reaches upstream");
        upstream.write_all(&msg(b'Z', b"T")).await.expect("write");
        let mut z = [0u8; 6];
        client
            .read_exact(&mut z)
            .await
            .expect("ready reaches client");
        client.write_all(&msg(b'X', b"")).await.expect("write");

        let outcome = task.await.expect("relay");
        assert_eq!(outcome.end, End::Terminate);
        assert!(outcome.idle);
        assert_eq!(outcome.tx_status, b'T');
    }

    #[tokio::test]
    async fn client_leaving_mid_query_is_not_idle() {
        let (mut client, mut client_end) = duplex(1 << 16);
        let (_upstream, mut upstream_end) = duplex(1 << 16);
        let task = tokio::spawn(async move {
            let mut pending = BytesMut::new();
            relay(
                &mut client_end,
                &mut upstream_end,
                &mut pending,
                std::future::pending(),
            )
            .await
        });
        client
            .write_all(&msg(b'Q', b"select pg_sleep(9)\0"))
            .await
            .expect("write");
        drop(client);
        let outcome = task.await.expect("relay");
        assert_eq!(outcome.end, End::ClientClosed);
        assert!(!outcome.idle);
    }
}
