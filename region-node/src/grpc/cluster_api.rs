//! `ClusterStatus`: this node's view of every group; state digests for replica comparison; and
//! the fault-injection API of test nodes.

use std::sync::Arc;

use meridian_api::pb::cluster_service_server::ClusterService;
use meridian_api::pb::fault_service_server::FaultService;
use meridian_api::pb::{
    ClusterStatusReply, Empty, FaultSpec, GroupDigest, GroupStatus, MemberInfo, StateDigestsReply,
};
use openraft::async_runtime::WatchReceiver;
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
                let m = g.raft.metrics().borrow_watched().clone();
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

    async fn state_digests(
        &self,
        _req: Request<Empty>,
    ) -> Result<Response<StateDigestsReply>, Status> {
        let groups = self
            .node
            .groups()
            .iter()
            .map(|g| {
                let (applied_index, digest) = g.shared.digest();
                GroupDigest {
                    group: g.id,
                    applied_index,
                    digest,
                }
            })
            .collect();
        Ok(Response::new(StateDigestsReply { groups }))
    }
}

pub struct FaultApi {
    pub node: Arc<RegionNode>,
}

#[tonic::async_trait]
impl FaultService for FaultApi {
    async fn set_faults(&self, req: Request<FaultSpec>) -> Result<Response<Empty>, Status> {
        use std::sync::atomic::Ordering::SeqCst;
        let Some(f) = &self.node.faults else {
            return Err(Status::failed_precondition(
                "fault injection is disabled on this node ([faults] enabled = false)",
            ));
        };
        let spec = req.into_inner();
        tracing::warn!(?spec, "injected faults changed");
        *f.blocked.lock().expect("blocked lock") = spec.blocked_peers.into_iter().collect();
        f.delay_ms.store(spec.delay_ms, SeqCst);
        f.drop_per_mille
            .store(spec.drop_per_mille.min(1000), SeqCst);
        f.clock_offset_ms.store(spec.clock_offset_ms, SeqCst);
        f.set_disk_full(spec.disk_full);
        Ok(Response::new(Empty {}))
    }
}
