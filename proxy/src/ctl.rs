//! The client side of the admin API: `regproxy prefetch`, `pin`, `unpin`,
//! `cache` and `rate` ask a running proxy on its admin listener (`--admin`,
//! `REGPROXY_ADMIN`) with the token in `--admin-token-file`.
//!
//! Exit codes, for every command: 0 done, 1 the proxy did it and something
//! failed (or refused, e.g. content in use), 2 the command could not ask
//! (bad arguments, no token, the admin listener unreachable).
//!
//! - [`prefetch`]: `prefetch`, `pin`, `unpin`, with a progress bar per image.
//! - [`cache`]: `cache ls`, `cache rm`, `cache verify`.

pub mod cache;
pub mod prefetch;

use std::path::PathBuf;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use clap::Args;
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::config::Command;

/// Where the proxy's admin API is, and how to ask it.
#[derive(Args, Clone, Debug)]
pub struct AdminArgs {
    /// The proxy's admin listener (`serve --admin-listen`).
    #[arg(long, env = "REGPROXY_ADMIN", default_value = "http://127.0.0.1:9477")]
    pub admin: Uri,

    /// The admin token, the same file as `serve --admin-token-file`.
    #[arg(long, env = "REGPROXY_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Print the proxy's JSON (a line per event for streams) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `regproxy rate [RATE]`.
#[derive(Args, Clone, Debug)]
pub struct RateArgs {
    #[command(flatten)]
    pub admin: AdminArgs,

    /// The new rate, `20Mbit/s`, `5MiB/s` or `off`; without it, show the rate.
    pub rate: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the admin API at {url}: {cause}")]
    Connect { url: String, cause: String },
    #[error("the proxy answered {status}: {message}")]
    Refused { status: StatusCode, message: String },
    #[error("the admin API's answer broke off: {0}")]
    Broken(String),
}

impl CtlError {
    /// The exit code: 1 when the proxy answered no, 2 when it was not asked.
    pub fn code(&self) -> i32 {
        match self {
            CtlError::Refused { .. } | CtlError::Broken(_) => 1,
            CtlError::Usage(_) | CtlError::Connect { .. } => 2,
        }
    }
}

/// Most bytes of a JSON answer that is read whole.
const MAX_ANSWER: usize = 64 << 20;

/// One admin API, asked over a connection per call.
pub struct Admin {
    url: Uri,
    authority: String,
    token: Option<String>,
}

impl Admin {
    pub fn new(a: &AdminArgs) -> Result<Admin, CtlError> {
        if a.admin.scheme_str() != Some("http") {
            return Err(CtlError::Usage(format!(
                "--admin {}: the admin listener speaks plain http (http://HOST:PORT)",
                a.admin
            )));
        }
        let Some(auth) = a.admin.authority() else {
            return Err(CtlError::Usage(format!("--admin {}: no host", a.admin)));
        };
        let authority = match auth.port_u16() {
            Some(_) => auth.as_str().to_owned(),
            None => format!("{}:80", auth.as_str()),
        };
        let token = match &a.admin_token_file {
            Some(p) => Some(crate::config::read_token(p).map_err(CtlError::Usage)?),
            None => None,
        };
        Ok(Admin {
            url: a.admin.clone(),
            authority,
            token,
        })
    }

    /// Sends one request; `Ok` is a 2xx answer's body, any other answer is
    /// [`CtlError::Refused`] with the proxy's `{"error": ...}`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Incoming, CtlError> {
        let connect = |cause: String| CtlError::Connect {
            url: self.url.to_string(),
            cause,
        };
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&self.authority),
        )
        .await
        .map_err(|_| connect("no answer in 10s".into()))?
        .map_err(|e| connect(e.to_string()))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect(e.to_string()))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.authority.as_str());
        if let Some(t) = &self.token {
            let v = HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|_| CtlError::Usage("the admin token is not a header value".into()))?;
            req = req.header(header::AUTHORIZATION, v);
        }
        let bytes = match body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| CtlError::Usage(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| connect(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.into_body());
        }
        let body = read_all(resp.into_body(), 64 << 10)
            .await
            .unwrap_or_default();
        let message = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
        Err(CtlError::Refused { status, message })
    }

    /// [`Admin::call`], with the answer read whole as one JSON value.
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CtlError> {
        let body = self.call(method, path, body).await?;
        let bytes = read_all(body, MAX_ANSWER).await?;
        serde_json::from_slice(&bytes).map_err(|e| CtlError::Broken(e.to_string()))
    }
}

async fn read_all(mut body: Incoming, cap: usize) -> Result<Bytes, CtlError> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CtlError::Broken(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > cap {
                return Err(CtlError::Broken(format!("an answer past {cap} bytes")));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// A stream of NDJSON answers, one value per line.
pub struct Lines {
    body: Incoming,
    buf: BytesMut,
    done: bool,
}

/// Longest line of a stream.
const MAX_LINE: usize = 1 << 20;

impl Lines {
    pub fn new(body: Incoming) -> Lines {
        Lines {
            body,
            buf: BytesMut::new(),
            done: false,
        }
    }

    /// The next value; `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Result<Value, CtlError>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(i + 1);
                let line = &line[..i];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(
                    serde_json::from_slice(line).map_err(|e| CtlError::Broken(e.to_string())),
                );
            }
            if self.done {
                if self.buf.has_remaining() && !self.buf.iter().all(u8::is_ascii_whitespace) {
                    return Some(Err(CtlError::Broken("the stream ended mid-line".into())));
                }
                return None;
            }
            if self.buf.len() > MAX_LINE {
                self.done = true;
                self.buf.clear();
                return Some(Err(CtlError::Broken("a line past 1 MiB".into())));
            }
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    self.buf.clear();
                    return Some(Err(CtlError::Broken(e.to_string())));
                }
                None => self.done = true,
            }
        }
    }
}

/// Runs one of the admin API's commands; returns the exit code.
pub fn main(cmd: Command) -> i32 {
    let (name, run): (
        &str,
        std::pin::Pin<Box<dyn std::future::Future<Output = _>>>,
    ) = match cmd {
        Command::Prefetch(a) => ("prefetch", Box::pin(prefetch::prefetch(a, false))),
        Command::Pin(a) => ("pin", Box::pin(prefetch::prefetch(a, true))),
        Command::Unpin(a) => ("unpin", Box::pin(prefetch::unpin(a))),
        Command::Cache(a) => ("cache", Box::pin(cache::run(a))),
        Command::Rate(a) => ("rate", Box::pin(rate(a))),
        _ => unreachable!("ctl::main runs the admin API's commands only"),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("regproxy {name}: {e}");
            return 2;
        }
    };
    match rt.block_on(run) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("regproxy {name}: {e}");
            e.code()
        }
    }
}

/// `regproxy rate [RATE]`: prints the rate in force (after the change).
async fn rate(a: RateArgs) -> Result<bool, CtlError> {
    let admin = Admin::new(&a.admin)?;
    let answer = match &a.rate {
        Some(r) => {
            let bytes = crate::units::parse_rate(r).map_err(|e| CtlError::Usage(e.to_string()))?;
            let body = serde_json::json!({ "rate": bytes });
            admin.json(Method::PUT, "/admin/rate", Some(body)).await?
        }
        None => admin.json(Method::GET, "/admin/rate", None).await?,
    };
    if a.admin.json {
        println!("{answer}");
    } else {
        let r = answer.get("rate").and_then(Value::as_u64).unwrap_or(0);
        println!("upstream rate: {}", crate::units::format_rate(r));
    }
    Ok(true)
}
