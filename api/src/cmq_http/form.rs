//! `application/x-www-form-urlencoded` parsing (whatever the Content-Type says) and typed access
//! to CMQ parameters, including `name.n` arrays that may be 0- or 1-based but must be contiguous.

use std::collections::BTreeMap;

use crate::error::{CmqError, CmqResult};
use crate::limits::MAX_BATCH;

/// Decoded request parameters in wire order (the signature needs the raw decoded values).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    pub pairs: Vec<(String, String)>,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn decode(part: &[u8]) -> CmqResult<String> {
    let mut out = Vec::with_capacity(part.len());
    let mut i = 0;
    while i < part.len() {
        match part[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let h = part.get(i + 1).copied().and_then(hex);
                let l = part.get(i + 2).copied().and_then(hex);
                match (h, l) {
                    (Some(h), Some(l)) => {
                        out.push(h << 4 | l);
                        i += 2;
                    }
                    _ => {
                        return Err(CmqError::invalid(
                            10000,
                            "malformed percent-encoding in form data",
                        ))
                    }
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| CmqError::invalid(10000, "form data is not valid UTF-8"))
}

/// Percent-encodes one form component (RFC 3986 unreserved characters kept).
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Encodes pairs as `application/x-www-form-urlencoded`.
pub fn encode_form(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode_component(k), encode_component(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Parses a urlencoded form (a query string or a POST body).
pub fn parse_form(raw: &[u8]) -> CmqResult<Params> {
    let mut pairs = Vec::new();
    for part in raw.split(|&b| b == b'&') {
        if part.is_empty() {
            continue;
        }
        let (k, v) = match part.iter().position(|&b| b == b'=') {
            Some(eq) => (&part[..eq], &part[eq + 1..]),
            None => (part, &b""[..]),
        };
        let key = decode(k)?;
        if key.is_empty() {
            return Err(CmqError::invalid(10310, "empty parameter name"));
        }
        pairs.push((key, decode(v)?));
    }
    Ok(Params { pairs })
}

impl Params {
    /// The value of `name`; a parameter given twice is an error (CMQ 10330).
    pub fn get(&self, name: &str) -> CmqResult<Option<&str>> {
        let mut found = None;
        for (k, v) in &self.pairs {
            if k == name {
                if found.is_some() {
                    return Err(CmqError::invalid(
                        10330,
                        format!("parameter {name} is repeated"),
                    ));
                }
                found = Some(v.as_str());
            }
        }
        Ok(found)
    }

    pub fn required(&self, name: &str) -> CmqResult<&str> {
        self.get(name)?
            .ok_or_else(|| CmqError::invalid(10010, format!("missing parameter {name}")))
    }

    /// An integer parameter; absent or empty gives `None`.
    pub fn int<T: std::str::FromStr>(&self, name: &str) -> CmqResult<Option<T>> {
        match self.get(name)? {
            None | Some("") => Ok(None),
            Some(v) => v.trim().parse::<T>().map(Some).map_err(|_| {
                CmqError::invalid(
                    10360,
                    format!("parameter {name}={v:?} is not a valid integer in range"),
                )
            }),
        }
    }

    /// The `prefix.n` array: indexes must run contiguously from 0 or from 1; at most 16.
    pub fn array(&self, prefix: &str) -> CmqResult<Vec<&str>> {
        let dotted = format!("{prefix}.");
        let mut items: BTreeMap<u64, &str> = BTreeMap::new();
        for (k, v) in &self.pairs {
            let Some(idx) = k.strip_prefix(&dotted) else {
                continue;
            };
            let n: u64 = idx
                .parse()
                .map_err(|_| CmqError::invalid(10310, format!("bad array parameter name {k:?}")))?;
            if items.insert(n, v.as_str()).is_some() {
                return Err(CmqError::invalid(
                    10330,
                    format!("parameter {k} is repeated"),
                ));
            }
        }
        if items.len() > MAX_BATCH {
            return Err(CmqError::invalid(
                10370,
                format!(
                    "{prefix}.n holds {} items, at most {MAX_BATCH}",
                    items.len()
                ),
            ));
        }
        if let Some((&first, _)) = items.first_key_value() {
            let last = *items.last_key_value().expect("non-empty").0;
            if first > 1 || last - first + 1 != items.len() as u64 {
                return Err(CmqError::invalid(
                    10380,
                    format!("{prefix}.n indexes must be contiguous from 0 or 1"),
                ));
            }
        }
        Ok(items.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_plus_and_percent_and_utf8() {
        let p = parse_form(b"msgBody=hello+world+%26+%3D%2B%25%2F%E4%B8%AD%E6%96%87&a=&b").unwrap();
        assert_eq!(p.get("msgBody").unwrap(), Some("hello world & =+%/中文"));
        assert_eq!(p.get("a").unwrap(), Some(""));
        assert_eq!(p.get("b").unwrap(), Some(""));
        assert!(parse_form(b"x=%E4%B8").is_err(), "truncated UTF-8");
        assert!(parse_form(b"x=%zz").is_err());
        assert!(parse_form(b"x=%4").is_err());
    }

    #[test]
    fn arrays_zero_or_one_based_contiguous() {
        let p = parse_form(b"m.1=a&m.2=b&m.3=c").unwrap();
        assert_eq!(p.array("m").unwrap(), vec!["a", "b", "c"]);
        let p = parse_form(b"m.2=c&m.0=a&m.1=b").unwrap();
        assert_eq!(p.array("m").unwrap(), vec!["a", "b", "c"]);
        assert_eq!(
            parse_form(b"m.1=a&m.3=c")
                .unwrap()
                .array("m")
                .unwrap_err()
                .module,
            10380
        );
        assert_eq!(
            parse_form(b"m.2=a").unwrap().array("m").unwrap_err().module,
            10380
        );
        assert_eq!(
            parse_form(b"m.x=a").unwrap().array("m").unwrap_err().module,
            10310
        );
        assert_eq!(
            parse_form(b"m.1=a&m.1=b")
                .unwrap()
                .array("m")
                .unwrap_err()
                .module,
            10330
        );
        let many: Vec<String> = (1..=17).map(|i| format!("m.{i}=x")).collect();
        let p = parse_form(many.join("&").as_bytes()).unwrap();
        assert_eq!(p.array("m").unwrap_err().module, 10370);
        assert!(parse_form(b"").unwrap().array("m").unwrap().is_empty());
    }

    #[test]
    fn typed_access() {
        let p = parse_form(b"n=5&bad=x&dup=1&dup=2").unwrap();
        assert_eq!(p.int::<u32>("n").unwrap(), Some(5));
        assert_eq!(p.int::<u32>("missing").unwrap(), None);
        assert_eq!(p.int::<u32>("bad").unwrap_err().module, 10360);
        assert_eq!(p.get("dup").unwrap_err().module, 10330);
        assert_eq!(p.required("missing").unwrap_err().module, 10010);
    }

    proptest! {
        #[test]
        fn never_panics(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(p) = parse_form(&raw) {
                let _ = p.array("msgBody");
                let _ = p.int::<u32>("delaySeconds");
            }
        }
    }
}
