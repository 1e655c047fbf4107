//! Just enough HTTP/1.1 for the tests: a one-shot client and a fixed-answer upstream.
//!
//! The client sends `GET` (or another method, without a body) with `Connection: close`, reads to the end of the stream and
//! decodes a chunked body (Envoy's admin answers chunked). Every exchange has a time limit.
//! The upstream answers every request `200` with one body and keeps connections alive unless
//! asked not to, as a service behind a sidecar would. Neither is a general HTTP implementation.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::{Error, io_error};

/// Time limit of one whole exchange, connect to last byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An HTTP response, read to the end.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header names lowercased, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body, decoded from chunked if it was.
    pub body: String,
}

/// A server on 127.0.0.1 that answers every request `200 OK` with a fixed body, until
/// dropped.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Upstream {
    /// Binds 127.0.0.1:0 and serves `body` on every connection, in a task of the current
    /// runtime.
    pub async fn start(body: &'static str) -> Result<Self, Error> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(io_error("binding the upstream"))?;
        let addr = listener
            .local_addr()
            .map_err(io_error("reading the upstream's address"))?;
        let task = tokio::spawn(async move {
            // Connections live in the set, so aborting this task ends them too.
            let mut connections = JoinSet::new();
            while let Ok((conn, _)) = listener.accept().await {
                connections.spawn(serve(conn, body));
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self { addr, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `GET path` from `addr` with `Connection: close`, within [`REQUEST_TIMEOUT`].
pub async fn get(addr: SocketAddr, path: &str) -> Result<Response, Error> {
    request(addr, "GET", path).await
}

/// `method path` (no body) to `addr` with `Connection: close`, within [`REQUEST_TIMEOUT`].
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> Result<Response, Error> {
    let failed = |reason: String| Error::Http {
        addr,
        path: path.to_owned(),
        reason,
    };
    let raw = tokio::time::timeout(REQUEST_TIMEOUT, exchange(addr, method, path))
        .await
        .map_err(|_| failed(format!("no complete answer within {REQUEST_TIMEOUT:?}")))?
        .map_err(|e| failed(e.to_string()))?;
    parse_response(&raw).map_err(failed)
}

async fn exchange(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: e2e.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    Ok(raw)
}

fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
        if raw.is_empty() {
            "connection closed without an answer".to_owned()
        } else {
            format!("no end of headers in {} bytes", raw.len())
        }
    })?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size_line, after) = rest.split_once("\r\n").ok_or("truncated chunk header")?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|e| format!("bad chunk size {size_line:?}: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..size).ok_or("truncated chunk")?);
        rest = after.get(size + 2..).ok_or("truncated chunk end")?;
    }
}

/// Answers requests on one connection until the peer closes it or asks to
/// (`Connection: close`). Requests carry no body.
async fn serve(mut conn: TcpStream, body: &'static str) {
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let close = head.contains("\r\nconnection: close\r\n");
        buf.drain(..end);
        if conn.write_all(response.as_bytes()).await.is_err() || close {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_client_reads_what_the_upstream_serves() {
        let upstream = Upstream::start("hello\n").await.unwrap();
        for _ in 0..3 {
            let r = get(upstream.addr(), "/x").await.unwrap();
            assert_eq!((r.status, r.body.as_str()), (200, "hello\n"));
            assert_eq!(r.header("Content-Type"), Some("text/plain"));
        }
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab\r\n\r\n3;x=y\r\ncde\r\n0\r\n\r\n";
        let r = parse_response(raw).unwrap();
        assert_eq!(r.body, "ab\r\ncde");
    }

    #[test]
    fn an_empty_answer_is_an_error_not_a_panic() {
        assert!(parse_response(b"").is_err());
        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }
}
