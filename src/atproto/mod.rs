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

/// The outbound clients `serve` needs, sharing one connection pool: a [`Resolver`] for
/// `SPINDLE_SERVER_PLC_URL` and a [`PdsClient`]. Fails only if no TLS root certificates load.
pub fn clients(config: &crate::config::Config) -> Result<(Resolver, PdsClient), HttpError> {
    let http = HttpClient::new(HttpSettings::default())?;
    Ok((Resolver::new(config.plc_url.clone(), http.clone()), PdsClient::new(http)))
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn clients_build_from_config() {
        let config = crate::config::Config::for_tests();
        let (resolver, _pds) = super::clients(&config).expect("system roots load");
        assert!(format!("{resolver:?}").contains(&config.plc_url));
    }
}
