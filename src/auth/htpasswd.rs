//! The htpasswd file: `user:bcrypt-hash` lines as `htpasswd -B` writes them. Only bcrypt is
//! accepted (the other htpasswd formats are fast hashes or plain text). The file is re-read when
//! its modification time changes, so users are added and removed without a restart.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// How often the file's modification time is looked at.
const RECHECK: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Loaded {
    users: Arc<HashMap<String, String>>,
    /// A hash of the file's cost, checked for unknown users so that the answer takes as long as
    /// for a known one (no user enumeration by timing).
    dummy: Arc<String>,
    mtime: Option<SystemTime>,
    checked: Instant,
}

#[derive(Debug)]
pub struct Htpasswd {
    path: PathBuf,
    state: RwLock<Loaded>,
}

/// Parses the file's text: `user:hash` per line, `#` comments and blank lines skipped.
pub fn parse(text: &str) -> Result<HashMap<String, String>, String> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            return Err(format!("line {}: expected user:hash", i + 1));
        };
        let bcrypt = ["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p));
        if !bcrypt || hash.parse::<bcrypt::HashParts>().is_err() {
            return Err(format!(
                "line {}: user {user:?}: only bcrypt entries are accepted (htpasswd -B)",
                i + 1
            ));
        }
        if user.is_empty() || user == "anonymous" || user == "authenticated" {
            return Err(format!(
                "line {}: {user:?} is not a usable user name",
                i + 1
            ));
        }
        users.insert(user.to_string(), hash.to_string());
    }
    Ok(users)
}

fn load(path: &PathBuf) -> Result<Loaded, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let users = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let cost = users
        .values()
        .next()
        .and_then(|h| h.parse::<bcrypt::HashParts>().ok())
        .map(|p| p.get_cost())
        .unwrap_or(bcrypt::DEFAULT_COST);
    let dummy = bcrypt::hash("ociedge-no-such-user", cost).map_err(|e| e.to_string())?;
    Ok(Loaded {
        users: Arc::new(users),
        dummy: Arc::new(dummy),
        mtime,
        checked: Instant::now(),
    })
}

impl Htpasswd {
    /// Reads the file; errors name the file and the line.
    pub fn open(path: &str) -> Result<Htpasswd, String> {
        let path = PathBuf::from(path);
        let state = load(&path)?;
        Ok(Htpasswd {
            path,
            state: RwLock::new(state),
        })
    }

    /// Re-reads the file when it changed. A file that became unreadable or invalid keeps the
    /// last good contents (and says so in the log) rather than locking everyone out.
    /// Returns whether the users changed.
    fn refresh(&self) -> bool {
        let due = self
            .state
            .read()
            .map(|s| s.checked.elapsed() >= RECHECK)
            .unwrap_or(false);
        if !due {
            return false;
        }
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let Ok(mut s) = self.state.write() else {
            return false;
        };
        s.checked = Instant::now();
        if mtime == s.mtime {
            return false;
        }
        match load(&self.path) {
            Ok(new) => {
                tracing::info!(path = %self.path.display(), users = new.users.len(), "htpasswd reloaded");
                *s = new;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "htpasswd not reloaded; keeping the previous users");
                s.mtime = mtime;
                false
            }
        }
    }

    /// Whether `password` is `user`'s. bcrypt is slow on purpose, so it runs off the async
    /// threads. The second value says the file changed since the last call (cached answers
    /// must then be dropped).
    pub async fn verify(&self, user: &str, password: &str) -> (bool, bool) {
        let changed = self.refresh();
        let (users, dummy) = match self.state.read() {
            Ok(s) => (s.users.clone(), s.dummy.clone()),
            Err(_) => return (false, changed),
        };
        let (hash, known) = match users.get(user) {
            Some(h) => (h.clone(), true),
            None => (dummy.to_string(), false),
        };
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false);
        (ok && known, changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bcrypt_entries_verify_and_others_are_refused() {
        let h = bcrypt::hash("pw", 4).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("htpasswd");
        std::fs::write(&f, format!("# users\nalice:{h}\n\n")).unwrap();
        let ht = Htpasswd::open(f.to_str().unwrap()).unwrap();
        assert_eq!(ht.verify("alice", "pw").await, (true, false));
        assert!(!ht.verify("alice", "nope").await.0);
        assert!(!ht.verify("bob", "pw").await.0);

        // Edited in place: re-read once the recheck interval has passed; a broken edit keeps
        // the last good users.
        let hb = bcrypt::hash("bpw", 4).unwrap();
        std::fs::write(&f, format!("bob:{hb}\n")).unwrap();
        tokio::time::sleep(RECHECK + Duration::from_millis(100)).await;
        assert_eq!(ht.verify("bob", "bpw").await, (true, true));
        assert!(!ht.verify("alice", "pw").await.0);
        std::fs::write(&f, "garbage\n").unwrap();
        tokio::time::sleep(RECHECK + Duration::from_millis(100)).await;
        assert_eq!(ht.verify("bob", "bpw").await, (true, false));

        let e = parse("bob:$apr1$abc$def\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("htpasswd -B"), "{e}");
        assert!(parse("plain\n").unwrap_err().contains("user:hash"));
        assert!(parse(&format!("anonymous:{h}\n")).is_err());
    }
}
