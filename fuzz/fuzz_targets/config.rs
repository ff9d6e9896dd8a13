//! Any text as a configuration: validation reports problems, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = dcflow_core::Config::from_toml(text, &dcflow_core::Env::default());
    }
});
