//! containerd's rule for namespace names, in one place: the configuration
//! checks `snapshotter.shared_namespaces` with it when the file is loaded,
//! and `host::containerd` checks every namespace a request names before it
//! reaches containerd.

/// A namespace name containerd would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid namespace {namespace:?}: letters, digits and . _ - between them, at most 76 characters")]
pub struct InvalidNamespace {
    /// The name as given, cut to its first 80 characters.
    pub namespace: String,
}

impl InvalidNamespace {
    pub fn new(namespace: &str) -> InvalidNamespace {
        InvalidNamespace {
            namespace: namespace.chars().take(80).collect(),
        }
    }
}

/// containerd's namespace rule; it also keeps the value a valid gRPC header.
pub fn validate_namespace(namespace: &str) -> Result<(), InvalidNamespace> {
    let valid = !namespace.is_empty()
        && namespace.len() <= 76
        && namespace
            .split(['.', '_', '-'])
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric()));
    if valid {
        Ok(())
    } else {
        Err(InvalidNamespace::new(namespace))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_follow_containerd() {
        for ok in ["default", "k8s.io", "moby", "seamless-test_1"] {
            validate_namespace(ok).unwrap();
        }
        for bad in ["", "-a", "a..b", "a/b", "a b", "é", &"a".repeat(77)] {
            assert!(validate_namespace(bad).is_err(), "{bad:?}");
        }
        let long = "a/".repeat(60);
        assert_eq!(validate_namespace(&long).unwrap_err().namespace.chars().count(), 80);
    }
}
