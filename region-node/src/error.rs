//! Errors of the region node.

use meridian_api::CmqError;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("storage: {0}")]
    Storage(String),
    #[error("config: {0}")]
    Config(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("network: {0}")]
    Network(String),
    #[error(transparent)]
    Cmq(#[from] CmqError),
}

impl From<NodeError> for CmqError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Cmq(c) => c,
            other => CmqError::internal(other.to_string()),
        }
    }
}
