//! Small HTTP servers for what no real component does on demand: an upstream that serves wrong
//! bytes for a digest, and a token-auth gate in front of a real registry.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

fn resp(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r
}

/// Serves `handler` on 127.0.0.1:0 until the test's runtime ends; returns the port.
pub async fn serve<F, Fut>(handler: F) -> u16
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    serve_on("127.0.0.1", handler).await
}

/// [`serve`] on another loopback address (`127.0.0.2`: another host to the proxy).
pub async fn serve_on<F, Fut>(ip: &str, handler: F) -> u16
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let h = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let h = h.clone();
                    async move { Ok::<_, Infallible>(h(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    port
}

/// An upstream registry that knows some blobs and can be told to corrupt them.
#[derive(Clone, Default)]
pub struct FakeUpstream {
    pub blobs: Arc<Mutex<HashMap<String, Bytes>>>,
    pub corrupt: Arc<AtomicBool>,
    pub blob_gets: Arc<AtomicUsize>,
}

impl FakeUpstream {
    pub async fn start(self) -> u16 {
        let me = self.clone();
        serve(move |req| {
            let me = me.clone();
            async move { me.handle(req) }
        })
        .await
    }

    fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        if path == "/v2/" {
            return resp(StatusCode::OK, "{}");
        }
        let Some(i) = path.rfind("/blobs/") else {
            return resp(StatusCode::NOT_FOUND, "");
        };
        let digest = &path[i + 7..];
        let Some(data) = self.blobs.lock().expect("lock").get(digest).cloned() else {
            return resp(
                StatusCode::NOT_FOUND,
                r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"x"}]}"#,
            );
        };
        let len = data.len();
        let body = if req.method() == http::Method::HEAD {
            Bytes::new()
        } else {
            self.blob_gets.fetch_add(1, Ordering::SeqCst);
            if self.corrupt.load(Ordering::SeqCst) {
                let mut v = data.to_vec();
                for b in v.iter_mut().step_by(4096) {
                    *b ^= 0xff;
                }
                Bytes::from(v)
            } else {
                data
            }
        };
        let mut r = resp(StatusCode::OK, body);
        r.headers_mut()
            .insert(http::header::CONTENT_LENGTH, len.into());
        r.headers_mut()
            .insert("docker-content-digest", digest.parse().expect("hv"));
        r
    }
}

/// A Bearer-token gate in front of a real registry: `/token` issues tokens (checking basic
/// credentials when set), `/v2/...` demands a valid token and forwards to `backend`.
#[derive(Clone)]
pub struct TokenGate {
    pub backend: String,
    pub basic: Option<String>,
    pub tokens_issued: Arc<AtomicUsize>,
    pub scopes: Arc<Mutex<Vec<String>>>,
    /// More `Basic …` values accepted besides `basic` (see [`TokenGate::also_accept`]).
    more_basic: Vec<String>,
    issued: Arc<Mutex<Vec<String>>>,
    port: Arc<Mutex<u16>>,
}

impl TokenGate {
    /// `basic` is the expected `user:password`, if any.
    pub fn new(backend: String, basic: Option<&str>) -> TokenGate {
        use base64::Engine as _;
        TokenGate {
            backend,
            basic: basic.map(|b| {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(b)
                )
            }),
            tokens_issued: Arc::default(),
            scopes: Arc::default(),
            more_basic: Vec::new(),
            issued: Arc::default(),
            port: Arc::default(),
        }
    }

    /// Also accepts `user:password` (a second account: a proxy's own and a client's).
    pub fn also_accept(mut self, basic: &str) -> TokenGate {
        use base64::Engine as _;
        self.more_basic.push(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(basic)
        ));
        self
    }

    pub async fn start(self) -> u16 {
        let me = self.clone();
        let port = serve(move |req| {
            let me = me.clone();
            async move { me.handle(req).await }
        })
        .await;
        *self.port.lock().expect("lock") = port;
        port
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let path = req.uri().path().to_string();
        if path == "/token" {
            let more = auth.as_ref().is_some_and(|a| self.more_basic.contains(a));
            if self.basic.is_some() && auth != self.basic && !more {
                return resp(StatusCode::UNAUTHORIZED, "bad credentials");
            }
            let q: HashMap<String, String> =
                url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                    .into_owned()
                    .collect();
            self.scopes
                .lock()
                .expect("lock")
                .push(q.get("scope").cloned().unwrap_or_default());
            let n = self.tokens_issued.fetch_add(1, Ordering::SeqCst);
            let tok = format!("tok{n}");
            self.issued.lock().expect("lock").push(tok.clone());
            return resp(
                StatusCode::OK,
                format!(r#"{{"token":"{tok}","expires_in":300}}"#),
            );
        }
        let ok = auth
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .is_some_and(|t| self.issued.lock().expect("lock").iter().any(|i| i == t));
        if !ok {
            let port = *self.port.lock().expect("lock");
            let name = path
                .trim_start_matches("/v2/")
                .split("/manifests/")
                .next()
                .unwrap_or("")
                .split("/blobs/")
                .next()
                .unwrap_or("");
            let mut r = resp(
                StatusCode::UNAUTHORIZED,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}"#,
            );
            let ch = format!(
                r#"Bearer realm="http://127.0.0.1:{port}/token",service="gate",scope="repository:{name}:pull""#
            );
            r.headers_mut()
                .insert("www-authenticate", ch.parse().expect("hv"));
            return r;
        }
        // Forward to the real registry.
        forward(&self.backend, req).await
    }
}

/// Serves a loopback forwarder to `backend` (see [`forward`]); `on_answer` sees each request's
/// method and path with the answer, before it is sent, and may change the answer (count
/// requests, add headers). Returns the port.
pub async fn forwarding<F>(backend: &str, on_answer: F) -> u16
where
    F: Fn(&http::Method, &str, &mut Response<Body>) + Clone + Send + Sync + 'static,
{
    let backend = backend.to_string();
    serve(move |req| {
        let (backend, on_answer) = (backend.clone(), on_answer.clone());
        async move {
            let (method, path) = (req.method().clone(), req.uri().path().to_string());
            let mut resp = forward(&backend, req).await;
            on_answer(&method, &path, &mut resp);
            resp
        }
    })
    .await
}

/// Forwards `req` (its method, path, query, headers but `Authorization` and `Host`, and body) to
/// `backend` and answers with what it answered.
pub async fn forward(backend: &str, req: Request<Incoming>) -> Response<Body> {
    let client = reqwest::Client::new();
    let url = format!(
        "{backend}{}",
        req.uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    let mut rb = client.request(req.method().clone(), url);
    for (k, v) in req.headers() {
        if k != "authorization" && k != "host" {
            rb = rb.header(k, v);
        }
    }
    let Ok(body) = req.into_body().collect().await else {
        return resp(StatusCode::BAD_REQUEST, "");
    };
    let Ok(up) = rb.body(body.to_bytes()).send().await else {
        return resp(StatusCode::BAD_GATEWAY, "");
    };
    let mut r = Response::builder().status(up.status());
    for (k, v) in up.headers() {
        r = r.header(k, v);
    }
    let body = up.bytes().await.unwrap_or_default();
    r.body(full(body)).expect("response")
}
