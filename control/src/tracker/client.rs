//! The node's side of a tracker: announce this node every [`ANNOUNCE_INTERVAL`], then hand
//! every listed peer to the peer manager, which dials, handshakes and keeps it like a seed it
//! learned. Failures are logged when the state changes (not every round) and retried. An
//! https tracker is verified with the system's roots, or, with `tracker_fingerprint`, only its
//! pinned certificate is accepted (a mismatch fails the round with both fingerprints).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{ANNOUNCE_INTERVAL, Announce, PeerList};
use neuroshard_net::{Network, manager, now_ms, stopped};

/// Deadline of one tracker request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Delay before retrying a round that failed.
const RETRY_AFTER: Duration = Duration::from_secs(3);

/// Announces to `url` and learns its peers until `shutdown` turns true; `pin` is the
/// tracker certificate's SHA-256 fingerprint, or empty.
pub async fn run(net: Arc<Network>, url: String, pin: String, mut shutdown: watch::Receiver<bool>) {
    let base = url.trim_end_matches('/').to_string();
    let http = match client(&pin) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "tracker client cannot start");
            return;
        }
    };
    let mut healthy: Option<bool> = None;
    loop {
        let result = round(&net, &http, &base).await;
        match (&result, healthy) {
            (Ok(n), Some(true)) => tracing::debug!(tracker = %base, peers = n, "tracker round"),
            (Ok(n), _) => tracing::info!(tracker = %base, peers = n, "announced to the tracker"),
            (Err(e), Some(false)) => {
                tracing::debug!(tracker = %base, error = format!("{e:#}"), "tracker still unreachable")
            }
            (Err(e), _) => {
                tracing::warn!(tracker = %base, error = format!("{e:#}"), "tracker unreachable; retrying")
            }
        }
        healthy = Some(result.is_ok());
        tokio::select! {
            _ = tokio::time::sleep(next_round(result.is_ok())) => {}
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// The HTTP client of the tracker rounds: pinned to `pin` when it is a fingerprint.
fn client(pin: &str) -> anyhow::Result<reqwest::Client> {
    let builder = reqwest::Client::builder().timeout(REQUEST_TIMEOUT);
    let builder = match crate::tls::parse_fingerprint(pin) {
        Some(sha256) => builder.use_preconfigured_tls(crate::tls::pinned_client(sha256)?),
        None => builder,
    };
    Ok(builder.build()?)
}

/// Delay before the next round: [`ANNOUNCE_INTERVAL`] less up to a fifth, at random, so that
/// nodes started together do not hit the tracker in lockstep; after a failure, a few seconds
/// (the node would otherwise drop off a tracker whose TTL is close to the interval).
fn next_round(ok: bool) -> Duration {
    let base = if ok { ANNOUNCE_INTERVAL } else { RETRY_AFTER };
    base.mul_f64(1.0 - rand::random::<f64>() * 0.2)
}

/// One announce + list; returns how many peers the tracker listed.
async fn round(net: &Network, http: &reqwest::Client, base: &str) -> anyhow::Result<usize> {
    let info = net.local_info();
    let (api_port, _) = net.ports();
    // The announced address (`--announce-ip`/`--announce-port`); without a host the tracker
    // lists the address the request came from.
    let (host, peer_port) = net.announced();
    let a = Announce::signed(
        &net.wallet,
        peer_port,
        api_port,
        host,
        &info.role,
        info.layers,
        now_ms(),
    );
    let r = http
        .post(format!("{base}/announce"))
        .json(&a)
        .send()
        .await?;
    if !r.status().is_success() {
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        anyhow::bail!(
            "announce answered {status}: {}",
            body.chars().take(300).collect::<String>()
        );
    }
    let r = http
        .get(format!("{base}/peers"))
        .query(&[("exclude", a.node_id.as_str()), ("limit", "200")])
        .send()
        .await?;
    if !r.status().is_success() {
        anyhow::bail!("peers answered {}", r.status());
    }
    let list: PeerList = r.json().await?;
    let me = net.id().to_string().to_ascii_lowercase();
    for p in &list.peers {
        if p.node_id.to_ascii_lowercase() != me {
            manager::learn_address(net, &p.address);
        }
    }
    Ok(list.peers.len())
}
