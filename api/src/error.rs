//! CMQ error codes (reference §9). Every error that reaches a client, over any interface, carries
//! one of these codes; the module code (e.g. 10020) refines it as CMQ's own messages do.

use std::fmt;

/// The stable, documented top-level CMQ codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u32)]
pub enum CmqCode {
    InvalidParameter = 4000,
    AuthFailed = 4100,
    MessageTooLarge = 4400,
    HeapFull = 4410,
    Throttled = 4420,
    InvalidReceiptHandle = 4430,
    NotFound = 4440,
    LimitReached = 4450,
    AlreadyExists = 4460,
    BatchTooLarge = 4470,
    SubscriptionExists = 4490,
    SubscriptionLimit = 4500,
    BlankInUrl = 4510,
    Internal = 6000,
    BatchDeletePartial = 6010,
    BatchDeleteFailed = 6020,
    NoSubscriptionMatched = 6030,
    RecreatedTooSoon = 6040,
    RewindDisabled = 6050,
    NoMessage = 7000,
}

impl CmqCode {
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    pub fn from_u32(code: u32) -> Option<Self> {
        use CmqCode::*;
        Some(match code {
            4000 => InvalidParameter,
            4100 => AuthFailed,
            4400 => MessageTooLarge,
            4410 => HeapFull,
            4420 => Throttled,
            4430 => InvalidReceiptHandle,
            4440 => NotFound,
            4450 => LimitReached,
            4460 => AlreadyExists,
            4470 => BatchTooLarge,
            4490 => SubscriptionExists,
            4500 => SubscriptionLimit,
            4510 => BlankInUrl,
            6000 => Internal,
            6010 => BatchDeletePartial,
            6020 => BatchDeleteFailed,
            6030 => NoSubscriptionMatched,
            6040 => RecreatedTooSoon,
            6050 => RewindDisabled,
            7000 => NoMessage,
            _ => return None,
        })
    }
}

/// An error with its CMQ code, CMQ module code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
pub struct CmqError {
    pub code: CmqCode,
    /// CMQ's finer "module" code (10020 bad name, 10230 too large …); 0 when none applies.
    pub module: u32,
    pub message: String,
}

impl fmt::Display for CmqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.module != 0 {
            write!(f, "({}) {}", self.module, self.message)
        } else {
            f.write_str(&self.message)
        }
    }
}

/// Name of the gRPC metadata key that carries the CMQ code of an error status.
pub const GRPC_CODE_KEY: &str = "cmq-code";

impl CmqError {
    pub fn new(code: CmqCode, module: u32, message: impl Into<String>) -> Self {
        Self {
            code,
            module,
            message: message.into(),
        }
    }
    pub fn invalid(module: u32, message: impl Into<String>) -> Self {
        Self::new(CmqCode::InvalidParameter, module, message)
    }
    pub fn queue_not_found(name: &str) -> Self {
        Self::new(
            CmqCode::NotFound,
            10100,
            format!("queue {name:?} does not exist"),
        )
    }
    pub fn invalid_handle(message: impl Into<String>) -> Self {
        Self::new(CmqCode::InvalidReceiptHandle, 10260, message)
    }
    pub fn no_message() -> Self {
        Self::new(CmqCode::NoMessage, 10200, "no message")
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(CmqCode::Internal, 10050, message)
    }

    /// The gRPC status for this error: the CMQ code in metadata, the text in the message.
    pub fn to_status(&self) -> tonic::Status {
        let grpc = match self.code {
            CmqCode::InvalidParameter
            | CmqCode::MessageTooLarge
            | CmqCode::InvalidReceiptHandle
            | CmqCode::BatchTooLarge
            | CmqCode::BlankInUrl => tonic::Code::InvalidArgument,
            CmqCode::AuthFailed => tonic::Code::Unauthenticated,
            CmqCode::NotFound => tonic::Code::NotFound,
            CmqCode::AlreadyExists | CmqCode::SubscriptionExists => tonic::Code::AlreadyExists,
            CmqCode::HeapFull
            | CmqCode::LimitReached
            | CmqCode::Throttled
            | CmqCode::SubscriptionLimit => tonic::Code::ResourceExhausted,
            CmqCode::RecreatedTooSoon
            | CmqCode::RewindDisabled
            | CmqCode::NoSubscriptionMatched => tonic::Code::FailedPrecondition,
            CmqCode::NoMessage => tonic::Code::NotFound,
            CmqCode::Internal | CmqCode::BatchDeletePartial | CmqCode::BatchDeleteFailed => {
                tonic::Code::Internal
            }
        };
        let mut status = tonic::Status::new(grpc, format!("({}) {}", self.code.as_u32(), self));
        status.metadata_mut().insert(
            GRPC_CODE_KEY,
            self.code
                .as_u32()
                .to_string()
                .parse()
                .expect("digits are valid metadata"),
        );
        status
    }

    /// Recovers the CMQ error from a status made by [`CmqError::to_status`]; a status from
    /// elsewhere (transport failure, deadline) becomes a 6000 internal error.
    pub fn from_status(status: &tonic::Status) -> Self {
        let code = status
            .metadata()
            .get(GRPC_CODE_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .and_then(CmqCode::from_u32);
        match code {
            Some(code) => {
                let prefix = format!("({}) ", code.as_u32());
                let msg = status
                    .message()
                    .strip_prefix(&prefix)
                    .unwrap_or(status.message());
                CmqError::new(code, 0, msg)
            }
            None => CmqError::internal(format!("{}: {}", status.code(), status.message())),
        }
    }
}

pub type CmqResult<T> = Result<T, CmqError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip_keeps_code_and_text() {
        let e = CmqError::queue_not_found("orders");
        let back = CmqError::from_status(&e.to_status());
        assert_eq!(back.code, CmqCode::NotFound);
        assert!(back.message.contains("orders"), "{}", back.message);
    }

    #[test]
    fn foreign_status_is_internal() {
        let back = CmqError::from_status(&tonic::Status::unavailable("down"));
        assert_eq!(back.code, CmqCode::Internal);
    }
}
