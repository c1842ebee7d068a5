//! The architecture invariants of ARCHITECTURE.md, checked over `cargo metadata`: which crate
//! may know prost and the database, and what each crate of the workspace must never depend
//! on, directly or through other crates. A violation names the crate, the dependency and the
//! path through which it comes in.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Async runtimes and executors.
const ASYNC: &[&str] = &["tokio", "async-std", "smol", "futures-executor"];
/// Database drivers: sqlx and the lower crates one could use instead.
const DATABASE: &[&str] = &[
    "sqlx",
    "sqlx-core",
    "sqlx-sqlite",
    "sqlx-postgres",
    "libsqlite3-sys",
    "rusqlite",
    "tokio-postgres",
];
const CUDA: &[&str] = &["cudarc"];
/// A REST API: its server and OpenAPI generator. tonic's router is built on axum, so axum
/// below tonic is not one: only a crate's own axum is (checked `directly`).
const REST: &[&str] = &["axum", "utoipa"];
/// hyper under tonic. A crate that uses these itself speaks HTTP on its own: control dials the
/// engine's socket with hyper-util; the engine's socket is served by tonic alone.
const HYPER: &[&str] = &["hyper", "hyper-util", "h2"];
const HTTP_CLIENT: &[&str] = &["reqwest", "ureq"];
/// Peers and money: control (the daemon: the peer services, the ledger's gossip), the crates
/// of identities, the ledger, the peer network (net) and coordination, and the secp256k1 keys
/// of wallets and node identities.
const PEERS_AND_MONEY: &[&str] = &[
    "neuroshard",
    "neuroshard-identity",
    "neuroshard-ledger",
    "neuroshard-net",
    "neuroshard-coordination",
    "k256",
];

/// What a crate never depends on: `anywhere` directly or through other crates, `directly` in
/// its own dependencies (those may still come in through another crate). Normal dependencies
/// only, the ones its code can use: dev- and build-dependencies are not followed.
struct Never {
    krate: &'static str,
    anywhere: &'static [&'static [&'static str]],
    directly: &'static [&'static [&'static str]],
}

/// The rules, one row per crate. Every workspace member needs a row, an empty one included; a
/// row of a crate that does not exist (yet) checks nothing.
const NEVER: &[Never] = &[
    // The contracts and their generated code: no storage, no CUDA, no HTTP of its own.
    Never {
        krate: "neuroshard-proto",
        anywhere: &[DATABASE, CUDA, HTTP_CLIENT],
        directly: &[REST, HYPER],
    },
    // Plain types both processes agree on.
    Never {
        krate: "neuroshard-shared",
        anywhere: &[ASYNC, DATABASE, CUDA],
        directly: &[],
    },
    // No async, no I/O.
    Never {
        krate: "neuroshard-kernels",
        anywhere: &[
            ASYNC,
            &["futures-util", "mio", "tonic"],
            DATABASE,
            REST,
            HTTP_CLIENT,
        ],
        directly: &[],
    },
    // The data plane: tonic serves its command socket; no REST API, no HTTP client, no
    // database, nothing of peers or money.
    Never {
        krate: "neuroshard-engine",
        anywhere: &[DATABASE, HTTP_CLIENT, PEERS_AND_MONEY],
        directly: &[REST, HYPER],
    },
    // The daemon must survive a GPU fault: the numerics and CUDA stay in the engine process.
    Never {
        krate: "neuroshard",
        anywhere: &[&["neuroshard-engine", "neuroshard-kernels"], CUDA],
        directly: &[],
    },
    // STYLE.md's target shape, for the crates moving out of control.
    Never {
        krate: "neuroshard-identity",
        anywhere: &[ASYNC, DATABASE, &["tonic", "axum", "reqwest", "hyper"]],
        directly: &[],
    },
    // The peer network is transport only: handshake, signed calls, connections, scores and
    // bans, one peer table. The subsystems it carries plug in through the daemon, so it never
    // reaches the ledger (nor its database), the daemon, the engine or CUDA; no REST API and
    // no HTTP client of its own. Nor coordination: the transport decides nothing; the daemon
    // joins coordination's decisions with net's table (routes, takeovers).
    Never {
        krate: "neuroshard-net",
        anywhere: &[
            DATABASE,
            CUDA,
            HTTP_CLIENT,
            &[
                "neuroshard",
                "neuroshard-ledger",
                "neuroshard-engine",
                "neuroshard-kernels",
                "neuroshard-coordination",
                "utoipa",
            ],
        ],
        // hyper-util only for `TokioIo`: tonic's connector takes hyper's I/O traits, and the
        // peer channels' connector hands it libp2p streams (net/src/p2p/io.rs).
        directly: &[REST, &["hyper", "h2"]],
    },
    Never {
        krate: "neuroshard-ledger",
        anywhere: &[&["tonic", "neuroshard-engine", "neuroshard-kernels"], CUDA],
        directly: &[REST],
    },
    // Coordination decides and does nothing else: no runtime, no RPC, no storage, no clock
    // and no randomness of its own (time and seeds come in as arguments), nothing of the
    // daemon's.
    Never {
        krate: "neuroshard-coordination",
        anywhere: &[
            ASYNC,
            DATABASE,
            CUDA,
            &[
                "tonic",
                "axum",
                "reqwest",
                "hyper",
                "chrono",
                "rand",
                "neuroshard",
            ],
        ],
        directly: &[],
    },
    // The harness and the scenarios run everything.
    Never {
        krate: "neuroshard-tests",
        anywhere: &[],
        directly: &[],
    },
];

/// Protocol buffers: only proto knows prost; the other crates convert at the RPC edge.
const PROTOBUF: &[&str] = &[
    "prost",
    "prost-build",
    "prost-types",
    "tonic-prost",
    "tonic-prost-build",
];
const PROTOBUF_OWNERS: &[&str] = &["neuroshard-proto"];

/// Only control touches the database.
const DATABASE_OWNERS: &[&str] = &[
    "neuroshard-ledger",
    // The tracker's table (its queries and `sqlx::migrate!` need the crate itself).
    "neuroshard",
    // The harness creates and drops a PostgreSQL database per node under test.
    "neuroshard-tests",
];

/// Crates that only their owners may depend on directly (normal, build or dev dependency).
const OWNED: &[(&[&str], &[&str])] = &[(PROTOBUF, PROTOBUF_OWNERS), (DATABASE, DATABASE_OWNERS)];

#[test]
fn crates_depend_only_on_what_the_architecture_allows() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let graph = Graph::load();
    let mut problems = Vec::new();
    for member in &graph.members {
        if !NEVER.iter().any(|rule| rule.krate == member) {
            problems.push(format!(
                "workspace member {member} has no row in NEVER (tests/tests/architecture.rs): \
                 add one (an empty one if it may depend on anything)"
            ));
        }
    }
    for rule in NEVER {
        let krate = rule.krate;
        let Some(reached) = graph.reachable(krate) else {
            continue; // not a crate of the workspace (yet)
        };
        let forbidden: BTreeSet<&str> = rule
            .anywhere
            .iter()
            .flat_map(|g| g.iter().copied())
            .collect();
        // A forbidden crate that comes in through another is told with that one.
        let mut through: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for &name in &forbidden {
            let Some(path) = reached.get(name) else {
                continue;
            };
            // The path ends at `name`, so there is a first.
            let first = path[1..]
                .iter()
                .map(String::as_str)
                .find(|p| forbidden.contains(p))
                .unwrap_or(name);
            let others = through.entry(first).or_default();
            if first != name {
                others.push(name);
            }
        }
        for (name, also) in through {
            let also = if also.is_empty() {
                String::new()
            } else {
                format!(" (and through it {})", also.join(", "))
            };
            problems.push(format!(
                "{krate} must not depend on {name}, but does: {}{also}",
                reached[name].join(" -> ")
            ));
        }
        for (dep, kinds) in graph.direct(krate) {
            let forbidden = rule.directly.iter().any(|g| g.contains(&dep.as_str()));
            if forbidden && kinds.contains("normal") {
                problems.push(format!(
                    "{krate} must not depend on {dep} itself, but does ({kinds} dependency)"
                ));
            }
        }
    }
    for (crates, owners) in OWNED {
        for member in &graph.members {
            if owners.contains(&member.as_str()) {
                continue;
            }
            for (dep, kind) in graph.direct(member) {
                if crates.contains(&dep.as_str()) {
                    problems.push(format!(
                        "{member} depends on {dep} directly ({kind} dependency), but only {} may",
                        owners.join(", ")
                    ));
                }
            }
        }
    }
    // A graph read wrongly would find nothing and pass: the engine reaches the kernels.
    let engine = graph
        .reachable("neuroshard-engine")
        .expect("the engine crate");
    assert!(
        engine.contains_key("neuroshard-kernels") && engine.contains_key("tokio"),
        "the dependency graph was not read: the engine reaches {:?}",
        engine.keys().collect::<Vec<_>>()
    );
    assert!(
        problems.is_empty(),
        "architecture invariants broken:\n{}",
        problems.join("\n")
    );
}

/// The resolved dependency graph of the workspace on this machine's platform.
struct Graph {
    /// Package names of the workspace members.
    members: BTreeSet<String>,
    /// Package name of every package id.
    names: BTreeMap<String, String>,
    /// Package id → (dependency id, kinds: "normal", "dev", "build").
    deps: BTreeMap<String, Vec<(String, Vec<String>)>>,
}

impl Graph {
    fn load() -> Graph {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["metadata", "--format-version", "1", "--locked"])
            .args(["--filter-platform", &host_triple()])
            .current_dir(&root)
            .output()
            .expect("running cargo metadata");
        assert!(
            out.status.success(),
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata's JSON");
        let names: BTreeMap<String, String> = meta["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .map(|p| (text(&p["id"]), text(&p["name"])))
            .collect();
        let members = meta["workspace_members"]
            .as_array()
            .expect("workspace_members")
            .iter()
            .map(|id| names[&text(id)].clone())
            .collect();
        let mut deps = BTreeMap::new();
        for node in meta["resolve"]["nodes"].as_array().expect("resolve.nodes") {
            let edges = node["deps"]
                .as_array()
                .expect("deps")
                .iter()
                .map(|d| {
                    let kinds = d["dep_kinds"]
                        .as_array()
                        .expect("dep_kinds")
                        .iter()
                        .map(|k| k["kind"].as_str().unwrap_or("normal").to_string())
                        .collect();
                    (text(&d["pkg"]), kinds)
                })
                .collect();
            deps.insert(text(&node["id"]), edges);
        }
        Graph {
            members,
            names,
            deps,
        }
    }

    fn id_of(&self, name: &str) -> Option<&String> {
        self.names
            .iter()
            .find(|(id, n)| *n == name && self.deps.contains_key(*id))
            .map(|(id, _)| id)
    }

    /// Every crate `name` reaches through normal dependencies, with the shortest path to it
    /// (package names, `name` first); `None` when `name` is not in the graph.
    fn reachable(&self, name: &str) -> Option<BTreeMap<String, Vec<String>>> {
        let start = self.id_of(name)?;
        let mut path_to: BTreeMap<&String, Vec<String>> = BTreeMap::new();
        path_to.insert(start, vec![name.to_string()]);
        let mut queue = VecDeque::from([start]);
        while let Some(id) = queue.pop_front() {
            for (dep, kinds) in &self.deps[id] {
                if path_to.contains_key(dep) || !kinds.iter().any(|k| k == "normal") {
                    continue;
                }
                let mut path = path_to[id].clone();
                path.push(self.names[dep].clone());
                path_to.insert(dep, path);
                queue.push_back(dep);
            }
        }
        path_to.remove(start);
        let mut by_name = BTreeMap::new();
        for (id, path) in path_to {
            by_name.entry(self.names[id].clone()).or_insert(path);
        }
        Some(by_name)
    }

    /// The direct dependencies of `name` (package name, kinds).
    fn direct(&self, name: &str) -> Vec<(String, String)> {
        let Some(id) = self.id_of(name) else {
            return Vec::new();
        };
        self.deps[id]
            .iter()
            .map(|(dep, kinds)| (self.names[dep].clone(), kinds.join(", ")))
            .collect()
    }
}

fn text(v: &Value) -> String {
    v.as_str()
        .expect("a string in cargo metadata's JSON")
        .to_string()
}

/// This machine's target triple (`rustc -vV`), so the graph has the dependencies that are
/// built here and no other platform's.
fn host_triple() -> String {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc)
        .arg("-vV")
        .output()
        .expect("running rustc -vV");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_string()
}

/// No product file is longer than this many lines (one concept per file; ARCHITECTURE.md).
const MAX_FILE_LINES: usize = 800;

/// The crates whose sources are checked for module cycles and file length (product code:
/// the test harness is not).
const SOURCE_CRATES: &[&str] = &[
    "proto",
    "shared",
    "identity",
    "ledger",
    "kernels",
    "engine",
    "coordination",
    "net",
    "control",
];

#[test]
fn no_module_cycle_and_no_file_over_the_limit() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut problems = Vec::new();
    let mut checked = 0;
    for krate in SOURCE_CRATES {
        let src = root.join(krate).join("src");
        let graph = module_graph(&src, &mut |file, lines| {
            checked += 1;
            if lines > MAX_FILE_LINES {
                problems.push(format!(
                    "{krate}/src/{file} has {lines} lines (most: {MAX_FILE_LINES}): split it by concept"
                ));
            }
        });
        for cycle in cycles(&graph) {
            let steps: Vec<String> = cycle
                .windows(2)
                .map(|w| format!("{} -> {} ({})", w[0], w[1], graph[&w[0]][&w[1]]))
                .collect();
            problems.push(format!("module cycle in {krate}: {}", steps.join(", ")));
        }
    }
    // Sources read wrongly would find nothing and pass: the workspace has about 180 files.
    assert!(checked > 150, "only {checked} source files were read");
    assert!(
        problems.is_empty(),
        "source invariants broken:\n{}",
        problems.join("\n")
    );
}

/// Top-level module → modules of the same crate it names (`crate::x`, `crate::{x, y}`, and
/// `super::x` from a top-level file), each with one file that does. Comment lines are not
/// read (a doc link is no dependency), nor is test code (`tests.rs` files, and a file's
/// lines from its `#[cfg(test)]` on: unit tests sit at the bottom of their file).
/// `report(file, lines)` is called for every file.
fn module_graph(
    src: &Path,
    report: &mut dyn FnMut(&str, usize),
) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("reading a source folder") {
            let path = entry.expect("a folder entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|f| top_module(f.strip_prefix(src).ok()?))
        .collect();
    let mut graph: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(src).expect("under src");
        let name = rel.to_string_lossy().to_string();
        let text = std::fs::read_to_string(file).expect("reading a source file");
        report(&name, text.lines().count());
        let Some(top) = top_module(rel) else {
            continue; // lib.rs, main.rs: the crate root may name anything
        };
        if rel.file_name().is_some_and(|f| f == "tests.rs") {
            continue;
        }
        // `super::` is the crate root in a top-level module's own file.
        let top_file = rel.components().count() == 1
            || rel.file_name().is_some_and(|f| f == "mod.rs") && rel.components().count() == 2;
        for line in text.lines() {
            let line = line.trim_start();
            if line.starts_with("#[cfg(test)]") {
                break;
            }
            if line.starts_with("//") {
                continue;
            }
            let mut named = names_after(line, "crate::");
            if top_file {
                named.extend(names_after(line, "super::"));
            }
            for n in named {
                if n != top && modules.contains(&n) {
                    graph
                        .entry(top.clone())
                        .or_default()
                        .entry(n)
                        .or_insert_with(|| name.clone());
                }
            }
        }
    }
    graph
}

/// The top-level module a file belongs to (`api/state.rs` → `api`, `daemon.rs` → `daemon`);
/// `None` for the crate roots.
fn top_module(rel: &Path) -> Option<String> {
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .to_string();
    if rel.components().count() > 1 {
        return Some(first);
    }
    let stem = first.strip_suffix(".rs")?;
    (!matches!(stem, "lib" | "main")).then(|| stem.to_string())
}

/// The first path segments after each `prefix` in `line`: `crate::a::b` → `a`,
/// `crate::{a::x, b}` → `a`, `b`.
fn names_after(line: &str, prefix: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    for (i, _) in line.match_indices(prefix) {
        // `foo_crate::` or `mycrate::` is not `crate::`.
        let before = line[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &line[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = group.split('}').next().unwrap_or("");
            // Top-level items of the group only: `a::{x, y}, b` → a, b.
            let mut depth = 0;
            let mut start = 0;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(ident(&group[start..j]));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
            out.push(ident(&group[start..]));
        } else {
            out.push(ident(rest));
        }
    }
    out.retain(|n| !n.is_empty());
    out
}

/// Every strongly connected set of more than one module, as one cycle through it (first
/// module repeated at the end).
fn cycles(graph: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<Vec<String>> {
    let reaches = |from: &str| -> BTreeMap<String, Vec<String>> {
        let mut path_to = BTreeMap::from([(from.to_string(), vec![from.to_string()])]);
        let mut queue = VecDeque::from([from.to_string()]);
        while let Some(m) = queue.pop_front() {
            for next in graph.get(&m).into_iter().flat_map(|e| e.keys()) {
                if !path_to.contains_key(next) {
                    let mut p = path_to[&m].clone();
                    p.push(next.clone());
                    path_to.insert(next.clone(), p);
                    queue.push_back(next.clone());
                }
            }
        }
        path_to
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (m, edges) in graph {
        if seen.contains(m) {
            continue;
        }
        // A cycle through m: an edge m -> n with a path n -> ... -> m.
        for n in edges.keys() {
            if let Some(back) = reaches(n).remove(m) {
                let mut cycle = vec![m.clone()];
                cycle.extend(back);
                seen.extend(cycle.iter().cloned());
                out.push(cycle);
                break;
            }
        }
    }
    out
}
