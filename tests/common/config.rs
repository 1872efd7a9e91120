//! A typed builder for the ociedge config the tests write. It renders the YAML of
//! `/work/shared/DESIGN.md` (and README's configuration section); `{PORT}` and `{DIR}` stay in the
//! text for [`super::Proxy::start`] to fill.
//!
//! ```ignore
//! let cfg = Config::mirror(&origin.url()).cache("max_size", "64MiB").render();
//! let cfg = Config::local("eu", "file://{DIR}/data").push("eu").render();
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The whole config file.
#[derive(Clone, Debug)]
pub struct Config {
    listen: String,
    region: Option<String>,
    preference: String,
    probe: Vec<(String, String)>,
    engines: Vec<Engine>,
    upstreams: Vec<Upstream>,
    push: Option<String>,
    replicate: Vec<(String, Vec<String>)>,
    cache: Vec<(String, String)>,
    limits: Vec<(String, String)>,
    tls: Vec<(String, String)>,
    auth: Option<Auth>,
    raw: String,
}

/// One `storage.engines` entry.
#[derive(Clone, Debug)]
pub struct Engine {
    id: String,
    url: String,
    options: Vec<(String, String)>,
    replicate_by_default: bool,
}

/// One `upstreams` entry.
#[derive(Clone, Debug)]
pub struct Upstream {
    name: String,
    url: String,
    auth: Option<(String, String)>,
    realms: Vec<String>,
    access: Option<String>,
    ca_file: Option<String>,
    /// More keys, as written in YAML (`down_after`, `ratelimit_reserve`).
    more: Vec<(String, String)>,
}

/// The `auth:` section.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    htpasswd: Option<PathBuf>,
    token: Vec<(String, String)>,
    rules: Vec<String>,
}

/// `"text"`, escaped for YAML's double-quoted scalars.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `{ k: v, … }`.
fn flow(pairs: &[(String, String)]) -> String {
    let inner: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("{{ {} }}", inner.join(", "))
}

impl Config {
    /// No engine yet: listen on `127.0.0.1:{PORT}`, local engine `preference`.
    pub fn new(preference: &str) -> Config {
        Config {
            listen: "127.0.0.1:{PORT}".into(),
            region: None,
            preference: preference.into(),
            probe: Vec::new(),
            engines: Vec::new(),
            upstreams: Vec::new(),
            push: None,
            replicate: Vec::new(),
            cache: Vec::new(),
            limits: Vec::new(),
            tls: Vec::new(),
            auth: None,
            raw: String::new(),
        }
    }

    /// One local engine `id` at `url`.
    pub fn local(id: &str, url: &str) -> Config {
        Config::new(id).engine(Engine::new(id, url))
    }

    /// The config [`super::mirror_config`] writes: region `eu`, a `file://{DIR}/data` local engine and
    /// one `docker.io` upstream at `upstream_url`.
    pub fn mirror(upstream_url: &str) -> Config {
        Config::mirror_of(Upstream::new("docker.io", upstream_url))
    }

    /// [`Config::mirror`] of another upstream (one with credentials, an access mode).
    pub fn mirror_of(upstream: Upstream) -> Config {
        Config::local("eu", "file://{DIR}/data")
            .region("eu")
            .upstream(upstream)
    }

    pub fn listen(mut self, addr: &str) -> Config {
        self.listen = addr.into();
        self
    }

    pub fn region(mut self, region: &str) -> Config {
        self.region = Some(region.into());
        self
    }

    /// `storage.probe.<key>` (`interval`, `timeout`, `down_after`).
    pub fn probe(mut self, key: &str, value: &str) -> Config {
        self.probe.push((key.into(), value.into()));
        self
    }

    pub fn engine(mut self, engine: Engine) -> Config {
        self.engines.push(engine);
        self
    }

    pub fn upstream(mut self, upstream: Upstream) -> Config {
        self.upstreams.push(upstream);
        self
    }

    /// `push.engine`.
    pub fn push(mut self, engine: &str) -> Config {
        self.push = Some(engine.into());
        self
    }

    /// A `push.replicate` rule.
    pub fn replicate(mut self, repos: &str, to: &[&str]) -> Config {
        self.replicate
            .push((repos.into(), to.iter().map(|s| s.to_string()).collect()));
        self
    }

    /// `cache.<key>: <value>` (`tag_ttl`, `max_size`, `min_idle`, …).
    pub fn cache(mut self, key: &str, value: &str) -> Config {
        self.cache.push((key.into(), value.into()));
        self
    }

    /// `limits.<key>: <value>` (`max_connections`, `idle_timeout`, …).
    pub fn limits(mut self, key: &str, value: &str) -> Config {
        self.limits.push((key.into(), value.into()));
        self
    }

    /// `tls: { cert, key }`, with the files at these paths.
    pub fn tls(mut self, cert: &str, key: &str) -> Config {
        self.tls.push(("cert".into(), quote(cert)));
        self.tls.push(("key".into(), quote(key)));
        self
    }

    /// Another `tls.<key>` (`plain_listen`, `reload_interval`).
    pub fn tls_option(mut self, key: &str, value: &str) -> Config {
        self.tls.push((key.into(), value.into()));
        self
    }

    pub fn auth(mut self, auth: Auth) -> Config {
        self.auth = Some(auth);
        self
    }

    /// YAML appended as it is (a section the builder does not know; a wrong value on purpose).
    pub fn raw(mut self, yaml: &str) -> Config {
        self.raw.push_str(yaml);
        if !yaml.is_empty() && !yaml.ends_with('\n') {
            self.raw.push('\n');
        }
        self
    }

    /// The YAML text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "listen: {}", self.listen);
        if let Some(r) = &self.region {
            let _ = writeln!(s, "region: {r}");
        }
        let _ = writeln!(s, "storage:\n  preference: {}", self.preference);
        if !self.probe.is_empty() {
            let _ = writeln!(s, "  probe: {}", flow(&self.probe));
        }
        s.push_str("  engines:\n");
        for e in &self.engines {
            let _ = writeln!(s, "    {}: {}", e.id, e.render());
        }
        if !self.upstreams.is_empty() {
            s.push_str("upstreams:\n");
            for u in &self.upstreams {
                let _ = writeln!(s, "  - {}", u.render());
            }
        }
        match (&self.push, self.replicate.is_empty()) {
            (Some(p), true) => {
                let _ = writeln!(s, "push: {{ engine: {p} }}");
            }
            (p, _) => {
                if p.is_some() || !self.replicate.is_empty() {
                    s.push_str("push:\n");
                }
                if let Some(p) = p {
                    let _ = writeln!(s, "  engine: {p}");
                }
                if !self.replicate.is_empty() {
                    s.push_str("  replicate:\n");
                    for (repos, to) in &self.replicate {
                        let _ = writeln!(
                            s,
                            "    - {{ repos: {}, to: [{}] }}",
                            quote(repos),
                            to.join(", ")
                        );
                    }
                }
            }
        }
        if !self.cache.is_empty() {
            let _ = writeln!(s, "cache: {}", flow(&self.cache));
        }
        if !self.limits.is_empty() {
            let _ = writeln!(s, "limits: {}", flow(&self.limits));
        }
        if !self.tls.is_empty() {
            let _ = writeln!(s, "tls: {}", flow(&self.tls));
        }
        if let Some(a) = &self.auth {
            s.push_str(&a.render());
        }
        s.push_str(&self.raw);
        s
    }
}

impl std::fmt::Display for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

impl Engine {
    pub fn new(id: &str, url: &str) -> Engine {
        Engine {
            id: id.into(),
            url: url.into(),
            options: Vec::new(),
            replicate_by_default: false,
        }
    }

    /// An S3 bucket `registry` at `endpoint` with the harness's credentials (moto takes any).
    pub fn s3(id: &str, endpoint: &str) -> Engine {
        Engine::new(id, "s3://registry")
            .option("endpoint", &quote(endpoint))
            .option("region", "us-east-1")
            .option("access_key_id", "harness")
            .option("secret_access_key", "harness-secret")
            .option("allow_http", "\"true\"")
    }

    /// An object_store option (`value` as written in YAML).
    pub fn option(mut self, key: &str, value: &str) -> Engine {
        self.options.push((key.into(), value.into()));
        self
    }

    pub fn replicate_by_default(mut self) -> Engine {
        self.replicate_by_default = true;
        self
    }

    fn render(&self) -> String {
        let mut pairs = vec![("url".to_string(), quote(&self.url))];
        if !self.options.is_empty() {
            pairs.push(("options".into(), flow(&self.options)));
        }
        if self.replicate_by_default {
            pairs.push(("replicate_by_default".into(), "true".into()));
        }
        flow(&pairs)
    }
}

impl Upstream {
    pub fn new(name: &str, url: &str) -> Upstream {
        Upstream {
            name: name.into(),
            url: url.into(),
            auth: None,
            realms: Vec::new(),
            access: None,
            ca_file: None,
            more: Vec::new(),
        }
    }

    /// Another key of the entry, as written in YAML (`down_after`, `ratelimit_reserve`).
    pub fn option(mut self, key: &str, value: &str) -> Upstream {
        self.more.push((key.into(), value.into()));
        self
    }

    /// `auth: { username, password }`.
    pub fn credentials(mut self, username: &str, password: &str) -> Upstream {
        self.auth = Some((username.into(), password.into()));
        self
    }

    /// `auth.realms`: the token-service origins the credentials may go to.
    pub fn realms(mut self, origins: &[&str]) -> Upstream {
        self.realms = origins.iter().map(|o| o.to_string()).collect();
        self
    }

    /// `access: public | gated | passthrough`.
    pub fn access(mut self, access: &str) -> Upstream {
        self.access = Some(access.into());
        self
    }

    pub fn ca_file(mut self, path: &str) -> Upstream {
        self.ca_file = Some(path.into());
        self
    }

    fn render(&self) -> String {
        let mut pairs = vec![
            ("name".to_string(), quote(&self.name)),
            ("url".to_string(), quote(&self.url)),
        ];
        if let Some((u, p)) = &self.auth {
            let mut auth = vec![
                ("username".to_string(), quote(u)),
                ("password".to_string(), quote(p)),
            ];
            if !self.realms.is_empty() {
                let realms: Vec<String> = self.realms.iter().map(|r| quote(r)).collect();
                auth.push(("realms".into(), format!("[{}]", realms.join(", "))));
            }
            pairs.push(("auth".into(), flow(&auth)));
        }
        if let Some(a) = &self.access {
            pairs.push(("access".into(), a.clone()));
        }
        if let Some(c) = &self.ca_file {
            pairs.push(("ca_file".into(), quote(c)));
        }
        pairs.extend(self.more.iter().cloned());
        flow(&pairs)
    }
}

impl Auth {
    pub fn new() -> Auth {
        Auth::default()
    }

    pub fn htpasswd(mut self, path: &Path) -> Auth {
        self.htpasswd = Some(path.to_path_buf());
        self
    }

    /// `token.signing_key`.
    pub fn signing_key(mut self, path: &Path) -> Auth {
        self.token
            .push(("signing_key".into(), quote(&path.display().to_string())));
        self
    }

    /// `token.verify_keys`.
    pub fn verify_keys(mut self, paths: &[&Path]) -> Auth {
        let keys: Vec<String> = paths
            .iter()
            .map(|p| quote(&p.display().to_string()))
            .collect();
        self.token
            .push(("verify_keys".into(), format!("[{}]", keys.join(", "))));
        self
    }

    /// Another `token.<key>` (`ttl`, `realm`), as written in YAML.
    pub fn token(mut self, key: &str, value: &str) -> Auth {
        self.token.push((key.into(), value.into()));
        self
    }

    /// A rule, as a YAML flow map: `{ repos: "library/**", pull: [anonymous] }`.
    pub fn rule(mut self, rule: &str) -> Auth {
        self.rules.push(rule.into());
        self
    }

    fn render(&self) -> String {
        let mut s = String::from("auth:\n");
        if let Some(h) = &self.htpasswd {
            let _ = writeln!(s, "  htpasswd: {}", quote(&h.display().to_string()));
        }
        if !self.token.is_empty() {
            let _ = writeln!(s, "  token: {}", flow(&self.token));
        }
        s.push_str("  rules:\n");
        for r in &self.rules {
            let _ = writeln!(s, "    - {r}");
        }
        s
    }
}

/// Two regions sharing `file://` engines under `root`: `eu` pushes to its local engine and
/// replicates to `us` (`replicate_by_default`); the configs of eu and of us.
pub fn two_regions(root: &Path) -> (String, String) {
    let region = |name: &str| {
        Config::new(name)
            .region(name)
            .probe("interval", "200ms")
            .engine(Engine::new("eu", &format!("file://{}/eu", root.display())))
            .engine(
                Engine::new("us", &format!("file://{}/us", root.display())).replicate_by_default(),
            )
            .push("eu")
            .render()
    };
    (region("eu"), region("us"))
}
