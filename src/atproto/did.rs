//! DID and handle syntax, where each DID method's document lives, and reading the parts of a DID
//! document atproto uses (`#atproto` key, `#atproto_pds` endpoint, `at://` handle). All pure.

use serde::Deserialize;

use super::keys::{KeyError, PublicKey};

/// A DID we know how to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Did<'a> {
    /// `did:plc:<24 base32 chars>`.
    Plc(&'a str),
    /// `did:web:<host>`; `host` is percent-decoded (`localhost%3A8080` → `localhost:8080`).
    Web { did: &'a str, host: String },
}

/// Why a string is not a DID we can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DidError {
    #[error("{0:?} is not a valid DID")]
    Syntax(String),
    #[error("unsupported DID method in {0:?} (only did:plc and did:web)")]
    UnsupportedMethod(String),
    #[error("invalid did:plc identifier {0:?}")]
    BadPlc(String),
    #[error("invalid did:web host in {0:?} (atproto allows only a bare hostname, no path)")]
    BadWeb(String),
}

/// General DID syntax as atproto defines it: `did:<method>:<id>`, ASCII, at most 2 KiB.
pub fn is_valid_did(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("did:") else { return false };
    let Some((method, id)) = rest.split_once(':') else { return false };
    s.len() <= 2048
        && !method.is_empty()
        && method.bytes().all(|b| b.is_ascii_lowercase())
        && !id.is_empty()
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:%-".contains(&b))
        && !id.ends_with([':', '%'])
}

/// Classify and validate a DID for resolution.
pub fn parse_did(s: &str) -> Result<Did<'_>, DidError> {
    if !is_valid_did(s) {
        return Err(DidError::Syntax(s.to_string()));
    }
    if let Some(id) = s.strip_prefix("did:plc:") {
        let ok = id.len() == 24 && id.bytes().all(|b| matches!(b, b'a'..=b'z' | b'2'..=b'7'));
        return if ok { Ok(Did::Plc(s)) } else { Err(DidError::BadPlc(s.to_string())) };
    }
    if let Some(id) = s.strip_prefix("did:web:") {
        let host = id.replace("%3A", ":").replace("%3a", ":");
        return if is_valid_web_host(&host) {
            Ok(Did::Web { did: s, host })
        } else {
            Err(DidError::BadWeb(s.to_string()))
        };
    }
    Err(DidError::UnsupportedMethod(s.to_string()))
}

/// A hostname with an optional `:port`; no path, no userinfo, no percent escapes left.
fn is_valid_web_host(host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok());
    port_ok
        && !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Handle syntax (atproto): at least two dot-separated labels, the last not starting with a digit.
pub fn is_valid_handle(s: &str) -> bool {
    let labels: Vec<&str> = s.split('.').collect();
    s.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
        && labels.last().is_some_and(|tld| tld.bytes().next().is_some_and(|b| b.is_ascii_alphabetic()))
}

/// The parts of a DID document we read. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DidDocument {
    pub id: String,
    #[serde(default)]
    pub also_known_as: Vec<String>,
    #[serde(default)]
    pub verification_method: Vec<VerificationMethod>,
    #[serde(default)]
    pub service: Vec<Service>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerificationMethod {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub public_key_multibase: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: serde_json::Value,
    pub service_endpoint: serde_json::Value,
}

/// `id` is either `#frag` or `<did>#frag`.
fn matches_fragment(id: &str, did: &str, frag: &str) -> bool {
    id.strip_prefix(did).unwrap_or(id).strip_prefix('#') == Some(frag)
}

impl DidDocument {
    /// The `#atproto` signing key: `None` if absent, an error if present but unusable.
    pub fn signing_key(&self) -> Option<Result<PublicKey, KeyError>> {
        let vm = self.verification_method.iter().find(|vm| matches_fragment(&vm.id, &self.id, "atproto"))?;
        Some(match &vm.public_key_multibase {
            Some(mb) => PublicKey::from_verification_method(&vm.kind, mb),
            None => Err(KeyError::NotBase58Multibase),
        })
    }

    /// The `#atproto_pds` service endpoint, if it is an http(s) URL (trailing `/` removed).
    pub fn pds_endpoint(&self) -> Option<String> {
        let svc = self.service.iter().find(|s| {
            matches_fragment(&s.id, &self.id, "atproto_pds")
                && s.kind.as_str() == Some("AtprotoPersonalDataServer")
        })?;
        let url = svc.service_endpoint.as_str()?;
        (url.starts_with("https://") || url.starts_with("http://"))
            .then(|| url.trim_end_matches('/').to_string())
    }

    /// The first `at://` entry of `alsoKnownAs`, lower-cased, if it is a syntactically valid
    /// handle. Not verified in the other direction (B16: only the DID matters here).
    pub fn handle(&self) -> Option<String> {
        self.also_known_as
            .iter()
            .find_map(|aka| aka.strip_prefix("at://"))
            .map(str::to_ascii_lowercase)
            .filter(|h| is_valid_handle(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_syntax() {
        for ok in ["did:plc:rjnvgfygwwqc5hyfsxmecosf", "did:web:example.com", "did:key:zabc"] {
            assert!(is_valid_did(ok), "{ok}");
        }
        for bad in ["", "did:", "did:plc", "did:plc:", "DID:plc:x", "did:Plc:x", "did:plc:a/b", "did:web:x:"]
        {
            assert!(!is_valid_did(bad), "{bad}");
        }
    }

    #[test]
    fn parse_did_classifies_methods() {
        assert_eq!(
            parse_did("did:plc:rjnvgfygwwqc5hyfsxmecosf"),
            Ok(Did::Plc("did:plc:rjnvgfygwwqc5hyfsxmecosf"))
        );
        assert_eq!(
            parse_did("did:web:localhost%3A8080"),
            Ok(Did::Web { did: "did:web:localhost%3A8080", host: "localhost:8080".into() })
        );
        assert!(matches!(parse_did("did:plc:short"), Err(DidError::BadPlc(_))));
        assert!(matches!(parse_did("did:plc:RJNVGFYGWWQC5HYFSXMECOSF"), Err(DidError::BadPlc(_))));
        assert!(matches!(parse_did("did:web:example.com:user:alice"), Err(DidError::BadWeb(_))));
        assert!(matches!(parse_did("did:web:exa_mple.com"), Err(DidError::BadWeb(_))));
        assert!(matches!(parse_did("did:web:host%2Fpath"), Err(DidError::BadWeb(_))));
        assert!(matches!(parse_did("did:key:zabc"), Err(DidError::UnsupportedMethod(_))));
        assert!(matches!(parse_did("nope"), Err(DidError::Syntax(_))));
    }

    #[test]
    fn handle_syntax() {
        for ok in ["alice.bsky.social", "tangled.sh", "a-b.test"] {
            assert!(is_valid_handle(ok), "{ok}");
        }
        for bad in ["alice", "alice.", ".alice.com", "a_b.com", "alice.123", "-a.com", "127.0.0.1"] {
            assert!(!is_valid_handle(bad), "{bad}");
        }
    }

    #[test]
    fn document_parts() {
        let key = crate::atproto::keys::tests::k256_key("doc");
        let mb = PublicKey::K256(*key.verifying_key()).to_multibase();
        let doc: DidDocument = serde_json::from_value(serde_json::json!({
            "@context": ["https://www.w3.org/ns/did/v1"],
            "id": "did:plc:rjnvgfygwwqc5hyfsxmecosf",
            "alsoKnownAs": ["https://other", "at://Alice.Example.com"],
            "verificationMethod": [
                {"id": "did:plc:rjnvgfygwwqc5hyfsxmecosf#other", "type": "Multikey", "controller": "x", "publicKeyMultibase": "zbad"},
                {"id": "did:plc:rjnvgfygwwqc5hyfsxmecosf#atproto", "type": "Multikey", "controller": "x", "publicKeyMultibase": mb}
            ],
            "service": [
                {"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "https://pds.example.com/"}
            ]
        }))
        .expect("doc parses");
        assert_eq!(doc.signing_key(), Some(Ok(PublicKey::K256(*key.verifying_key()))));
        assert_eq!(doc.pds_endpoint().as_deref(), Some("https://pds.example.com"));
        assert_eq!(doc.handle().as_deref(), Some("alice.example.com"));

        let bare: DidDocument = serde_json::from_value(serde_json::json!({
            "id": "did:web:example.com",
            "verificationMethod": [{"id": "#atproto", "type": "Multikey"}],
            "service": [{"id": "#atproto_pds", "type": "Other", "serviceEndpoint": "https://x"}]
        }))
        .expect("doc parses");
        assert_eq!(bare.signing_key(), Some(Err(KeyError::NotBase58Multibase)));
        assert_eq!(bare.pds_endpoint(), None);
        assert_eq!(bare.handle(), None);
    }
}
