//! The announcement a node sends to a tracker, and the tracker's answer. An announcement is
//! signed by the node's wallet key over a canonical encoding, so a tracker lists a node only
//! at the address that node itself announced, and an old announcement cannot be replayed.

use serde::{Deserialize, Serialize};

use neuroshard_ledger::encode::Encoder;
use neuroshard_ledger::keys::{Hash32, Sig65, keccak, recover_signer};
use neuroshard_ledger::{Address, Wallet};

/// Roles a node may announce.
pub const ROLES: [&str; 5] = ["full", "driver", "worker", "validator", "observer"];
/// Most layers one announcement may list.
pub const MAX_LAYERS: usize = 4096;
/// Longest host name accepted.
pub const MAX_HOST_LEN: usize = 253;

/// `POST /announce` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announce {
    /// The node's wallet address (`0x` + 40 hex).
    pub node_id: String,
    /// Port of the node's peer gRPC service.
    pub peer_port: u16,
    /// Port of the node's REST API.
    pub api_port: u16,
    /// Host (IP or DNS name) peers should dial; absent: the address the request came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub role: String,
    pub layers: Vec<u32>,
    /// Milliseconds since the Unix epoch when signed; must grow from one announcement to the next.
    pub timestamp: i64,
    /// 65-byte recoverable secp256k1 signature (hex) over [`Announce::digest`].
    pub signature: Sig65,
}

/// One peer as a tracker lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrackedPeer {
    pub node_id: String,
    /// `host:port` of the peer service.
    pub address: String,
    pub api_port: u16,
    pub role: String,
    pub layers: Vec<u32>,
    /// Milliseconds since the Unix epoch of its last announcement.
    pub last_seen: i64,
}

/// `GET /peers` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerList {
    pub peers: Vec<TrackedPeer>,
    pub count: usize,
}

impl Announce {
    /// Builds and signs an announcement of `wallet`'s node.
    pub fn signed(
        wallet: &Wallet,
        peer_port: u16,
        api_port: u16,
        host: Option<String>,
        role: &str,
        layers: Vec<u32>,
        timestamp: i64,
    ) -> Announce {
        let mut a = Announce {
            node_id: wallet.address().to_string(),
            peer_port,
            api_port,
            host,
            role: role.to_string(),
            layers,
            timestamp,
            signature: Sig65([0; 65]),
        };
        a.signature = wallet.sign_digest(&a.digest());
        a
    }

    /// The digest the signature covers: every field but the signature, canonically encoded.
    pub fn digest(&self) -> Hash32 {
        let mut e = Encoder::new(b"neuroshard/tracker-announce/v1");
        e.str(&self.node_id)
            .u32(u32::from(self.peer_port))
            .u32(u32::from(self.api_port))
            .str(self.host.as_deref().unwrap_or(""))
            .str(&self.role)
            .u32(self.layers.len() as u32);
        for l in &self.layers {
            e.u32(*l);
        }
        e.i64(self.timestamp);
        keccak(b"", e.finish())
    }

    /// Checks fields and signature; returns the signer. `now_ms` and `max_skew_ms` bound the
    /// timestamp so a captured announcement stops being accepted.
    pub fn verify(&self, now_ms: i64, max_skew_ms: i64) -> Result<Address, String> {
        let id = Address::parse(&self.node_id).map_err(|e| format!("node_id: {e}"))?;
        if self.peer_port == 0 {
            return Err("peer_port must not be 0".into());
        }
        if !ROLES.contains(&self.role.as_str()) {
            return Err(format!("role must be one of {}", ROLES.join(", ")));
        }
        if self.layers.len() > MAX_LAYERS {
            return Err(format!("at most {MAX_LAYERS} layers"));
        }
        if let Some(h) = &self.host {
            valid_host(h)?;
        }
        if (self.timestamp - now_ms).abs() > max_skew_ms {
            return Err(format!(
                "timestamp is {} s away from the tracker's clock (at most {} s)",
                (self.timestamp - now_ms) / 1000,
                max_skew_ms / 1000
            ));
        }
        let signer = recover_signer(&self.digest(), &self.signature, "announcement")
            .map_err(|e| e.to_string())?;
        if signer != id {
            return Err(format!("signed by {signer}, not by {id}"));
        }
        Ok(id)
    }
}

/// An IP literal or a DNS name (letters, digits, `-`, `.`).
fn valid_host(h: &str) -> Result<(), String> {
    if h.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = !h.is_empty()
        && h.len() <= MAX_HOST_LEN
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err("host must be an IP address or a DNS name".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(wallet: &Wallet, ts: i64) -> Announce {
        Announce::signed(wallet, 9000, 8000, None, "full", vec![0, 1], ts)
    }

    #[test]
    fn signed_announcement_verifies() {
        let w = Wallet::from_seed(1);
        let a = sample(&w, 1_000_000);
        assert_eq!(a.verify(1_000_000, 60_000), Ok(w.address()));
        let json = serde_json::to_string(&a).unwrap();
        let back: Announce = serde_json::from_str(&json).unwrap();
        assert_eq!(back.verify(1_000_000, 60_000), Ok(w.address()));
    }

    #[test]
    fn tampering_is_refused() {
        let w = Wallet::from_seed(2);
        let a = sample(&w, 1_000_000);

        let mut moved = a.clone();
        moved.peer_port = 9999;
        assert!(
            moved
                .verify(1_000_000, 60_000)
                .unwrap_err()
                .contains("signed by")
        );

        let mut hijacked = a.clone();
        hijacked.host = Some("10.0.0.66".into());
        assert!(hijacked.verify(1_000_000, 60_000).is_err());

        let mut other = a.clone();
        other.node_id = Wallet::from_seed(3).address().to_string();
        assert!(other.verify(1_000_000, 60_000).is_err());

        assert!(
            a.verify(1_000_000 + 61_000, 60_000)
                .unwrap_err()
                .contains("clock")
        );
    }

    #[test]
    fn fields_are_checked() {
        let w = Wallet::from_seed(4);
        let bad_role = Announce::signed(&w, 9000, 8000, None, "king", vec![], 0);
        assert!(bad_role.verify(0, 1000).unwrap_err().contains("role"));
        let bad_host = Announce::signed(&w, 9000, 8000, Some("a b".into()), "full", vec![], 0);
        assert!(bad_host.verify(0, 1000).unwrap_err().contains("host"));
        let zero = Announce::signed(&w, 0, 8000, None, "full", vec![], 0);
        assert!(zero.verify(0, 1000).is_err());
        let named = Announce::signed(
            &w,
            9000,
            8000,
            Some("node-1.example.org".into()),
            "worker",
            vec![3],
            0,
        );
        assert!(named.verify(0, 1000).is_ok());
        let too_many = Announce::signed(&w, 9000, 8000, None, "full", vec![0; MAX_LAYERS + 1], 0);
        assert!(too_many.verify(0, 1000).is_err());
    }
}
