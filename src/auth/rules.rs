//! The per-repository rules: the first rule whose glob matches a repository decides, and a
//! repository that no rule matches is denied to everyone (so adding a repository never opens it
//! by accident).

use globset::{GlobBuilder, GlobMatcher};

use super::{Action, Principal};
use crate::config::auth::RuleConfig;

/// Who a rule entry names.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Who {
    /// `anonymous`: everyone, with or without credentials (a user never has fewer rights than
    /// an anonymous client).
    Everyone,
    /// `authenticated`: any client whose credentials were verified.
    Authenticated,
    User(String),
}

impl Who {
    fn parse(s: &str) -> Who {
        match s {
            "anonymous" => Who::Everyone,
            "authenticated" => Who::Authenticated,
            name => Who::User(name.to_string()),
        }
    }

    fn admits(&self, p: &Principal) -> bool {
        match (self, p) {
            (Who::Everyone, _) => true,
            (Who::Authenticated, Principal::User(_)) => true,
            (Who::User(n), Principal::User(u)) => n == u,
            _ => false,
        }
    }
}

#[derive(Debug)]
struct Rule {
    repos: GlobMatcher,
    pull: Vec<Who>,
    push: Vec<Who>,
    delete: Vec<Who>,
}

impl Rule {
    fn who(&self, a: Action) -> &[Who] {
        match a {
            Action::Pull => &self.pull,
            Action::Push => &self.push,
            Action::Delete => &self.delete,
        }
    }
}

/// The compiled `auth.rules`.
#[derive(Debug, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// Compiles the rules; a bad glob names its rule (config validation catches it first).
    pub fn new(cfg: &[RuleConfig]) -> Result<Rules, String> {
        let mut rules = Vec::with_capacity(cfg.len());
        for (i, r) in cfg.iter().enumerate() {
            let glob = GlobBuilder::new(&r.repos)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("auth.rules[{i}].repos: {e}"))?;
            let parse = |v: &[String]| v.iter().map(|s| Who::parse(s)).collect();
            rules.push(Rule {
                repos: glob.compile_matcher(),
                pull: parse(&r.pull),
                push: parse(&r.push),
                delete: parse(&r.delete),
            });
        }
        Ok(Rules { rules })
    }

    /// Whether `who` may do `action` on `repo` (the repository's stored name).
    pub fn allows(&self, repo: &str, action: Action, who: &Principal) -> bool {
        match self.rules.iter().find(|r| r.repos.is_match(repo)) {
            Some(r) => r.who(action).iter().any(|w| w.admits(who)),
            None => false,
        }
    }

    /// Whether any rule grants `who` anything: decides `/v2/`'s 200 or 401, as registries
    /// answer it for a client that may do something somewhere.
    pub fn grants_anything(&self, who: &Principal) -> bool {
        self.rules.iter().any(|r| {
            [Action::Pull, Action::Push, Action::Delete]
                .iter()
                .any(|a| r.who(*a).iter().any(|w| w.admits(who)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(repos: &str, pull: &[&str], push: &[&str]) -> RuleConfig {
        RuleConfig {
            repos: repos.into(),
            pull: pull.iter().map(|s| s.to_string()).collect(),
            push: push.iter().map(|s| s.to_string()).collect(),
            delete: vec![],
        }
    }

    #[test]
    fn first_match_wins_and_no_match_denies() {
        let r = Rules::new(&[
            rule("library/**", &["anonymous"], &[]),
            rule("team/secret/*", &["alice"], &["alice"]),
            rule("team/**", &["authenticated"], &["alice", "ci"]),
        ])
        .unwrap();
        let anon = Principal::Anonymous;
        let alice = Principal::User("alice".into());
        let bob = Principal::User("bob".into());
        assert!(r.allows("library/alpine", Action::Pull, &anon));
        assert!(r.allows("library/a/b", Action::Pull, &bob));
        assert!(!r.allows("library/alpine", Action::Push, &alice));
        assert!(r.allows("team/app", Action::Pull, &bob));
        assert!(!r.allows("team/app", Action::Pull, &anon));
        assert!(r.allows("team/app", Action::Push, &alice));
        assert!(!r.allows("team/app", Action::Push, &bob));
        // The narrower rule comes first and wins, though the broader one would admit bob.
        assert!(!r.allows("team/secret/x", Action::Pull, &bob));
        // `*` stays within a component.
        assert!(r.allows("team/secret/x/y", Action::Pull, &bob));
        assert!(!r.allows("other/app", Action::Pull, &alice));
        assert!(r.grants_anything(&anon));
        let none = Rules::new(&[rule("team/**", &["alice"], &[])]).unwrap();
        assert!(!none.grants_anything(&anon));
        assert!(!none.grants_anything(&bob));
        assert!(none.grants_anything(&alice));
    }
}
