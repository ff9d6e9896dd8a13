//! The raw walk over a configuration's TOML: typed access to one table that records every
//! problem under its `section.key`, so that all of them are reported at once. Used by both
//! the configuration (`config`) and the workflow rules (`workflow`): neither imports the
//! other's parsing.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;

/// One problem in a configuration file, naming its key (`section.key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub problem: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)
    }
}

pub(crate) fn problem(key: &str, what: impl Into<String>) -> ConfigProblem {
    ConfigProblem {
        key: key.to_owned(),
        problem: what.into(),
    }
}

/// Typed access to one table that records every problem under `section.key` (the section
/// may be nested: `workflow[0].step[1]`).
pub(crate) struct Section<'a> {
    pub(crate) name: String,
    pub(crate) table: Option<&'a toml::Table>,
    pub(crate) errs: &'a mut Vec<ConfigProblem>,
}

impl<'a> Section<'a> {
    /// Reports every key of `table` not in `known`.
    pub(crate) fn new(
        name: impl Into<String>,
        table: Option<&'a toml::Table>,
        known: &[&str],
        errs: &'a mut Vec<ConfigProblem>,
    ) -> Self {
        let name = name.into();
        if let Some(t) = table {
            let known: BTreeSet<&str> = known.iter().copied().collect();
            for key in t.keys().filter(|k| !known.contains(k.as_str())) {
                let hint = match closest(key, known.iter().copied()) {
                    Some(k) => format!("unknown key (did you mean {k}?)"),
                    None => format!(
                        "unknown key (the keys of [{name}]: {})",
                        known.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                };
                errs.push(problem(&format!("{name}.{key}"), hint));
            }
        }
        Self { name, table, errs }
    }

    pub(crate) fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.name)
    }

    /// Where problems go, for tables nested in this one.
    pub(crate) fn errs(&mut self) -> &mut Vec<ConfigProblem> {
        self.errs
    }

    pub(crate) fn fail(&mut self, key: &str, what: impl Into<String>) {
        let k = self.key(key);
        self.errs.push(problem(&k, what));
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a toml::Value> {
        self.table.and_then(|t| t.get(key))
    }

    pub(crate) fn string(&mut self, key: &str) -> Option<String> {
        match self.get(key)? {
            toml::Value::String(s) => Some(s.clone()),
            other => {
                self.fail(key, format!("must be a string, found {}", other.type_str()));
                None
            }
        }
    }

    pub(crate) fn required_string(&mut self, key: &str) -> Option<String> {
        let v = self.string(key);
        if v.is_none() && self.get(key).is_none() {
            self.fail(key, "is required");
        }
        v.filter(|s| !s.is_empty()).or_else(|| {
            if self.get(key).is_some_and(|v| v.as_str() == Some("")) {
                self.fail(key, "must not be empty");
            }
            None
        })
    }

    /// A positive integer (seconds, counts) within `min..=max`.
    pub(crate) fn int(&mut self, key: &str, default: u64, min: u64, max: u64) -> u64 {
        self.opt_int(key, min, max).unwrap_or(default)
    }

    /// An optional integer within `min..=max`.
    pub(crate) fn opt_int(&mut self, key: &str, min: u64, max: u64) -> Option<u64> {
        match self.get(key)? {
            toml::Value::Integer(i) if (min as i128..=max as i128).contains(&(*i as i128)) => {
                Some(*i as u64)
            }
            toml::Value::Integer(i) => {
                self.fail(key, format!("{i} is out of range {min}..={max}"));
                None
            }
            other => {
                self.fail(
                    key,
                    format!("must be an integer, found {}", other.type_str()),
                );
                None
            }
        }
    }

    pub(crate) fn boolean(&mut self, key: &str, default: bool) -> bool {
        match self.get(key) {
            None => default,
            Some(toml::Value::Boolean(b)) => *b,
            Some(other) => {
                self.fail(
                    key,
                    format!("must be true or false, found {}", other.type_str()),
                );
                default
            }
        }
    }

    pub(crate) fn strings(&mut self, key: &str) -> Option<Vec<String>> {
        match self.get(key)? {
            toml::Value::Array(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item.as_str() {
                        Some(s) => out.push(s.to_owned()),
                        None => self.fail(&format!("{key}[{i}]"), "must be a string"),
                    }
                }
                Some(out)
            }
            other => {
                self.fail(
                    key,
                    format!("must be an array of strings, found {}", other.type_str()),
                );
                None
            }
        }
    }

    pub(crate) fn path(&mut self, key: &str) -> Option<PathBuf> {
        self.string(key).and_then(|s| {
            if s.is_empty() {
                self.fail(key, "must not be empty");
                None
            } else {
                Some(PathBuf::from(s))
            }
        })
    }
}

/// The known name nearest to `typed`, if it is near enough to be what was meant: at most a
/// third of its letters wrong (`maxdownload` → `maxdownloads`, `retrytime` → `retrytimes`).
pub(crate) fn closest<'a>(typed: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let typed = typed.to_ascii_lowercase();
    known
        .map(|k| (edit_distance(&typed, k), k))
        // Distance 0 is a key written in other case: keys are case-sensitive.
        .filter(|&(d, k)| d <= (k.len().max(typed.len()) / 3).max(1))
        .min()
        .map(|(_, k)| k)
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_near_miss_names_the_key_that_was_meant() {
        let keys = [
            "maxdownloads",
            "retrytimes",
            "retryseconds",
            "timeout",
            "stalltimeout",
        ];
        assert_eq!(
            closest("maxdownload", keys.iter().copied()),
            Some("maxdownloads")
        );
        assert_eq!(
            closest("MaxDownloads", keys.iter().copied()),
            Some("maxdownloads")
        );
        assert_eq!(
            closest("retrytime", keys.iter().copied()),
            Some("retrytimes")
        );
        assert_eq!(
            closest("stall_timeout", keys.iter().copied()),
            Some("stalltimeout")
        );
        assert_eq!(closest("colour", keys.iter().copied()), None);
    }
}
