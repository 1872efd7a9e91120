//! What a token from `/token` grants.

use super::token::AccessEntry;
use super::{Action, Auth, Creds, Grant, Local, Principal, Refusal, Target};
use crate::error::Error;

impl Auth {
    /// What a token for `creds` asking for `wanted` grants: each requested action the rules
    /// (and, for pulls of passthrough content, the upstream) allow. Wrong credentials are a 401,
    /// not an empty token: the client must learn its password is wrong.
    pub async fn grant(
        &self,
        creds: Option<&Creds>,
        wanted: &[(Target<'_>, Vec<Action>)],
    ) -> Result<Grant, Refusal> {
        let (local, failed) = match creds {
            Some(c) => match self.local_user(c).await? {
                Local::User(u) => (Some(u), None),
                Local::Not(failed) => (None, failed),
            },
            None => (None, None),
        };
        let granted = self.grant_to(creds, local, wanted).await;
        if let Some(c) = creds {
            // Not a local user's password: a failure unless an upstream vouched for it.
            let refused = matches!(granted, Err(Refusal::Unauthorized { .. }));
            self.settle(failed, c, !refused);
        }
        granted
    }

    async fn grant_to(
        &self,
        creds: Option<&Creds>,
        local: Option<String>,
        wanted: &[(Target<'_>, Vec<Action>)],
    ) -> Result<Grant, Refusal> {
        let local_who = local.clone().map_or(Principal::Anonymous, Principal::User);
        let mut vouched = false;
        let mut access: Vec<AccessEntry> = Vec::new();
        for (t, actions) in wanted {
            let mut ok: Vec<String> = Vec::new();
            for a in actions {
                let allowed = match self.gate(t, *a) {
                    Some(g) => {
                        let opens = self.passthrough.opens(g, t.upstream_repo, creds).await?;
                        vouched |= opens && creds.is_some();
                        let who =
                            creds.map_or(Principal::Anonymous, |c| Principal::User(c.user.clone()));
                        opens && self.rules.allows(t.repo.as_str(), *a, &who)
                    }
                    None => self.rules.allows(t.repo.as_str(), *a, &local_who),
                };
                if allowed && !ok.iter().any(|x| x == a.as_str()) {
                    ok.push(a.as_str().to_string());
                }
            }
            if ok.is_empty() {
                continue;
            }
            match access.iter_mut().find(|e| e.name == t.repo.as_str()) {
                Some(e) => {
                    for a in ok {
                        if !e.actions.contains(&a) {
                            e.actions.push(a);
                        }
                    }
                }
                None => access.push(AccessEntry {
                    kind: "repository".into(),
                    name: t.repo.to_string(),
                    actions: ok,
                }),
            }
        }
        let (sub, idp) = match creds {
            None => (String::new(), None),
            Some(c) if local.is_some() => (c.user.clone(), Some("htpasswd")),
            Some(c) if vouched => (c.user.clone(), Some("upstream")),
            Some(c) if wanted.is_empty() && self.upstream_login(c).await? => {
                (c.user.clone(), Some("upstream"))
            }
            Some(_) => {
                return Err(Refusal::Unauthorized {
                    message: "invalid username or password".into(),
                    scope: None,
                    error: None,
                })
            }
        };
        let scope = access
            .iter()
            .map(|e| format!("repository:{}:{}", e.name, e.actions.join(",")))
            .collect::<Vec<_>>()
            .join(" ");
        let token = self
            .keys
            .issue(&sub, idp, access)
            .map_err(|e| Refusal::Failed(Error::Config(format!("cannot sign a token: {e}"))))?;
        Ok(Grant {
            token,
            expires_in: self.keys.ttl(),
            scope,
        })
    }
}
