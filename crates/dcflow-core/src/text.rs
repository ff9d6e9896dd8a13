//! Text for operators: an error with all of its causes, and fields cut to a bounded length
//! with a marker (a 10 MB path must not make a 31 MB CSV row or a 73 MB log).

/// An error and its causes, outermost first, joined by ": ". `io::Error` hides the error it
/// wraps from `source()`: it is stepped into explicitly. A cause whose text its parent already
/// shows is left out. reqwest's own text of a refused connection is only "error sending
/// request"; with its causes it reads "error sending request: client error (Connect): tcp
/// connect error: Connection refused (os error 111)".
pub fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    parts.join(": ")
}

/// The marker that ends a field cut by [`bounded`].
pub const CUT: &str = "…[cut]";

/// `text` itself when it has at most `max` bytes; else its first bytes (on a character
/// boundary) followed by [`CUT`] and the length it had.
pub fn bounded(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{CUT} ({} bytes)", &text[..end], text.len()).into()
}

/// A size as operators read it, in decimal units with three significant digits: "999 B",
/// "3.50 GB", "35.2 MB", "217 MB". Every place dcflow shows a size (logs, demo, `status`,
/// the status page) uses this rule, so that the same number reads the same everywhere.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 999.5 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    match (unit, v) {
        (0, _) => format!("{bytes} B"),
        (_, v) if v < 9.995 => format!("{v:.2} {}", UNITS[unit]),
        (_, v) if v < 99.95 => format!("{v:.1} {}", UNITS[unit]),
        _ => format!("{v:.0} {}", UNITS[unit]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_shows_what_it_wraps() {
        #[derive(Debug)]
        struct Inner;
        impl std::fmt::Display for Inner {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("connect 127.0.0.1:1: connection refused")
            }
        }
        impl std::error::Error for Inner {}
        let io = std::io::Error::other(Inner);
        assert_eq!(causes(&io), "connect 127.0.0.1:1: connection refused");
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("error sending request")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        assert_eq!(
            causes(&Outer(io)),
            "error sending request: connect 127.0.0.1:1: connection refused"
        );
    }

    #[test]
    fn sizes_have_three_significant_digits() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(3_500_000_000), "3.50 GB");
        assert_eq!(human_bytes(35_230_000), "35.2 MB");
        assert_eq!(human_bytes(217_300_000), "217 MB");
        assert_eq!(human_bytes(999_600), "1.00 MB");
    }

    #[test]
    fn long_fields_are_cut_on_a_character_boundary_with_a_marker() {
        assert_eq!(bounded("short", 10), "short");
        let long = "é".repeat(3000); // 6000 bytes
        let cut = bounded(&long, 1001);
        assert!(
            cut.starts_with("éé") && cut.ends_with("…[cut] (6000 bytes)"),
            "{cut}"
        );
        assert!(cut.len() < 1100);
    }
}
