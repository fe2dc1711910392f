//! TLS on both servers: gRPC with client certificates required (mutual
//! TLS), HTTPS for the console and the Segment API. Certificates are made
//! for the test by a throwaway authority.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use cdp_e2e::{ADMIN_KEY, CdpProcess, DEFAULT_CONFIG};
use cdp_proto::v1;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca: ca_cert.pem(),
        server: leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        client: leaf(vec!["cdp-cli".into()], ExtendedKeyUsagePurpose::ClientAuth),
    }
}

fn write(dir: &Path, name: &str, pem: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path.display().to_string()
}

async fn who_am_i(channel: Channel) -> Result<v1::Principal, tonic::Status> {
    let authed = cdp_proto::client::authed(
        channel,
        cdp_proto::client::Bearer::new(Some(ADMIN_KEY)).unwrap(),
    );
    v1::access_service_client::AccessServiceClient::new(authed)
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_requires_a_client_certificate_and_the_console_serves_https() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let ca = write(dir.path(), "ca.pem", &pki.ca);
    let cert = write(dir.path(), "server.pem", &pki.server.0);
    let key = write(dir.path(), "server.key", &pki.server.1);
    let config = format!(
        "{DEFAULT_CONFIG}\n[server.tls]\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {ca:?}\n[http.tls]\ncert = {cert:?}\nkey = {key:?}\n"
    );
    let cdp = CdpProcess::start_with(&config);
    let url = format!("https://localhost:{}", cdp.query_addr().port());
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");

    // With a client certificate signed by the authority: served.
    let channel = Channel::from_shared(url.clone())
        .unwrap()
        .tls_config(
            tls.clone()
                .identity(Identity::from_pem(&pki.client.0, &pki.client.1)),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let me = who_am_i(channel).await.unwrap();
    assert_eq!(me.role, "admin");

    // Without one: the handshake is refused.
    let refused = match Channel::from_shared(url.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
    {
        Ok(channel) => who_am_i(channel).await.err(),
        Err(e) => Some(tonic::Status::unavailable(e.to_string())),
    };
    assert!(
        refused.is_some(),
        "a client without a certificate was served"
    );
    // In plain text: nothing answers.
    let plain = format!("http://127.0.0.1:{}", cdp.query_addr().port());
    let answered = match Channel::from_shared(plain).unwrap().connect().await {
        Ok(channel) => who_am_i(channel).await.is_ok(),
        Err(_) => false,
    };
    assert!(!answered, "gRPC answered in plain text");

    // The operators' CLI over mutual TLS.
    let client_cert = write(dir.path(), "client.pem", &pki.client.0);
    let client_key = write(dir.path(), "client.key", &pki.client.1);
    let listed = std::process::Command::new(cdp_e2e::cdp_binary())
        .args(["credentials", "list", "--endpoint", &url])
        .env("CDP_TOKEN", ADMIN_KEY)
        .env("CDP_CA_CERT", &ca)
        .env("CDP_CLIENT_CERT", &client_cert)
        .env("CDP_CLIENT_KEY", &client_key)
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(String::from_utf8_lossy(&listed.stdout).contains("test-admin"));

    // The console over HTTPS, its certificate checked against the authority.
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for c in tokio_rustls::rustls::pki_types::CertificateDer::pem_slice_iter(pki.ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let client = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let http = cdp.console_url().replace("http://", "");
    let tcp = tokio::net::TcpStream::connect(&http).await.unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    stream
        .write_all(b"GET /console HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("Single customer view"), "{answer}");
}

use tokio_rustls::rustls::pki_types::pem::PemObject as _;
