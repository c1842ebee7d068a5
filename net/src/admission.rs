//! Admission at accept, for every listening socket of a node that hostile clients can reach
//! (the peer port here, the REST API and the tracker in control's `listen.rs`): a connection
//! is refused (closed at once, counted) when its address already holds `per_address`
//! connections, or when `total` connections from other machines are open. Loopback clients
//! (the local CLI, the dashboard, peers on the same machine) are not counted against `total`:
//! their own room is bounded only by the per-address cap, so a flood from outside never locks
//! the operator out. The caps are figures of the node's descriptors: [`total_cap`] lowers a
//! configured total so that every socket's connections together leave
//! [`DESCRIPTOR_HEADROOM`] free.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// The caps of one listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Most connections open at once from one client address.
    pub per_address: usize,
    /// Most connections open at once from addresses other than loopback.
    pub total: usize,
}

/// Connection figures of one listening socket (metrics).
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Connections admitted.
    pub accepted: AtomicU64,
    /// Connections refused at accept: their address held `per_address` already.
    pub refused_per_address: AtomicU64,
    /// Connections refused at accept: `total` connections from other machines were open.
    pub refused_total: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
}

impl ConnStats {
    /// Connections refused at accept, for either cap.
    pub fn refused(&self) -> u64 {
        self.refused_per_address.load(Ordering::Relaxed)
            + self.refused_total.load(Ordering::Relaxed)
    }
}

/// Open connections by client address; a [`Slot`] frees its place when dropped.
#[derive(Debug, Default)]
pub struct Table {
    by_address: HashMap<IpAddr, usize>,
    remote_total: usize,
}

/// One admitted connection's place in its [`Table`]: keep it as long as the connection lives.
#[derive(Debug)]
pub struct Slot {
    table: Arc<Mutex<Table>>,
    stats: Arc<ConnStats>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.table.lock();
        if let Some(n) = t.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.by_address.remove(&self.ip);
            }
        }
        if !self.ip.is_loopback() {
            t.remote_total -= 1;
        }
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    PerAddress,
    Total,
}

/// Admits a connection from `ip` under `caps`, or says why not; either way the outcome is
/// counted in `stats` (accepted and open, or refused by reason).
pub fn admit(
    table: &Arc<Mutex<Table>>,
    stats: &Arc<ConnStats>,
    caps: Caps,
    ip: IpAddr,
) -> Result<Slot, Refusal> {
    let mut t = table.lock();
    let held = t.by_address.get(&ip).copied().unwrap_or(0);
    let refusal = if held >= caps.per_address {
        Some(Refusal::PerAddress)
    } else if !ip.is_loopback() && t.remote_total >= caps.total {
        Some(Refusal::Total)
    } else {
        None
    };
    if let Some(refusal) = refusal {
        let counter = match refusal {
            Refusal::PerAddress => &stats.refused_per_address,
            Refusal::Total => &stats.refused_total,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        return Err(refusal);
    }
    if !ip.is_loopback() {
        t.remote_total += 1;
    }
    *t.by_address.entry(ip).or_insert(0) += 1;
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    stats.open.fetch_add(1, Ordering::Relaxed);
    Ok(Slot {
        table: table.clone(),
        stats: stats.clone(),
        ip,
    })
}

/// Descriptors kept free of client connections: the node's own files (database, logs,
/// checkpoints), its engine socket and shared memory, its outgoing peer connections and
/// loopback clients.
pub const DESCRIPTOR_HEADROOM: u64 = 1024;

/// The total cap of remote connections for one socket: the configured figure, lowered so that
/// `sockets` such sockets together leave [`DESCRIPTOR_HEADROOM`] of `nofile` free.
pub fn total_cap(configured: usize, nofile: u64, sockets: u64) -> usize {
    let room = nofile.saturating_sub(DESCRIPTOR_HEADROOM) / sockets.max(1);
    configured
        .min(usize::try_from(room).unwrap_or(usize::MAX))
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(per_address: usize, total: usize) -> Caps {
        Caps { per_address, total }
    }

    #[test]
    fn admits_up_to_the_caps_and_frees_on_drop() {
        let table = Arc::new(Mutex::new(Table::default()));
        let stats = Arc::new(ConnStats::default());
        let l = caps(2, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let a1 = admit(&table, &stats, l, a).unwrap();
        let _a2 = admit(&table, &stats, l, a).unwrap();
        assert_eq!(admit(&table, &stats, l, a).err(), Some(Refusal::PerAddress));
        let _b1 = admit(&table, &stats, l, b).unwrap();
        assert_eq!(admit(&table, &stats, l, b).err(), Some(Refusal::Total));
        // Loopback does not count against the total, only against its own address cap.
        let _l1 = admit(&table, &stats, l, local).unwrap();
        let _l2 = admit(&table, &stats, l, local).unwrap();
        assert_eq!(
            admit(&table, &stats, l, local).err(),
            Some(Refusal::PerAddress)
        );
        assert_eq!(stats.open.load(Ordering::Relaxed), 5);
        assert_eq!(stats.accepted.load(Ordering::Relaxed), 5);
        assert_eq!(stats.refused_per_address.load(Ordering::Relaxed), 2);
        assert_eq!(stats.refused_total.load(Ordering::Relaxed), 1);
        assert_eq!(stats.refused(), 3);
        drop(a1);
        assert_eq!(stats.open.load(Ordering::Relaxed), 4);
        let _b2 = admit(&table, &stats, l, b).unwrap();
        assert!(table.lock().by_address.len() == 3);
    }

    #[test]
    fn the_total_cap_keeps_headroom() {
        assert_eq!(total_cap(4096, 1_048_576, 3), 4096);
        assert_eq!(total_cap(4096, 4096, 2), 1536);
        assert_eq!(total_cap(4096, 512, 2), 1);
    }
}
