//! AT Protocol service auth: JWT verification (ES256K, ES256) and DID resolution.
