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

/// Connects to `endpoint` with `key`.
pub async fn connect(endpoint: &str, key: Option<&str>) -> Result<Authed, String> {
    let bearer = Bearer::new(key)?;
    let channel = Channel::from_shared(endpoint.to_owned())
        .map_err(|e| format!("{endpoint}: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("connecting to {endpoint}: {e}"))?;
    Ok(authed(channel, bearer))
}
