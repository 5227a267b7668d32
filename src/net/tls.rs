//! TLS for the public listener: a rustls `ServerConfig` with ALPN `h2` + `http/1.1` whose
//! certificate comes from a resolver that `reload` can swap while connections are running —
//! handshakes after the swap use the new certificate, established connections keep theirs.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::TlsFiles;

/// The certificate in force; swapped whole on reload.
pub struct Certificates {
    current: ArcSwap<CertifiedKey>,
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Certificates")
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl Certificates {
    pub fn load(files: &TlsFiles) -> Result<Certificates, String> {
        Ok(Certificates { current: ArcSwap::from_pointee(certified_key(files)?) })
    }

    /// Loads the files again; on error the old certificate stays in force.
    pub fn reload(&self, files: &TlsFiles) -> Result<(), String> {
        self.current.store(Arc::new(certified_key(files)?));
        Ok(())
    }
}

fn certified_key(files: &TlsFiles) -> Result<CertifiedKey, String> {
    let name = |p: &Path| p.display().to_string();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect())
        .map_err(|e| format!("tls.cert: cannot read certificates from {}: {e}", name(&files.cert)))?;
    if certs.is_empty() {
        return Err(format!("tls.cert: no certificate in {}", name(&files.cert)));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("tls.key: cannot read a private key from {}: {e}", name(&files.key)))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("tls.key: unsupported private key in {}: {e}", name(&files.key)))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match()
        .map_err(|e| format!("tls: the key in {} does not match the certificate: {e}", name(&files.key)))?;
    Ok(ck)
}

/// The rustls server config: ring provider, ALPN h2 then http/1.1.
pub fn server_config(certs: Arc<Certificates>) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut cfg =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
