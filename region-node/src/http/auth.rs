//! Request authentication: SecretId lookup in the replicated metadata, Timestamp skew window,
//! Nonce replay rejection, and the HMAC signature over the real Host header and path.

use meridian_api::cmq_http::{verify_signature, Params};
use meridian_api::{CmqCode, CmqError, CmqResult};

use super::HttpApi;
use crate::node::{GroupReply, GroupRequest};
use crate::placement::META_GROUP;
use crate::replay::NonceCheck;

fn auth_error(module: u32, message: impl Into<String>) -> CmqError {
    CmqError::new(CmqCode::AuthFailed, module, message)
}

/// Returns the tenant (app id) the request acts for, and the nonce to be checked by the leader
/// that executes it (see `replay`).
pub async fn authenticate(
    api: &HttpApi,
    method: &str,
    host: &str,
    path: &str,
    params: &Params,
) -> CmqResult<(String, NonceCheck)> {
    let secret_id = params
        .get("SecretId")?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| auth_error(10270, "missing SecretId"))?;
    if !secret_id.starts_with("AKID") {
        return Err(CmqError::invalid(10450, "SecretId must begin with AKID"));
    }
    let signature = params
        .get("Signature")?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| auth_error(10030, "missing Signature"))?;
    // The local copy of the metadata may lag a just-created key: ask the leader on a miss.
    let cred = match api.ops.node.credential(secret_id) {
        Some(c) => Some(c),
        None => {
            let req = GroupRequest::GetCredential {
                secret_id: secret_id.to_string(),
            };
            match api.ops.node.execute(META_GROUP, req).await? {
                GroupReply::Credential(c) => c,
                _ => None,
            }
        }
    }
    .ok_or_else(|| auth_error(10270, "SecretId does not exist"))?;
    if cred.revoked {
        return Err(auth_error(10080, "SecretId has been revoked"));
    }
    let now = api.ops.node.clock.now_ms() / 1000;
    let window = api.skew_seconds as i64;
    let ts: i64 = params
        .int("Timestamp")?
        .ok_or_else(|| auth_error(10030, "missing Timestamp"))?;
    if (ts - now).abs() > window {
        return Err(auth_error(
            10030,
            format!("Timestamp {ts} is more than {window} s from the server time {now}"),
        ));
    }
    let nonce = params.required("Nonce")?;
    if !verify_signature(&cred.secret_key, method, host, path, params, signature) {
        return Err(auth_error(10030, "signature mismatch"));
    }
    // Only a verified request consumes its nonce, so forgeries cannot block a real client.
    let check = NonceCheck {
        secret_id: secret_id.to_string(),
        nonce: nonce.to_string(),
        now_s: now,
        window_s: window,
    };
    Ok((cred.app_id.to_string(), check))
}
