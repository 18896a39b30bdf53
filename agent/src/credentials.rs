//! Where a pod's credentials come from: the cache the IMDS handler reads, the client that asks the
//! imdsgate server on a miss, and the revocation feed that drops what the server takes back.

pub mod credential_cache;
pub mod revocation;
pub mod server_client;
