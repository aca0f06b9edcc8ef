//! The CMQ HTTP action protocol (reference §2, §3, §12): form parsing with `.n` arrays, the
//! request signature, and reply envelopes. Pure functions, shared by the server and tests.

pub mod form;
pub mod signature;

pub use form::{parse_form, Params};
pub use signature::{sign, string_to_sign, verify_signature, SignatureMethod};

/// The JSON reply envelope: HTTP 200 always, integer `code`, `message`, `requestId`.
pub fn error_reply(e: &crate::CmqError, request_id: &str) -> serde_json::Value {
    serde_json::json!({
        "code": e.code.as_u32(),
        "message": e.to_string(),
        "requestId": request_id,
    })
}

/// A success envelope with the action's fields merged in.
pub fn ok_reply(request_id: &str, fields: serde_json::Value) -> serde_json::Value {
    let mut v = serde_json::json!({ "code": 0, "message": "", "requestId": request_id });
    if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), fields) {
        obj.extend(extra);
    }
    v
}
