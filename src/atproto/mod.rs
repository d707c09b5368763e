//! AT Protocol clients: DID resolution (did:plc, did:web) with caching, PDS record reads.
