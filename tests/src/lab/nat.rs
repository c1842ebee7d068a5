//! The NAT lab (issue 21 item 5): a public namespace (the internet: a bridge, every host on it
//! at a public-looking address), home LANs each behind a router namespace doing nftables
//! masquerade with no port forwarding, and a relay host on the public bridge. Two NAT kinds:
//!
//! - endpoint-independent mapping ([`NatKind::EndpointIndependent`]): plain `masquerade`,
//!   which keeps the LAN host's source port when it is free, so one local socket has one
//!   public address whatever it talks to (what most home routers do); conntrack still drops
//!   what comes from an address and port the host has not sent to, so a hole must be punched;
//! - symmetric ([`NatKind::Symmetric`]): `masquerade fully-random`, a new random public port
//!   for every new destination, so the address a relay observes is useless to anyone else.
//!
//! Processes are started in a namespace with `ip netns exec` and killed on drop, before the
//! namespaces go (the [`Topology`] removes those). Names carry this process's id and a
//! counter, so tests running at once never share one.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};

use super::net::{Link, Topology};

/// How a home router maps a LAN host's outgoing flows to public ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NatKind {
    /// One public port per local socket, whatever the destination (full-cone-like mapping).
    EndpointIndependent,
    /// A different public port per destination (address and port dependent mapping).
    Symmetric,
}

impl NatKind {
    /// The nftables statement of the router's postrouting rule.
    pub fn masquerade(self) -> &'static str {
        match self {
            NatKind::EndpointIndependent => "masquerade",
            NatKind::Symmetric => "masquerade fully-random",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            NatKind::EndpointIndependent => "EIM",
            NatKind::Symmetric => "symmetric",
        }
    }
}

/// Where a host sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On the public bridge, reachable by anyone.
    Public,
    /// Alone on a LAN behind its own router of this kind.
    Behind(NatKind),
}

impl Placement {
    pub fn label(self) -> &'static str {
        match self {
            Placement::Public => "public",
            Placement::Behind(k) => k.label(),
        }
    }
}

/// A host of the lab: its namespace and its own address (a LAN address behind a NAT).
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: String,
    pub ip: Ipv4Addr,
    pub placement: Placement,
}

/// The public network, its relay host, and the hosts added (public or behind a NAT each).
pub struct NatLab {
    // Dropped first: the processes, then the namespaces.
    children: Vec<Child>,
    pub topology: Topology,
    pub relay: Host,
    next_lan: u8,
}

impl NatLab {
    /// The public namespace and a public relay host (`<prefix>-relay`). Fails with what to
    /// install when `ip`, `tc` or `nft` is missing, or when not root.
    pub fn new() -> anyhow::Result<NatLab> {
        let mut topology = Topology::new(&format!("lab{}", super::run_name()))?;
        let (ns, ip) = topology.add_host("relay", Link::default())?;
        Ok(NatLab {
            children: Vec::new(),
            topology,
            relay: Host {
                ns,
                ip,
                placement: Placement::Public,
            },
            next_lan: 1,
        })
    }

    /// A host named `name` placed as asked: on the public bridge, or alone on a new LAN
    /// (`192.168.<k>.0/24`) behind a new router `<name>-gw` of the given kind.
    pub fn add_host(&mut self, name: &str, placement: Placement) -> anyhow::Result<Host> {
        let (ns, ip) = match placement {
            Placement::Public => self.topology.add_host(name, Link::default())?,
            Placement::Behind(kind) => {
                let k = self.next_lan;
                self.next_lan += 1;
                let mut lan = self.topology.add_nat_lan_of_kind(
                    &format!("{name}-gw"),
                    [192, 168, k],
                    kind,
                )?;
                self.topology
                    .add_host_behind(&mut lan, name, Link::default())?
            }
        };
        Ok(Host { ns, ip, placement })
    }

    /// Starts `program args` in `host`'s namespace, stdout piped, stderr to `log`; the lab
    /// kills it on drop. Its index for [`NatLab::kill`].
    pub fn spawn(
        &mut self,
        host: &Host,
        program: &std::path::Path,
        args: &[String],
        log: &std::path::Path,
    ) -> anyhow::Result<usize> {
        let child = Command::new("ip")
            .args(["netns", "exec", &host.ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()?;
        self.children.push(child);
        Ok(self.children.len() - 1)
    }

    /// The process started as `index`.
    pub fn child(&mut self, index: usize) -> &mut Child {
        &mut self.children[index]
    }

    /// Kills the process started as `index` and reaps it.
    pub fn kill(&mut self, index: usize) {
        let c = &mut self.children[index];
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
