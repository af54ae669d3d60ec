//! The accept loop: a bounded number of connections, a deadline for each request's headers
//! (HTTP/1) or pings that find dead peers (gRPC on HTTP/2), and a graceful shutdown that lets
//! every connection finish the requests it is serving.
//!
//! `axum::serve` gives none of the three: on it, 300 idle sockets are 300 tasks forever,
//! headers sent a byte a second hold a connection open without end, and the only limit on
//! connections is the process's file descriptors.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Limits of the connections the server keeps.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Most open connections; one more is closed as soon as it is accepted. Default 1024.
    pub max_connections: usize,
    /// A connection that has not sent a whole request head this long after it started waiting
    /// for one (a new connection, or an idle kept-alive one) is closed. Default 30 s.
    pub header_timeout: Duration,
    /// After a shutdown starts, connections still open this long are dropped (a stalled body
    /// or a gRPC stream its client keeps open would otherwise hold the exit for ever).
    /// Default 25 s: under Kubernetes' default grace period of 30 s before SIGKILL.
    pub drain_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 1024,
            header_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(25),
        }
    }
}

/// What a listener serves.
pub(crate) enum App {
    /// The REST routes, over HTTP/1.1.
    Rest(Router),
    /// The gRPC service, over HTTP/2 (prior knowledge, no TLS: as gRPC clients connect to
    /// `host:port` without `https`).
    Grpc(super::grpc::GrpcService),
}

/// Requests one gRPC connection may have open at once (HTTP/2 streams); a client that wants
/// more concurrency opens more connections, within [`ConnectionLimits::max_connections`].
const GRPC_STREAMS_PER_CONNECTION: u32 = 1024;

/// Serves `app` on `listener` until `shutdown` completes; then stops accepting and returns
/// when every open connection has answered the requests it was serving, or with a `TimedOut`
/// error once [`ConnectionLimits::drain_timeout`] has passed.
pub(crate) async fn serve(
    listener: TcpListener,
    app: App,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: transient, try again shortly.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        match &app {
            App::Rest(router) => {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new())
                    .header_read_timeout(limits.header_timeout);
                let conn = graceful
                    .watch(b.serve_connection(io, TowerToHyperService::new(router.clone())));
                tokio::spawn(async move {
                    let _ = conn.await;
                    drop(slot);
                });
            }
            App::Grpc(service) => {
                // gRPC channels stay open between requests by design, so an idle one is not
                // closed; a peer that stops answering pings within the header timeout is. A
                // connection that sends nothing at all (not even HTTP/2's preface, before
                // which hyper starts no pings) is closed after the header timeout.
                let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                b.timer(TokioTimer::new())
                    .max_concurrent_streams(GRPC_STREAMS_PER_CONNECTION)
                    .keep_alive_interval(Some(limits.header_timeout))
                    .keep_alive_timeout(limits.header_timeout);
                let watcher = graceful.watcher();
                let service = service.clone();
                let wait = limits.header_timeout;
                tokio::spawn(async move {
                    let mut first = [0u8; 1];
                    let spoke = tokio::time::timeout(wait, io.inner().peek(&mut first)).await;
                    if matches!(spoke, Ok(Ok(n)) if n > 0) {
                        let conn = b.serve_connection(io, TowerToHyperService::new(service));
                        let _ = watcher.watch(conn).await;
                    }
                    drop(slot);
                });
            }
        }
    }
    drop(listener);
    // Past the drain timeout the connections still open are left to be dropped with the
    // runtime (`apparate serve` exits; an embedding program decides).
    match tokio::time::timeout(limits.drain_timeout, graceful.shutdown()).await {
        Ok(()) => Ok(()),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "{} connections were still open {:.0} s after the shutdown started (the drain \
                 timeout): they are dropped",
                limits.max_connections.max(1) - slots.available_permits(),
                limits.drain_timeout.as_secs_f64()
            ),
        )),
    }
}
