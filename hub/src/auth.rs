//! Which gateways may connect: an allow-list of gateway ids and a revocation list, both
//! optional, both checked against the id taken from the verified client certificate.
//!
//! The files are read at start and re-read when they change (checked every second by
//! [`Auth::reload_if_changed`]); a change is announced on [`Auth::subscribe`], so that
//! live sessions of a gateway that is now revoked or no longer allowed close at once.
//! A file that cannot be read or parsed on reload keeps the last good list and is
//! logged; at start it is an error.
//!
//! File format: one gateway id per line; blank lines and `#` comments are ignored.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use tokio::sync::watch;

use crate::config::AuthSection;

/// An auth file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{key} {path}: {problem}")]
pub struct AuthError {
    /// The config key naming the file.
    pub key: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub problem: String,
}

/// Why a gateway is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its id is in the revocation list.
    Revoked,
    /// Its id is not in the allow-list.
    NotAllowed,
}

impl Refused {
    /// Short reason, for logs, metrics and the close frame.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Revoked => "revoked",
            Refused::NotAllowed => "not_allowed",
        }
    }
}

/// Modification time and size of a file (None: missing), to notice changes.
pub type Stamp = Option<(Option<SystemTime>, u64)>;

#[derive(Debug, Default)]
struct Lists {
    /// None: no id list (see [`Auth::check`]).
    allowed: Option<HashSet<String>>,
    revoked: HashSet<String>,
    allowed_stamp: Stamp,
    revoked_stamp: Stamp,
}

/// The allow-list and the revocation list.
#[derive(Debug)]
pub struct Auth {
    cfg: AuthSection,
    /// The CAs of `allowed_issuers`.
    issuers: Vec<crate::tls::IssuerKey>,
    lists: RwLock<Lists>,
    changed: watch::Sender<u64>,
}

/// The [`Stamp`] of `p` now.
pub fn stamp(p: &Path) -> Stamp {
    std::fs::metadata(p).ok().map(|m| (m.modified().ok(), m.len()))
}

fn read_ids(key: &'static str, path: &Path) -> Result<HashSet<String>, AuthError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| AuthError { key, path: path.into(), problem: e.to_string() })?;
    let mut ids = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let id = line.split('#').next().unwrap_or("").trim();
        if id.is_empty() {
            continue;
        }
        if !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(AuthError {
                key,
                path: path.into(),
                problem: format!("line {}: {id:?} is not a gateway id", n + 1),
            });
        }
        ids.insert(id.to_owned());
    }
    Ok(ids)
}

impl Auth {
    /// Reads the lists named in `[auth]`.
    pub fn new(cfg: &AuthSection) -> Result<Self, AuthError> {
        let mut issuers = Vec::new();
        for p in &cfg.allowed_issuers {
            issuers.extend(crate::tls::issuer_keys(p).map_err(|e| AuthError {
                key: "auth.allowed_issuers",
                path: p.clone(),
                problem: e.to_string(),
            })?);
        }
        let auth = Self { cfg: cfg.clone(), issuers, lists: RwLock::default(), changed: watch::channel(0).0 };
        {
            let mut l = auth.lists.write().expect("auth lock");
            l.allowed = auth.allowed_now()?;
            l.allowed_stamp = cfg.allowed_gateways_file.as_deref().and_then(stamp);
            if let Some(p) = &cfg.revoked_file {
                // A revocation list that does not exist yet is an empty one: operators
                // create it when they first revoke.
                l.revoked_stamp = stamp(p);
                if l.revoked_stamp.is_some() {
                    l.revoked = read_ids("auth.revoked_file", p)?;
                }
            }
        }
        Ok(auth)
    }

    fn allowed_now(&self) -> Result<Option<HashSet<String>>, AuthError> {
        let mut set: Option<HashSet<String>> =
            (!self.cfg.allowed_gateways.is_empty()).then(|| self.cfg.allowed_gateways.iter().cloned().collect());
        if let Some(p) = &self.cfg.allowed_gateways_file {
            set.get_or_insert_with(HashSet::new).extend(read_ids("auth.allowed_gateways_file", p)?);
        }
        Ok(set)
    }

    /// May `gateway`, with the verified certificate `cert` (DER), connect?
    ///
    /// Revoked ids never. Otherwise, with no allow rule configured, yes; with id lists
    /// or `allowed_issuers`, when any of them allows it.
    pub fn check(&self, gateway: &str, cert: &[u8]) -> Result<(), Refused> {
        let l = self.lists.read().expect("auth lock");
        if l.revoked.contains(gateway) {
            return Err(Refused::Revoked);
        }
        if l.allowed.is_none() && self.issuers.is_empty() {
            return Ok(());
        }
        let by_id = l.allowed.as_ref().is_some_and(|a| a.contains(gateway));
        let by_issuer = self.issuers.iter().any(|i| crate::tls::issued_by(cert, i));
        if by_id || by_issuer {
            Ok(())
        } else {
            Err(Refused::NotAllowed)
        }
    }

    /// Announces every change of the lists.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Re-reads the files that changed; true when a list changed.
    pub fn reload_if_changed(&self) -> bool {
        let mut changed = false;
        if let Some(p) = self.cfg.allowed_gateways_file.clone() {
            let now = stamp(&p);
            if now != self.lists.read().expect("auth lock").allowed_stamp {
                match self.allowed_now() {
                    Ok(a) => {
                        let mut l = self.lists.write().expect("auth lock");
                        l.allowed = a;
                        l.allowed_stamp = now;
                        changed = true;
                        tracing::info!(file = %p.display(), allowed = l.allowed.as_ref().map_or(0, HashSet::len), "Allow-list reloaded.");
                    }
                    Err(e) => {
                        self.lists.write().expect("auth lock").allowed_stamp = now;
                        tracing::error!(error = %e, "Allow-list unusable; keeping the last good one.");
                    }
                }
            }
        }
        if let Some(p) = self.cfg.revoked_file.clone() {
            let now = stamp(&p);
            if now != self.lists.read().expect("auth lock").revoked_stamp {
                let read = if now.is_some() { read_ids("auth.revoked_file", &p) } else { Ok(HashSet::new()) };
                match read {
                    Ok(r) => {
                        let mut l = self.lists.write().expect("auth lock");
                        tracing::info!(file = %p.display(), revoked = r.len(), "Revocation list reloaded.");
                        l.revoked = r;
                        l.revoked_stamp = now;
                        changed = true;
                    }
                    Err(e) => {
                        self.lists.write().expect("auth lock").revoked_stamp = now;
                        tracing::error!(error = %e, "Revocation list unusable; keeping the last good one.");
                    }
                }
            }
        }
        if changed {
            self.changed.send_modify(|g| *g += 1);
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_read_checked_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("allowed.txt");
        let revoked = dir.path().join("revoked.txt");
        std::fs::write(&allowed, "# site A\ngw-1\ngw-2  # spare\n\n").unwrap();
        let cfg = AuthSection {
            allowed_gateways: vec!["gw-9".into()],
            allowed_gateways_file: Some(allowed.clone()),
            revoked_file: Some(revoked.clone()),
            allowed_issuers: vec![],
        };
        let auth = Auth::new(&cfg).unwrap();
        assert_eq!(auth.check("gw-1", b""), Ok(()));
        assert_eq!(auth.check("gw-9", b""), Ok(()), "ids from the config and the file both count");
        assert_eq!(auth.check("gw-3", b""), Err(Refused::NotAllowed));
        let rx = auth.subscribe();
        assert!(!auth.reload_if_changed());
        std::fs::write(&revoked, "gw-2\n").unwrap();
        assert!(auth.reload_if_changed());
        assert!(rx.has_changed().unwrap());
        assert_eq!(auth.check("gw-2", b""), Err(Refused::Revoked));
        // A broken file keeps the last good list.
        std::fs::write(&revoked, "gw-2\nnot an id!\n").unwrap();
        assert!(!auth.reload_if_changed());
        assert_eq!(auth.check("gw-2", b""), Err(Refused::Revoked));
        std::fs::remove_file(&revoked).unwrap();
        assert!(auth.reload_if_changed());
        assert_eq!(auth.check("gw-2", b""), Ok(()));
        let e = Auth::new(&AuthSection { allowed_gateways_file: Some(dir.path().join("nope")), ..cfg }).unwrap_err();
        assert!(e.to_string().contains("auth.allowed_gateways_file"), "{e}");
    }
}
