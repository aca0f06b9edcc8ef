//! `ClusterStatus`: this node's view of every group.

use std::sync::Arc;

use meridian_api::pb::cluster_service_server::ClusterService;
use meridian_api::pb::{ClusterStatusReply, Empty, GroupStatus, MemberInfo};
use tonic::{Request, Response, Status};

use crate::node::RegionNode;

pub struct ClusterApi {
    pub node: Arc<RegionNode>,
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn cluster_status(
        &self,
        _req: Request<Empty>,
    ) -> Result<Response<ClusterStatusReply>, Status> {
        let groups = self
            .node
            .groups()
            .iter()
            .map(|g| {
                let m = g.raft.metrics().borrow().clone();
                GroupStatus {
                    group: g.id,
                    leader: m.current_leader.unwrap_or(0),
                    term: m.current_term,
                    last_log_index: m.last_log_index.unwrap_or(0),
                    applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
                    voters: m.membership_config.membership().voter_ids().collect(),
                    snapshots_installed: g
                        .shared
                        .snapshots_installed
                        .load(std::sync::atomic::Ordering::Relaxed),
                    purged_index: m.purged.map(|l| l.index).unwrap_or(0),
                }
            })
            .collect();
        let members = self
            .node
            .config
            .members
            .iter()
            .map(|m| MemberInfo {
                node_id: m.id,
                addr: m.addr.clone(),
            })
            .collect();
        Ok(Response::new(ClusterStatusReply {
            node_id: self.node.id,
            groups,
            members,
        }))
    }
}
