//! Durations and sizes written the way a person writes them: `60s`, `24h`, `500GiB`.

use std::fmt;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A duration from `humantime` syntax (`60s`, `5m`, `1h 30m`), printed back the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// The longest duration any setting takes: ten years is "for ever" for every timeout, TTL and
/// interval, and far from what the runtime cannot add to a clock (`tag_ttl: 1001years` made the
/// cache builder panic at start; `header_read_timeout: 300000000000years` every connection task).
pub const MAX_DURATION: Duration = Duration::from_secs(315_576_000); // 10 years of 365.25 days

/// The largest size any setting takes: 1 PiB.
pub const MAX_SIZE: u64 = 1 << 50;

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let v = humantime::parse_duration(&s).map_err(|e| {
            de::Error::custom(format!(
                "invalid duration {s:?} ({e}); write e.g. 60s, 5m, 24h"
            ))
        })?;
        if v > MAX_DURATION {
            return Err(de::Error::custom(format!(
                "duration {s:?} is longer than the largest allowed, {}",
                humantime::format_duration(MAX_DURATION)
            )));
        }
        Ok(HumanDuration(v))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// A byte size: a number with an optional unit (`B`, `KB`/`MB`/`GB`/`TB` powers of 1000,
/// `KiB`/`MiB`/`GiB`/`TiB` powers of 1024). A bare number is bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

const UNITS: &[(&str, u64)] = &[
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("B", 1),
];

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = (t[..split].trim(), t[split..].trim());
        let n: f64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?}; write e.g. 500GiB, 100MiB"))?;
        let mult = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(u, _)| u.eq_ignore_ascii_case(unit))
                .map(|(_, m)| *m)
                .ok_or_else(|| format!("unknown size unit {unit:?} in {s:?}; use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB"))?
        };
        let v = n * mult as f64;
        if !v.is_finite() || v < 0.0 || v > MAX_SIZE as f64 {
            return Err(format!(
                "size {s:?} is larger than the largest allowed, {}",
                ByteSize(MAX_SIZE)
            ));
        }
        Ok(ByteSize(v as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (u, m) in &UNITS[..4] {
            if self.0 >= *m && self.0.is_multiple_of(*m) {
                return write!(f, "{}{u}", self.0 / m);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) if n > MAX_SIZE => Err(de::Error::custom(format!(
                "size {n} is larger than the largest allowed, {}",
                ByteSize(MAX_SIZE)
            ))),
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("500GiB").unwrap().0, 500 << 30);
        assert_eq!(ByteSize::parse("1.5 MiB").unwrap().0, 3 << 19);
        assert_eq!(ByteSize::parse("10MB").unwrap().0, 10_000_000);
        assert_eq!(ByteSize::parse("42").unwrap().0, 42);
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert!(ByteSize::parse("GiB").is_err());
        assert_eq!(ByteSize(500 << 30).to_string(), "500GiB");
    }

    #[test]
    fn durations() {
        let d: HumanDuration = serde_yaml_ng::from_str("60s").unwrap();
        assert_eq!(d.0, Duration::from_secs(60));
        assert!(serde_yaml_ng::from_str::<HumanDuration>("soon").is_err());
    }
}

/// A percentage, written `10%` (or a bare number of percent); 0–100.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percent(pub f64);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        let (v, shown) = match Raw::deserialize(d)? {
            Raw::Number(n) => (n, n.to_string()),
            Raw::Text(s) => {
                let n = s
                    .trim()
                    .strip_suffix('%')
                    .unwrap_or(s.trim())
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| {
                        de::Error::custom(format!("invalid percentage {s:?}; write e.g. 10%"))
                    })?;
                (n, s)
            }
        };
        if !(0.0..=100.0).contains(&v) {
            return Err(de::Error::custom(format!(
                "percentage {shown} is not between 0% and 100%"
            )));
        }
        Ok(Percent(v))
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}%", self.0))
    }
}
