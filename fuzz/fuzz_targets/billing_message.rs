//! Any bytes as a billing message: decoding, the upload rule and the pre-filter never panic,
//! and the pre-filter never dismisses a message that a full decode selects.
#![no_main]

use dcflow_core::{BillingMessage, Selector};
use libfuzzer_sys::fuzz_target;

const PREFIX: &str = "/pnfs/example.org/data/lsst";

fuzz_target!(|data: &[u8]| {
    let selector = Selector::new(PREFIX);
    let _ = selector.glance(data);
    let Ok(msg) = BillingMessage::decode(data) else {
        return;
    };
    let Ok(upload) = msg.upload() else {
        return;
    };
    if selector.dismisses(data) {
        assert!(
            !upload.billing_path.starts_with(&format!("{PREFIX}/")),
            "dismissed an upload under the prefix: {:?}",
            String::from_utf8_lossy(data)
        );
    }
});
