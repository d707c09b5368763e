//! AT Protocol clients: DID resolution (did:plc, did:web) with caching, PDS record reads and
//! repo at-uri resolution. One [`HttpClient`] is shared by the [`Resolver`] and the
//! [`PdsClient`].

pub mod cache;
pub mod did;
pub mod http;
pub mod identity;
pub mod keys;
pub mod pds;
pub mod repo;
#[cfg(test)]
pub(crate) mod testserver;

pub use did::{is_valid_did, is_valid_handle};
pub use http::{HttpClient, HttpError, HttpSettings};
pub use identity::{CacheSettings, Identity, IdentityError, Resolver};
pub use keys::{KeyError, PublicKey};
pub use pds::{ListedRecord, PdsClient, PdsError};
pub use repo::{AtUri, RepoError, parse_at_uri, resolve_repo};
