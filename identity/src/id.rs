//! SPIFFE IDs of Kubernetes workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`.
//!
//! The types are the `spiffe` crate's [`SpiffeId`] and [`TrustDomain`]. That crate parses
//! leniently (it lower-cases an upper-case trust domain or scheme and accepts IDs longer
//! than 2048 bytes); [`parse_id`] and [`trust_domain`] are strict: they accept only what
//! the SPIFFE ID specification allows, in its canonical form.

pub use spiffe::{SpiffeId, TrustDomain};

/// The trust domain when none is configured, as in Istio and Linkerd.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// The specification's limit on a whole SPIFFE ID URI, in bytes.
pub const MAX_ID_LEN: usize = 2048;
/// The specification's limit on a trust domain name, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not an acceptable SPIFFE ID or trust domain.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IdError {
    /// The `spiffe` crate's parser refused it.
    #[error("invalid SPIFFE ID or trust domain {input:?}: {source}")]
    Spiffe {
        /// What was parsed.
        input: String,
        /// Why.
        source: spiffe::SpiffeIdError,
    },
    /// It parsed only after normalisation (upper case in the scheme or trust domain).
    #[error("{input:?} is not canonical: the scheme and trust domain must be lower case")]
    NotCanonical {
        /// What was parsed.
        input: String,
    },
    /// It is longer than the specification allows.
    #[error("{input:?} is {len} bytes long; at most {max} are allowed")]
    TooLong {
        /// What was parsed (cut to 64 bytes).
        input: String,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// It is a SPIFFE ID, but not of the form `/ns/<namespace>/sa/<serviceaccount>`.
    #[error("{id} does not name a Kubernetes workload (/ns/<namespace>/sa/<serviceaccount>)")]
    NotAWorkload {
        /// The ID.
        id: String,
    },
}

fn too_long(input: &str, max: usize) -> IdError {
    IdError::TooLong {
        input: input.chars().take(64).collect(),
        len: input.len(),
        max,
    }
}

/// Parses a trust domain name (`cluster.local`, not a URI), strictly.
pub fn trust_domain(name: &str) -> Result<TrustDomain, IdError> {
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(too_long(name, MAX_TRUST_DOMAIN_LEN));
    }
    if name.contains(':') || name.contains('/') {
        // `TrustDomain::new` also accepts a SPIFFE ID; a configured name must be a name.
        return Err(IdError::Spiffe {
            input: name.into(),
            source: spiffe::SpiffeIdError::BadTrustDomainChar,
        });
    }
    let td = TrustDomain::new(name).map_err(|source| IdError::Spiffe {
        input: name.into(),
        source,
    })?;
    if td.as_str() != name {
        return Err(IdError::NotCanonical { input: name.into() });
    }
    Ok(td)
}

/// Parses a SPIFFE ID, strictly (see the module documentation).
pub fn parse_id(input: &str) -> Result<SpiffeId, IdError> {
    if input.len() > MAX_ID_LEN {
        return Err(too_long(input, MAX_ID_LEN));
    }
    let id = SpiffeId::new(input).map_err(|source| IdError::Spiffe {
        input: input.into(),
        source,
    })?;
    if id.to_string() != input {
        return Err(IdError::NotCanonical {
            input: input.into(),
        });
    }
    Ok(id)
}

/// The SPIFFE ID of pods that run as `service_account` in `namespace`.
pub fn workload_id(
    td: &TrustDomain,
    namespace: &str,
    service_account: &str,
) -> Result<SpiffeId, IdError> {
    let id = SpiffeId::from_segments(td.clone(), &["ns", namespace, "sa", service_account])
        .map_err(|source| IdError::Spiffe {
            input: format!("{}/ns/{namespace}/sa/{service_account}", td.id_string()),
            source,
        })?;
    Ok(id)
}

/// The namespace and ServiceAccount a workload ID names.
pub fn workload_of(id: &SpiffeId) -> Result<(&str, &str), IdError> {
    let mut segments = id.path().strip_prefix('/').unwrap_or("").split('/');
    match (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Ok((ns, sa)),
        _ => Err(IdError::NotAWorkload { id: id.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_id_is_derived_from_namespace_and_service_account() {
        let td = trust_domain(DEFAULT_TRUST_DOMAIN).unwrap();
        let id = workload_id(&td, "shop", "checkout").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/checkout");
        assert_eq!(workload_of(&id).unwrap(), ("shop", "checkout"));
        // Kubernetes ServiceAccount names may hold dots: allowed in SPIFFE path segments.
        let id = workload_id(&td, "kube-system", "a.b-c_d").unwrap();
        assert_eq!(parse_id(&id.to_string()).unwrap(), id);
    }

    #[test]
    fn identity_id_valid_examples_from_the_spec() {
        for ok in [
            "spiffe://example.org",
            "spiffe://example.org/service",
            "spiffe://trust-domain.example_1/path/element.a-b_c",
            "spiffe://cluster.local/ns/default/sa/default",
            "spiffe://a/B/C.d", // path segments may be upper case
        ] {
            parse_id(ok).unwrap_or_else(|e| panic!("{ok} should be valid: {e}"));
        }
    }

    #[test]
    fn identity_id_invalid_examples_from_the_spec_are_refused() {
        let long_td = "a".repeat(256);
        let long_path = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN));
        let cases: Vec<String> = vec![
            "".into(),
            "spiffe://".into(),
            "spiffe:///path".into(),              // no trust domain
            "http://example.org/a".into(),        // wrong scheme
            "SPIFFE://example.org/a".into(),      // scheme must be lower case
            "spiffe://Example.org/a".into(),      // trust domain must be lower case
            "spiffe://example.org/".into(),       // trailing slash
            "spiffe://example.org/a//b".into(),   // empty segment
            "spiffe://example.org/a/./b".into(),  // dot segment
            "spiffe://example.org/a/../b".into(), // dot-dot segment
            "spiffe://example.org:8080/a".into(), // port
            "spiffe://user@example.org/a".into(), // userinfo
            "spiffe://example.org/a?q=1".into(),  // query
            "spiffe://example.org/a#frag".into(), // fragment
            "spiffe://example.org/a%20b".into(),  // percent-encoding
            "spiffe://exa mple.org/a".into(),
            "spiffe://example.org/ä".into(),
            format!("spiffe://{long_td}/a"),
            long_path,
        ];
        for bad in &cases {
            assert!(parse_id(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn identity_trust_domain_is_strict() {
        assert_eq!(
            trust_domain("cluster.local").unwrap().as_str(),
            "cluster.local"
        );
        for bad in [
            "",
            "Cluster.local",
            "spiffe://cluster.local",
            "a:80",
            "a/b",
            "a b",
            &"a".repeat(256),
        ] {
            assert!(trust_domain(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn identity_workload_names_that_break_the_spec_are_refused() {
        let td = trust_domain("cluster.local").unwrap();
        for (ns, sa) in [
            ("", "sa"),
            ("ns", ""),
            ("a/b", "sa"),
            ("ns", ".."),
            ("ns", "a b"),
        ] {
            assert!(workload_id(&td, ns, sa).is_err(), "{ns:?}/{sa:?}");
        }
        let not_workload = parse_id("spiffe://cluster.local/ns/a").unwrap();
        assert!(workload_of(&not_workload).is_err());
        let too_deep = parse_id("spiffe://cluster.local/ns/a/sa/b/c").unwrap();
        assert!(workload_of(&too_deep).is_err());
    }
}
