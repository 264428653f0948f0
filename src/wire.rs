//! PostgreSQL v3 message framing shared by every stage: reading one
//! length-prefixed message from a stream with a size cap, and encoding the
//! few messages the proxy itself writes. Nothing here panics on input.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Protocol 3.0 as sent in a StartupMessage.
pub const PROTOCOL_3_0: i32 = 196_608;
/// The magic "version" of an SSLRequest.
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
/// The magic "version" of a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
/// The magic "version" of a CancelRequest.
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("message length {len} is invalid (allowed {min}..={max} bytes)")]
    BadLength { len: i64, min: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// Reads one untyped packet (startup phase): a 4-byte length then the body.
/// Returns the body without the length word.
pub async fn read_untyped<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Bytes, WireError> {
    let len = read_len(r).await?;
    let body_len = check_len(len, 8, max)? - 4;
    let mut body = BytesMut::zeroed(body_len);
    r.read_exact(&mut body).await.map_err(eof_to_closed)?;
    Ok(body.freeze())
}

/// Reads one typed message: a tag byte, a 4-byte length, the body.
pub async fn read_typed<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<(u8, Bytes), WireError> {
    let tag = r.read_u8().await.map_err(eof_to_closed)?;
    let len = read_len(r).await?;
    let body_len = check_len(len, 4, max)? - 4;
    let mut body = BytesMut::zeroed(body_len);
    r.read_exact(&mut body).await.map_err(eof_to_closed)?;
    Ok((tag, body.freeze()))
}

/// Splits one complete typed message off the front of `buf`, if there is one.
pub fn split_typed(buf: &mut BytesMut, max: usize) -> Result<Option<(u8, Bytes)>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let total = check_len(len, 4, max)? + 1;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut msg = buf.split_to(total);
    let tag = msg[0];
    msg.advance(5);
    Ok(Some((tag, msg.freeze())))
}

async fn read_len<R: AsyncRead + Unpin>(r: &mut R) -> Result<i32, WireError> {
    r.read_i32().await.map_err(eof_to_closed)
}

fn check_len(len: i32, min: usize, max: usize) -> Result<usize, WireError> {
    match usize::try_from(len) {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(WireError::BadLength {
            len: len.into(),
            min,
            max,
        }),
    }
}

fn eof_to_closed(e: io::Error) -> WireError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        WireError::Closed
    } else {
        WireError::Io(e)
    }
}

/// A cursor over a message body with checked reads.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn i32(&mut self) -> Result<i32, WireError> {
        let (head, rest) = self
            .buf
            .split_first_chunk::<4>()
            .ok_or(WireError::Malformed("short"))?;
        self.buf = rest;
        Ok(i32::from_be_bytes(*head))
    }

    pub fn i16(&mut self) -> Result<i16, WireError> {
        let (head, rest) = self
            .buf
            .split_first_chunk::<2>()
            .ok_or(WireError::Malformed("short"))?;
        self.buf = rest;
        Ok(i16::from_be_bytes(*head))
    }

    pub fn u8(&mut self) -> Result<u8, WireError> {
        let (head, rest) = self
            .buf
            .split_first()
            .ok_or(WireError::Malformed("short"))?;
        self.buf = rest;
        Ok(*head)
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Malformed("short"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// A NUL-terminated string, which must be UTF-8.
    pub fn cstr(&mut self) -> Result<&'a str, WireError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(WireError::Malformed("string without terminator"))?;
        let s = std::str::from_utf8(&self.buf[..end])
            .map_err(|_| WireError::Malformed("string is not UTF-8"))?;
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// Starts a typed message in `out`; finish it with [`finish`].
pub fn begin(out: &mut BytesMut, tag: u8) -> usize {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    at
}

/// Writes the length of the message started at `at`.
pub fn finish(out: &mut BytesMut, at: usize) {
    let len = i32::try_from(out.len() - at).unwrap_or(i32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// The fields of an ErrorResponse or NoticeResponse.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ErrorFields {
    pub fn parse(body: &[u8]) -> ErrorFields {
        let mut fields = ErrorFields::default();
        let mut r = Reader::new(body);
        while let Ok(kind) = r.u8() {
            if kind == 0 {
                break;
            }
            let Ok(value) = r.cstr() else { break };
            let value = value.to_owned();
            match kind {
                b'S' => fields.severity = value,
                b'C' => fields.code = value,
                b'M' => fields.message = value,
                b'D' => fields.detail = Some(value),
                b'H' => fields.hint = Some(value),
                _ => {}
            }
        }
        fields
    }

    pub fn encode(&self, out: &mut BytesMut) {
        let at = begin(out, b'E');
        for (kind, value) in [
            (b'S', Some(&self.severity)),
            (b'V', Some(&self.severity)),
            (b'C', Some(&self.code)),
            (b'M', Some(&self.message)),
            (b'D', self.detail.as_ref()),
            (b'H', self.hint.as_ref()),
        ] {
            if let Some(value) = value {
                out.put_u8(kind);
                put_cstr(out, value);
            }
        }
        out.put_u8(0);
        finish(out, at);
    }
}

/// `AuthenticationOk` (`ok`), or another authentication request code.
pub fn authentication(out: &mut BytesMut, code: i32) {
    let at = begin(out, b'R');
    out.put_i32(code);
    finish(out, at);
}

pub const AUTH_OK: i32 = 0;
pub const AUTH_CLEARTEXT_PASSWORD: i32 = 3;

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    let at = begin(out, b'S');
    put_cstr(out, name);
    put_cstr(out, value);
    finish(out, at);
}

pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    let at = begin(out, b'K');
    out.put_i32(pid);
    out.put_i32(secret);
    finish(out, at);
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    let at = begin(out, b'Z');
    out.put_u8(status);
    finish(out, at);
}

/// `NegotiateProtocolVersion`: we speak 3.0 and none of the `_pq_` options.
pub fn negotiate_protocol_version(out: &mut BytesMut, newest_minor: i32, unknown: &[String]) {
    let at = begin(out, b'v');
    out.put_i32(newest_minor);
    out.put_i32(i32::try_from(unknown.len()).unwrap_or(i32::MAX));
    for name in unknown {
        put_cstr(out, name);
    }
    finish(out, at);
}

/// A simple-protocol `Query`.
pub fn query(out: &mut BytesMut, sql: &str) {
    let at = begin(out, b'Q');
    put_cstr(out, sql);
    finish(out, at);
}

/// Parse + Bind + Execute of an unnamed statement with text parameters;
/// the caller adds `Sync` after the last one.
pub fn extended_query(out: &mut BytesMut, sql: &str, params: &[&str]) {
    let at = begin(out, b'P');
    put_cstr(out, "");
    put_cstr(out, sql);
    out.put_i16(0);
    finish(out, at);

    let at = begin(out, b'B');
    put_cstr(out, "");
    put_cstr(out, "");
    out.put_i16(0);
    out.put_i16(i16::try_from(params.len()).unwrap_or(i16::MAX));
    for p in params {
        out.put_i32(i32::try_from(p.len()).unwrap_or(i32::MAX));
        out.put_slice(p.as_bytes());
    }
    out.put_i16(0);
    finish(out, at);

    let at = begin(out, b'E');
    put_cstr(out, "");
    out.put_i32(0);
    finish(out, at);
}

pub fn sync(out: &mut BytesMut) {
    let at = begin(out, b'S');
    finish(out, at);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_typed_waits_for_whole_message() {
        let mut out = BytesMut::new();
        ready_for_query(&mut out, b'I');
        let whole = out.clone();
        let mut partial = BytesMut::from(&whole[..4]);
        assert!(split_typed(&mut partial, 100).expect("valid").is_none());
        partial.extend_from_slice(&whole[4..]);
        let (tag, body) = split_typed(&mut partial, 100)
            .expect("valid")
            .expect("complete");
        assert_eq!((tag, &body[..]), (b'Z', &b"I"[..]));
        assert!(partial.is_empty());
    }

    #[test]
    fn split_typed_refuses_bad_lengths() {
        for len in [0i32, 3, -1, i32::MAX] {
            let mut buf = BytesMut::new();
            buf.put_u8(b'Q');
            buf.put_i32(len);
            assert!(split_typed(&mut buf, 1 << 20).is_err(), "length {len}");
        }
    }

    #[test]
    fn error_fields_round_trip() {
        let e = ErrorFields {
            severity: "FATAL".into(),
            code: "28000".into(),
            message: "token expired".into(),
            detail: Some("exp=1".into()),
            hint: None,
        };
        let mut out = BytesMut::new();
        e.encode(&mut out);
        let (tag, body) = split_typed(&mut out, 1000)
            .expect("valid")
            .expect("complete");
        assert_eq!(tag, b'E');
        assert_eq!(ErrorFields::parse(&body), e);
    }

    #[test]
    fn reader_never_panics_on_short_input() {
        let mut r = Reader::new(&[1, 2]);
        assert!(r.i32().is_err());
        assert!(r.cstr().is_err());
        assert_eq!(r.i16().expect("two bytes"), 0x0102);
        assert!(r.u8().is_err());
    }
}
