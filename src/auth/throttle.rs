//! Failed password checks, counted per client address and per user name, so that a
//! password-guessing flood neither guesses fast nor slows everyone else down.
//!
//! Each key has a leaky bucket of failures: every attempt that needs a bcrypt verification
//! first reserves one unit in the bucket of its address and of its user name (a success gives it
//! back), and the buckets drain at [`FORGIVE_EVERY`]. A full bucket refuses the attempt at once,
//! without a verification, with the time until it has room (`429` and `Retry-After`). Reserving
//! before verifying makes concurrent guesses count too.
//!
//! A user name's bucket does not apply from an address where that user proved their password
//! recently ([`TRUSTED_FOR`]): a flood aimed at alice does not lock alice out where she works.
//! Credentials verified moments ago are answered from a cache (`VERIFIED_TTL` in `mod.rs`)
//! before this is asked at all.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures an address may have outstanding before it is refused.
pub const ADDR_BURST: f64 = 10.0;
/// Failures a user name may have outstanding (from addresses it has not succeeded from).
pub const USER_BURST: f64 = 20.0;
/// One outstanding failure is forgiven this often.
pub const FORGIVE_EVERY: Duration = Duration::from_secs(6);
/// How long a successful login makes its address trusted for its user.
pub const TRUSTED_FOR: Duration = Duration::from_secs(24 * 3600);
/// Entries kept per map; beyond, drained buckets and expired trust are dropped first.
const MAX_ENTRIES: usize = 65_536;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    fn drained(&self, now: Instant) -> f64 {
        let forgiven = now.duration_since(self.at).as_secs_f64() / FORGIVE_EVERY.as_secs_f64();
        (self.level - forgiven).max(0.0)
    }
}

#[derive(Debug)]
struct Buckets<K> {
    map: HashMap<K, Bucket>,
    burst: f64,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(burst: f64) -> Self {
        Buckets {
            map: HashMap::new(),
            burst,
        }
    }

    /// The wait before `key` has room for one more attempt; `None` when it has room now.
    fn full(&self, key: &K, now: Instant) -> Option<Duration> {
        let level = self.map.get(key)?.drained(now);
        if level + 1.0 <= self.burst {
            return None;
        }
        let over = level + 1.0 - self.burst;
        Some(FORGIVE_EVERY.mul_f64(over))
    }

    fn add(&mut self, key: &K, n: f64, now: Instant) {
        if self.map.len() >= MAX_ENTRIES && !self.map.contains_key(key) {
            self.map.retain(|_, b| b.drained(now) > 0.0);
            if self.map.len() >= MAX_ENTRIES {
                tracing::warn!(
                    "too many clients failing to log in at once: forgetting their failures"
                );
                self.map.clear();
            }
        }
        let b = self.map.entry(key.clone()).or_insert(Bucket {
            level: 0.0,
            at: now,
        });
        b.level = (b.drained(now) + n).max(0.0);
        b.at = now;
    }
}

/// The address key: an IPv6 client is counted by its /64 (one host usually holds a whole one).
fn addr_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

#[derive(Debug)]
struct State {
    addrs: Buckets<IpAddr>,
    users: Buckets<String>,
    trusted: HashMap<(String, IpAddr), Instant>,
}

/// An attempt that was let through: report how it ended with [`Throttle::ended`].
#[derive(Debug)]
#[must_use]
pub struct Attempt {
    addr: Option<IpAddr>,
    user: Option<String>,
}

#[derive(Debug)]
pub struct Throttle {
    state: Mutex<State>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            state: Mutex::new(State {
                addrs: Buckets::new(ADDR_BURST),
                users: Buckets::new(USER_BURST),
                trusted: HashMap::new(),
            }),
        }
    }
}

impl Throttle {
    /// Reserves an attempt at `user`'s password from `from`, or says how long to wait.
    pub fn begin(&self, from: Option<IpAddr>, user: &str) -> Result<Attempt, Duration> {
        self.begin_at(from, user, Instant::now())
    }

    fn begin_at(
        &self,
        from: Option<IpAddr>,
        user: &str,
        now: Instant,
    ) -> Result<Attempt, Duration> {
        let addr = from.map(addr_key);
        let Ok(mut s) = self.state.lock() else {
            return Err(FORGIVE_EVERY);
        };
        let trusted = addr.is_some_and(|a| {
            s.trusted
                .get(&(user.to_string(), a))
                .is_some_and(|t| now.duration_since(*t) < TRUSTED_FOR)
        });
        let user = (!trusted).then(|| user.to_string());
        let wait = [
            addr.and_then(|a| s.addrs.full(&a, now)),
            user.as_ref().and_then(|u| s.users.full(u, now)),
        ]
        .into_iter()
        .flatten()
        .max();
        if let Some(w) = wait {
            return Err(w.max(Duration::from_secs(1)));
        }
        if let Some(a) = addr {
            s.addrs.add(&a, 1.0, now);
        }
        if let Some(u) = &user {
            s.users.add(u, 1.0, now);
        }
        Ok(Attempt { addr, user })
    }

    /// How a reserved attempt ended: a success gives its reservation back and trusts the
    /// address for the user; a failure keeps it.
    pub fn ended(&self, a: Attempt, user: &str, ok: bool) {
        self.ended_at(a, user, ok, Instant::now());
    }

    fn ended_at(&self, a: Attempt, user: &str, ok: bool, now: Instant) {
        if !ok {
            return;
        }
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        if let Some(addr) = a.addr {
            s.addrs.add(&addr, -1.0, now);
            if s.trusted.len() >= MAX_ENTRIES {
                s.trusted
                    .retain(|_, t| now.duration_since(*t) < TRUSTED_FOR);
                if s.trusted.len() >= MAX_ENTRIES {
                    s.trusted.clear();
                }
            }
            s.trusted.insert((user.to_string(), addr), now);
        }
        if let Some(u) = &a.user {
            s.users.add(u, -1.0, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn an_address_is_refused_after_its_burst_and_forgiven_with_time() {
        let t = Throttle::default();
        let now = Instant::now();
        for _ in 0..ADDR_BURST as usize {
            let a = t.begin_at(ip("10.0.0.1"), "alice", now).unwrap();
            t.ended_at(a, "alice", false, now);
        }
        let wait = t.begin_at(ip("10.0.0.1"), "bob", now).unwrap_err();
        assert!(
            wait >= Duration::from_secs(1) && wait <= FORGIVE_EVERY,
            "{wait:?}"
        );
        // Another address is not concerned, for another user.
        let a = t.begin_at(ip("10.0.0.2"), "bob", now).unwrap();
        t.ended_at(a, "bob", true, now);
        // One failure is forgiven after FORGIVE_EVERY.
        let later = now + FORGIVE_EVERY;
        let a = t.begin_at(ip("10.0.0.1"), "bob", later).unwrap();
        t.ended_at(a, "bob", false, later);
        assert!(t.begin_at(ip("10.0.0.1"), "bob", later).is_err());
    }

    #[test]
    fn successes_give_their_reservation_back() {
        let t = Throttle::default();
        let now = Instant::now();
        for _ in 0..100 {
            let a = t.begin_at(ip("10.0.0.1"), "alice", now).unwrap();
            t.ended_at(a, "alice", true, now);
        }
    }

    #[test]
    fn concurrent_attempts_count_before_they_end() {
        let t = Throttle::default();
        let now = Instant::now();
        let held: Vec<_> = (0..ADDR_BURST as usize)
            .map(|_| t.begin_at(ip("10.0.0.1"), "alice", now).unwrap())
            .collect();
        assert!(t.begin_at(ip("10.0.0.1"), "alice", now).is_err());
        drop(held);
    }

    #[test]
    fn a_user_under_attack_is_still_served_where_they_logged_in() {
        let t = Throttle::default();
        let now = Instant::now();
        let a = t.begin_at(ip("192.0.2.7"), "alice", now).unwrap();
        t.ended_at(a, "alice", true, now);
        // Many addresses guess alice's password until her name is refused.
        let mut n = 0;
        while let Ok(a) = t.begin_at(ip(&format!("10.0.{}.{}", n / 250, n % 250)), "alice", now) {
            t.ended_at(a, "alice", false, now);
            n += 1;
            assert!(n < 1000);
        }
        assert_eq!(n, USER_BURST as usize);
        assert!(t.begin_at(ip("10.9.9.9"), "alice", now).is_err());
        // From where she logged in, alice still gets her password checked.
        let a = t.begin_at(ip("192.0.2.7"), "alice", now).unwrap();
        t.ended_at(a, "alice", true, now);
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let t = Throttle::default();
        let now = Instant::now();
        for i in 0..ADDR_BURST as usize {
            let a = t
                .begin_at(ip(&format!("2001:db8:1:2::{i:x}")), &format!("u{i}"), now)
                .unwrap();
            t.ended_at(a, "x", false, now);
        }
        assert!(t.begin_at(ip("2001:db8:1:2::ffff"), "v", now).is_err());
        assert!(t.begin_at(ip("2001:db8:1:3::1"), "v", now).is_ok());
    }
}
