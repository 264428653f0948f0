//! The relay after hand-over: bytes flow both ways unchanged while the
//! proxy watches message boundaries only, to stop at the client's Terminate
//! and to know whether the upstream ended idle (so it can be reused).

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
    /// The last message from the upstream was an ErrorResponse (its FATAL).
    pub upstream_said_fatal: bool,
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

/// One direction of the relay. Reads go into a buffer on the stack of the
/// poll call, so an idle session holds no read buffer at all; only bytes the
/// destination could not take yet are copied to the heap (`spill`).
#[derive(Default)]
struct Direction {
    framer: Framer,
    /// Unwritten bytes, kept when the destination would block.
    spill: Vec<u8>,
    spill_at: usize,
    /// A partial message header held back for the next read.
    carry: [u8; 5],
    carry_len: usize,
    /// The destination (TLS) has buffered bytes to flush.
    flush_pending: bool,
    /// Set once the direction must end after the spill is written.
    stopping: Option<End>,
    bytes: u64,
}

/// How a direction failed, mapped to an [`End`] by the caller.
struct Ends {
    read_eof: End,
    read_error: End,
    write_error: End,
}

const CLIENT_SIDE: Ends = Ends {
    read_eof: End::ClientClosed,
    read_error: End::ClientError,
    write_error: End::UpstreamClosed,
};
const UPSTREAM_SIDE: Ends = Ends {
    read_eof: End::UpstreamClosed,
    read_error: End::UpstreamClosed,
    write_error: End::ClientError,
};

impl Direction {
    /// Moves bytes from `src` to `dst` until one would block or the
    /// direction ends. `on_message` sees each message tag and may stop the
    /// direction before that message (it is not forwarded).
    fn poll_relay<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        dst: &mut W,
        ends: &Ends,
        on_message: &mut dyn FnMut(u8) -> bool,
    ) -> Poll<End>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if let Err(end) = ready!(self.poll_drain(cx, dst, ends)) {
                return Poll::Ready(end);
            }
            if let Some(end) = self.stopping {
                return Poll::Ready(end);
            }

            // Left uninitialised: zeroing 16 KiB on every wake-up showed in
            // profiles, and the reader only exposes what it filled.
            let mut stack = [MaybeUninit::<u8>::uninit(); READ_BYTES];
            let mut read = ReadBuf::uninit(&mut stack);
            read.put_slice(&self.carry[..self.carry_len]);
            match Pin::new(&mut *src).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(ends.read_error),
                Poll::Ready(Ok(())) if read.filled().len() == self.carry_len => {
                    // EOF inside a message header is a broken stream.
                    let end = if self.carry_len == 0 {
                        ends.read_eof
                    } else {
                        ends.read_error
                    };
                    return Poll::Ready(end);
                }
                Poll::Ready(Ok(())) => {}
            }
            let data = read.filled();
            let data_len = data.len();

            let mut stopped = false;
            let scanned = self.framer.scan(data, |tag| {
                let go_on = on_message(tag);
                stopped |= !go_on;
                go_on
            });
            let Ok(consumed) = scanned else {
                return Poll::Ready(ends.read_error);
            };
            if stopped {
                self.stopping = Some(End::Terminate);
                self.carry_len = 0;
            } else {
                self.carry_len = data_len - consumed;
                self.carry[..self.carry_len].copy_from_slice(&data[consumed..]);
            }
            self.bytes += consumed as u64;

            let mut written = 0;
            while written < consumed {
                match Pin::new(&mut *dst).poll_write(cx, &data[written..consumed]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(ends.write_error);
                    }
                    Poll::Ready(Ok(n)) => written += n,
                    Poll::Pending => {
                        self.spill.extend_from_slice(&data[written..consumed]);
                        return Poll::Pending;
                    }
                }
            }
            self.flush_pending = written > 0;
        }
    }

    /// Writes the spill and flushes; `Ok` once nothing is left to send.
    fn poll_drain<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut W,
        ends: &Ends,
    ) -> Poll<Result<(), End>> {
        while self.spill_at < self.spill.len() {
            match ready!(Pin::new(&mut *dst).poll_write(cx, &self.spill[self.spill_at..])) {
                Ok(0) | Err(_) => return Poll::Ready(Err(ends.write_error)),
                Ok(n) => {
                    self.spill_at += n;
                    self.flush_pending = true;
                }
            }
        }
        if !self.spill.is_empty() {
            // Give the memory back: a session that idles keeps none.
            self.spill = Vec::new();
            self.spill_at = 0;
        }
        if self.flush_pending {
            if ready!(Pin::new(&mut *dst).poll_flush(cx)).is_err() {
                return Poll::Ready(Err(ends.write_error));
            }
            self.flush_pending = false;
        }
        Poll::Ready(Ok(()))
    }
}

/// Bytes read per poll, on the stack.
const READ_BYTES: usize = 16 * 1024;

/// Relays until the client terminates, either side closes or `shutdown`
/// resolves. `pending` holds upstream bytes already read during set-up;
/// it is forwarded first and left empty.
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
    let mut up = Direction::default();
    let mut down = Direction::default();
    // Query, Sync and FunctionCall each earn one ReadyForQuery.
    let mut expect_ready: u64 = 0;
    // Extended-protocol messages sent since the last Sync.
    let mut unsynced = false;
    let mut ready_seen: u64 = 0;
    let mut last_upstream_tag = 0u8;

    // Taken and dropped before the relay starts: an idle session keeps no
    // set-up buffer.
    let taken = std::mem::take(pending);
    let mut malformed_pending = false;
    if !taken.is_empty() {
        match down.framer.scan(&taken, |tag| {
            ready_seen += u64::from(tag == b'Z');
            true
        }) {
            Ok(consumed) => {
                down.spill = taken[..consumed].to_vec();
                down.carry_len = taken.len() - consumed;
                down.carry[..down.carry_len].copy_from_slice(&taken[consumed..]);
                down.bytes += consumed as u64;
            }
            Err(BadFrame) => malformed_pending = true,
        }
    }
    drop(taken);

    tokio::pin!(shutdown);
    let end = if malformed_pending {
        End::UpstreamClosed
    } else {
        std::future::poll_fn(|cx| {
            if shutdown.as_mut().poll(cx).is_ready() {
                return Poll::Ready(End::Shutdown);
            }
            let mut client_message = |tag: u8| {
                match tag {
                    b'X' => return false,
                    b'Q' | b'F' => expect_ready += 1,
                    b'S' => {
                        expect_ready += 1;
                        unsynced = false;
                    }
                    // COPY data and Flush do not need a Sync of their own.
                    b'd' | b'c' | b'f' | b'H' => {}
                    _ => unsynced = true,
                }
                true
            };
            if let Poll::Ready(end) =
                up.poll_relay(cx, client, upstream, &CLIENT_SIDE, &mut client_message)
            {
                return Poll::Ready(end);
            }
            let mut upstream_message = |tag: u8| {
                ready_seen += u64::from(tag == b'Z');
                last_upstream_tag = tag;
                true
            };
            down.poll_relay(cx, upstream, client, &UPSTREAM_SIDE, &mut upstream_message)
        })
        .await
    };

    let idle = matches!(end, End::Terminate | End::ClientClosed)
        && up.framer.remaining == 0
        && up.carry_len == 0
        && down.framer.remaining == 0
        && down.carry_len == 0
        && down.spill_at == down.spill.len()
        && !unsynced
        && expect_ready == ready_seen;
    Outcome {
        end,
        idle,
        tx_status: down.framer.last_status,
        client_at_boundary: down.framer.remaining == 0 && down.spill_at == down.spill.len(),
        upstream_said_fatal: last_upstream_tag == b'E',
        bytes_from_client: up.bytes,
        bytes_from_upstream: down.bytes,
    }
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    use super::*;

    type RelayTask = tokio::task::JoinHandle<Outcome>;

    /// A relay between two in-memory sockets; returns the client's and the
    /// upstream's far ends. `pending` plays bytes read during set-up.
    fn spawn_relay(
        client_capacity: usize,
        pending: &[u8],
    ) -> (DuplexStream, DuplexStream, RelayTask) {
        let (client, mut client_end) = duplex(client_capacity);
        let (upstream, mut upstream_end) = duplex(1 << 20);
        let mut pending = BytesMut::from(pending);
        let task = tokio::spawn(async move {
            let never = std::future::pending();
            relay(&mut client_end, &mut upstream_end, &mut pending, never).await
        });
        (client, upstream, task)
    }

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
        let (mut client, mut upstream, task) = spawn_relay(1 << 16, b"");

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
        let (mut client, _upstream, task) = spawn_relay(1 << 16, b"");
        client
            .write_all(&msg(b'Q', b"select pg_sleep(9)\0"))
            .await
            .expect("write");
        drop(client);
        let outcome = task.await.expect("relay");
        assert_eq!(outcome.end, End::ClientClosed);
        assert!(!outcome.idle);
    }

    #[tokio::test]
    async fn a_slow_client_gets_every_byte_in_order() {
        // A tiny duplex buffer makes every write to the client block, so
        // the relay spills and drains again and again.
        let (mut client, mut upstream, task) =
            spawn_relay(64, &msg(b'N', b"notice before hand-over"));
        let mut expected = msg(b'N', b"notice before hand-over");
        let mut stream = Vec::new();
        for i in 0..200u32 {
            stream.extend(msg(b'D', &i.to_be_bytes().repeat(100)));
        }
        stream.extend(msg(b'Z', b"I"));
        expected.extend(&stream);
        let query = msg(b'Q', b"select big\0");
        client.write_all(&query).await.expect("query");
        let mut got_query = vec![0u8; query.len()];
        upstream
            .read_exact(&mut got_query)
            .await
            .expect("query arrives");
        upstream.write_all(&stream).await.expect("write");
        let mut got = vec![0u8; expected.len()];
        client.read_exact(&mut got).await.expect("read everything");
        assert_eq!(got, expected);
        client.write_all(&msg(b'X', b"")).await.expect("terminate");
        let outcome = task.await.expect("relay");
        assert_eq!(outcome.end, End::Terminate);
        assert!(outcome.idle, "{outcome:?}");
    }

    #[tokio::test]
    async fn messages_split_across_writes_are_forwarded_whole() {
        let (mut client, mut upstream, task) = spawn_relay(1 << 16, b"");
        let query = msg(b'Q', b"select 42\0");
        for b in &query {
            client.write_all(&[*b]).await.expect("write one byte");
            tokio::task::yield_now().await;
        }
        let mut got = vec![0u8; query.len()];
        upstream.read_exact(&mut got).await.expect("query arrives");
        assert_eq!(got, query);
        upstream.write_all(&msg(b'Z', b"I")).await.expect("ready");
        let mut z = [0u8; 6];
        client.read_exact(&mut z).await.expect("ready arrives");
        // Terminate split in two: the relay must hold the header, not forward it.
        let terminate = msg(b'X', b"");
        client.write_all(&terminate[..2]).await.expect("half");
        tokio::task::yield_now().await;
        client.write_all(&terminate[2..]).await.expect("rest");
        let outcome = task.await.expect("relay");
        assert_eq!(outcome.end, End::Terminate);
        assert!(outcome.idle);
        drop(upstream_end_probe(&mut upstream).await);
    }

    /// Whatever reached the upstream after the query: must be nothing.
    async fn upstream_end_probe(upstream: &mut tokio::io::DuplexStream) -> Vec<u8> {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            upstream.read_to_end(&mut rest),
        )
        .await;
        assert!(rest.is_empty(), "Terminate leaked upstream: {rest:?}");
        rest
    }
}
