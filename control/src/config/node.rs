//! The `[node]` section: how the node takes part (observer or not), the address its peers
//! and the tracker are told, and the wallet it runs as. All take effect at the next start.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Longest host name accepted: `host:port` fits the 256 characters a peer's handshake may
/// carry (the tracker takes 253).
const MAX_HOST_LEN: usize = 249;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Follow the network and the ledger and serve the API, holding no layers and training
    /// nothing (announced with the role `observer`).
    pub observer: bool,
    /// IP or host name peers and the tracker are told to dial; empty: the address the
    /// node's connections come from.
    pub announce_ip: String,
    /// Peer port peers and the tracker are told to dial; 0: the peer port (port + 1000).
    pub announce_port: u16,
    /// Keystore of the wallet the node runs as; empty: `<data_dir>/wallet.json` (created at
    /// the first start).
    pub wallet_file: String,
}

impl NodeConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let host = &self.announce_ip;
        let name_ok = |h: &str| {
            h.len() <= MAX_HOST_LEN
                && h.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && !label.starts_with('-')
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                })
        };
        let unspecified = host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified());
        if !host.is_empty()
            && (unspecified || !(host.parse::<std::net::IpAddr>().is_ok() || name_ok(host)))
        {
            return Err(ConfigError::Invalid {
                key: "node.announce_ip".into(),
                message: format!("{host:?} is not an IP address or host name peers can dial"),
            });
        }
        Ok(())
    }

    /// The address this node is reachable at from outside (a forwarded port), added to the
    /// peer-to-peer stack's external addresses: set when `announce_ip` is an IP address
    /// (its port `announce_port`, or `peer_port` when that is 0).
    pub fn external_address(&self, peer_port: u16) -> Option<std::net::SocketAddr> {
        let ip = self.announce_ip.parse::<std::net::IpAddr>().ok()?;
        let port = if self.announce_port == 0 {
            peer_port
        } else {
            self.announce_port
        };
        Some(std::net::SocketAddr::new(ip, port))
    }

    /// The host peers and the tracker are told, when one is set.
    pub fn announce_host(&self) -> Option<String> {
        (!self.announce_ip.is_empty()).then(|| self.announce_ip.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announce_ip_takes_addresses_and_names_and_refuses_the_rest() {
        for ok in ["", "203.0.113.5", "2001:db8::1", "node-1.example.org"] {
            let n = NodeConfig {
                announce_ip: ok.into(),
                ..NodeConfig::default()
            };
            assert!(n.validate().is_ok(), "{ok}");
        }
        for bad in ["0.0.0.0", "::", "a b", "-x.org", "host:9000", "a..b"] {
            let n = NodeConfig {
                announce_ip: bad.into(),
                ..NodeConfig::default()
            };
            let err = n.validate().unwrap_err().to_string();
            assert!(err.contains("node.announce_ip"), "{bad}: {err}");
        }
    }
}
