//! The echo server behind `veil-echo`: HTTP/1.1 (keep-alive), h2c with prior knowledge and
//! gRPC (`veil.test.Echo/Echo`), all on one port, each request answered with what the server
//! saw of it, so end-to-end tests can check what reached the pod and from where.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;
use tonic::codegen::Service;
use tonic::transport::server::TcpConnectInfo;

use crate::proto::echo_server::{Echo, EchoServer};
use crate::proto::{EchoReply, EchoRequest};

/// Largest request body accepted; larger ones get 413. Tests send a few KiB, and a bound keeps
/// a misbehaving client from making the pod buffer without limit.
pub const MAX_BODY: usize = 1024 * 1024;

/// How much of the request body the JSON answer repeats: enough for any test payload, small
/// enough that a 1 MiB upload does not come back as a 1 MiB+ answer.
pub const MAX_ECHOED_BODY: usize = 64 * 1024;

/// The path probes use; answered `ok` without the JSON echo.
pub const HEALTH_PATH: &str = "/healthz";

/// After an accept error (EMFILE, ENOBUFS) wait this long before the next accept, so a full
/// file table does not turn the accept loop into a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What the server answers to every plain HTTP request, as JSON.
#[derive(Debug, Serialize)]
pub struct Echoed<'a> {
    /// `POD_NAME`, or the host name.
    pub pod: &'a str,
    /// `ip:port` of the TCP peer as the server saw it.
    pub peer: String,
    /// The request method.
    pub method: &'a str,
    /// Path and query exactly as received.
    pub path: &'a str,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// The Host header, or the URI's authority (HTTP/2's `:authority`).
    pub host: Option<String>,
    /// Every header, lower-case name to values in the order received (lossy UTF-8).
    pub headers: BTreeMap<&'a str, Vec<String>>,
    /// The first [`MAX_ECHOED_BODY`] bytes of the body, lossy UTF-8.
    pub body: String,
    /// The full body length in bytes.
    pub body_len: usize,
}

/// The pod name answers carry: `POD_NAME` (the downward API), else the kernel's host name
/// (a pod's host name is its name), else `unknown`.
pub fn pod_name() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Serves HTTP/1.1, h2c and gRPC on `listener` until the task is dropped; one task per
/// connection, so a bad connection only ends itself.
pub async fn serve(listener: TcpListener, pod: String) {
    let pod: Arc<str> = pod.into();
    let grpc = EchoServer::new(EchoService { pod: pod.clone() });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's HTTP/1 header read timeout (30 s by default) only runs with a timer; without it
    // a client that never finishes its headers would hold a connection forever.
    builder.http1().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let local = stream.local_addr().ok();
        let (builder, pod, grpc) = (builder.clone(), pod.clone(), grpc.clone());
        tokio::spawn(async move {
            let service =
                service_fn(move |request| handle(request, peer, local, pod.clone(), grpc.clone()));
            if let Err(error) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                // Garbage, resets and timeouts end here; they are the client's business.
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
}

/// Routes one request: gRPC to the tonic service, everything else to the JSON echo.
async fn handle(
    mut request: Request<Incoming>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    pod: Arc<str>,
    mut grpc: EchoServer<EchoService>,
) -> Result<Response<tonic::body::Body>, Infallible> {
    if is_grpc(&request) {
        tracing::info!(
            %peer,
            kind = "grpc",
            path = %request.uri().path(),
            version = ?request.version(),
            "request"
        );
        // What tonic's own server would insert, so `Request::remote_addr` works as usual.
        request.extensions_mut().insert(TcpConnectInfo {
            local_addr: local,
            remote_addr: Some(peer),
        });
        return grpc.call(request).await;
    }
    let method = request.method().clone();
    let path = path_of(&request);
    let version = request.version();
    let (response, body_len) = echo_http(request, peer, &pod).await;
    let status = response.status().as_u16();
    if path == HEALTH_PATH {
        // Probes come every few seconds; at info they would bury the test traffic.
        tracing::debug!(%peer, %method, %path, status, "request");
    } else {
        tracing::info!(%peer, kind = "http", %method, %path, ?version, status, body_len, "request");
    }
    Ok(response.map(tonic::body::Body::new))
}

/// gRPC by its content type (`application/grpc`, `application/grpc+proto`, …).
fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// The request target's path and query as received; the whole URI for the forms that have
/// none (CONNECT's `host:port`).
fn path_of<B>(request: &Request<B>) -> String {
    match request.uri().path_and_query() {
        Some(path) => path.as_str().to_owned(),
        None => request.uri().to_string(),
    }
}

/// Answers a plain HTTP request; returns the response and the body length read.
async fn echo_http(
    request: Request<Incoming>,
    peer: SocketAddr,
    pod: &str,
) -> (Response<Full<Bytes>>, usize) {
    let path = path_of(&request);
    let (parts, body) = request.into_parts();
    if parts.method == Method::GET && parts.uri.path() == HEALTH_PATH {
        return (text(StatusCode::OK, "ok"), 0);
    }
    // Refuse a declared oversize body before reading any of it.
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY as u64) {
        return (too_large(), 0);
    }
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => return (too_large(), 0),
        Err(error) => {
            let message = format!("reading the request body: {error}");
            return (text(StatusCode::BAD_REQUEST, &message), 0);
        }
    };
    let mut headers: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let host = parts
        .headers
        .get(HOST)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        .or_else(|| parts.uri.authority().map(|authority| authority.to_string()));
    let echoed = Echoed {
        pod,
        peer: peer.to_string(),
        method: parts.method.as_str(),
        path: &path,
        version: format!("{:?}", parts.version),
        host,
        headers,
        body: String::from_utf8_lossy(&body[..body.len().min(MAX_ECHOED_BODY)]).into_owned(),
        body_len: body.len(),
    };
    let response = match serde_json::to_vec(&echoed) {
        Ok(mut json) => {
            // One answer per line, so a client printing several can be read line by line.
            json.push(b'\n');
            let mut response = Response::new(Full::new(Bytes::from(json)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(error) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding the answer: {error}"),
        ),
    };
    (response, body.len())
}

/// 413 with the limit in the body.
fn too_large() -> Response<Full<Bytes>> {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("request body over {MAX_BODY} bytes"),
    )
}

/// A `text/plain` response.
fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The `veil.test.Echo` service.
#[derive(Debug, Clone)]
struct EchoService {
    /// Named in every reply.
    pod: Arc<str>,
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let peer = request
            .remote_addr()
            .map(|addr| addr.to_string())
            .unwrap_or_default();
        Ok(tonic::Response::new(EchoReply {
            message: request.into_inner().message,
            peer,
            pod: self.pod.to_string(),
        }))
    }
}
