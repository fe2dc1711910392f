//! What every gRPC client of the platform needs: a channel that carries
//! its credential (`authorization: Bearer <key>`) on every call.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Adds the credential to every request.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// A credential; `None` sends none (health checks only).
    pub fn new(key: Option<&str>) -> Result<Self, String> {
        key.map(|k| {
            format!("Bearer {}", k.trim())
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| "the key has characters a header cannot carry".to_owned())
        })
        .transpose()
        .map(Bearer)
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry a credential.
pub type Authed = InterceptedService<Channel, Bearer>;

pub fn authed(channel: Channel, bearer: Bearer) -> Authed {
    InterceptedService::new(channel, bearer)
}

/// TLS for an `https://` endpoint, from the environment: `CDP_CA_CERT`
/// (the authority that signed the server's certificate, PEM) and, for
/// mutual TLS, `CDP_CLIENT_CERT` and `CDP_CLIENT_KEY`.
fn tls_from_env() -> Result<tonic::transport::ClientTlsConfig, String> {
    let read = |var: &str| -> Result<Option<Vec<u8>>, String> {
        match std::env::var_os(var) {
            None => Ok(None),
            Some(path) => std::fs::read(&path)
                .map(Some)
                .map_err(|e| format!("{var}={}: {e}", path.to_string_lossy())),
        }
    };
    let mut tls = tonic::transport::ClientTlsConfig::new();
    match read("CDP_CA_CERT")? {
        Some(ca) => tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
        None => {
            return Err("an https endpoint needs CDP_CA_CERT (the server's authority, PEM)".into());
        }
    }
    match (read("CDP_CLIENT_CERT")?, read("CDP_CLIENT_KEY")?) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        (None, None) => {}
        _ => return Err("set both CDP_CLIENT_CERT and CDP_CLIENT_KEY, or neither".into()),
    }
    Ok(tls)
}

/// Connects to `endpoint` with `key` (over TLS for `https://`, see
/// [`tls_from_env`]).
pub async fn connect(endpoint: &str, key: Option<&str>) -> Result<Authed, String> {
    let bearer = Bearer::new(key)?;
    let mut channel =
        Channel::from_shared(endpoint.to_owned()).map_err(|e| format!("{endpoint}: {e}"))?;
    if endpoint.starts_with("https://") {
        channel = channel
            .tls_config(tls_from_env()?)
            .map_err(|e| format!("{endpoint}: {e}"))?;
    }
    let channel = channel
        .connect()
        .await
        .map_err(|e| format!("connecting to {endpoint}: {e}"))?;
    Ok(authed(channel, bearer))
}
