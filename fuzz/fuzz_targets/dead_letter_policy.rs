#![no_main]
//! deadLetterPolicy JSON: never panics; whatever parses survives a round trip.

use libfuzzer_sys::fuzz_target;
use meridian_api::limits::DeadLetterPolicy;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(p) = DeadLetterPolicy::parse_json(text) {
            assert_eq!(DeadLetterPolicy::parse_json(&p.to_json()).unwrap(), p);
        }
    }
});
