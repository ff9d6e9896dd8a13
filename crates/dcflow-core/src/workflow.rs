//! Workflows: which events start which ordered steps (`[[workflow]]` tables).
//!
//! ```toml
//! [[workflow]]
//! name = "campaign"
//! [workflow.match]
//! paths = ["raw/**/*.fits"]        # below pool + folder, or absolute ("/pnfs/...")
//! minsize = 1
//! [[workflow.step]]
//! type = "copy"                   # destination: [local] downloadfolder + the path below the folder
//! [[workflow.step]]
//! type = "delete-source"          # only after that copy was verified
//! [[workflow.step]]
//! type = "exec"
//! argv = ["sbatch", "--job-name", "{name}", "/opt/site/process.sh", "{local_path}"]
//! ```
//!
//! A configuration without `[[workflow]]` runs one implicit workflow, `copy`, over every upload
//! under `pool + folder`: the original tool's behaviour. Validation reports every problem as
//! `workflow[i].key` or `workflow[i].step[j].key`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use crate::section::{ConfigProblem, Section};

/// The placeholders a template may use, and the step kind that must come earlier for it.
const PLACEHOLDERS: &[(&str, Option<&str>)] = &[
    ("path", None),
    ("rel", None),
    ("name", None),
    ("pnfsid", None),
    ("size", None),
    ("kind", None),
    ("workflow", None),
    ("storageclass", None),
    ("owner", None),
    ("uid", None),
    ("source_url", None),
    ("local_path", Some("copy")),
    ("checksum", Some("copy")),
    ("unpacked", Some("unpack")),
    ("job_id", Some("slurm")),
];

/// The static name of a known placeholder.
pub fn placeholder(name: &str) -> Option<&'static str> {
    PLACEHOLDERS
        .iter()
        .find(|(p, _)| *p == name)
        .map(|(p, _)| *p)
}

/// A string with `{placeholder}`s, checked when the configuration is read. `{{` and `}}` are
/// literal braces. Each rendered value is substituted as is: a template is never handed to a
/// shell, so a file name cannot inject anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(String),
}

impl Template {
    /// Parses `text`; `Err` names the problem (an unknown or unclosed placeholder).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(format!("unclosed {{ in {text:?}")),
                        }
                    }
                    if !PLACEHOLDERS.iter().any(|(p, _)| *p == name) {
                        let known: Vec<&str> = PLACEHOLDERS.iter().map(|(p, _)| *p).collect();
                        return Err(format!(
                            "unknown placeholder {{{name}}} (known: {})",
                            known.join(", ")
                        ));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Field(name));
                }
                '}' => return Err(format!("unmatched }} in {text:?} (write }}}} for a brace)")),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self {
            parts,
            text: text.to_owned(),
        })
    }

    /// Fills the placeholders from `values`; a placeholder without a value is an error.
    pub fn render(&self, values: &BTreeMap<&str, String>) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Field(f) => match values.get(f.as_str()) {
                    Some(v) => out.push_str(v),
                    None => return Err(format!("{{{f}}} has no value for this event")),
                },
            }
        }
        Ok(out)
    }

    /// Placeholders that need an earlier step of the given kind.
    fn needs(&self) -> impl Iterator<Item = (&str, &'static str)> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => PLACEHOLDERS
                .iter()
                .find(|(n, _)| n == f)
                .and_then(|(_, step)| step.map(|s| (f.as_str(), s))),
            Part::Literal(_) => None,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The placeholders it uses.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f.as_str()),
            Part::Literal(_) => None,
        })
    }
}

/// What a storage event announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventKind {
    /// A completed upload (the pool's write transfer, the door's request, SRM putDone).
    Upload,
    /// A file removed from the namespace (`remove`, status 0).
    Remove,
    /// A file staged back from tape to a pool (`restore`, status 0).
    Restore,
    /// A file flushed from a pool to tape (`store`, status 0).
    Store,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Upload => "upload",
            Self::Remove => "remove",
            Self::Restore => "restore",
            Self::Store => "store",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "upload" => Some(Self::Upload),
            "remove" => Some(Self::Remove),
            "restore" | "stage" => Some(Self::Restore),
            "store" => Some(Self::Store),
            _ => None,
        }
    }
}

/// The facts of an event that rules match on.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    pub kind: EventKind,
    pub billing_path: &'a str,
    /// The path below `pool + folder`, when the event is under it.
    pub rel: Option<&'a str>,
    pub size: Option<u64>,
    /// `storageInfo`, e.g. `disk:doma@osm`.
    pub storage_info: Option<&'a str>,
    pub owner: Option<&'a str>,
    pub uid: Option<i64>,
}

/// Which events a workflow takes. Paths are globs on the path below `pool + folder`, or, when
/// they start with `/`, on the whole billing path; either way only files under `pool +
/// folder` are handled, since that is what the door serves (`url + folder + rel`).
#[derive(Debug, Clone)]
pub struct Matcher {
    pub kinds: BTreeSet<EventKind>,
    /// Globs on the path below `pool + folder`.
    relative: Option<globset::GlobSet>,
    /// Globs on the whole billing path.
    absolute: Option<globset::GlobSet>,
    pub min_size: Option<u64>,
    pub max_size: Option<u64>,
    pub storage_classes: Vec<String>,
    pub owners: Vec<String>,
    pub uids: Vec<i64>,
}

impl Matcher {
    /// Every upload under `pool + folder`: the implicit workflow.
    pub fn everything_under_folder() -> Self {
        Self {
            kinds: [EventKind::Upload].into(),
            relative: None,
            absolute: None,
            min_size: None,
            max_size: None,
            storage_classes: Vec::new(),
            owners: Vec::new(),
            uids: Vec::new(),
        }
    }

    pub fn matches(&self, f: &Facts<'_>) -> bool {
        if !self.kinds.contains(&f.kind) {
            return false;
        }
        // Only what lies under pool + folder can be fetched (url + folder + rel).
        let Some(rel) = f.rel else {
            return false;
        };
        let path_ok = match (&self.relative, &self.absolute) {
            (None, None) => true,
            (relative, absolute) => {
                relative.as_ref().is_some_and(|g| g.is_match(rel))
                    || absolute
                        .as_ref()
                        .is_some_and(|g| g.is_match(f.billing_path))
            }
        };
        if !path_ok {
            return false;
        }
        if self.min_size.is_some_and(|m| f.size.is_none_or(|s| s < m))
            || self.max_size.is_some_and(|m| f.size.is_none_or(|s| s > m))
        {
            return false;
        }
        if !self.storage_classes.is_empty() {
            let Some(info) = f.storage_info else {
                return false;
            };
            let class = info.split('@').next().unwrap_or(info);
            if !self.storage_classes.iter().any(|c| c == info || c == class) {
                return false;
            }
        }
        if !self.owners.is_empty() && !f.owner.is_some_and(|o| self.owners.iter().any(|x| x == o)) {
            return false;
        }
        if !self.uids.is_empty() && !f.uid.is_some_and(|u| self.uids.contains(&u)) {
            return false;
        }
        true
    }
}

/// How `exec` maps a program's exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitCodes {
    /// Exit statuses that mean "try again later" (default: 75, EX_TEMPFAIL).
    pub retry: Vec<i32>,
}

/// Archive formats `unpack` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// From the file name: `.tar`, `.tar.gz`/`.tgz`, `.zip`.
    Auto,
    Tar,
    TarGz,
    Zip,
}

impl ArchiveFormat {
    /// The format of `name` for [`ArchiveFormat::Auto`].
    pub fn of(self, name: &str) -> Option<Self> {
        if self != Self::Auto {
            return Some(self);
        }
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".tar.gz") || lower.ends_with(".tgz") {
            Some(Self::TarGz)
        } else if lower.ends_with(".tar") {
            Some(Self::Tar)
        } else if lower.ends_with(".zip") {
            Some(Self::Zip)
        } else {
            None
        }
    }
}

/// Body format of a `webhook` POST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookFormat {
    /// `{"event": {...}, "context": {...}}`.
    Json,
    /// A CloudEvents 1.0 structured-mode JSON event (`application/cloudevents+json`).
    CloudEvent,
}

/// One step of a workflow.
#[derive(Debug, Clone)]
pub enum Step {
    /// The verified copy. `destination` is relative to `[local] downloadfolder`; by default
    /// the path below the folder, as the original tool did.
    Copy { destination: Option<Template> },
    /// HTTP DELETE of the source at the door, only after this workflow's copy was verified.
    DeleteSource,
    /// A program run without a shell.
    Exec {
        argv: Vec<Template>,
        env: BTreeMap<String, Template>,
        timeout: Duration,
        codes: ExitCodes,
    },
    /// An HTTP POST of the event and context.
    Webhook {
        url: url::Url,
        format: WebhookFormat,
        headers: BTreeMap<String, Template>,
        /// A file holding a bearer token, re-read for each call.
        token_file: Option<std::path::PathBuf>,
        timeout: Duration,
    },
    /// The copied archive, unpacked into a directory published by one rename.
    Unpack {
        /// Relative to `[local] downloadfolder`; by default the copy's path with `.d` added.
        destination: Option<Template>,
        format: ArchiveFormat,
        limits: UnpackLimits,
    },
    /// A JSON message (event, context, workflow) to a Kafka topic of the `[kafka]` brokers.
    Produce { topic: String, key: Template },
    /// One row per file, upserted into an SQLite catalog.
    Catalog { database: std::path::PathBuf },
    /// The verified copy registered as a replica in Rucio (`[rucio]`): on `rse`, as
    /// `scope:name`, at `pfn` (required by a non-deterministic RSE), attached to `dataset`.
    Rucio {
        rse: Template,
        scope: Template,
        name: Template,
        pfn: Option<Template>,
        dataset: Option<Template>,
        /// A replication rule: an RSE expression and the number of copies.
        rule: Option<(String, u32)>,
    },
    /// A Slurm batch job, followed to its end: the step ends as the job did.
    Slurm(Box<SlurmJob>),
}

/// What the `slurm` step submits, and how many of its jobs may be in Slurm at once.
#[derive(Debug, Clone)]
pub struct SlurmJob {
    /// A batch script and its arguments (rendered templates, no shell), or
    pub script: Option<Template>,
    pub args: Vec<Template>,
    /// a command line for `sbatch --wrap` (a shell runs it, so it takes no placeholders:
    /// the job reads the file's fields from `DCFLOW_*` environment variables).
    pub wrap: Option<String>,
    pub partition: Option<String>,
    pub account: Option<String>,
    /// `--time`, as sbatch takes it (`30`, `1:00:00`, `2-00:00:00`).
    pub time: Option<String>,
    /// `--chdir` and `--output` of the job.
    pub chdir: Option<Template>,
    pub output: Option<Template>,
    /// More sbatch options, as given.
    pub options: Vec<String>,
    pub env: BTreeMap<String, Template>,
    /// Jobs of this step submitted and not yet ended, at most.
    pub max_jobs: usize,
    /// The longest wait between two looks at a waiting job.
    pub poll: Duration,
}

/// sbatch options that dcflow sets itself.
const SBATCH_OWN: &[&str] = &["--parsable", "--job-name", "-J", "--wrap"];

impl Step {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Copy { .. } => "copy",
            Self::DeleteSource => "delete-source",
            Self::Exec { .. } => "exec",
            Self::Webhook { .. } => "webhook",
            Self::Unpack { .. } => "unpack",
            Self::Produce { .. } => "produce",
            Self::Catalog { .. } => "catalog",
            Self::Rucio { .. } => "rucio",
            Self::Slurm(_) => "slurm",
        }
    }
}

/// What an archive may unpack to: past any of these, the step fails and leaves nothing (an
/// archive bomb would otherwise fill the destination file system).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// `maxbytes`: bytes of all unpacked files (default 1 TB).
    pub max_bytes: u64,
    /// `maxfiles`: entries (files, folders, links; default 100,000).
    pub max_entries: u64,
    /// `maxratio`: unpacked bytes per byte of archive (default 100).
    pub max_ratio: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1_000_000_000_000,
            max_entries: 100_000,
            max_ratio: 100,
        }
    }
}

/// A named rule and its steps.
#[derive(Debug, Clone)]
pub struct Workflow {
    pub name: String,
    pub matcher: Matcher,
    pub steps: Vec<Step>,
    /// Attempts per step before the workflow fails for this event.
    pub attempts: u32,
}

impl Workflow {
    /// The original tool's behaviour: copy every upload under the folder.
    pub fn implicit_copy(attempts: u32) -> Self {
        Self {
            name: "copy".into(),
            matcher: Matcher::everything_under_folder(),
            steps: vec![Step::Copy { destination: None }],
            attempts,
        }
    }
}

const WORKFLOW_KEYS: &[&str] = &["name", "match", "step", "attempts"];
const MATCH_KEYS: &[&str] = &[
    "kinds",
    "paths",
    "minsize",
    "maxsize",
    "storageclass",
    "owner",
    "uid",
];

/// Reads the `workflow` array of tables; problems are appended to `errs`.
pub fn parse_workflows(
    value: &toml::Value,
    default_attempts: u32,
    errs: &mut Vec<ConfigProblem>,
) -> Vec<Workflow> {
    let mut out = Vec::new();
    let Some(items) = value.as_array() else {
        errs.push(problem(
            "workflow",
            "must be an array of tables: [[workflow]]",
        ));
        return out;
    };
    let mut names = BTreeSet::new();
    for (i, item) in items.iter().enumerate() {
        // Named by its name where it has one of its own: `workflow "archive".step[0].argv`;
        // by its place otherwise: `workflow[1].name`.
        let at = match item.get("name").and_then(toml::Value::as_str) {
            Some(n) if !n.is_empty() && n.len() <= 64 && !names.contains(n) => {
                format!("workflow {n:?}")
            }
            _ => format!("workflow[{i}]"),
        };
        let Some(t) = item.as_table() else {
            errs.push(problem(&at, "must be a table"));
            continue;
        };
        let mut p = Section::new(at.clone(), Some(t), WORKFLOW_KEYS, errs);
        let name = p.string("name");
        match &name {
            None if p.get("name").is_none() => p.fail("name", "is required"),
            Some(n) if n.is_empty() || n.contains(['/', ',', '\n']) => {
                p.fail("name", "must be non-empty, without '/', ',' or newlines")
            }
            Some(n) if !names.insert(n.clone()) => {
                p.fail("name", format!("{n:?} is used by an earlier workflow"))
            }
            _ => {}
        }
        let attempts = p.int("attempts", u64::from(default_attempts), 1, 1000) as u32;
        let matcher = match t.get("match") {
            None => Some(Matcher::everything_under_folder()),
            Some(toml::Value::Table(m)) => parse_match(&format!("{at}.match"), m, p.errs()),
            Some(_) => {
                p.fail("match", "must be a table: [workflow.match]");
                None
            }
        };
        let steps = match t.get("step") {
            Some(toml::Value::Array(steps)) if !steps.is_empty() => {
                parse_steps(&at, steps, p.errs())
            }
            Some(toml::Value::Array(_)) | None => {
                p.fail("step", "at least one [[workflow.step]] is required");
                None
            }
            Some(_) => {
                p.fail("step", "must be an array of tables: [[workflow.step]]");
                None
            }
        };
        // Steps that need the file's bytes run on uploads only.
        if let (Some(m), Some(steps)) = (&matcher, &steps) {
            if m.kinds.iter().any(|k| *k != EventKind::Upload) {
                for (j, step) in steps.iter().enumerate() {
                    if matches!(
                        step,
                        Step::Copy { .. } | Step::DeleteSource | Step::Unpack { .. }
                    ) {
                        p.errs().push(problem(
                            &format!("{at}.step[{j}].type"),
                            format!(
                                "{} needs a file to fetch: its workflow must match only kinds = [\"upload\"]",
                                step.kind()
                            ),
                        ));
                    }
                }
            }
        }
        if let (Some(name), Some(matcher), Some(steps)) = (name, matcher, steps) {
            out.push(Workflow {
                name,
                matcher,
                steps,
                attempts,
            });
        }
    }
    out
}

fn parse_match(at: &str, t: &toml::Table, errs: &mut Vec<ConfigProblem>) -> Option<Matcher> {
    let before = errs.len();
    let mut p = Section::new(at, Some(t), MATCH_KEYS, errs);
    let mut kinds = BTreeSet::new();
    for (i, k) in p
        .strings("kinds")
        .unwrap_or_else(|| vec!["upload".into()])
        .iter()
        .enumerate()
    {
        match EventKind::parse(k) {
            Some(kind) => {
                kinds.insert(kind);
            }
            None => p.fail(
                &format!("kinds[{i}]"),
                format!("unknown event kind {k:?} (expected upload, remove, restore or store)"),
            ),
        }
    }
    let mut relative = globset::GlobSetBuilder::new();
    let mut absolute = globset::GlobSetBuilder::new();
    let (mut any_rel, mut any_abs) = (false, false);
    for (i, pattern) in p.strings("paths").unwrap_or_default().iter().enumerate() {
        let glob = globset::GlobBuilder::new(pattern)
            .literal_separator(true)
            .build();
        match glob {
            Ok(g) if pattern.starts_with('/') => {
                absolute.add(g);
                any_abs = true;
            }
            Ok(g) => {
                relative.add(g);
                any_rel = true;
            }
            Err(e) => p.fail(&format!("paths[{i}]"), format!("not a valid glob: {e}")),
        }
    }
    let min_size = p.opt_int("minsize", 0, i64::MAX as u64);
    let max_size = p.opt_int("maxsize", 0, i64::MAX as u64);
    if let (Some(lo), Some(hi)) = (min_size, max_size) {
        if lo > hi {
            p.fail("maxsize", format!("{hi} is below minsize {lo}"));
        }
    }
    let storage_classes = p.strings("storageclass").unwrap_or_default();
    let owners = p.strings("owner").unwrap_or_default();
    let uids = match t.get("uid") {
        None => Vec::new(),
        Some(toml::Value::Array(a)) => a
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let n = v.as_integer();
                if n.is_none() {
                    p.fail(&format!("uid[{i}]"), "must be an integer");
                }
                n
            })
            .collect(),
        Some(_) => {
            p.fail("uid", "must be an array of integers, e.g. [3915]");
            Vec::new()
        }
    };
    let build = |b: globset::GlobSetBuilder, any: bool| any.then(|| b.build().ok()).flatten();
    let matcher = Matcher {
        kinds,
        relative: build(relative, any_rel),
        absolute: build(absolute, any_abs),
        min_size,
        max_size,
        storage_classes,
        owners,
        uids,
    };
    (errs.len() == before).then_some(matcher)
}

// Long on purpose: one arm per step kind, each reading that kind's keys; splitting would spread
// the key table over many functions.
fn parse_steps(
    at: &str,
    items: &[toml::Value],
    errs: &mut Vec<ConfigProblem>,
) -> Option<Vec<Step>> {
    let before = errs.len();
    let mut steps: Vec<Step> = Vec::new();
    for (j, item) in items.iter().enumerate() {
        let at = format!("{at}.step[{j}]");
        let Some(t) = item.as_table() else {
            errs.push(problem(&at, "must be a table"));
            continue;
        };
        let known: Vec<&str> = match t.get("type").and_then(toml::Value::as_str) {
            Some("copy") => vec!["type", "destination"],
            Some("delete-source") => vec!["type"],
            Some("exec") => vec!["type", "argv", "env", "timeout", "retrycodes"],
            Some("webhook") => vec!["type", "url", "format", "headers", "tokenfile", "timeout"],
            Some("unpack") => vec![
                "type",
                "destination",
                "format",
                "maxbytes",
                "maxfiles",
                "maxratio",
            ],
            Some("produce") => vec!["type", "topic", "key"],
            Some("catalog") => vec!["type", "database"],
            Some("rucio") => vec![
                "type", "rse", "scope", "name", "pfn", "dataset", "rule", "copies",
            ],
            Some("slurm") => vec![
                "type",
                "script",
                "args",
                "wrap",
                "partition",
                "account",
                "time",
                "chdir",
                "output",
                "options",
                "env",
                "maxjobs",
                "poll",
            ],
            // An unknown or missing type is the one problem reported.
            _ => t.keys().map(String::as_str).collect(),
        };
        let mut p = Section::new(at, Some(t), &known, errs);
        let kind = p.string("type");
        let step = match kind.as_deref() {
            None => {
                if t.get("type").is_none() {
                    p.fail(
                        "type",
                        "is required: copy, delete-source, unpack, exec, webhook, produce, catalog, rucio \
                         or slurm",
                    );
                }
                None
            }
            Some("copy") => {
                let destination = p.template("destination");
                if let Some(d) = &destination {
                    if d.as_str().starts_with('/') {
                        p.fail(
                            "destination",
                            "must be relative to [local] downloadfolder, e.g. \"by-run/{name}\"",
                        );
                    }
                }
                if steps.iter().any(|s| matches!(s, Step::Copy { .. })) {
                    p.fail("type", "a workflow copies once: a second copy step");
                }
                Some(Step::Copy { destination })
            }
            Some("delete-source") => {
                if !steps.iter().any(|s| matches!(s, Step::Copy { .. })) {
                    p.fail(
                        "type",
                        "delete-source needs a copy step before it in the same workflow",
                    );
                }
                Some(Step::DeleteSource)
            }
            Some("exec") => {
                let argv = p.templates("argv");
                if argv.as_ref().is_none_or(Vec::is_empty) && t.get("argv").is_none() {
                    p.fail(
                        "argv",
                        "is required: the program and its arguments, no shell",
                    );
                }
                let env = p.template_table("env");
                let timeout = Duration::from_secs(p.int("timeout", 600, 1, 86_400 * 7));
                let retry = match t.get("retrycodes") {
                    None => vec![75],
                    Some(v) => match v.as_array() {
                        Some(a) => a
                            .iter()
                            .filter_map(|c| c.as_integer().map(|c| c as i32))
                            .collect(),
                        None => {
                            p.fail("retrycodes", "must be an array of exit statuses");
                            Vec::new()
                        }
                    },
                };
                argv.map(|argv| Step::Exec {
                    argv,
                    env,
                    timeout,
                    codes: ExitCodes { retry },
                })
            }
            Some("webhook") => {
                let url = p.string("url").and_then(|u| match url::Url::parse(&u) {
                    Ok(u) if ["http", "https"].contains(&u.scheme()) => Some(u),
                    Ok(_) => {
                        p.fail("url", "must be an http or https URL");
                        None
                    }
                    Err(e) => {
                        p.fail("url", format!("not a URL: {e}"));
                        None
                    }
                });
                if t.get("url").is_none() {
                    p.fail("url", "is required");
                }
                let format = match p.string("format").as_deref() {
                    None | Some("json") => WebhookFormat::Json,
                    Some("cloudevent") | Some("cloudevents") => WebhookFormat::CloudEvent,
                    Some(other) => {
                        p.fail(
                            "format",
                            format!("unknown format {other:?} (expected json or cloudevent)"),
                        );
                        WebhookFormat::Json
                    }
                };
                let headers = p.template_table("headers");
                let token_file = p.string("tokenfile").map(std::path::PathBuf::from);
                let timeout = Duration::from_secs(p.int("timeout", 30, 1, 3600));
                url.map(|url| Step::Webhook {
                    url,
                    format,
                    headers,
                    token_file,
                    timeout,
                })
            }
            Some("unpack") => {
                if !steps.iter().any(|s| matches!(s, Step::Copy { .. })) {
                    p.fail(
                        "type",
                        "unpack needs a copy step before it in the same workflow",
                    );
                }
                let destination = p.template("destination");
                if destination
                    .as_ref()
                    .is_some_and(|d| d.as_str().starts_with('/'))
                {
                    p.fail("destination", "must be relative to [local] downloadfolder");
                }
                let format = match p.string("format").as_deref() {
                    None | Some("auto") => ArchiveFormat::Auto,
                    Some("tar") => ArchiveFormat::Tar,
                    Some("tar.gz") | Some("tgz") => ArchiveFormat::TarGz,
                    Some("zip") => ArchiveFormat::Zip,
                    Some(other) => {
                        p.fail(
                            "format",
                            format!("unknown archive format {other:?} (auto, tar, tar.gz, zip)"),
                        );
                        ArchiveFormat::Auto
                    }
                };
                let d = UnpackLimits::default();
                let limits = UnpackLimits {
                    max_bytes: p.int("maxbytes", d.max_bytes, 1, u64::MAX >> 1),
                    max_entries: p.int("maxfiles", d.max_entries, 1, u64::MAX >> 1),
                    max_ratio: p.int("maxratio", d.max_ratio, 1, 1_000_000),
                };
                Some(Step::Unpack {
                    destination,
                    format,
                    limits,
                })
            }
            Some("produce") => {
                let topic = p.string("topic").filter(|t| !t.is_empty());
                if topic.is_none() {
                    p.fail("topic", "is required: the Kafka topic to publish to");
                }
                let key = p
                    .template("key")
                    .unwrap_or_else(|| Template::parse("{pnfsid}").expect("valid"));
                topic.map(|topic| Step::Produce { topic, key })
            }
            Some("catalog") => {
                let database = p.string("database").filter(|d| !d.is_empty());
                if database.is_none() {
                    p.fail("database", "is required: the SQLite file of the catalog");
                }
                database.map(|d| Step::Catalog { database: d.into() })
            }
            Some("rucio") => {
                let rule = p.string("rule");
                let copies = p.int("copies", 1, 1, 100) as u32;
                if t.contains_key("copies") && rule.is_none() {
                    p.fail("copies", "counts the copies of a rule: give rule too");
                }
                let rse = p.template("rse");
                if rse.is_none() {
                    p.fail("rse", "is required: the RSE that holds the replica");
                }
                let scope = p.template("scope");
                if scope.is_none() {
                    p.fail("scope", "is required: the Rucio scope, e.g. \"user.jdoe\"");
                }
                let name = p
                    .template("name")
                    .unwrap_or_else(|| Template::parse("{name}").expect("valid"));
                let pfn = p.template("pfn");
                let dataset = p.template("dataset");
                match (rse, scope) {
                    (Some(rse), Some(scope)) => Some(Step::Rucio {
                        rse,
                        scope,
                        name,
                        pfn,
                        dataset,
                        rule: rule.map(|r| (r, copies)),
                    }),
                    _ => None,
                }
            }
            Some("slurm") => parse_slurm(&mut p),
            Some(other) => {
                p.fail(
                    "type",
                    format!(
                        "unknown step {other:?} (expected copy, delete-source, unpack, exec, \
                         webhook, produce, catalog, rucio or slurm)"
                    ),
                );
                None
            }
        };
        // Placeholders that need an earlier step.
        if let Some(step) = &step {
            let earlier: BTreeSet<&str> = steps.iter().map(Step::kind).collect();
            for template in step_templates(step) {
                for (field, needs) in template.needs() {
                    if !earlier.contains(needs) {
                        p.fail(
                            "type",
                            format!("{{{field}}} needs a {needs} step before this one"),
                        );
                    }
                }
            }
        }
        if let Some(step) = step {
            steps.push(step);
        }
    }
    (errs.len() == before).then_some(steps)
}

fn step_templates(step: &Step) -> Vec<&Template> {
    match step {
        Step::Copy { destination } => destination.iter().collect(),
        Step::DeleteSource => Vec::new(),
        Step::Exec { argv, env, .. } => argv.iter().chain(env.values()).collect(),
        Step::Webhook { headers, .. } => headers.values().collect(),
        Step::Unpack { destination, .. } => destination.iter().collect(),
        Step::Produce { key, .. } => vec![key],
        Step::Catalog { .. } => Vec::new(),
        Step::Rucio {
            rse,
            scope,
            name,
            pfn,
            dataset,
            ..
        } => [rse, scope, name]
            .into_iter()
            .chain(pfn.iter())
            .chain(dataset.iter())
            .collect(),
        Step::Slurm(job) => job
            .script
            .iter()
            .chain(&job.args)
            .chain(&job.chdir)
            .chain(&job.output)
            .chain(job.env.values())
            .collect(),
    }
}

fn parse_slurm(p: &mut Section<'_>) -> Option<Step> {
    let before = p.errs().len();
    let script = p.template("script");
    let wrap = p.string("wrap");
    match (&script, &wrap) {
        (Some(_), Some(_)) => p.fail("wrap", "give script or wrap, not both"),
        (None, None) => p.fail(
            "script",
            "is required: the batch script (or `wrap`, a command line for sbatch --wrap)",
        ),
        _ => {}
    }
    if let Some(w) = &wrap {
        if let Ok(t) = Template::parse(w) {
            if let Some(field) = t.fields().next() {
                p.fail(
                    "wrap",
                    format!(
                        "a shell runs it, so it takes no placeholders ({{{field}}}): read \
                         \"$DCFLOW_{}\" in the command, or use script and args",
                        field.to_ascii_uppercase()
                    ),
                );
            }
        }
    }
    let args = p.templates("args").unwrap_or_default();
    if wrap.is_some() && !args.is_empty() {
        p.fail("args", "are the script's arguments: wrap takes none");
    }
    let options = p.strings("options").unwrap_or_default();
    for (i, o) in options.iter().enumerate() {
        let name = o.split('=').next().unwrap_or(o);
        if SBATCH_OWN.contains(&name) {
            p.fail(
                &format!("options[{i}]"),
                format!(
                    "{name} is set by dcflow (the job name finds the job again after a restart)"
                ),
            );
        }
    }
    let env = p.template_table("env");
    let job = SlurmJob {
        script,
        args,
        wrap,
        partition: p.string("partition"),
        account: p.string("account"),
        time: p.string("time"),
        chdir: p.template("chdir"),
        output: p.template("output"),
        options,
        env,
        max_jobs: p.int("maxjobs", 100, 1, 1_000_000) as usize,
        poll: Duration::from_secs(p.int("poll", 30, 1, 3600)),
    };
    (p.errs().len() == before).then(|| Step::Slurm(Box::new(job)))
}

fn problem(key: &str, what: impl Into<String>) -> ConfigProblem {
    ConfigProblem {
        key: key.to_owned(),
        problem: what.into(),
    }
}

/// Templates in a configuration table, checked as they are read.
impl Section<'_> {
    fn template(&mut self, key: &str) -> Option<Template> {
        let s = self.string(key)?;
        match Template::parse(&s) {
            Ok(t) => Some(t),
            Err(e) => {
                self.fail(key, e);
                None
            }
        }
    }

    fn templates(&mut self, key: &str) -> Option<Vec<Template>> {
        let items = self.strings(key)?;
        let mut out = Vec::new();
        for (i, s) in items.iter().enumerate() {
            match Template::parse(s) {
                Ok(t) => out.push(t),
                Err(e) => self.fail(&format!("{key}[{i}]"), e),
            }
        }
        Some(out)
    }

    fn template_table(&mut self, key: &str) -> BTreeMap<String, Template> {
        let mut out = BTreeMap::new();
        match self.get(key) {
            None => {}
            Some(toml::Value::Table(t)) => {
                for (k, v) in t {
                    match v.as_str().map(Template::parse) {
                        Some(Ok(tpl)) => {
                            out.insert(k.clone(), tpl);
                        }
                        Some(Err(e)) => self.fail(&format!("{key}.{k}"), e),
                        None => self.fail(&format!("{key}.{k}"), "must be a string"),
                    }
                }
            }
            Some(other) => {
                let found = other.type_str();
                self.fail(key, format!("must be a table of strings, found {found}"));
            }
        }
        out
    }
}

impl fmt::Display for Workflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let steps: Vec<&str> = self.steps.iter().map(Step::kind).collect();
        write!(f, "{}: {}", self.name, steps.join(" → "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Workflow>, Vec<String>> {
        let root: toml::Table = text.parse().unwrap();
        let mut errs = Vec::new();
        let w = parse_workflows(&root["workflow"], 3, &mut errs);
        if errs.is_empty() {
            Ok(w)
        } else {
            Err(errs.iter().map(ToString::to_string).collect())
        }
    }

    fn facts(rel: &str, size: u64) -> Facts<'_> {
        Facts {
            kind: EventKind::Upload,
            billing_path: rel,
            rel: Some(rel),
            size: Some(size),
            storage_info: Some("disk:doma@osm"),
            owner: None,
            uid: Some(3915),
        }
    }

    #[test]
    fn templates_render_and_refuse_unknown_placeholders() {
        let t = Template::parse("{name}.{{done}}-{pnfsid}").unwrap();
        let values = BTreeMap::from([("name", "a;b".to_owned()), ("pnfsid", "00AB".to_owned())]);
        assert_eq!(t.render(&values).unwrap(), "a;b.{done}-00AB");
        assert!(Template::parse("{nope}")
            .unwrap_err()
            .contains("unknown placeholder"));
        assert!(Template::parse("{name").unwrap_err().contains("unclosed"));
        assert!(Template::parse("a}b").unwrap_err().contains("unmatched"));
        let t = Template::parse("{local_path}").unwrap();
        assert!(t.render(&BTreeMap::new()).is_err());
    }

    #[test]
    fn rules_match_paths_sizes_classes_and_uids() {
        let w = parse(
            r#"
[[workflow]]
name = "fits"
[workflow.match]
paths = ["raw/**/*.fits", "/pnfs/x/data/*.tar"]
minsize = 10
maxsize = 100
storageclass = ["disk:doma"]
uid = [3915]
[[workflow.step]]
type = "copy"
"#,
        )
        .unwrap();
        let m = &w[0].matcher;
        assert!(m.matches(&facts("raw/2026/a.fits", 50)));
        assert!(!m.matches(&facts("raw/2026/a.txt", 50)), "glob");
        assert!(!m.matches(&facts("raw/2026/a.fits", 5)), "minsize");
        assert!(!m.matches(&facts("raw/2026/a.fits", 500)), "maxsize");
        let mut f = facts("raw/x/a.fits", 50);
        f.uid = Some(1);
        assert!(!m.matches(&f), "uid");
        let mut f = facts("raw/x/a.fits", 50);
        f.storage_info = Some("tape:cms@osm");
        assert!(!m.matches(&f), "storage class");
        let abs = Facts {
            billing_path: "/pnfs/x/data/b.tar",
            rel: Some("b.tar"),
            ..facts("", 50)
        };
        assert!(m.matches(&abs), "absolute glob");
        let outside = Facts {
            rel: None,
            ..abs.clone()
        };
        assert!(
            !m.matches(&outside),
            "not under pool + folder: cannot be fetched"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let errs = parse(
            r#"
[[workflow]]
name = "a"
colour = "blue"
[workflow.match]
kinds = ["upload", "explode"]
paths = ["[unclosed"]
minsize = 10
maxsize = 5
[[workflow.step]]
type = "delete-source"
[[workflow.step]]
type = "exec"
argv = ["echo", "{local_path}", "{bogus}"]
[[workflow.step]]
type = "webhook"
url = "ftp://x"
format = "xml"
[[workflow.step]]
type = "teleport"

[[workflow]]
name = "a"
"#,
        )
        .unwrap_err();
        let joined = errs.join("\n");
        for expected in [
            "workflow \"a\".colour: unknown key",
            "workflow \"a\".match.kinds[1]: unknown event kind \"explode\"",
            "workflow \"a\".match.paths[0]: not a valid glob",
            "workflow \"a\".match.maxsize: 5 is below minsize 10",
            "workflow \"a\".step[0].type: delete-source needs a copy step",
            "workflow \"a\".step[1].argv[2]: unknown placeholder {bogus}",
            "workflow \"a\".step[2].url: must be an http or https URL",
            "workflow \"a\".step[2].format: unknown format",
            "workflow \"a\".step[3].type: unknown step \"teleport\"",
            "workflow[1].name: \"a\" is used by an earlier workflow",
            "workflow[1].step: at least one",
        ] {
            assert!(
                joined.contains(expected),
                "missing {expected:?} in\n{joined}"
            );
        }
    }

    #[test]
    fn placeholders_of_a_later_step_are_refused() {
        let errs = parse(
            r#"
[[workflow]]
name = "early"
[[workflow.step]]
type = "exec"
argv = ["echo", "{checksum}"]
[[workflow.step]]
type = "copy"
"#,
        )
        .unwrap_err();
        assert!(
            errs[0].contains("{checksum} needs a copy step before this one"),
            "{errs:?}"
        );
    }
}
