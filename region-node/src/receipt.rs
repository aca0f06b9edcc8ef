//! Receipt handles: `<group>:<seq>:<generation>:<mac>` where the MAC (HMAC-SHA256, truncated to
//! 128 bits) covers the tenant, queue name, group, message and receive generation under the
//! region's secret. A client can neither forge one nor reuse one on another queue; "only the
//! latest handle works" is the state machine's check of the generation.

use aws_lc_rs::hmac;
use meridian_api::{CmqError, CmqResult};

use crate::command::{QueueKey, Receipt};

const MAC_LEN: usize = 16;

pub struct ReceiptSigner {
    key: hmac::Key,
}

impl ReceiptSigner {
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    fn material(key: &QueueKey, group: u32, r: Receipt) -> Vec<u8> {
        let mut m = Vec::with_capacity(key.tenant.len() + key.name.len() + 18);
        m.extend_from_slice(key.tenant.as_bytes());
        m.push(0);
        m.extend_from_slice(key.name.as_bytes());
        m.push(0);
        m.extend_from_slice(&group.to_be_bytes());
        m.extend_from_slice(&r.seq.to_be_bytes());
        m.extend_from_slice(&r.generation.to_be_bytes());
        m
    }

    pub fn sign(&self, key: &QueueKey, group: u32, r: Receipt) -> String {
        let tag = hmac::sign(&self.key, &Self::material(key, group, r));
        format!(
            "{}:{}:{}:{}",
            group,
            r.seq,
            r.generation,
            hex::encode(&tag.as_ref()[..MAC_LEN])
        )
    }

    /// Parses and authenticates a handle for the queue `key` living in `group`.
    pub fn verify(&self, key: &QueueKey, group: u32, handle: &str) -> CmqResult<Receipt> {
        let bad = || CmqError::invalid_handle(format!("invalid receiptHandle {handle:?}"));
        if handle.len() > 256 {
            return Err(bad());
        }
        let mut parts = handle.split(':');
        let (Some(g), Some(seq), Some(gen), Some(mac), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        let g: u32 = g.parse().map_err(|_| bad())?;
        let r = Receipt {
            seq: seq.parse().map_err(|_| bad())?,
            generation: gen.parse().map_err(|_| bad())?,
        };
        let mac = hex::decode(mac).map_err(|_| bad())?;
        if g != group || mac.len() != MAC_LEN {
            return Err(bad());
        }
        let full = hmac::sign(&self.key, &Self::material(key, group, r));
        // Constant-time comparison of the truncated tag.
        if aws_lc_rs::constant_time::verify_slices_are_equal(&full.as_ref()[..MAC_LEN], &mac)
            .is_err()
        {
            return Err(bad());
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sign_verify_and_tamper() {
        let s = ReceiptSigner::new(b"0123456789abcdef");
        let k = QueueKey::new("", "orders");
        let r = Receipt {
            seq: 42,
            generation: 3,
        };
        let h = s.sign(&k, 2, r);
        assert_eq!(s.verify(&k, 2, &h).unwrap(), r);
        assert!(s.verify(&QueueKey::new("", "other"), 2, &h).is_err());
        assert!(s.verify(&k, 1, &h).is_err());
        let forged = h.replace(":3:", ":4:");
        assert!(s.verify(&k, 2, &forged).is_err());
        assert!(ReceiptSigner::new(b"another-secret!!")
            .verify(&k, 2, &h)
            .is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_verifies_or_panics(h in ".{0,300}") {
            let s = ReceiptSigner::new(b"0123456789abcdef");
            prop_assert!(s.verify(&QueueKey::new("", "q"), 1, &h).is_err());
        }
    }
}
