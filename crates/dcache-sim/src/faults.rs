//! Fault injection, per door path: what a real dCache, its network or its pools do wrong.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One kind of misbehaviour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Fault {
    /// Door GET and HEAD answer this status (500, 503, 429, 401, 403, 404...).
    Status { code: u16 },
    /// Door GET: the connection is dropped without an answer.
    Reset,
    /// Door GET: never answered (the request hangs).
    Hang,
    /// Door GET: redirected to the pool over plain http (a downgrade clients must refuse).
    RedirectHttp,
    /// Pool GET: the body stops after `at` bytes and the connection is cut.
    Truncate { at: u64 },
    /// Pool GET: after `at` bytes, nothing for `seconds`, then the rest.
    Stall { at: u64, seconds: u64 },
    /// Pool GET: the byte at offset `at` is flipped on the wire.
    FlipByte { at: u64 },
    /// HEAD and GET advertise a wrong adler32 (and md5) in `Digest`.
    WrongDigest,
    /// Pool GET: at most `bytes_per_second`.
    SlowLink { bytes_per_second: u64 },
    /// Upload-directory (SRM) flow: the billing messages name a transfer path under
    /// `/upload/`, and the file answers 404 at its billing path until `seconds` after the
    /// upload (dCache issue #5285).
    UploadDir { seconds: u64 },
    /// Door PROPFIND answers this status (a listing that fails).
    ListStatus { code: u16 },
}

impl Fault {
    /// Where the fault acts.
    pub fn stage(&self) -> Stage {
        match self {
            Fault::Status { .. } | Fault::Reset | Fault::Hang | Fault::RedirectHttp => Stage::Door,
            Fault::Truncate { .. }
            | Fault::Stall { .. }
            | Fault::FlipByte { .. }
            | Fault::SlowLink { .. } => Stage::Pool,
            Fault::WrongDigest => Stage::Digest,
            Fault::UploadDir { .. } => Stage::Upload,
            Fault::ListStatus { .. } => Stage::List,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Door,
    Pool,
    Digest,
    Upload,
    List,
}

/// A fault on a path, for a number of requests (`times`) or for ever.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRule {
    /// Door path (`/lsst/a/b`); a trailing `*` matches a prefix.
    pub path: String,
    pub fault: Fault,
    /// How many requests it affects; absent = all.
    #[serde(default)]
    pub times: Option<u32>,
}

impl FaultRule {
    fn matches(&self, path: &str) -> bool {
        match self.path.strip_suffix('*') {
            Some(prefix) => path.starts_with(prefix),
            None => self.path == path,
        }
    }
}

#[derive(Default)]
pub struct Faults {
    rules: Mutex<Vec<FaultRule>>,
    /// How many times each (path, stage) fault fired.
    fired: Mutex<HashMap<String, u32>>,
}

impl Faults {
    pub fn add(&self, rule: FaultRule) {
        self.rules.lock().expect("faults").push(rule);
    }

    pub fn clear(&self) {
        self.rules.lock().expect("faults").clear();
    }

    /// Takes one use of the first rule for `path` at `stage`, if any.
    pub fn take(&self, path: &str, stage: Stage) -> Option<Fault> {
        let mut rules = self.rules.lock().expect("faults");
        let idx = rules
            .iter()
            .position(|r| r.fault.stage() == stage && r.matches(path) && r.times != Some(0))?;
        let rule = &mut rules[idx];
        if let Some(t) = rule.times.as_mut() {
            *t -= 1;
        }
        *self
            .fired
            .lock()
            .expect("fired")
            .entry(path.to_owned())
            .or_default() += 1;
        Some(rule.fault.clone())
    }

    /// Looks without using it up (for upload-time faults).
    pub fn peek(&self, path: &str, stage: Stage) -> Option<Fault> {
        let rules = self.rules.lock().expect("faults");
        rules
            .iter()
            .find(|r| r.fault.stage() == stage && r.matches(path))
            .map(|r| r.fault.clone())
    }

    pub fn fired(&self, path: &str) -> u32 {
        self.fired
            .lock()
            .expect("fired")
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_used_up() {
        let f = Faults::default();
        f.add(FaultRule {
            path: "/a/*".into(),
            fault: Fault::Status { code: 503 },
            times: Some(2),
        });
        assert_eq!(
            f.take("/a/x", Stage::Door),
            Some(Fault::Status { code: 503 })
        );
        assert_eq!(f.take("/a/x", Stage::Pool), None);
        assert_eq!(f.take("/b/x", Stage::Door), None);
        assert!(f.take("/a/y", Stage::Door).is_some());
        assert_eq!(f.take("/a/x", Stage::Door), None);
        assert_eq!(f.fired("/a/x"), 1);
        let json = r#"{"path":"/x","fault":{"kind":"stall","at":10,"seconds":5}}"#;
        let rule: FaultRule = serde_json::from_str(json).unwrap();
        assert_eq!(rule.fault, Fault::Stall { at: 10, seconds: 5 });
    }
}
