//! gRPC administration of CMQ API credentials.

use meridian_api::pb::credential_service_server::CredentialService;
use meridian_api::pb::*;
use tonic::{Request, Response, Status};

use crate::ops::QueueOps;

pub struct CredentialApi {
    pub ops: QueueOps,
}

#[tonic::async_trait]
impl CredentialService for CredentialApi {
    async fn create_credential(
        &self,
        req: Request<CreateCredentialRequest>,
    ) -> Result<Response<CredentialInfo>, Status> {
        let app_id = req.into_inner().app_id;
        let (secret_id, secret_key) = self
            .ops
            .create_credential(app_id)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(CredentialInfo {
            secret_id,
            secret_key,
            app_id,
            create_time: 0,
            revoked: false,
        }))
    }

    async fn list_credentials(
        &self,
        _req: Request<Empty>,
    ) -> Result<Response<ListCredentialsReply>, Status> {
        let list = self
            .ops
            .list_credentials()
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(ListCredentialsReply {
            credentials: list
                .into_iter()
                .map(|c| CredentialInfo {
                    secret_id: c.secret_id,
                    secret_key: String::new(),
                    app_id: c.app_id,
                    create_time: c.created_ms / 1000,
                    revoked: c.revoked,
                })
                .collect(),
        }))
    }

    async fn revoke_credential(
        &self,
        req: Request<RevokeCredentialRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.ops
            .revoke_credential(&req.into_inner().secret_id)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(Empty {}))
    }
}
