//! CMQ request signatures (reference §3): HMAC-SHA1 or HMAC-SHA256 over
//! `METHOD + host + path + "?" + sorted name=rawValue pairs`, base64-encoded.

use aws_lc_rs::hmac;
use base64::Engine as _;

use super::form::Params;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureMethod {
    HmacSha1,
    HmacSha256,
}

impl SignatureMethod {
    /// `HmacSHA256` selects SHA-256; anything else (or nothing) means SHA-1, as in the SDKs.
    pub fn from_param(v: Option<&str>) -> Self {
        match v {
            Some("HmacSHA256") => Self::HmacSha256,
            _ => Self::HmacSha1,
        }
    }
}

/// The string the client signed. `skip_at_values` drops parameters whose value starts with `@`,
/// reproducing the Python SDK's PHP-curl legacy.
pub fn string_to_sign(
    method: &str,
    host: &str,
    path: &str,
    params: &Params,
    skip_at_values: bool,
) -> String {
    let mut pairs: Vec<&(String, String)> = params
        .pairs
        .iter()
        .filter(|(k, v)| k != "Signature" && !(skip_at_values && v.starts_with('@')))
        .collect();
    pairs.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut src = String::with_capacity(256);
    src.push_str(&method.to_ascii_uppercase());
    src.push_str(host);
    src.push_str(path);
    src.push('?');
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            src.push('&');
        }
        src.push_str(&k.replace('_', "."));
        src.push('=');
        src.push_str(v);
    }
    src
}

pub fn sign(secret_key: &str, method: SignatureMethod, src: &str) -> String {
    let alg = match method {
        SignatureMethod::HmacSha1 => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        SignatureMethod::HmacSha256 => hmac::HMAC_SHA256,
    };
    let tag = hmac::sign(&hmac::Key::new(alg, secret_key.as_bytes()), src.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}

/// Checks `signature` in constant time, first over every parameter, then (Python quirk) with
/// `@`-valued parameters left out.
pub fn verify_signature(
    secret_key: &str,
    http_method: &str,
    host: &str,
    path: &str,
    params: &Params,
    signature: &str,
) -> bool {
    let method = SignatureMethod::from_param(
        params
            .pairs
            .iter()
            .find(|(k, _)| k == "SignatureMethod")
            .map(|(_, v)| v.as_str()),
    );
    let check = |skip| {
        let expected = sign(
            secret_key,
            method,
            &string_to_sign(http_method, host, path, params, skip),
        );
        aws_lc_rs::constant_time::verify_slices_are_equal(expected.as_bytes(), signature.as_bytes())
            .is_ok()
    };
    check(false) || (params.pairs.iter().any(|(_, v)| v.starts_with('@')) && check(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmq_http::form::parse_form;

    const KEY: &str = "pPgfLipfEXZ7VcRzhAMIyPaU7UbQyFFx";

    fn doc_params(method: &str) -> Params {
        parse_form(
            format!(
                "Action=SendMessage&Nonce=2889712707386595659&RequestClient=SDK_Python_1.3\
                 &SecretId=AKIDPcYDclDJCn8D0Xypa4f3pKYUCVYLn3zT&SignatureMethod={method}\
                 &Timestamp=1534154812&clientRequestId=1231231231&delaySeconds=0&msgBody=msg&queueName=test1"
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn golden_vectors_from_the_reference() {
        let host = "cmq-queue-gz.api.tencentyun.com";
        let p = doc_params("HmacSHA1");
        let src = string_to_sign("POST", host, "/v2/index.php", &p, false);
        assert_eq!(
            src,
            "POSTcmq-queue-gz.api.tencentyun.com/v2/index.php?Action=SendMessage&Nonce=2889712707386595659&RequestClient=SDK_Python_1.3&SecretId=AKIDPcYDclDJCn8D0Xypa4f3pKYUCVYLn3zT&SignatureMethod=HmacSHA1&Timestamp=1534154812&clientRequestId=1231231231&delaySeconds=0&msgBody=msg&queueName=test1"
        );
        let cases = [
            (
                "POST",
                host,
                "/v2/index.php",
                "HmacSHA1",
                "C16WEtEXsD5v5tnaUMLAbZewXhI=",
            ),
            (
                "GET",
                host,
                "/v2/index.php",
                "HmacSHA1",
                "fkR3mzm6NfEbQqgF0B+Fd4rFLtM=",
            ),
            (
                "POST",
                host,
                "/v2/index.php",
                "HmacSHA256",
                "7aNNVzszJftqWPLvvnHU3lDznBYFPof7ACkTD3OJUu4=",
            ),
            (
                "POST",
                "127.0.0.1:8080",
                "/v2/index.php",
                "HmacSHA1",
                "NcQjtTewO4aVtsSXuFKi14VfZpM=",
            ),
            (
                "POST",
                "cmq-gz.public.tencenttdmq.com",
                "/",
                "HmacSHA1",
                "MZMPtQuvGXh3D9GDMfkCP6raWlE=",
            ),
        ];
        for (m, h, path, alg, want) in cases {
            let p = doc_params(alg);
            let got = sign(
                KEY,
                SignatureMethod::from_param(Some(alg)),
                &string_to_sign(m, h, path, &p, false),
            );
            assert_eq!(got, want, "{m} {h} {path} {alg}");
            assert!(verify_signature(KEY, m, h, path, &p, want));
            assert!(!verify_signature("wrong-key", m, h, path, &p, want));
            assert!(!verify_signature(KEY, m, h, "/other", &p, want));
        }
    }

    #[test]
    fn at_values_quirk_and_underscore_names() {
        let p = parse_form(b"Action=SendMessage&msgBody=@hello&my_param=1").unwrap();
        let python_src = string_to_sign("POST", "h", "/", &p, true);
        assert!(!python_src.contains("@hello"));
        assert!(python_src.contains("my.param=1"));
        let sig = sign("k", SignatureMethod::HmacSha1, &python_src);
        assert!(verify_signature("k", "POST", "h", "/", &p, &sig));
        let full = sign(
            "k",
            SignatureMethod::HmacSha1,
            &string_to_sign("POST", "h", "/", &p, false),
        );
        assert!(verify_signature("k", "POST", "h", "/", &p, &full));
    }
}
