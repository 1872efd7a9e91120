//! A prewarm job as data: what was asked ([`Spec`], validated field by field) and how far it
//! got ([`Record`]: per image and per engine, blobs and bytes done, errors, finished).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::oci::{Reference, RepoName};

/// Images one job may name.
pub const MAX_IMAGES: usize = 1000;
/// Platforms one job may list.
pub const MAX_PLATFORMS: usize = 64;
/// Errors kept per image and engine (the first ones; the count goes on).
const MAX_ERRORS: usize = 10;

/// What a job was asked to do.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// As clients write them (`library/alpine:3.20`, `ghcr.io/org/app@sha256:…`).
    pub images: Vec<String>,
    /// `os/arch[/variant]` children of an index to fetch; `None`: every one.
    #[serde(default)]
    pub platforms: Option<Vec<String>>,
    /// Also copy everything into every storage engine.
    #[serde(default)]
    pub replicate: bool,
    /// Eviction keeps what the job fetched until then (unix seconds).
    #[serde(default)]
    pub pin_until: Option<u64>,
}

/// A field of a request that does not validate: the field (`images[2]`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// An image as a client writes it: `name[:tag]` or `name[:tag]@digest` (the tag is then
/// ignored, as clients do); no tag means `latest`. The name is routed later, as a pull's is.
pub fn parse_image(s: &str) -> Result<(RepoName, Reference), String> {
    // A tag follows the last `:` after the last `/` (`host:5000/app` has none).
    fn split_tag(s: &str) -> (&str, Option<&str>) {
        match s.rfind(':') {
            Some(i) if !s[i..].contains('/') => (&s[..i], Some(&s[i + 1..])),
            _ => (s, None),
        }
    }
    let (name, reference) = match s.split_once('@') {
        Some((n, d)) => {
            let d = Reference::parse(d)
                .filter(|r| matches!(r, Reference::Digest(_)))
                .ok_or_else(|| format!("{d:?} is not a valid digest"))?;
            (split_tag(n).0, d)
        }
        None => {
            let (n, t) = split_tag(s);
            let t = t.unwrap_or("latest");
            let r = Reference::parse(t)
                .filter(|r| matches!(r, Reference::Tag(_)))
                .ok_or_else(|| format!("{t:?} is not a valid tag"))?;
            (n, r)
        }
    };
    let name = name
        .parse::<RepoName>()
        .map_err(|e| format!("{name:?} is not a valid repository name: {e}"))?;
    Ok((name, reference))
}

fn platform_ok(p: &str) -> bool {
    let parts: Vec<&str> = p.split('/').collect();
    (2..=3).contains(&parts.len())
        && parts.iter().all(|c| {
            !c.is_empty()
                && c.len() <= 32
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        })
}

impl Spec {
    /// A validated spec; `pin_for` counts from `now` (unix seconds).
    pub fn new(
        images: Vec<String>,
        platforms: Option<Vec<String>>,
        replicate: bool,
        pin_for: Option<Duration>,
        now: u64,
    ) -> Result<Spec, FieldError> {
        if images.is_empty() {
            return Err(bad("images", "names no image"));
        }
        if images.len() > MAX_IMAGES {
            return Err(bad(
                "images",
                format!("{} images; at most {MAX_IMAGES} per job", images.len()),
            ));
        }
        for (i, im) in images.iter().enumerate() {
            parse_image(im).map_err(|e| bad(format!("images[{i}]"), e))?;
        }
        if let Some(ps) = &platforms {
            if ps.is_empty() {
                return Err(bad("platforms", "an empty list names no platform"));
            }
            if ps.len() > MAX_PLATFORMS {
                return Err(bad(
                    "platforms",
                    format!("at most {MAX_PLATFORMS} platforms"),
                ));
            }
            for (i, p) in ps.iter().enumerate() {
                if !platform_ok(p) {
                    return Err(bad(
                        format!("platforms[{i}]"),
                        format!("{:?} is not os/arch[/variant]", trunc(p)),
                    ));
                }
            }
        }
        let pin_until = match pin_for {
            Some(d) if d > crate::config::units::MAX_DURATION => {
                return Err(bad("pin_until", "longer than ten years"))
            }
            Some(d) => Some(now.saturating_add(d.as_secs())),
            None => None,
        };
        Ok(Spec {
            images,
            platforms,
            replicate,
            pin_until,
        })
    }

    /// The spec of a request body: `{"images": [...], "platforms": "all" | [...],
    /// "replicate": bool, "pin_until": "48h"}` (only `images` required; other keys refused).
    pub fn from_json(body: &[u8], now: u64) -> Result<Spec, FieldError> {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| bad("body", format!("not JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(bad("body", "not a JSON object"));
        };
        for k in obj.keys() {
            if !["images", "platforms", "replicate", "pin_until"].contains(&k.as_str()) {
                return Err(bad(
                    trunc(k),
                    "unknown field (expected images, platforms, replicate, pin_until)",
                ));
            }
        }
        let images = match obj.get("images") {
            None => return Err(bad("images", "missing")),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("images[{i}]"), "not a string"))
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err(bad("images", "not a list of image names")),
        };
        let platforms = match obj.get("platforms") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "all" => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .enumerate()
                    .map(|(i, x)| {
                        x.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| bad(format!("platforms[{i}]"), "not a string"))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(_) => {
                return Err(bad(
                    "platforms",
                    "\"all\" or a list such as [\"linux/amd64\"]",
                ))
            }
        };
        let replicate = match obj.get("replicate") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("replicate", "not true or false")),
        };
        let pin_for = match obj.get("pin_until") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(humantime::parse_duration(s).map_err(|e| {
                bad(
                    "pin_until",
                    format!("{:?}: {e}; write a duration such as 48h", trunc(s)),
                )
            })?),
            Some(_) => return Err(bad("pin_until", "a duration such as \"48h\"")),
        };
        Spec::new(images, platforms, replicate, pin_for, now)
    }

    /// Whether an index child of `platform` (`os`, `architecture`, `variant`) is wanted.
    pub fn wants(&self, os: &str, arch: &str, variant: Option<&str>) -> bool {
        let Some(ps) = &self.platforms else {
            return true;
        };
        ps.iter().any(|p| {
            let mut it = p.split('/');
            let (o, a, v) = (it.next(), it.next(), it.next());
            o == Some(os) && a == Some(arch) && (v.is_none() || v == variant)
        })
    }
}

fn trunc(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Progress of one image in one engine.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub blobs_total: u64,
    pub blobs_done: u64,
    /// Bytes of the blobs done (present before or copied now).
    pub bytes_done: u64,
    /// Bytes that had to be transferred.
    pub bytes_transferred: u64,
    pub manifests_done: u64,
    pub errors: Vec<String>,
}

impl Counts {
    pub fn error(&mut self, e: impl std::fmt::Display) {
        push_error(&mut self.errors, e);
    }
}

fn push_error(list: &mut Vec<String>, e: impl std::fmt::Display) {
    if list.len() < MAX_ERRORS {
        list.push(e.to_string().chars().take(500).collect());
    }
}

/// Progress of one image.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageRecord {
    pub image: String,
    /// The storage name it was routed to.
    #[serde(default)]
    pub repository: Option<String>,
    /// The digest of its manifest (or index).
    #[serde(default)]
    pub digest: Option<String>,
    /// By engine id: the local engine, and with `replicate` every other storage engine.
    #[serde(default)]
    pub engines: BTreeMap<String, Counts>,
    /// Failures of the image as a whole (its manifest unknown, its name not routable).
    #[serde(default)]
    pub errors: Vec<String>,
    #[serde(default)]
    pub finished: bool,
}

impl ImageRecord {
    pub fn error(&mut self, e: impl std::fmt::Display) {
        push_error(&mut self.errors, e);
    }

    /// Whether any error was recorded, for the image or one of its engines.
    pub fn failed(&self) -> bool {
        !self.errors.is_empty() || self.engines.values().any(|c| !c.errors.is_empty())
    }
}

/// A job and its progress, as stored and as `GET /_ociedge/prewarm/<id>` shows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub id: String,
    pub spec: Spec,
    /// Unix seconds.
    pub created: u64,
    pub updated: u64,
    pub finished: bool,
    /// How many times a process started running it (more than one after a restart).
    #[serde(default)]
    pub runs: u32,
    pub images: Vec<ImageRecord>,
}

impl Record {
    pub fn new(id: String, spec: Spec, now: u64) -> Record {
        let images = spec
            .images
            .iter()
            .map(|i| ImageRecord {
                image: i.clone(),
                ..Default::default()
            })
            .collect();
        Record {
            id,
            spec,
            created: now,
            updated: now,
            finished: false,
            runs: 0,
            images,
        }
    }

    /// `running`, `done`, or `failed` (finished with errors).
    pub fn state(&self) -> &'static str {
        match (self.finished, self.images.iter().any(ImageRecord::failed)) {
            (false, _) => "running",
            (true, false) => "done",
            (true, true) => "failed",
        }
    }

    /// Sums over every image, by engine.
    pub fn totals(&self) -> BTreeMap<String, Counts> {
        let mut out: BTreeMap<String, Counts> = BTreeMap::new();
        for im in &self.images {
            for (e, c) in &im.engines {
                let t = out.entry(e.clone()).or_default();
                t.blobs_total += c.blobs_total;
                t.blobs_done += c.blobs_done;
                t.bytes_done += c.bytes_done;
                t.bytes_transferred += c.bytes_transferred;
                t.manifests_done += c.manifests_done;
                for err in &c.errors {
                    push_error(&mut t.errors, err);
                }
            }
        }
        out
    }

    /// A line of the status page: the state and totals, without the images.
    pub fn summary(&self) -> Value {
        serde_json::json!({
            "id": self.id,
            "state": self.state(),
            "finished": self.finished,
            "created": self.created,
            "updated": self.updated,
            "images": self.images.len(),
            "images_done": self.images.iter().filter(|i| i.finished).count(),
            "replicate": self.spec.replicate,
            "pin_until": self.spec.pin_until,
            "engines": self.totals(),
        })
    }

    /// The JSON answer: the record with its state, totals by engine, and `platforms` as asked.
    pub fn view(&self) -> Value {
        let images: Vec<Value> = self
            .images
            .iter()
            .map(|im| {
                serde_json::json!({
                    "image": im.image,
                    "repository": im.repository,
                    "digest": im.digest,
                    "engines": im.engines,
                    "errors": im.errors,
                    "finished": im.finished,
                })
            })
            .collect();
        serde_json::json!({
            "id": self.id,
            "state": self.state(),
            "finished": self.finished,
            "created": self.created,
            "updated": self.updated,
            "runs": self.runs,
            "replicate": self.spec.replicate,
            "platforms": match &self.spec.platforms {
                None => Value::String("all".into()),
                Some(ps) => serde_json::json!(ps),
            },
            "pin_until": self.spec.pin_until,
            "engines": self.totals(),
            "images": images,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(body: &str) -> String {
        Spec::from_json(body.as_bytes(), 0).unwrap_err().field
    }

    #[test]
    fn images_as_clients_write_them() {
        let (n, r) = parse_image("library/alpine:3.20").unwrap();
        assert_eq!(
            (n.as_str(), r.to_string().as_str()),
            ("library/alpine", "3.20")
        );
        let (n, r) = parse_image("alpine").unwrap();
        assert_eq!((n.as_str(), r.to_string().as_str()), ("alpine", "latest"));
        let d = format!("sha256:{}", "a".repeat(64));
        let (n, r) = parse_image(&format!("ghcr.io/org/app:v1@{d}")).unwrap();
        assert_eq!(n.as_str(), "ghcr.io/org/app");
        assert_eq!(r, Reference::Digest(d.parse().unwrap()));
        assert!(parse_image("Upper/case").is_err());
        assert!(parse_image("a@sha256:abc").is_err());
        assert!(parse_image("a:-bad").is_err());
    }

    #[test]
    fn requests_are_validated_field_by_field() {
        let s = Spec::from_json(
            br#"{"images":["a:1"],"platforms":["linux/amd64"],"replicate":true,"pin_until":"1h"}"#,
            100,
        )
        .unwrap();
        assert_eq!(s.pin_until, Some(3700));
        assert!(s.replicate);
        assert!(s.wants("linux", "amd64", None) && !s.wants("linux", "arm64", Some("v8")));
        let all = Spec::from_json(br#"{"images":["a"],"platforms":"all"}"#, 0).unwrap();
        assert!(all.platforms.is_none() && all.wants("x", "y", None));
        assert_eq!(field(r#"{"images":[]}"#), "images");
        assert_eq!(field(r#"{}"#), "images");
        assert_eq!(field(r#"{"images":"a"}"#), "images");
        assert_eq!(field(r#"{"images":["a","B"]}"#), "images[1]");
        assert_eq!(field(r#"{"images":["a"],"platforms":"some"}"#), "platforms");
        assert_eq!(
            field(r#"{"images":["a"],"platforms":["linux"]}"#),
            "platforms[0]"
        );
        assert_eq!(field(r#"{"images":["a"],"replicate":"yes"}"#), "replicate");
        assert_eq!(field(r#"{"images":["a"],"pin_until":"soon"}"#), "pin_until");
        assert_eq!(
            field(r#"{"images":["a"],"pin_until":"100years"}"#),
            "pin_until"
        );
        assert_eq!(field(r#"{"images":["a"],"extra":1}"#), "extra");
        assert_eq!(field(r#"[1]"#), "body");
        assert_eq!(field(r#"{"#), "body");
    }
}
