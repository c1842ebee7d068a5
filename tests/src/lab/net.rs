//! The lab's network: one "public internet" namespace holding a bridge, and one namespace per
//! host joined to it by a veth pair, each host's access link shaped (rate, loss, and latency
//! where the kernel has `sch_netem`); a partition is an nftables drop between two sets of
//! addresses on the bridge, healed by deleting the table. A NAT'd LAN is a router namespace
//! on the bridge (a public address) masquerading for a LAN bridge of its own, so hosts can sit
//! behind it (issue 21 item 5 builds on this). Everything is made with `ip`, `tc` and `nft`
//! and removed on drop, even after a failure.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

pub use super::nat::NatKind;

/// The public network: 10.77.0.0/16, the bridge holding 10.77.0.1.
pub const PUBLIC_PREFIX: [u8; 2] = [10, 77];

/// How a host's access link is shaped, both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Link {
    /// One-way delay added on the access link, each direction (needs `sch_netem`).
    pub delay_ms: u32,
    /// Bandwidth of the access link, each direction; 0: unlimited.
    pub rate_mbit: u32,
    /// Share of packets dropped, each direction, in percent.
    pub loss_pct: f64,
}

/// The lab's namespaces, named `<prefix>-<name>`.
pub struct Topology {
    prefix: String,
    public: String,
    namespaces: Vec<String>,
    netem: bool,
    next_public_host: u32,
    partitioned: bool,
}

/// A LAN behind a masquerading router (its own namespace and bridge).
pub struct NatLan {
    pub router: String,
    pub public_ip: Ipv4Addr,
    /// First three octets of the LAN's /24; the router is `.1`.
    pub subnet: [u8; 3],
    next_host: u8,
}

/// Runs a command; its stderr in the error when it fails.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args))
}

/// `cmd args` inside namespace `ns`.
fn in_ns(ns: &str, cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip")
        .args(["netns", "exec", ns, cmd])
        .args(args))
}

/// Fails with what to install when `tool` is not on PATH (the lab never skips).
pub fn require_tools() -> anyhow::Result<()> {
    for tool in ["ip", "tc", "nft"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()));
        if !found {
            bail!("the lab needs `{tool}` (apt-get install -y iproute2 nftables)");
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { nix::libc::geteuid() } != 0 {
        bail!("the lab needs root (network namespaces, cgroups)");
    }
    Ok(())
}

/// The file a namespace is reached through (for `setns`).
pub fn ns_path(ns: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(ns)
}

impl Topology {
    /// Creates the public namespace and its bridge. Namespaces left by an earlier lab run
    /// whose process is gone (`lab<pid>-<k>-...`) are removed first.
    pub fn new(prefix: &str) -> anyhow::Result<Topology> {
        require_tools()?;
        remove_stale_namespaces();
        let public = format!("{prefix}-pub");
        ip(&["netns", "add", &public])?;
        let mut t = Topology {
            prefix: prefix.to_string(),
            public: public.clone(),
            namespaces: vec![public.clone()],
            netem: false,
            next_public_host: 10,
            partitioned: false,
        };
        ip(&["-n", &public, "link", "set", "lo", "up"])?;
        ip(&["-n", &public, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &public, "link", "set", "br0", "up"])?;
        let [a, b] = PUBLIC_PREFIX;
        ip(&[
            "-n",
            &public,
            "addr",
            "add",
            &format!("{a}.{b}.0.1/16"),
            "dev",
            "br0",
        ])?;
        t.netem = in_ns(
            &public,
            "tc",
            &["qdisc", "add", "dev", "lo", "root", "netem"],
        )
        .is_ok();
        if t.netem {
            let _ = in_ns(&public, "tc", &["qdisc", "del", "dev", "lo", "root"]);
        }
        Ok(t)
    }

    /// Whether this kernel emulates latency (`sch_netem`); without it links have rate and
    /// loss only and a delay is refused.
    pub fn has_netem(&self) -> bool {
        self.netem
    }

    pub fn public_ns(&self) -> &str {
        &self.public
    }

    /// The next free public address.
    pub fn next_public_ip(&mut self) -> Ipv4Addr {
        let n = self.next_public_host;
        self.next_public_host += 1;
        let [a, b] = PUBLIC_PREFIX;
        Ipv4Addr::new(a, b, (n / 250) as u8, (n % 250) as u8 + 1)
    }

    /// A host namespace `<prefix>-<name>` on the public bridge at a new public address.
    pub fn add_host(&mut self, name: &str, link: Link) -> anyhow::Result<(String, Ipv4Addr)> {
        let addr = self.next_public_ip();
        let ns = format!("{}-{name}", self.prefix);
        let public = self.public.clone();
        self.attach(&ns, &public, "br0", addr, 16, None, link)?;
        Ok((ns, addr))
    }

    /// A host namespace `<prefix>-<name>` on `lan`, behind its router.
    pub fn add_host_behind(
        &mut self,
        lan: &mut NatLan,
        name: &str,
        link: Link,
    ) -> anyhow::Result<(String, Ipv4Addr)> {
        let [a, b, c] = lan.subnet;
        lan.next_host += 1;
        let addr = Ipv4Addr::new(a, b, c, lan.next_host);
        let ns = format!("{}-{name}", self.prefix);
        let router = lan.router.clone();
        let gateway = Ipv4Addr::new(a, b, c, 1);
        self.attach(&ns, &router, "lan0", addr, 24, Some(gateway), link)?;
        Ok((ns, addr))
    }

    /// A router namespace on the public bridge masquerading for the LAN `a.b.c.0/24`: hosts
    /// behind it reach the public network, nothing there reaches them unasked.
    pub fn add_nat_lan(&mut self, name: &str, subnet: [u8; 3]) -> anyhow::Result<NatLan> {
        self.add_nat_lan_of_kind(name, subnet, NatKind::EndpointIndependent)
    }

    /// [`Topology::add_nat_lan`] with the router's mapping behaviour chosen (see [`NatKind`]).
    pub fn add_nat_lan_of_kind(
        &mut self,
        name: &str,
        subnet: [u8; 3],
        kind: NatKind,
    ) -> anyhow::Result<NatLan> {
        let public_ip = self.next_public_ip();
        let router = format!("{}-{name}", self.prefix);
        let public = self.public.clone();
        self.attach(
            &router,
            &public,
            "br0",
            public_ip,
            16,
            None,
            Link::default(),
        )?;
        ip(&["-n", &router, "link", "add", "lan0", "type", "bridge"])?;
        ip(&["-n", &router, "link", "set", "lan0", "up"])?;
        let [a, b, c] = subnet;
        ip(&[
            "-n",
            &router,
            "addr",
            "add",
            &format!("{a}.{b}.{c}.1/24"),
            "dev",
            "lan0",
        ])?;
        in_ns(&router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let rules = format!(
            "table ip nat {{\n chain post {{\n  type nat hook postrouting priority 100;\n  \
             ip saddr {a}.{b}.{c}.0/24 oifname \"eth0\" {}\n }}\n}}\n",
            kind.masquerade()
        );
        self.nft(&router, &rules)?;
        // Like a home router, it drops what arrives unasked on its public side. Without this
        // the first packet of a hole punch (the peer's, arriving before ours leaves) got a
        // conntrack entry towards the router itself, and our outgoing packet then clashed
        // with it and was given another public port: no endpoint-independent mapping.
        let filter = "table inet wan {\n chain input {\n  type filter hook input priority 0; \
             policy accept;\n  iifname \"eth0\" ct state new drop\n }\n}\n";
        self.nft(&router, filter)?;
        Ok(NatLan {
            router,
            public_ip,
            subnet,
            next_host: 1,
        })
    }

    /// Makes namespace `ns` with `eth0` (address `addr/prefix_len`) on `bridge` of `on_ns`.
    #[allow(clippy::too_many_arguments)]
    fn attach(
        &mut self,
        ns: &str,
        on_ns: &str,
        bridge: &str,
        addr: Ipv4Addr,
        prefix_len: u8,
        gateway: Option<Ipv4Addr>,
        link: Link,
    ) -> anyhow::Result<()> {
        if link.delay_ms > 0 && !self.netem {
            bail!(
                "this kernel has no sch_netem (CONFIG_NET_SCH_NETEM): links cannot be given \
                 a delay; run with a delay of 0 (rate and loss still apply)"
            );
        }
        ip(&["netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        // The bridge end's name is unique in `on_ns`: v<last two octets>.
        let o = addr.octets();
        let outer = format!("v{}x{}x{}", o[1], o[2], o[3]);
        ip(&[
            "-n", on_ns, "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["-n", on_ns, "link", "set", &outer, "master", bridge, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/{prefix_len}"),
            "dev",
            "eth0",
        ])?;
        if let Some(gw) = gateway {
            ip(&["-n", ns, "route", "add", "default", "via", &gw.to_string()])?;
        }
        // Both directions: the host's egress on eth0, its ingress on the bridge end.
        self.shape(ns, "eth0", link)?;
        self.shape(on_ns, &outer, link)?;
        if link.loss_pct > 0.0 {
            // Loss without netem: nftables drops a random share of what the host sends and
            // receives.
            let per_10k = (link.loss_pct * 100.0).round() as u32;
            let rules = format!(
                "table inet loss {{\n chain in {{ type filter hook input priority 0; \
                 meta iifname \"eth0\" numgen random mod 10000 < {per_10k} drop; }}\n \
                 chain out {{ type filter hook output priority 0; \
                 meta oifname \"eth0\" numgen random mod 10000 < {per_10k} drop; }}\n}}\n"
            );
            if !self.netem {
                self.nft(ns, &rules)?;
            }
        }
        Ok(())
    }

    /// The egress qdisc of `dev` in `ns`: netem (delay, rate, loss) where the kernel has it,
    /// else a token bucket for the rate.
    fn shape(&self, ns: &str, dev: &str, link: Link) -> anyhow::Result<()> {
        if self.netem && (link.delay_ms > 0 || link.rate_mbit > 0 || link.loss_pct > 0.0) {
            let mut args = vec!["qdisc", "add", "dev", dev, "root", "netem"];
            let delay = format!("{}ms", link.delay_ms);
            let rate = format!("{}mbit", link.rate_mbit);
            let loss = format!("{}%", link.loss_pct);
            args.extend(["delay", &delay]);
            if link.rate_mbit > 0 {
                args.extend(["rate", &rate]);
            }
            if link.loss_pct > 0.0 {
                args.extend(["loss", &loss]);
            }
            // netem's queue must hold a delay's worth of packets.
            args.extend(["limit", "10000"]);
            return in_ns(ns, "tc", &args);
        }
        if link.rate_mbit > 0 {
            let rate = format!("{}mbit", link.rate_mbit);
            // A burst of at least one MTU per timer tick at this rate; 200 ms of queue.
            let burst = format!("{}kb", (link.rate_mbit * 125 / 100).max(16));
            in_ns(
                ns,
                "tc",
                &[
                    "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst,
                    "latency", "200ms",
                ],
            )?;
        }
        Ok(())
    }

    /// Loads an nftables ruleset into `ns`.
    fn nft(&self, ns: &str, rules: &str) -> anyhow::Result<()> {
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), rules)?;
        let path = file.path().to_str().context("temp path")?.to_string();
        in_ns(ns, "nft", &["-f", &path])
    }

    /// Drops every packet between `a` and `b` on the public bridge (both directions).
    pub fn partition(&mut self, a: &[Ipv4Addr], b: &[Ipv4Addr]) -> anyhow::Result<()> {
        if a.is_empty() || b.is_empty() {
            bail!("a partition needs hosts on both sides");
        }
        let set = |s: &[Ipv4Addr]| {
            s.iter()
                .map(Ipv4Addr::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (a, b) = (set(a), set(b));
        let rules = format!(
            "table bridge partition {{\n chain cut {{\n  type filter hook forward priority 0; \
             policy accept;\n  ip saddr {{ {a} }} ip daddr {{ {b} }} drop\n  \
             ip saddr {{ {b} }} ip daddr {{ {a} }} drop\n }}\n}}\n"
        );
        let public = self.public.clone();
        self.nft(&public, &rules)?;
        self.partitioned = true;
        Ok(())
    }

    /// Removes the partition.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        if self.partitioned {
            in_ns(
                &self.public,
                "nft",
                &["delete", "table", "bridge", "partition"],
            )?;
            self.partitioned = false;
        }
        Ok(())
    }

    /// Moves the calling thread (and the threads it starts later) into the public
    /// namespace: the lab reads the nodes' APIs from there.
    pub fn enter_public(&self) -> anyhow::Result<()> {
        let f = std::fs::File::open(ns_path(&self.public))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering the lab's public namespace")?;
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Removes `lab<pid>-*` namespaces of lab processes that no longer run.
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("lab")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !crate::pid_alive(pid) {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// Runs `f` on a thread inside namespace `ns` (its sockets are that namespace's).
pub fn run_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let file = std::fs::File::open(ns_path(ns)).with_context(|| format!("opening {ns}"))?;
    std::thread::spawn(move || -> anyhow::Result<T> {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread in {ns} panicked"))?
}

/// Whether a TCP connection from namespace `ns` to `addr` opens within 2 s.
pub fn can_connect(ns: &str, addr: std::net::SocketAddr) -> anyhow::Result<bool> {
    run_in(ns, move || {
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).is_ok()
    })
}
