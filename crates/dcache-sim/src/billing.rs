//! Billing messages in dCache's wire format (dCache's `*MessageSerializer` classes, org.json):
//! keys in arbitrary order, absent for null, `VERSION` on doors and `version` elsewhere, dates
//! from `ISO_OFFSET_DATE_TIME` (variable fraction), doubles from Java's `Double.toString`
//! (`1.8710797E8`), `isWrite` as `"write"`/`"read"`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use rand::seq::SliceRandom;
use serde::Serialize;
use time::OffsetDateTime;

/// One JSON object whose key order is shuffled when written, like Java's `HashMap`.
/// Values are kept as JSON text, so that doubles can be written as Java writes them.
#[derive(Default)]
pub struct Msg {
    fields: Vec<(String, String)>,
}

impl Msg {
    pub fn put(mut self, key: &str, value: impl Serialize) -> Self {
        let json = serde_json::to_string(&value).expect("serialisable");
        if json == "null" {
            // org.json: put(k, null) removes the key.
            return self;
        }
        self.fields.push((key.to_owned(), json));
        self
    }
    /// A Java `double`, printed as `Double.toString` does.
    pub fn put_double(mut self, key: &str, value: f64) -> Self {
        self.fields.push((key.to_owned(), java_double(value)));
        self
    }
    pub fn put_msg(mut self, key: &str, value: Msg) -> Self {
        self.fields.push((key.to_owned(), value.to_json()));
        self
    }
    pub fn to_json(&self) -> String {
        let mut order: Vec<usize> = (0..self.fields.len()).collect();
        order.shuffle(&mut rand::thread_rng());
        let mut out = String::from("{");
        for (n, i) in order.into_iter().enumerate() {
            let (k, v) = &self.fields[i];
            if n > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(k).expect("string"));
            out.push(':');
            out.push_str(v);
        }
        out.push('}');
        out
    }
}

/// Java's `Double.toString`: plain with at least one decimal in [1e-3, 1e7), else
/// `d.dddE<n>`.
pub fn java_double(v: f64) -> String {
    let abs = v.abs();
    if v == 0.0 || (1e-3..1e7).contains(&abs) {
        let s = format!("{v}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let s = format!("{v:e}");
        let (mantissa, exp) = s.split_once('e').expect("exponent form");
        let mantissa = if mantissa.contains('.') {
            mantissa.to_owned()
        } else {
            format!("{mantissa}.0")
        };
        format!("{mantissa}E{exp}")
    }
}

/// `DateTimeFormatter.ISO_OFFSET_DATE_TIME`: fraction without trailing zeros, `Z` for UTC.
pub fn iso_offset_date_time(t: OffsetDateTime) -> String {
    let mut s = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    let millis = t.millisecond();
    if millis != 0 {
        let frac = format!("{millis:03}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    let off = t.offset();
    if off.is_utc() {
        s.push('Z');
    } else {
        let (h, m, _) = off.as_hms();
        s.push_str(&format!(
            "{}{:02}:{:02}",
            if off.is_negative() { '-' } else { '+' },
            h.abs(),
            m.abs()
        ));
    }
    s
}

/// Where billing messages go: appended to a JSONL file (one message a line) and kept in memory.
pub struct BillingLog {
    file: Option<Mutex<File>>,
    memory: Mutex<Vec<String>>,
    kafka: Option<crate::kafka::KafkaSink>,
}

impl BillingLog {
    pub fn new(
        path: Option<&Path>,
        kafka: Option<crate::kafka::KafkaSink>,
    ) -> std::io::Result<Self> {
        let file = match path {
            Some(p) => Some(Mutex::new(
                OpenOptions::new().create(true).append(true).open(p)?,
            )),
            None => None,
        };
        Ok(Self {
            file,
            memory: Mutex::new(Vec::new()),
            kafka,
        })
    }

    pub fn emit(&self, msg: &Msg) {
        let line = msg.to_json();
        if let Some(f) = &self.file {
            let mut f = f.lock().expect("billing file lock");
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
        if let Some(k) = &self.kafka {
            k.send(&line);
        }
        self.memory.lock().expect("billing lock").push(line);
    }

    /// Waits until every message produced so far is on the broker.
    pub fn flush(&self) {
        if let Some(k) = &self.kafka {
            k.flush();
        }
    }

    pub fn messages(&self) -> Vec<String> {
        self.memory.lock().expect("billing lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_formats() {
        assert_eq!(java_double(1.8710797E8), "1.8710797E8");
        assert_eq!(java_double(2.0E8), "2.0E8");
        assert_eq!(java_double(1234.5), "1234.5");
        assert_eq!(java_double(12.0), "12.0");
        assert_eq!(java_double(0.0001), "1.0E-4");
        let t = time::macros::datetime!(2019-07-09 11:11:57.010 +02:00);
        assert_eq!(iso_offset_date_time(t), "2019-07-09T11:11:57.01+02:00");
        let t = time::macros::datetime!(2019-07-09 11:11:57 UTC);
        assert_eq!(iso_offset_date_time(t), "2019-07-09T11:11:57Z");
    }

    #[test]
    fn keys_are_shuffled_but_complete() {
        let m = Msg::default()
            .put("a", 1)
            .put("b", "x")
            .put_double("c", 1.5e9)
            .put("d", Option::<u8>::None);
        let v: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(v["c"].as_f64(), Some(1.5e9));
        assert!(m.to_json().contains("1.5E9"));
        assert!(v.get("d").is_none(), "null values are absent keys");
    }
}

/// rustc 1.95's MIR GVN pass turned this into a double free in optimised builds
/// (rust-lang/rust#158830); `.cargo/config.toml` disables the pass. Run it with
/// `cargo test --release -p dcache-sim --lib gvn`.
#[cfg(test)]
mod gvn_miscompile_guard {
    use super::*;
    #[test]
    fn many_puts_in_a_closure() {
        for _ in 0..1000 {
            let s = String::from("session");
            let p = serde_json::json!({"a": 1});
            let common = |m: Msg| {
                m.put("version", "1.0")
                    .put("msgType", "transfer")
                    .put("date", "x")
                    .put("q", 0)
                    .put("c", "p")
                    .put("ct", "pool")
                    .put("cd", "d")
                    .put_double("bw", 1.5e8)
                    .put("wi", "PT0.004S")
                    .put("wa", format!("PT{}S", 3))
                    .put("le", "x")
                    .put("status", serde_json::json!({"code": 0}))
                    .put("session", &s)
                    .put("ts", 5u64)
                    .put("tt", 5u64)
                    .put("iw", "write")
                    .put("pi", &p)
                    .put("p2p", false)
                    .put("tp", "/x")
            };
            let a = common(Msg::default())
                .put("subject", ["a", "b"])
                .put("pnfsid", "X");
            let b = common(Msg::default());
            assert!(a.to_json().len() > b.to_json().len());
        }
    }
}
