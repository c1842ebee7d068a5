//! The peer-to-peer stack through real NATs (issue 21 items 1 and 5, first part): the NAT lab
//! (`neuroshard_tests::lab::nat`: a public namespace, home LANs behind nftables masquerade
//! routers, a relay on the public side) and the chosen stack's bench binary, rust-libp2p's
//! (`bench/p2p/libp2p-bench`: relay v2, DCUtR, identify, AutoNAT; built by scripts/test.sh). Two endpoints behind endpoint-independent NATs
//! end on a direct path after hole punching; one behind a symmetric NAT still connects,
//! through the relay; with the relay gone, a NAT'd endpoint cannot be found and the client
//! fails with an error within its timeout, not a hang. Needs root, `ip` and `nft`.
//!
//! The daemon's transport is not on the stack yet (docs/p2p.md): this checks the ground it
//! will stand on.

use std::time::Duration;

use neuroshard_tests::lab::nat::{NatKind, NatLab, Placement};
use neuroshard_tests::lab::p2p::{ClientOptions, P2pRun, Stack};

/// The stack chosen by measuring both (BENCHMARKS.md, "Peer-to-peer stacks").
const STACK: Stack = Stack::Libp2p;
const EIM: Placement = Placement::Behind(NatKind::EndpointIndependent);
const SYMMETRIC: Placement = Placement::Behind(NatKind::Symmetric);
const CLIENT_LIMIT: Duration = Duration::from_secs(90);

#[test]
fn natted_endpoints_hole_punch_fall_back_to_the_relay_and_fail_cleanly_without_it()
-> anyhow::Result<()> {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let mut lab = NatLab::new()?;
    let a = lab.add_host("a", EIM)?;
    let b = lab.add_host("b", EIM)?;
    let s = lab.add_host("s", SYMMETRIC)?;
    let mut run = P2pRun::start(&mut lab, STACK)?;
    run.start_server(&mut lab, &a, "a")?;

    // Both behind endpoint-independent NATs: direct after hole punching, the data arrives.
    let opts = ClientOptions {
        bytes: 4 << 20,
        wait_direct_s: 20.0,
        ..ClientOptions::default()
    };
    let r = run.client(&mut lab, &b, "a", &opts, CLIENT_LIMIT)?;
    assert_eq!(r["path"], "direct", "{r}\n{}", run.log("a"));
    assert!(r["direct_ms"].is_number(), "{r}");
    assert_eq!(r["transfer"]["bytes"], 4 << 20, "{r}");

    // Behind a symmetric NAT the punched hole leads nowhere: relayed, and it still works.
    let relayed = ClientOptions {
        wait_direct_s: 3.0,
        ..opts.clone()
    };
    let r = run.client(&mut lab, &s, "a", &relayed, CLIENT_LIMIT)?;
    assert_eq!(r["path"], "relay", "{r}");
    assert_eq!(r["transfer"]["bytes"], 4 << 20, "{r}");

    // The relay down: nothing coordinates the punch and nothing carries the bytes; the client
    // gives up with an error (its dial of the relay fails, or its connect timeout of 10 s
    // passes) instead of hanging (the run kills a client still there after 90 s and says so).
    run.stop_relay(&mut lab);
    let down = ClientOptions {
        connect_timeout_s: 10.0,
        ..opts
    };
    let err = run
        .client(&mut lab, &b, "a", &down, CLIENT_LIMIT)
        .expect_err("connected to a NAT'd endpoint with the relay down");
    let text = format!("{err:#}");
    assert!(!text.contains("hung"), "{text}");
    assert!(text.contains("failed"), "{text}");
    Ok(())
}
