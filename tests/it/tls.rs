//! TLS (§8): h2 via ALPN with a certificate generated in the test, and certificate reload.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};

use crate::harness::*;
use crate::upstream::Upstream;

fn certificate(dir: &std::path::Path) -> CertificateDer<'static> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
    ck.cert.der().clone()
}

/// Connects with TLS trusting only `root`, offering h2 and http/1.1; returns the ALPN result and
/// the answer to GET /v1/models over whichever protocol was negotiated.
async fn fetch(
    addr: std::net::SocketAddr,
    root: CertificateDer<'static>,
    key: &str,
) -> Result<(Vec<u8>, u16), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).map_err(|e| e.to_string())?;
    let mut cfg =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec).unwrap_or_default();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(format!("https://localhost:{}/v1/models", addr.port()))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::default())
        .unwrap();
    let rsp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = rsp.status().as_u16();
    let _ = rsp.into_body().collect().await;
    Ok((alpn, status))
}

#[tokio::test]
async fn tls_serves_h2_via_alpn_and_reloads_its_certificate() {
    let up = Upstream::start().await;
    let certs = tempfile::tempdir().unwrap();
    let first = certificate(certs.path());
    let tls = format!(
        "{{ cert: \"{}\", key: \"{}\" }}",
        certs.path().join("cert.pem").display(),
        certs.path().join("key.pem").display()
    );
    let tg = Tollgate::builder(&up.url()).section("tls", &tls).start();

    let (alpn, status) = fetch(tg.addr, first.clone(), &tg.key).await.unwrap();
    assert_eq!(alpn, b"h2");
    assert_eq!(status, 200);
    assert_eq!(up.requests()[0].headers["x-forwarded-proto"], "https");

    // Replace the certificate files: new handshakes use the new certificate.
    let second = certificate(certs.path());
    assert!(tg.wait_log("TLS certificate reloaded", Duration::from_secs(10)).await);
    let (_, status) = fetch(tg.addr, second, &tg.key).await.unwrap();
    assert_eq!(status, 200);
    assert!(fetch(tg.addr, first, &tg.key).await.is_err(), "the old certificate is still served");
}
