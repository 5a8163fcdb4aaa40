//! `veil-client`: the test client of Veil's end-to-end tier. It prints what it received on
//! stdout and exits 0 only when the expectation holds; otherwise it says why on stderr and
//! exits 1 (2 for a bad command line, from clap).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::{http1, http2};
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::{Method, Request, Response, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use veil_test_workloads::duration;
use veil_test_workloads::proto::echo_client::EchoClient;
use veil_test_workloads::proto::EchoRequest;

/// Most of a response (HTTP body or raw TCP stream) the client reads; far above any test
/// answer, and a bound so a misbehaving server cannot exhaust the pod's memory.
const MAX_READ: usize = 16 * 1024 * 1024;

/// Test client for Veil's end-to-end tests: prints what it received on stdout and exits 0
/// only when the expectation holds (non-zero with the reason on stderr otherwise).
#[derive(Debug, Parser)]
#[command(name = "veil-client", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// HTTP/1.1 (or h2c with --http2) requests to an http:// URL, all on one connection.
    Http(HttpArgs),
    /// One veil.test.Echo/Echo call; prints the reply, or the status as JSON.
    Grpc(GrpcArgs),
    /// Raw TCP: connect, write, half-close, read until the server closes.
    Tcp(TcpArgs),
}

#[derive(Debug, Args)]
struct HttpArgs {
    /// The URL, e.g. http://echo.demo.svc.cluster.local:8080/path?q=1 (no TLS).
    url: Uri,
    /// The request method.
    #[arg(long, default_value = "GET")]
    method: Method,
    /// The request body.
    #[arg(long)]
    data: Option<String>,
    /// The request body, read from a file (for bodies too big for a command line).
    #[arg(long, conflicts_with = "data")]
    data_file: Option<PathBuf>,
    /// A request header, 'Name: value'; repeatable. A Host header replaces the URL's.
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    #[arg(long)]
    http2: bool,
    /// The status every response must have (default: any 2xx).
    #[arg(long)]
    expect_status: Option<u16>,
    /// Text every response body must contain; repeatable.
    #[arg(long)]
    expect_body_contains: Vec<String>,
    /// Limit for connecting, and for each request with its response body.
    #[arg(long, default_value = "5s", value_parser = duration::parse)]
    timeout: Duration,
    /// Number of requests, one after another on ONE keep-alive connection; each is checked.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
}

#[derive(Debug, Args)]
struct GrpcArgs {
    /// The server, e.g. http://echo.demo.svc.cluster.local:8080 (h2c, no TLS).
    url: String,
    /// The message to echo.
    #[arg(long)]
    message: String,
    /// The gRPC status code the call must end with: 0 OK, 7 PERMISSION_DENIED, 14 UNAVAILABLE, ...
    #[arg(long, default_value_t = 0)]
    expect_code: i32,
    /// Limit for connecting and for the call.
    #[arg(long, default_value = "5s", value_parser = duration::parse)]
    timeout: Duration,
}

#[derive(Debug, Args)]
struct TcpArgs {
    /// host:port; host may be a DNS name.
    addr: String,
    /// What to write before half-closing.
    #[arg(long, default_value = "")]
    send: String,
    /// Text the bytes read (lossy UTF-8) must contain; repeatable.
    #[arg(long)]
    expect_contains: Vec<String>,
    /// Limit for connecting, and for writing and reading until the server closes.
    #[arg(long, default_value = "5s", value_parser = duration::parse)]
    timeout: Duration,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Http(args) => http(args).await,
        Command::Grpc(args) => grpc(args).await,
        Command::Tcp(args) => tcp(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("veil-client: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// One connection's sender, whichever protocol it speaks.
enum Sender {
    /// HTTP/1.1; requests go one at a time (keep-alive, no pipelining).
    H1(http1::SendRequest<Full<Bytes>>),
    /// h2c with prior knowledge.
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    /// Sends one request once the connection can take it.
    async fn send(&mut self, request: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        match self {
            Sender::H1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
            Sender::H2(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
        }
    }
}

async fn http(args: HttpArgs) -> anyhow::Result<()> {
    ensure!(
        args.url.scheme_str() == Some("http"),
        "{}: only http:// URLs (the client speaks no TLS)",
        args.url
    );
    let authority = args.url.authority().context("the URL has no host")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    // Uri keeps IPv6 literals bracketed; the resolver wants them bare.
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let mut headers = Vec::with_capacity(args.headers.len());
    for header in &args.headers {
        headers.push(parse_header(header)?);
    }
    let stream = connect(host, port, args.timeout).await?;
    let io = TokioIo::new(stream);
    let mut sender = if args.http2 {
        let (sender, connection) = http2::handshake(TokioExecutor::new(), io)
            .await
            .context("HTTP/2 handshake")?;
        // The connection future does the I/O; it ends when the sender is dropped.
        tokio::spawn(connection);
        Sender::H2(sender)
    } else {
        let (sender, connection) = http1::handshake(io).await.context("HTTP/1.1 handshake")?;
        tokio::spawn(connection);
        Sender::H1(sender)
    };
    // HTTP/1.1 takes the origin form plus Host; HTTP/2 the full URI (its :authority).
    let target = if args.http2 {
        args.url.clone()
    } else {
        args.url
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |path| Uri::from(path.clone()))
    };
    let body = match (&args.data, &args.data_file) {
        (_, Some(path)) => Bytes::from(
            tokio::fs::read(path)
                .await
                .with_context(|| format!("reading {}", path.display()))?,
        ),
        (data, None) => Bytes::from(data.clone().unwrap_or_default()),
    };
    for n in 1..=args.count {
        let mut request = Request::builder()
            .method(args.method.clone())
            .uri(target.clone())
            .body(Full::new(body.clone()))
            .context("building the request")?;
        if !args.http2 {
            let host = HeaderValue::from_str(authority.as_str()).context("the URL's host")?;
            request.headers_mut().insert(HOST, host);
        }
        for (name, value) in &headers {
            // `insert` for Host so the user's replaces the URL's; `append` keeps repeats.
            if name == HOST {
                request.headers_mut().insert(HOST, value.clone());
            } else {
                request.headers_mut().append(name.clone(), value.clone());
            }
        }
        let which = format!("request {n}/{}", args.count);
        let (status, body) = timeout(args.timeout, async {
            let response = sender.send(request).await.context("sending")?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_READ)
                .collect()
                .await
                .map_err(|error| anyhow::anyhow!("reading the body: {error}"))?
                .to_bytes();
            anyhow::Ok((status, body))
        })
        .await
        .map_err(|_| anyhow::anyhow!("no full response within {:?}", args.timeout))
        .and_then(|result| result)
        .with_context(|| format!("{which} to {}", args.url))?;
        print_body(&body).await?;
        let text = String::from_utf8_lossy(&body);
        match args.expect_status {
            Some(expected) if status.as_u16() != expected => {
                bail!("{which}: status {status}, expected {expected}")
            }
            None if !status.is_success() => bail!("{which}: status {status}, expected 2xx"),
            _ => {}
        }
        for needle in &args.expect_body_contains {
            ensure!(
                text.contains(needle.as_str()),
                "{which}: the body does not contain {needle:?}"
            );
        }
    }
    Ok(())
}

/// `Name: value` into a header pair.
fn parse_header(text: &str) -> anyhow::Result<(HeaderName, HeaderValue)> {
    let (name, value) = text
        .split_once(':')
        .with_context(|| format!("header {text:?} is not 'Name: value'"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .with_context(|| format!("header name in {text:?}"))?;
    let value =
        HeaderValue::from_str(value.trim()).with_context(|| format!("header value in {text:?}"))?;
    Ok((name, value))
}

/// Connects within `limit`; `host` may be a DNS name (resolved by the system resolver, so
/// cluster DNS search domains apply in pods).
async fn connect(host: &str, port: u16, limit: Duration) -> anyhow::Result<TcpStream> {
    timeout(limit, TcpStream::connect((host, port)))
        .await
        .map_err(|_| anyhow::anyhow!("no connection within {limit:?}"))
        .and_then(|connected| connected.map_err(anyhow::Error::from))
        .with_context(|| format!("connecting to {host}:{port}"))
}

/// Writes a body to stdout, ending it with a newline so several bodies stay apart.
async fn print_body(body: &[u8]) -> anyhow::Result<()> {
    let mut stdout = tokio::io::stdout();
    stdout.write_all(body).await.context("writing stdout")?;
    if !body.ends_with(b"\n") {
        stdout.write_all(b"\n").await.context("writing stdout")?;
    }
    stdout.flush().await.context("writing stdout")?;
    Ok(())
}

async fn grpc(args: GrpcArgs) -> anyhow::Result<()> {
    let endpoint = tonic::transport::Endpoint::from_shared(args.url.clone())
        .with_context(|| format!("{:?} is not a URL", args.url))?
        .connect_timeout(args.timeout)
        .timeout(args.timeout);
    // Lazy, so a refused or reset connection becomes a status (14 UNAVAILABLE) that
    // --expect-code can check, like any other outcome of the call.
    let mut client = EchoClient::new(endpoint.connect_lazy());
    let outcome = client
        .echo(EchoRequest {
            message: args.message,
        })
        .await;
    let (code, printed) = match outcome {
        Ok(reply) => {
            let reply = reply.into_inner();
            let printed = serde_json::json!({
                "message": reply.message,
                "peer": reply.peer,
                "pod": reply.pod,
            });
            (0, printed)
        }
        Err(status) => {
            let code = status.code() as i32;
            let printed = serde_json::json!({
                "code": code,
                "code_name": format!("{:?}", status.code()),
                "message": status.message(),
            });
            (code, printed)
        }
    };
    print_body(printed.to_string().as_bytes()).await?;
    ensure!(
        code == args.expect_code,
        "gRPC call to {} ended with code {code} ({:?}), expected {} ({:?})",
        args.url,
        tonic::Code::from_i32(code),
        args.expect_code,
        tonic::Code::from_i32(args.expect_code)
    );
    Ok(())
}

async fn tcp(args: TcpArgs) -> anyhow::Result<()> {
    let mut stream = timeout(args.timeout, TcpStream::connect(args.addr.as_str()))
        .await
        .map_err(|_| anyhow::anyhow!("no connection within {:?}", args.timeout))
        .and_then(|connected| connected.map_err(anyhow::Error::from))
        .with_context(|| format!("connecting to {}", args.addr))?;
    let mut received = Vec::new();
    timeout(args.timeout, async {
        stream
            .write_all(args.send.as_bytes())
            .await
            .context("writing")?;
        // Half-close: the server sees the end of the request and can answer and close.
        stream.shutdown().await.context("half-closing")?;
        (&mut stream)
            .take(MAX_READ as u64)
            .read_to_end(&mut received)
            .await
            .context("reading")?;
        anyhow::Ok(())
    })
    .await
    .map_err(|_| anyhow::anyhow!("the server did not close within {:?}", args.timeout))
    .and_then(|result| result)
    .with_context(|| format!("TCP exchange with {}", args.addr))?;
    if !received.is_empty() {
        print_body(&received).await?;
    }
    let text = String::from_utf8_lossy(&received);
    for needle in &args.expect_contains {
        ensure!(
            text.contains(needle.as_str()),
            "{}: the bytes read do not contain {needle:?}",
            args.addr
        );
    }
    Ok(())
}
