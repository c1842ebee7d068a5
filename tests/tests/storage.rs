//! A full disk with real processes: the data directory lives on a small tmpfs that the test
//! fills to the last byte while the node runs. Writes (send, stake, config PATCH) answer 503
//! `STORAGE_ERROR` and change nothing, reads keep working, health reports the storage check
//! failing, proof minting on a full disk does not bring the node down, and once space returns
//! the node takes writes again with every earlier record intact, also after a restart.
//!
//! Mounting a tmpfs needs CAP_SYS_ADMIN (the tests run as root in CI and in the dev
//! containers). Without it the test falls back to another real mechanism: the data
//! directory is made read-only (mode 0500), which refuses the new files that config saves and
//! the health probe need; SQLite keeps its already-open descriptor there, so sends may then
//! succeed, and are only required to be either stored or refused with `STORAGE_ERROR`.
//!
//! As root, once the node is stopped the tmpfs is also remounted read-only and a start is
//! refused with a clear error that changes nothing; the start after it finds every record.
//!
//! A file system that turns read-only under the running node, as one does on a disk error:
//! an ext4 image on a loop device mounted `errors=remount-ro`, made to record an error through
//! its `trigger_fs_error` switch in sysfs, so the kernel remounts it read-only with the
//! daemon's database, log and checkpoints open on it (what `mount -o remount,ro` refuses).
//! Writes answer `STORAGE_ERROR`, reads and health keep answering, and after `e2fsck` and a
//! fresh mount the restarted node holds every acknowledged record. This needs root and loop
//! devices (CI has both and requires the test; elsewhere it says why it cannot run).
//!
//! The daemon's log (`daemon.log`, as the harness starts it) is on the same full disk, so the
//! node must also live with log lines it cannot write: a write that failed to log once made
//! tracing-subscriber report the failure with `eprintln!`, which panicked, and the request
//! got no answer at all (the panic could not be logged either).

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use neuroshard_tests::{Node, NodeOptions, pid_alive, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

/// A tmpfs of `size_mb` mounted on a fresh directory, unmounted on drop.
struct SmallDisk {
    dir: PathBuf,
    mounted: bool,
}

impl SmallDisk {
    fn mount(size_mb: u32) -> SmallDisk {
        let dir = std::env::temp_dir().join(format!("nsdisk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mb}m,mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("cannot mount a tmpfs here: falling back to a read-only data directory");
        }
        SmallDisk { dir, mounted }
    }
}

impl SmallDisk {
    /// Remounts the tmpfs read-only (`ro`) or writable (`rw`); refused (EBUSY) while a
    /// process holds a file on it open for writing.
    fn remount(&self, mode: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount {mode} of {}", self.dir.display());
    }
}

/// With the node stopped, its data directory turns read-only (as root, permissions do not
/// bind, and the file system cannot be remounted read-only while the daemon holds its files
/// open): a start is refused at once with an error that names the directory and the cause,
/// and nothing there changes.
fn start_on_read_only_disk_is_refused(disk: &SmallDisk, node: &Node) {
    let listing = |dir: &Path| {
        let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = listing(node.data_dir());
    disk.remount("ro");
    // The node's own start command; its log is on the read-only disk, so the output is piped.
    let mut child = node
        .start_command()
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for(
        "the start on a read-only data directory to give up",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || child.try_wait().ok().flatten(),
    );
    if status.is_err() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    disk.remount("rw");
    let status = status.unwrap_or_else(|e| panic!("{e}: still running\n{text}"));
    assert!(
        !status.success(),
        "started on a read-only data directory\n{text}"
    );
    assert!(
        text.contains(&node.data_dir().display().to_string())
            && text.to_lowercase().contains("read-only file system"),
        "the error does not say which directory and why:\n{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    assert_eq!(
        listing(node.data_dir()),
        before,
        "the refused start changed the directory"
    );
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes `path` until the file system refuses another byte; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let mut written = 0u64;
    for chunk in [1 << 20, 4096, 1] {
        let buf = vec![0xa5u8; chunk];
        while f.write_all(&buf).is_ok() {
            written += chunk as u64;
        }
    }
    let _ = f.sync_all();
    written
}

fn send_entries(node: &Node) -> HashSet<String> {
    let (code, page) = node
        .authed(Method::GET, "/api/v1/wallet/transactions?limit=1000", None)
        .unwrap();
    assert_eq!(code, 200, "{page}");
    page["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["type"] == "send" || t["type"] == "stake")
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect()
}

fn assert_storage_error(what: &str, answer: Option<(u16, Value)>) {
    let (code, body) = answer.unwrap_or_else(|| panic!("{what}: no answer"));
    assert_eq!(code, 503, "{what}: {body}");
    assert_eq!(body["error"]["code"], "STORAGE_ERROR", "{what}: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("disk full or read-only")),
        "{what}: {body}"
    );
}

fn batch_size(node: &Node) -> Value {
    let (code, cfg) = node.authed(Method::GET, "/api/v1/config", None).unwrap();
    assert_eq!(code, 200, "{cfg}");
    cfg["training"]["batch_size"].clone()
}

/// The node stays up across an epoch turn, when it mints a proof (which the store refuses)
/// and its engine checkpoints: health keeps answering 503 (the storage check failing), and
/// the ledger still adds up.
fn lives_through_an_epoch_turn_unable_to_store(node: &Node) {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let start = now();
    wait_for(
        "an epoch turn and its proof attempt",
        Duration::from_secs(70),
        Duration::from_millis(500),
        || {
            let (code, h) = node.get("/api/v1/health").expect("health answers");
            assert_eq!(code, 503, "{h}");
            (now().saturating_sub(3) / 60 > start / 60).then_some(())
        },
    )
    .unwrap();
    assert!(pid_alive(node.pid().unwrap()), "the daemon died");
    let (_, network) = node.get("/api/v1/network").unwrap();
    assert_eq!(network["ledger"]["invariant_ok"], true, "{network}");
}

/// Starts the stopped node again: its ledger entries are exactly `acked`, its saved batch
/// size is `batch`, and the ledger adds up.
fn restarts_with_every_record(node: &mut Node, acked: &HashSet<String>, batch: u32) {
    node.spawn().unwrap();
    node.wait_healthy(Duration::from_secs(60)).unwrap();
    wait_for(
        "the restarted node's token",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            node.authed(Method::GET, "/api/v1/status", None)
                .filter(|(c, _)| *c == 200)
        },
    )
    .unwrap();
    assert_eq!(&send_entries(node), acked, "records lost or added");
    assert_eq!(batch_size(node), batch);
    let (_, network) = node.get("/api/v1/network").unwrap();
    assert_eq!(network["ledger"]["invariant_ok"], true, "{network}");
}

/// Funds come from the node's proofs of work (one per 60 s epoch).
fn wait_reward(node: &Node) {
    wait_for(
        "a proof-of-work reward",
        Duration::from_secs(150),
        Duration::from_millis(500),
        || {
            let (_, b) = node.authed(Method::GET, "/api/v1/wallet/balance", None)?;
            b["balances"]["available"].as_f64().filter(|a| *a > 0.0005)
        },
    )
    .unwrap();
}

fn send(node: &Node, to: &str) -> Option<(u16, Value)> {
    node.authed(
        Method::POST,
        "/api/v1/wallet/send",
        Some(json!({"to": to, "amount": 0.00001, "memo": "disk"})),
    )
}

fn stake(node: &Node) -> Option<(u16, Value)> {
    node.authed(
        Method::POST,
        "/api/v1/wallet/stake",
        Some(json!({"amount": 0.00001, "duration_days": 1})),
    )
}

fn patch_batch_size(node: &Node, n: u32) -> Option<(u16, Value)> {
    node.authed(
        Method::PATCH,
        "/api/v1/config",
        Some(json!({"training": {"batch_size": n}})),
    )
}

#[test]
fn full_disk_refuses_writes_cleanly_keeps_reads_and_recovers_intact() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let disk = SmallDisk::mount(64);
    // Training on: its rewards fund the writes, and its checkpoints hit the full disk too.
    let opts = NodeOptions {
        config: "[resources]\nmin_free_disk_mb = 1\n[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 4\nseq_len = 32\n".into(),
        ..NodeOptions::default()
    };
    let mut node = Node::start_in(&disk.dir, opts).unwrap();
    node.wait_healthy(Duration::from_secs(30)).unwrap();
    let (_, frank) = node.new_wallet("frank").unwrap();
    wait_reward(&node);
    let send = || send(&node, &frank);
    let stake = || stake(&node);
    let patch = |n: u32| patch_batch_size(&node, n);
    let mut acked = HashSet::new();
    for op in [&send as &dyn Fn() -> Option<(u16, Value)>, &stake, &send] {
        let (code, body) = op().unwrap();
        assert_eq!(code, 200, "{body}");
        acked.insert(body["transaction_id"].as_str().unwrap().to_string());
    }
    assert_eq!(patch(2).unwrap().0, 200);
    let config_path = node.data_dir().join("neuroshard.toml");
    let config_before = std::fs::read_to_string(&config_path).unwrap();
    assert!(config_before.contains("batch_size = 2"), "{config_before}");
    assert_eq!(send_entries(&node), acked);
    let (_, balance_before) = node
        .authed(Method::GET, "/api/v1/wallet/balance", None)
        .unwrap();

    // The disk fills up (or, without a tmpfs, the data directory turns read-only).
    let filler = disk.dir.join("filler");
    let data_mode = std::fs::metadata(node.data_dir()).unwrap().permissions();
    if disk.mounted {
        let n = fill(&filler);
        eprintln!("filled the disk with {} MB", n >> 20);
    } else {
        std::fs::set_permissions(node.data_dir(), std::fs::Permissions::from_mode(0o500)).unwrap();
    }

    let (code, health) = node.get("/api/v1/health").unwrap();
    assert_eq!(code, 503, "{health}");
    assert_eq!(health["healthy"], false, "{health}");
    assert!(
        health["checks"]["storage"]
            .as_str()
            .is_some_and(|s| s.starts_with("not_writable")),
        "{health}"
    );
    assert_storage_error("config patch", patch(3));
    assert_eq!(
        std::fs::read_to_string(&config_path).unwrap(),
        config_before,
        "a refused patch changed the file"
    );
    assert_eq!(batch_size(&node), 2, "a refused patch was applied live");
    if disk.mounted {
        assert_storage_error("send", send());
        assert_storage_error("stake", stake());
        assert_storage_error("send", send());
    } else {
        for op in [&send as &dyn Fn() -> Option<(u16, Value)>, &stake] {
            let (code, body) = op().unwrap();
            if code == 200 {
                acked.insert(body["transaction_id"].as_str().unwrap().to_string());
            } else {
                assert_storage_error("write", Some((code, body)));
            }
        }
    }
    // Reads keep working and show exactly what was stored.
    for path in ["/api/v1/status", "/api/v1/network", "/api/v1/peers"] {
        let (code, body) = node.authed(Method::GET, path, None).unwrap();
        assert_eq!(code, 200, "{path}: {body}");
    }
    assert_eq!(
        send_entries(&node),
        acked,
        "refused writes left entries behind"
    );
    if disk.mounted {
        let (_, balance) = node
            .authed(Method::GET, "/api/v1/wallet/balance", None)
            .unwrap();
        assert_eq!(
            balance["balances"]["staked"], balance_before["balances"]["staked"],
            "a refused stake moved funds"
        );
    }
    lives_through_an_epoch_turn_unable_to_store(&node);

    // Space returns: writes work again, without a restart.
    if disk.mounted {
        std::fs::remove_file(&filler).unwrap();
    } else {
        std::fs::set_permissions(node.data_dir(), data_mode).unwrap();
    }
    node.wait_healthy(Duration::from_secs(10)).unwrap();
    for op in [&send as &dyn Fn() -> Option<(u16, Value)>, &stake] {
        let (code, body) = op().unwrap();
        assert_eq!(code, 200, "{body}");
        acked.insert(body["transaction_id"].as_str().unwrap().to_string());
    }
    assert_eq!(patch(3).unwrap().0, 200);
    assert_eq!(batch_size(&node), 3);

    // And every record is intact after a restart.
    node.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    node.wait_exit(Duration::from_secs(20)).unwrap();
    if disk.mounted {
        start_on_read_only_disk_is_refused(&disk, &node);
    }
    restarts_with_every_record(&mut node, &acked, 3);
    assert!(!node.logs().contains("panicked"), "the daemon panicked");
    drop(node);
    drop(disk);
}

/// An ext4 file system in an image file on a loop device, mounted `errors=remount-ro` on a
/// fresh directory: the kernel turns it read-only by itself when it records an error, as it
/// does on a failing disk. Unmounted, detached and removed on drop.
struct Ext4Disk {
    dir: PathBuf,
    image: PathBuf,
    device: String,
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "{program} {}: {}: {text}",
            args.join(" "),
            out.status
        ))
    }
}

impl Ext4Disk {
    /// None (and why) where loop devices or mounting are not allowed.
    fn mount(size_mb: u64) -> Result<Ext4Disk, String> {
        let base = std::env::temp_dir().join(format!("nsext4-{}", std::process::id()));
        let (dir, image) = (base.join("mnt"), base.join("disk.img"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size_mb << 20))
            .map_err(|e| e.to_string())?;
        let image_s = image.to_str().unwrap();
        run("mkfs.ext4", &["-q", "-F", image_s])?;
        let device = run("losetup", &["--find", "--show", image_s])?
            .trim()
            .to_string();
        let disk = Ext4Disk { dir, image, device };
        disk.mount_device()?;
        Ok(disk)
    }

    fn mount_device(&self) -> Result<String, String> {
        run(
            "mount",
            &[
                "-t",
                "ext4",
                "-o",
                "errors=remount-ro",
                &self.device,
                self.dir.to_str().unwrap(),
            ],
        )
    }

    /// Records a file system error (ext4's `trigger_fs_error`): the kernel aborts the journal
    /// and remounts the file system read-only under whoever has files open on it.
    fn fail(&self) {
        let name = Path::new(&self.device).file_name().unwrap();
        let switch = Path::new("/sys/fs/ext4")
            .join(name)
            .join("trigger_fs_error");
        std::fs::write(&switch, "read-only test\n")
            .unwrap_or_else(|e| panic!("{}: {e}", switch.display()));
    }

    /// After the processes on it are gone: unmount, repair the journal, mount again (rw).
    fn repair(&self) {
        run("umount", &[self.dir.to_str().unwrap()]).unwrap();
        // e2fsck exits 1 when it fixed something: the recorded error is cleared then.
        let fsck = Command::new("e2fsck")
            .args(["-f", "-y", &self.device])
            .output()
            .unwrap();
        assert!(
            matches!(fsck.status.code(), Some(0 | 1)),
            "e2fsck: {}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        self.mount_device().unwrap();
    }
}

impl Drop for Ext4Disk {
    fn drop(&mut self) {
        let _ = run("umount", &[self.dir.to_str().unwrap()]);
        let _ = run("losetup", &["-d", &self.device]);
        let _ = std::fs::remove_dir_all(self.image.parent().unwrap());
    }
}

#[test]
fn file_system_turning_read_only_under_the_running_node_loses_nothing() {
    let _scenario = neuroshard_tests::scenario(module_path!());
    let disk = match Ext4Disk::mount(128) {
        Ok(disk) => disk,
        Err(why) => {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "needs root and loop devices (CI=true): {why}"
            );
            eprintln!("cannot mount an ext4 image here (needs root and loop devices): {why}");
            return;
        }
    };
    let opts = NodeOptions {
        config: "[resources]\nmin_free_disk_mb = 1\n[training]\nenabled = true\nmodel = \"tiny\"\nbatch_size = 4\nseq_len = 32\n".into(),
        ..NodeOptions::default()
    };
    let mut node = Node::start_in(&disk.dir, opts).unwrap();
    node.wait_healthy(Duration::from_secs(30)).unwrap();
    let (_, grace) = node.new_wallet("grace").unwrap();
    wait_reward(&node);
    let mut acked = HashSet::new();
    for answer in [send(&node, &grace), stake(&node), send(&node, &grace)] {
        let (code, body) = answer.unwrap();
        assert_eq!(code, 200, "{body}");
        acked.insert(body["transaction_id"].as_str().unwrap().to_string());
    }
    assert_eq!(patch_batch_size(&node, 2).unwrap().0, 200);
    let config_path = node.data_dir().join("neuroshard.toml");
    let config_before = std::fs::read_to_string(&config_path).unwrap();
    let (_, balance_before) = node
        .authed(Method::GET, "/api/v1/wallet/balance", None)
        .unwrap();

    // The disk fails: read-only under the daemon, its files open.
    disk.fail();
    let probe = std::fs::write(disk.dir.join("probe"), b"x").unwrap_err();
    assert_eq!(
        probe.raw_os_error(),
        Some(nix::libc::EROFS),
        "the file system did not turn read-only: {probe}"
    );

    let (code, health) = node.get("/api/v1/health").unwrap();
    assert_eq!(code, 503, "{health}");
    assert!(
        health["checks"]["storage"]
            .as_str()
            .is_some_and(|s| s.starts_with("not_writable")),
        "{health}"
    );
    assert_storage_error("send", send(&node, &grace));
    assert_storage_error("stake", stake(&node));
    assert_storage_error("config patch", patch_batch_size(&node, 3));
    assert_storage_error("send", send(&node, &grace));
    assert_eq!(batch_size(&node), 2, "a refused patch was applied live");
    // Reads keep working and show exactly what was stored.
    for path in ["/api/v1/status", "/api/v1/network", "/api/v1/peers"] {
        let (code, body) = node.authed(Method::GET, path, None).unwrap();
        assert_eq!(code, 200, "{path}: {body}");
    }
    assert_eq!(send_entries(&node), acked, "refused writes left entries");
    let (_, balance) = node
        .authed(Method::GET, "/api/v1/wallet/balance", None)
        .unwrap();
    assert_eq!(
        balance["balances"]["staked"], balance_before["balances"]["staked"],
        "a refused stake moved funds"
    );
    lives_through_an_epoch_turn_unable_to_store(&node);

    // A stop on the read-only disk still ends the daemon and its engine.
    node.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    let exit = node.wait_exit(Duration::from_secs(30)).unwrap();
    eprintln!("daemon stopped on the read-only disk: {exit:?}");

    // The disk is repaired (fsck, mount again); the node finds every record.
    disk.repair();
    assert_eq!(
        std::fs::read_to_string(&config_path).unwrap(),
        config_before,
        "a refused patch changed the file"
    );
    restarts_with_every_record(&mut node, &acked, 2);
    // And it takes writes again.
    let (code, body) = send(&node, &grace).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(!node.logs().contains("panicked"), "the daemon panicked");
    drop(node);
    drop(disk);
}
