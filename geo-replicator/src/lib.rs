//! Placeholder: geo-replication is not implemented yet (see issue "geo-replication").
