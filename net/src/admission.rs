//! Admission at accept, for every listening socket of a node that hostile clients can reach
//! (the peer port here, the REST API and the tracker in control's `listen.rs`): a connection
//! is refused (closed at once, counted) when its address already holds `per_address`
//! connections, or when `total` connections from other machines are open. Loopback clients
//! (the local CLI, the dashboard, peers on the same machine) are not counted against `total`:
//! their own room is bounded only by the per-address cap, so a flood from outside never locks
//! the operator out. The caps are figures of the node's descriptors: [`total_cap`] lowers a
//! configured total so that every socket's connections together leave
//! [`DESCRIPTOR_HEADROOM`] free.
//!
//! New connections are also rated: each address has a token bucket of `new_per_second`
//! connections a second with a burst of [`BURST_SECONDS`] of them; a connection beyond it is
//! refused. The addresses of this machine's own tools, 127.0.0.1 and ::1 (the CLI, the
//! dashboard, a reverse proxy on the same machine), are exempt; the rest of 127.0.0.0/8 is
//! rated like any address. Buckets of idle addresses are swept (a full bucket is the same as
//! none), and the buckets are at most [`MAX_BUCKETS`], so a flood from many addresses cannot
//! grow the table without bound.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The caps of one listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Most connections open at once from one client address.
    pub per_address: usize,
    /// Most connections open at once from addresses other than loopback.
    pub total: usize,
    /// New connections one address may open per second, in bursts of [`BURST_SECONDS`] of
    /// them (127.0.0.1 and ::1 are exempt).
    pub new_per_second: u32,
}

/// A bucket holds this many seconds' worth of new connections: the burst an address may open
/// at once after being idle.
pub const BURST_SECONDS: u32 = 4;

/// Most addresses with a rate bucket at once. Beyond, after a sweep, a new address is admitted
/// unrated (the per-address and total caps still hold): accepted connections come from
/// addresses that finished a TCP handshake, and this bounds the table's memory (about 4 MiB).
pub const MAX_BUCKETS: usize = 65_536;

/// Connection figures of one listening socket (metrics).
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Connections admitted.
    pub accepted: AtomicU64,
    /// Connections refused at accept: their address held `per_address` already.
    pub refused_per_address: AtomicU64,
    /// Connections refused at accept: `total` connections from other machines were open.
    pub refused_total: AtomicU64,
    /// Connections refused at accept: their address opened new ones faster than its rate.
    pub refused_rate: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
}

impl ConnStats {
    /// Connections refused at accept, for any reason.
    pub fn refused(&self) -> u64 {
        self.refused_per_address.load(Ordering::Relaxed)
            + self.refused_total.load(Ordering::Relaxed)
            + self.refused_rate.load(Ordering::Relaxed)
    }
}

/// Open connections by client address; a [`Slot`] frees its place when dropped.
#[derive(Debug, Default)]
pub struct Table {
    by_address: HashMap<IpAddr, usize>,
    remote_total: usize,
    buckets: HashMap<IpAddr, Bucket>,
    last_sweep: Option<Instant>,
}

/// New connections an address may still open now, as of `at`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Table {
    /// Takes one new connection from `ip`'s bucket at `now`; false when it is empty.
    fn take(&mut self, ip: IpAddr, rate: u32, now: Instant) -> bool {
        if rate == 0 || exempt(ip) {
            return true;
        }
        let burst = f64::from(rate) * f64::from(BURST_SECONDS);
        let refill = Duration::from_secs(u64::from(BURST_SECONDS));
        // Sweep once per refill time (not more often: a sweep walks the whole table): a
        // bucket that has refilled is the same as none.
        if self
            .last_sweep
            .is_none_or(|t| now.duration_since(t) >= refill)
        {
            self.buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.at).as_secs_f64() * f64::from(rate) < burst
            });
            self.last_sweep = Some(now);
        }
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= MAX_BUCKETS {
            return true;
        }
        let b = self.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * f64::from(rate)).min(burst);
        b.at = now;
        if b.tokens < 1.0 {
            return false;
        }
        b.tokens -= 1.0;
        true
    }

    /// Addresses with a rate bucket now (after the last sweep).
    pub fn rated_addresses(&self) -> usize {
        self.buckets.len()
    }
}

/// This machine's own tools connect from these: never rated.
fn exempt(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == std::net::Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => {
            v6 == std::net::Ipv6Addr::LOCALHOST
                || v6.to_ipv4_mapped() == Some(std::net::Ipv4Addr::LOCALHOST)
        }
    }
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
    Rate,
}

/// Admits a connection from `ip` under `caps`, or says why not; either way the outcome is
/// counted in `stats` (accepted and open, or refused by reason).
pub fn admit(
    table: &Arc<Mutex<Table>>,
    stats: &Arc<ConnStats>,
    caps: Caps,
    ip: IpAddr,
) -> Result<Slot, Refusal> {
    admit_at(table, stats, caps, ip, Instant::now())
}

/// [`admit`] at the instant `now` (the rate's clock).
fn admit_at(
    table: &Arc<Mutex<Table>>,
    stats: &Arc<ConnStats>,
    caps: Caps,
    ip: IpAddr,
    now: Instant,
) -> Result<Slot, Refusal> {
    let mut t = table.lock();
    let held = t.by_address.get(&ip).copied().unwrap_or(0);
    let refusal = if held >= caps.per_address {
        Some(Refusal::PerAddress)
    } else if !ip.is_loopback() && t.remote_total >= caps.total {
        Some(Refusal::Total)
    } else if !t.take(ip, caps.new_per_second, now) {
        Some(Refusal::Rate)
    } else {
        None
    };
    if let Some(refusal) = refusal {
        let counter = match refusal {
            Refusal::PerAddress => &stats.refused_per_address,
            Refusal::Total => &stats.refused_total,
            Refusal::Rate => &stats.refused_rate,
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
        Caps {
            per_address,
            total,
            new_per_second: 0,
        }
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
    fn new_connections_are_rated_per_address_in_bursts() {
        let table = Arc::new(Mutex::new(Table::default()));
        let stats = Arc::new(ConnStats::default());
        let l = Caps {
            per_address: 1000,
            total: 1000,
            new_per_second: 5,
        };
        let burst = (5 * BURST_SECONDS) as usize;
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        let mut held = Vec::new();
        for _ in 0..burst {
            held.push(admit_at(&table, &stats, l, a, t0).unwrap());
        }
        // The burst is spent; closing connections gives nothing back, time does.
        held.clear();
        assert_eq!(
            admit_at(&table, &stats, l, a, t0).err(),
            Some(Refusal::Rate)
        );
        assert_eq!(stats.refused_rate.load(Ordering::Relaxed), 1);
        assert_eq!(stats.refused(), 1);
        // Another address has its own bucket.
        assert!(admit_at(&table, &stats, l, b, t0).is_ok());
        // A fifth of a second later: one more (5 a second).
        let later = t0 + Duration::from_millis(200);
        assert!(admit_at(&table, &stats, l, a, later).is_ok());
        assert_eq!(
            admit_at(&table, &stats, l, a, later).err(),
            Some(Refusal::Rate)
        );
        // This machine's own tools are never rated; the rest of loopback is.
        for ip in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            for _ in 0..burst * 3 {
                drop(admit_at(&table, &stats, l, ip, t0).unwrap());
            }
        }
        let other_loopback: IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 0..burst {
            drop(admit_at(&table, &stats, l, other_loopback, t0).unwrap());
        }
        assert_eq!(
            admit_at(&table, &stats, l, other_loopback, t0).err(),
            Some(Refusal::Rate)
        );
        // A rate of 0 rates nothing.
        let unrated = Caps {
            new_per_second: 0,
            ..l
        };
        assert!(admit_at(&table, &stats, unrated, a, later).is_ok());
    }

    #[test]
    fn idle_buckets_are_swept_and_the_table_is_bounded() {
        let table = Arc::new(Mutex::new(Table::default()));
        let stats = Arc::new(ConnStats::default());
        let l = Caps {
            per_address: 10,
            total: usize::MAX,
            new_per_second: 1,
        };
        let t0 = Instant::now();
        // A flood from many addresses, one connection each.
        for i in 0..5000u32 {
            let ip = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            drop(admit_at(&table, &stats, l, ip, t0).unwrap());
        }
        assert_eq!(table.lock().rated_addresses(), 5000);
        // Once their buckets have refilled (BURST_SECONDS at 1 a second), the next admission
        // sweeps them all.
        let later = t0 + Duration::from_secs(u64::from(BURST_SECONDS));
        let fresh: IpAddr = "192.0.2.1".parse().unwrap();
        drop(admit_at(&table, &stats, l, fresh, later).unwrap());
        assert_eq!(table.lock().rated_addresses(), 1);
        // More addresses than MAX_BUCKETS within one refill time: the table stops at the
        // bound and the rest are admitted unrated.
        let t1 = later + Duration::from_millis(1);
        for i in 0..(MAX_BUCKETS as u32 + 100) {
            let ip = IpAddr::from((0x0b00_0000 + i).to_be_bytes());
            drop(admit_at(&table, &stats, l, ip, t1).unwrap());
        }
        assert!(table.lock().rated_addresses() <= MAX_BUCKETS);
        assert_eq!(stats.refused(), 0);
    }

    #[test]
    fn the_total_cap_keeps_headroom() {
        assert_eq!(total_cap(4096, 1_048_576, 3), 4096);
        assert_eq!(total_cap(4096, 4096, 2), 1536);
        assert_eq!(total_cap(4096, 512, 2), 1);
    }
}
