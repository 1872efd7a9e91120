//! A fault-injecting HTTP proxy between ociedge and a real registry or S3 server. Requests are
//! forwarded as they are; those whose path contains the configured needle get the fault.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};

type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    None,
    /// Answer this status instead of forwarding.
    Status(u16),
    /// Forward, but close the connection after this many body bytes.
    Reset(usize),
    /// Forward, flipping one byte in every 64 KiB of the body.
    Corrupt,
    /// Forward after this delay.
    Latency(Duration),
    /// Send the headers, then nothing for this long, then the body.
    Stall(Duration),
}

#[derive(Clone)]
pub struct FaultProxy {
    target: String,
    rule: Arc<Mutex<(String, Fault, usize)>>,
    pub port: u16,
}

fn boxed(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

impl FaultProxy {
    /// Proxies to `target` (`http://127.0.0.1:PORT`) on a free loopback port.
    pub async fn start(target: &str) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let me = FaultProxy {
            target: target.trim_end_matches('/').to_string(),
            rule: Arc::new(Mutex::new((String::new(), Fault::None, 0))),
            port,
        };
        let server = me.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let p = server.clone();
                let client = client.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let p = p.clone();
                        let client = client.clone();
                        async move { Ok::<_, Infallible>(p.handle(req, client).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        me
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Injects `fault` into the next `times` requests whose path contains `needle`.
    pub fn inject(&self, needle: &str, fault: Fault, times: usize) {
        *self.rule.lock().unwrap() = (needle.to_string(), fault, times);
    }

    fn take_fault(&self, path: &str, method: &http::Method) -> Fault {
        let mut r = self.rule.lock().unwrap();
        if r.2 > 0 && *method != http::Method::HEAD && path.contains(&r.0) {
            r.2 -= 1;
            return r.1.clone();
        }
        Fault::None
    }

    async fn handle(&self, req: Request<Incoming>, client: reqwest::Client) -> Response<Body> {
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        let fault = self.take_fault(&path, req.method());
        if let Fault::Status(s) = fault {
            let mut r = Response::new(boxed("injected"));
            *r.status_mut() = StatusCode::from_u16(s).unwrap();
            return r;
        }
        if let Fault::Latency(d) = fault {
            tokio::time::sleep(d).await;
        }
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let mut rb = client.request(parts.method.clone(), format!("{}{path}", self.target));
        for (k, v) in &parts.headers {
            if k != "host" && k != "content-length" && k != "transfer-encoding" {
                rb = rb.header(k, v);
            }
        }
        if let Some(h) = parts.headers.get("host") {
            // SigV4 signs the host: keep what the client signed.
            rb = rb.header("host", h);
        }
        let Ok(up) = rb.body(body).send().await else {
            let mut r = Response::new(boxed("upstream unreachable"));
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            return r;
        };
        let mut b = Response::builder().status(up.status().as_u16());
        for (k, v) in up.headers() {
            if k != "transfer-encoding" && k != "connection" {
                b = b.header(k.as_str(), v.as_bytes());
            }
        }
        let mut sent = 0usize;
        let stall = match fault {
            Fault::Stall(d) => Some(d),
            _ => None,
        };
        let stream = up.bytes_stream().then(move |chunk| {
            let fault = fault.clone();
            async move {
                if let Some(d) = stall {
                    tokio::time::sleep(d).await;
                }
                (chunk, fault)
            }
        });
        let stream = stream.map(move |(chunk, fault)| {
            let chunk =
                chunk.map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })?;
            let start = sent;
            sent += chunk.len();
            match fault {
                Fault::Reset(n) if sent > n => Err("injected reset".into()),
                Fault::Corrupt => {
                    let mut v = chunk.to_vec();
                    for (i, byte) in v.iter_mut().enumerate() {
                        if (start + i) % 65536 == 100 {
                            *byte ^= 0x5a;
                        }
                    }
                    Ok(Frame::data(Bytes::from(v)))
                }
                _ => Ok(Frame::data(chunk)),
            }
        });
        b.body(BodyExt::boxed(StreamBody::new(stream))).unwrap()
    }
}
