//! Checksums computed while streaming, and dCache's `Digest` header (RFC 3230).
//!
//! dCache answers `Want-Digest: adler32` with `Digest: adler32=<8 lower-case hex>` and md5 as
//! base64. adler32 values are compared as numbers: case and zero-padding do not matter (other
//! tools get this wrong).

use std::fmt;

use base64::Engine;
use dcflow_core::ChecksumAlgo;
use md5::{Digest as _, Md5};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    Adler32(u32),
    Md5([u8; 16]),
}

impl Checksum {
    pub fn algo(&self) -> ChecksumAlgo {
        match self {
            Self::Adler32(_) => ChecksumAlgo::Adler32,
            Self::Md5(_) => ChecksumAlgo::Md5,
        }
    }

    /// Parses one `algo=value` item of a `Digest` header; `None` for algorithms not known.
    pub fn parse_item(item: &str) -> Option<Result<Self, String>> {
        let (algo, value) = item.trim().split_once('=')?;
        let value = value.trim();
        match ChecksumAlgo::parse(algo.trim())? {
            ChecksumAlgo::Adler32 => Some(
                (value.len() <= 8 && !value.is_empty())
                    .then(|| u32::from_str_radix(value, 16).ok())
                    .flatten()
                    .map(Self::Adler32)
                    .ok_or_else(|| format!("adler32 value {value:?} is not up to 8 hex digits")),
            ),
            ChecksumAlgo::Md5 => {
                let bytes = if value.len() == 32 {
                    (0..16)
                        .map(|i| u8::from_str_radix(&value[2 * i..2 * i + 2], 16))
                        .collect::<Result<Vec<_>, _>>()
                        .ok()
                } else {
                    base64::engine::general_purpose::STANDARD.decode(value).ok()
                };
                Some(
                    bytes
                        .and_then(|b| <[u8; 16]>::try_from(b).ok())
                        .map(Self::Md5)
                        .ok_or_else(|| {
                            format!("md5 value {value:?} is neither base64 nor hex of 16 bytes")
                        }),
                )
            }
        }
    }

    /// All known checksums in a `Digest` header value (unknown algorithms ignored).
    pub fn parse_digest_header(value: &str) -> Vec<Self> {
        value
            .split(',')
            .filter_map(Self::parse_item)
            .filter_map(Result::ok)
            .collect()
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Adler32(v) => write!(f, "adler32:{v:08x}"),
            Self::Md5(b) => {
                f.write_str("md5:")?;
                b.iter().try_for_each(|x| write!(f, "{x:02x}"))
            }
        }
    }
}

/// Computes the configured checksums over a stream of chunks.
pub struct Hasher {
    adler32: Option<simd_adler32::Adler32>,
    md5: Option<Md5>,
}

impl Hasher {
    pub fn new(algos: &[ChecksumAlgo]) -> Self {
        Self {
            adler32: algos
                .contains(&ChecksumAlgo::Adler32)
                .then(simd_adler32::Adler32::new),
            md5: algos.contains(&ChecksumAlgo::Md5).then(Md5::new),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        if let Some(a) = self.adler32.as_mut() {
            a.write(data);
        }
        if let Some(m) = self.md5.as_mut() {
            m.update(data);
        }
    }

    pub fn finish(self) -> Vec<Checksum> {
        let mut out = Vec::new();
        if let Some(a) = self.adler32 {
            out.push(Checksum::Adler32(a.finish()));
        }
        if let Some(m) = self.md5 {
            out.push(Checksum::Md5(m.finalize().into()));
        }
        out
    }
}

/// Compares computed checksums with dCache's. `Ok(matched)` lists those compared (empty when
/// dCache offered none of ours); `Err` is the first mismatch (computed, expected).
pub fn compare(
    computed: &[Checksum],
    expected: &[Checksum],
) -> Result<Vec<Checksum>, (Checksum, Checksum)> {
    let mut matched = Vec::new();
    for c in computed {
        if let Some(e) = expected.iter().find(|e| e.algo() == c.algo()) {
            if e != c {
                return Err((*c, *e));
            }
            matched.push(*c);
        }
    }
    Ok(matched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_adler32_equals_the_reference_whatever_the_chunks() {
        let data: Vec<u8> = (0..1_000_003u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect();
        for chunk in [1, 7, 4096, 65_521, 512 << 10, data.len()] {
            for len in [0, 1, 5551, 5552, 5553, 65_536, data.len()] {
                let mut h = Hasher::new(&[ChecksumAlgo::Adler32]);
                data[..len].chunks(chunk.max(1)).for_each(|c| h.update(c));
                assert_eq!(
                    h.finish(),
                    vec![Checksum::Adler32(adler2::adler32_slice(&data[..len]))],
                    "{len} bytes in chunks of {chunk}"
                );
            }
        }
    }

    #[test]
    fn adler32_compares_as_a_number() {
        for v in ["0a1b2c3d", "0A1B2C3D", "a1b2c3d"] {
            assert_eq!(
                Checksum::parse_digest_header(&format!("adler32={v}")),
                vec![Checksum::Adler32(0x0a1b2c3d)]
            );
        }
        assert_eq!(
            Checksum::parse_digest_header("ADLER32=00000001"),
            vec![Checksum::Adler32(1)]
        );
        assert!(Checksum::parse_item("adler32=123456789").unwrap().is_err());
        assert!(Checksum::parse_item("adler32=xyz").unwrap().is_err());
        assert_eq!(Checksum::Adler32(0x1).to_string(), "adler32:00000001");
    }

    #[test]
    fn md5_in_base64_or_hex_and_unknown_ignored() {
        let mut h = Hasher::new(&[ChecksumAlgo::Md5, ChecksumAlgo::Adler32]);
        h.update(b"hello");
        let got = h.finish();
        assert_eq!(got[0], Checksum::Adler32(0x062c0215));
        assert_eq!(got[1].to_string(), "md5:5d41402abc4b2a76b9719d911017c592");
        let header = "sha-256=LCa0a2j/xo/5m0U8HTBBNBNCLXBkg7+g+YpeiGJm564=, md5=XUFAKrxLKna5cZ2REBfFkg==,adler32=062c0215";
        let expected = Checksum::parse_digest_header(header);
        assert_eq!(expected.len(), 2);
        assert_eq!(compare(&got, &expected).unwrap().len(), 2);
        assert_eq!(compare(&got, &[]).unwrap().len(), 0);
        let wrong = [Checksum::Adler32(0x062c0216)];
        assert!(compare(&got, &wrong).is_err());
        assert_eq!(
            Checksum::parse_digest_header("md5=5d41402abc4b2a76b9719d911017c592"),
            vec![got[1]]
        );
    }

    #[test]
    fn streaming_equals_one_shot() {
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let mut h = Hasher::new(&[ChecksumAlgo::Adler32]);
        data.chunks(4099).for_each(|c| h.update(c));
        // RFC 1950's definition, computed the slow way.
        let (mut a, mut b) = (1u32, 0u32);
        for &x in &data {
            a = (a + x as u32) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!(h.finish(), vec![Checksum::Adler32((b << 16) | a)]);
    }
}
