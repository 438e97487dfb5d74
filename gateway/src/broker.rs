//! The embedded MQTT broker (rumqttd), for gateways without a Mosquitto.
//!
//! It runs on its own threads (rumqttd brings its own runtime per listener) and keeps
//! messages in memory only: what devices published to it but the gateway has not yet
//! committed dies with the process. Production gateways with devices that must not lose
//! a message on a power cut use a local Mosquitto with persistence instead.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// The broker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The listen address is taken or not ours.
    #[error("embedded broker cannot listen on {addr} (key broker.listen): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The broker did not accept connections in time.
    #[error("embedded broker on {0} did not start accepting connections")]
    NotListening(SocketAddr),
}

/// Starts the broker on `listen` and returns once it accepts connections.
pub async fn start(listen: SocketAddr, max_payload: usize, max_inflight: usize) -> Result<(), BrokerError> {
    // rumqttd reports a failed bind only in its log: check the address first.
    drop(std::net::TcpListener::bind(listen).map_err(|source| BrokerError::Bind { addr: listen, source })?);
    let server = ServerSettings {
        name: "embedded".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: max_payload + 64 * 1024,
            max_inflight_count: max_inflight,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 1_000,
            max_segment_size: 64 * 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "Embedded broker stopped.");
            }
        })
        .map_err(|source| BrokerError::Bind { addr: listen, source })?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(BrokerError::NotListening(listen))
}
