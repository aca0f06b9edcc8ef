//! The CMQ HTTP action protocol (reference §2, §3, §12): form parsing with `.n` arrays, the
//! request signature, and reply envelopes. Pure functions, shared by the server and tests.

pub mod form;
pub mod signature;

pub use form::{encode_form, parse_form, Params};
pub use signature::{sign, string_to_sign, verify_signature, SignatureMethod};

/// A client's signed form: adds Timestamp and Nonce (unless given), SecretId and Signature.
#[allow(clippy::too_many_arguments)]
pub fn sign_form(
    params: &[(&str, &str)],
    secret_id: &str,
    secret_key: &str,
    http_method: &str,
    host: &str,
    path: &str,
    now_s: u64,
    nonce: u64,
) -> String {
    let mut pairs: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if !pairs.iter().any(|(k, _)| k == "Timestamp") {
        pairs.push(("Timestamp".into(), now_s.to_string()));
    }
    if !pairs.iter().any(|(k, _)| k == "Nonce") {
        pairs.push(("Nonce".into(), nonce.to_string()));
    }
    pairs.push(("SecretId".into(), secret_id.into()));
    let method = SignatureMethod::from_param(
        pairs
            .iter()
            .find(|(k, _)| k == "SignatureMethod")
            .map(|(_, v)| v.as_str()),
    );
    let p = Params { pairs };
    let signature = sign(
        secret_key,
        method,
        &string_to_sign(http_method, host, path, &p, false),
    );
    let mut pairs = p.pairs;
    pairs.push(("Signature".into(), signature));
    encode_form(&pairs)
}

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
