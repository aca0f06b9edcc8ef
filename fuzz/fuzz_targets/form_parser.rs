#![no_main]
//! Arbitrary bytes as a CMQ form: parsing and every typed accessor must never panic, and a
//! parsed array is always 0..=16 items.

use libfuzzer_sys::fuzz_target;
use meridian_api::cmq_http::parse_form;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = parse_form(data) {
        for prefix in ["msgBody", "receiptHandle", "msgTag", ""] {
            if let Ok(items) = p.array(prefix) {
                assert!(items.len() <= 16);
            }
        }
        let _ = p.int::<u32>("delaySeconds");
        let _ = p.int::<i64>("startConsumeTime");
        let _ = p.required("Action");
    }
});
