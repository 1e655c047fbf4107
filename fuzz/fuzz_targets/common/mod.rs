//! What the fuzz targets that run an agent share: the client connection to its socket and
//! the health check that a well-formed request is still served.

use std::path::PathBuf;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// Bound on the health check, first certificate included.
pub const HEALTH_WAIT: Duration = Duration::from_secs(10);

pub async fn connect(path: PathBuf) -> SecretDiscoveryServiceClient<Channel> {
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .expect("connect to the agent");
    SecretDiscoveryServiceClient::new(channel)
}

/// A well-formed `FetchSecrets` for `default` is answered with that secret (retried while the
/// first certificate is being issued).
pub async fn assert_serves(mut client: SecretDiscoveryServiceClient<Channel>) {
    let req = DiscoveryRequest {
        resource_names: vec!["default".into()],
        type_url: SECRET_TYPE.into(),
        ..Default::default()
    };
    let deadline = tokio::time::Instant::now() + HEALTH_WAIT;
    loop {
        let answer = tokio::time::timeout(HEALTH_WAIT, client.fetch_secrets(req.clone())).await;
        if let Ok(Ok(resp)) = answer {
            let resp = resp.into_inner();
            assert_eq!(resp.resources.len(), 1, "health check: {resp:?}");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent no longer serves a good request: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
