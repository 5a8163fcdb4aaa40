//! The accepted socket as the proxy reads it: bytes already read while sniffing are
//! replayed first, and every byte either way marks the connection active (idle timeout).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// When a connection last moved a byte.
#[derive(Debug)]
pub(crate) struct Activity {
    start: Instant,
    /// Milliseconds after `start` of the last byte read or written.
    last_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last byte.
    pub(crate) fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Returns once the connection has been idle for `timeout` while `busy()` is false.
    pub(crate) async fn idle(&self, timeout: Duration, busy: impl Fn() -> bool) {
        loop {
            let idle = self.idle_for();
            if idle >= timeout && !busy() {
                return;
            }
            // Sleep until the earliest moment the connection could be idle long enough;
            // with a request in progress, look again a timeout later.
            let wait = if idle >= timeout {
                timeout
            } else {
                timeout - idle
            };
            let wait = wait.max(Duration::from_millis(10));
            tokio::time::sleep(wait).await;
        }
    }
}

/// The accepted stream, with the sniffed bytes in front.
#[derive(Debug)]
pub(crate) struct ConnIo {
    inner: TcpStream,
    prefix: Vec<u8>,
    pos: usize,
    activity: Arc<Activity>,
}

impl ConnIo {
    pub(crate) fn new(inner: TcpStream, prefix: Vec<u8>, activity: Arc<Activity>) -> Self {
        ConnIo {
            inner,
            prefix,
            pos: 0,
            activity,
        }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(rest) = this.prefix.get(this.pos..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            this.pos += n;
            if this.pos >= this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What the first bytes of a connection look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// An HTTP/1 request line's method and space, or the HTTP/2 preface (`PRI `).
    Http,
    /// Not HTTP.
    NotHttp,
    /// Too few bytes to tell.
    NeedMore,
}

/// Longest method token accepted before its space; the longest registered method
/// (`UPDATEREDIRECTREF`) has 17 bytes.
const MAX_METHOD: usize = 24;
/// Empty lines a client may send before the request line (RFC 9112 2.2: at least one must
/// be ignored); a few more bytes than one CRLF.
const MAX_LEADING_CRLF: usize = 4;

/// `tchar` of RFC 9110 5.6.2, the bytes of a method token.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Classifies the first bytes of a connection: a method token and a space (the HTTP/2
/// preface starts with `PRI `, so it is one too).
pub(crate) fn classify(bytes: &[u8]) -> Class {
    let lead = bytes
        .iter()
        .take(MAX_LEADING_CRLF + 1)
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    if lead > MAX_LEADING_CRLF {
        return Class::NotHttp;
    }
    let method = bytes.get(lead..).unwrap_or_default();
    for (i, &b) in method.iter().enumerate() {
        if b == b' ' {
            return if i == 0 { Class::NotHttp } else { Class::Http };
        }
        if !is_tchar(b) || i >= MAX_METHOD {
            return Class::NotHttp;
        }
    }
    Class::NeedMore
}

/// What sniffing a new connection found.
#[derive(Debug)]
pub(crate) enum Sniffed {
    /// HTTP; the bytes read so far.
    Http(Vec<u8>),
    /// Not HTTP; the bytes read so far.
    NotHttp(Vec<u8>),
    /// The client closed before saying anything.
    Closed,
    /// Too slow to say what it is.
    TimedOut,
}

/// Reads just enough of a new connection to tell HTTP from other bytes, within `timeout`.
pub(crate) async fn sniff(stream: &mut TcpStream, timeout: Duration) -> io::Result<Sniffed> {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            match classify(&buf) {
                Class::Http => return Ok(Sniffed::Http(buf)),
                Class::NotHttp => return Ok(Sniffed::NotHttp(buf)),
                Class::NeedMore => {}
            }
            // `classify` decides within MAX_LEADING_CRLF + MAX_METHOD + 1 bytes, so `buf`
            // stays below that plus one chunk.
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(if buf.is_empty() {
                    Sniffed::Closed
                } else {
                    Sniffed::NotHttp(buf)
                });
            }
            buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(r) => r,
        Err(_) => Ok(Sniffed::TimedOut),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn proxy_sniff_classifies_golden() {
        let cases: [(&[u8], Class); 15] = [
            (b"GET / HTTP/1.1\r\n", Class::Http),
            (b"POST ", Class::Http),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Class::Http),
            (b"\r\nGET /", Class::Http),
            (b"M-SEARCH * HTTP/1.1", Class::Http),
            (b"\x16\x03\x01\x02\x00", Class::NotHttp),
            (b" GET", Class::NotHttp),
            (b"SSH-2.0-OpenSSH\r\n", Class::NotHttp),
            (b"\r\n\r\n\r\n", Class::NotHttp),
            (b"GET\t/", Class::NotHttp),
            (b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", Class::NotHttp),
            (b"\0", Class::NotHttp),
            (b"", Class::NeedMore),
            (b"GE", Class::NeedMore),
            (b"\r\n", Class::NeedMore),
        ];
        for (bytes, want) in cases {
            assert_eq!(classify(bytes), want, "{bytes:?}");
        }
        assert_eq!(classify(b"PRI"), Class::NeedMore);
    }

    proptest! {
        /// Any bytes: no panic, a decision within a bounded prefix, and a decision never
        /// changes when more bytes arrive.
        #[test]
        fn proxy_sniff_classify_is_bounded_and_stable(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let bound = MAX_LEADING_CRLF + MAX_METHOD + 2;
            if bytes.len() >= bound {
                prop_assert_ne!(classify(&bytes[..bound]), Class::NeedMore);
            }
            for i in 0..=bytes.len() {
                let c = classify(&bytes[..i]);
                if c != Class::NeedMore {
                    prop_assert_eq!(classify(&bytes), c);
                }
            }
        }

        #[test]
        fn proxy_sniff_accepts_every_method_token(m in "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,17}") {
            let line = format!("{m} /x HTTP/1.1\r\n");
            prop_assert_eq!(classify(line.as_bytes()), Class::Http);
        }
    }
}
