//! The optional TLS listener's certificate: PEM files in, a rustls acceptor (ring provider, to
//! keep aws-lc's C build off a Pi's build) out.
//!
//! The handshake itself runs in each connection's own task under `--connect-timeout` (see
//! `session`), so a client that opens a socket and says nothing stalls nobody — unlike rumqttd's
//! TLS listener, whose accept loop waits for each handshake in turn.

use std::{path::Path, sync::Arc};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::TlsAcceptor;

use crate::{Error, Result};

/// Builds the acceptor from a certificate chain (leaf first) and its private key.
pub(crate) fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor> {
    let bad = |path: &Path, reason: String| Error::Tls {
        path: path.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert, "no CERTIFICATE block in the file".to_owned()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| bad(key, format!("does not fit the certificate: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_generated_certificate_and_reports_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
        assert!(acceptor(&cert, &key).is_ok());

        let err = acceptor(&key, &key).err().unwrap().to_string();
        assert!(err.contains("cert") || err.contains("CERTIFICATE"), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = acceptor(&cert, &missing).err().unwrap().to_string();
        assert!(err.contains("missing.pem"), "{err}");
        let other = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).unwrap();
        std::fs::write(&key, other.signing_key.serialize_pem()).unwrap();
        assert!(
            acceptor(&cert, &key).is_err(),
            "a key of another certificate"
        );
    }
}
