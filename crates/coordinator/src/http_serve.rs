//! Serving HTTP (web UI, metrics, farm cache) with the bounds `axum::serve` does not set: a
//! deadline for each request's head, so a client that trickles its headers (or sends none,
//! or idles between requests) is dropped, and a cap on open connections. Each request
//! carries its peer's address (`ConnectInfo<SocketAddr>`), as `axum::serve` gives it.

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// How long a client may take to send a request's head (also the idle time allowed between
/// requests on a kept-alive connection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Open connections per listener; past it new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 4096;

/// Serves `app` on `listener` until the task is dropped.
pub async fn serve<L: Listener<Addr = SocketAddr>>(listener: L, app: Router) {
    serve_with(listener, app, HEADER_TIMEOUT, MAX_CONNECTIONS).await
}

pub(crate) async fn serve_with<L: Listener<Addr = SocketAddr>>(
    mut listener: L,
    app: Router,
    header_timeout: Duration,
    max_connections: usize,
) {
    let open = Arc::new(Semaphore::new(max_connections));
    loop {
        let (io, addr) = listener.accept().await;
        let Ok(slot) = open.clone().try_acquire_owned() else {
            tracing::warn!("{max_connections} HTTP connections open: closing a new one");
            continue;
        };
        let service = TowerToHyperService::new(app.clone().map_request(
            move |mut r: axum::http::Request<_>| {
                r.extensions_mut().insert(ConnectInfo(addr));
                r
            },
        ));
        tokio::spawn(async move {
            let mut b = Builder::new(TokioExecutor::new());
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            if let Err(e) = b
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .await
            {
                tracing::debug!("HTTP connection ended: {e}");
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server(max: usize) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "hello" }));
        tokio::spawn(serve_with(l, app, Duration::from_millis(300), max));
        addr
    }

    /// Reads until the server closes the connection (or 5 s pass): what it sent.
    async fn until_closed(s: &mut tokio::net::TcpStream) -> Option<String> {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .ok()?
            .ok()?;
        Some(String::from_utf8_lossy(&got).to_string())
    }

    #[tokio::test]
    async fn a_client_that_trickles_its_headers_is_dropped() {
        let addr = server(16).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let start = std::time::Instant::now();
        let got = until_closed(&mut s).await.expect("closed by the server");
        assert!(start.elapsed() < Duration::from_secs(3));
        assert!(!got.contains("hello"), "{got}");
        // A whole request is answered.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        assert!(until_closed(&mut s).await.unwrap().ends_with("hello"));
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_at_once() {
        let addr = server(1).await;
        let mut held = tokio::net::TcpStream::connect(addr).await.unwrap();
        held.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let got = tokio::time::timeout(Duration::from_millis(250), until_closed(&mut s))
            .await
            .expect("closed before the first one's deadline");
        assert!(!got.unwrap_or_default().contains("hello"));
        // Once the first is gone, connections are served again.
        drop(held);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        assert!(until_closed(&mut s).await.unwrap().ends_with("hello"));
    }
}
