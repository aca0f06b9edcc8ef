#![no_main]
//! The signature canonicaliser and verifier on arbitrary forms, hosts and paths: no panic, and
//! a signature made for a request always verifies for that same request.

use libfuzzer_sys::fuzz_target;
use meridian_api::cmq_http::{parse_form, sign, string_to_sign, verify_signature, SignatureMethod};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0);
    let (Some(form), Some(host), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let (Ok(p), Ok(host), Ok(path)) =
        (parse_form(form), std::str::from_utf8(host), std::str::from_utf8(path))
    else {
        return;
    };
    let method = SignatureMethod::from_param(
        p.pairs.iter().find(|(k, _)| k == "SignatureMethod").map(|(_, v)| v.as_str()),
    );
    let sig = sign("key", method, &string_to_sign("POST", host, path, &p, false));
    assert!(verify_signature("key", "POST", host, path, &p, &sig));
    let _ = verify_signature("key", "GET", host, path, &p, "garbage");
});
