//! Operator commands of the CLI: they mirror the REST API (`status`, `wallet ...`, `peers`)
//! by calling the local node with the daemon's cookie token, and manage API tokens and
//! wallets (`token ...`, `setup`) in the data directory. Human-readable output by default,
//! the API's JSON with `--json`.

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::client::{Endpoint, call_ok};
use crate::config::Config;
use crate::daemon::Paths;
use neuroshard_ledger::Address;

#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Port of the running node (default: the node running on the data directory, else the
    /// config file's).
    #[arg(long, env = "NEUROSHARD_PORT")]
    pub port: Option<u16>,
    /// API token (default: the running daemon's cookie, <data-dir>/api.cookie).
    #[arg(long, env = "NEUROSHARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON answer.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum WalletCommand {
    /// Balances and stake of the token's account.
    Balance,
    /// Send NEURO: `send 0xabc... 12.5 --memo "thanks"`.
    Send {
        to: String,
        amount: f64,
        #[arg(long, default_value = "")]
        memo: String,
    },
    /// Stake NEURO for a number of days (1 to 365).
    Stake { amount: f64, days: i64 },
    /// Start unstaking (funds become available after the 7-day cooldown).
    Unstake { amount: f64 },
    /// Transaction history, newest first.
    History {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long, default_value_t = 0)]
        offset: usize,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create an API token (the secret is printed once).
    Create {
        /// A name to find it by.
        #[arg(long)]
        name: String,
        /// Bind it to a new wallet created now (default: the node wallet).
        #[arg(long, conflicts_with = "account")]
        new_wallet: bool,
        /// Bind it to this account (its key must be held by this node).
        #[arg(long)]
        account: Option<String>,
    },
    /// List tokens (ids, names, accounts; never secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id or name.
    Revoke { id_or_name: String },
}

pub(crate) fn token(paths: &Paths, conn: &Conn) -> anyhow::Result<String> {
    if let Some(t) = &conn.token {
        return Ok(t.clone());
    }
    let cookie = paths.data_dir.join(crate::auth::COOKIE_FILE);
    std::fs::read_to_string(&cookie)
        .map(|s| s.trim().to_string())
        .with_context(|| {
            format!(
                "no token given and no cookie at {} (is the node running?)",
                cookie.display()
            )
        })
}

/// The running node's endpoint: its port (`--port`, else the one the node running on the data
/// directory was started with, its `node.json`, else the config's) on 127.0.0.1, over https
/// when the daemon serves it.
pub(crate) fn port(paths: &Paths, conn: &Conn) -> anyhow::Result<Endpoint> {
    let port = match conn.port {
        Some(p) => p,
        None => match crate::runfile::running(&paths.data_dir) {
            Some(info) => info.port,
            None => Config::load(&paths.config_path)?.port,
        },
    };
    Endpoint::local(&paths.data_dir, port)
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn f(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".into(), |x| format!("{x:.4}"))
}

/// `neuroshard status`.
pub fn status(paths: &Paths, conn: &Conn) -> anyhow::Result<()> {
    let node = port(paths, conn)?;
    let s = call_ok(&node, "GET", "/api/v1/status", None, None)?;
    if conn.json {
        print_json(&s);
        return Ok(());
    }
    let t = &s["training"];
    println!(
        "node      {} ({}, {})",
        s["node_id"].as_str().unwrap_or("?"),
        s["status"].as_str().unwrap_or("?"),
        s["role"].as_str().unwrap_or("?")
    );
    println!(
        "version   {}   uptime {} s",
        s["version"].as_str().unwrap_or("?"),
        s["uptime_seconds"]
    );
    println!("wallet    {}", s["wallet_address"].as_str().unwrap_or("?"));
    println!("layers    {}   peers {}", s["layers"], s["peer_count"]);
    println!(
        "training  {}   step {}   loss {}",
        if t["enabled"].as_bool() == Some(true) {
            "on"
        } else {
            "off"
        },
        t["step"],
        f(&t["loss"])
    );
    let r = &s["resources"];
    println!(
        "resources cpu {}%   ram {} MB",
        r["cpu_percent"],
        r["ram_used"].as_u64().unwrap_or(0) / (1 << 20)
    );
    match node.pin {
        Some(pin) => println!(
            "api       https, certificate sha256 {}",
            crate::tls::fingerprint_hex(&pin)
        ),
        None => println!("api       http"),
    }
    Ok(())
}

/// `neuroshard peers`.
pub fn peers(paths: &Paths, conn: &Conn) -> anyhow::Result<()> {
    let p = call_ok(
        &port(paths, conn)?,
        "GET",
        "/api/v1/peers",
        Some(&token(paths, conn)?),
        None,
    )?;
    if conn.json {
        print_json(&p);
        return Ok(());
    }
    println!("{} peers", p["total"]);
    for peer in p["peers"].as_array().into_iter().flatten() {
        println!(
            "  {}  {}  {}  layers {}  {} ms  since {}",
            peer["id"].as_str().unwrap_or("?"),
            peer["address"].as_str().unwrap_or("?"),
            peer["role"].as_str().unwrap_or("?"),
            peer["layers"],
            peer["latency_ms"],
            peer["connected_since"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

/// `neuroshard wallet ...`.
pub fn wallet(paths: &Paths, conn: &Conn, cmd: WalletCommand) -> anyhow::Result<()> {
    let (port, token) = (port(paths, conn)?, token(paths, conn)?);
    let call = |method: &str, path: &str, body: Option<Value>| {
        call_ok(&port, method, path, Some(&token), body.as_ref())
    };
    let answer = match &cmd {
        WalletCommand::Balance => call("GET", "/api/v1/wallet/balance", None)?,
        WalletCommand::Send { to, amount, memo } => call(
            "POST",
            "/api/v1/wallet/send",
            Some(json!({"to": to, "amount": amount, "memo": memo})),
        )?,
        WalletCommand::Stake { amount, days } => call(
            "POST",
            "/api/v1/wallet/stake",
            Some(json!({"amount": amount, "duration_days": days})),
        )?,
        WalletCommand::Unstake { amount } => call(
            "POST",
            "/api/v1/wallet/unstake",
            Some(json!({"amount": amount})),
        )?,
        WalletCommand::History { limit, offset } => call(
            "GET",
            &format!("/api/v1/wallet/transactions?limit={limit}&offset={offset}"),
            None,
        )?,
    };
    if conn.json {
        print_json(&answer);
        return Ok(());
    }
    let a = &answer;
    match cmd {
        WalletCommand::Balance => {
            let b = &a["balances"];
            println!("address   {}", a["address"].as_str().unwrap_or("?"));
            println!("available {} NEURO", f(&b["available"]));
            println!("staked    {} NEURO", f(&b["staked"]));
            println!("pending   {} NEURO", f(&b["pending"]));
            println!("total     {} NEURO", f(&b["total"]));
            // `staking` is always an object; its amount is 0 when nothing is staked.
            if let Some(s) = a["staking"]
                .as_object()
                .filter(|s| s["amount"].as_f64().unwrap_or(0.0) > 0.0)
            {
                println!(
                    "stake     {} NEURO for {} days, unlocks {}, multiplier {}",
                    f(&s["amount"]),
                    s["duration_days"],
                    s["unlock_date"].as_str().unwrap_or("?"),
                    s["multiplier"]
                );
            }
        }
        WalletCommand::Send { .. } => println!(
            "sent {} NEURO to {} (fee {} burned): {} {}",
            f(&a["amount"]),
            a["to"].as_str().unwrap_or("?"),
            f(&a["fee"]),
            a["transaction_id"].as_str().unwrap_or("?"),
            a["status"].as_str().unwrap_or("?")
        ),
        WalletCommand::Stake { .. } => println!(
            "staked {} NEURO until {} (multiplier {}); available now {} NEURO",
            f(&a["stake"]["amount"]),
            a["stake"]["unlock_date"].as_str().unwrap_or("?"),
            a["stake"]["multiplier"],
            f(&a["new_balance"]["available"])
        ),
        WalletCommand::Unstake { .. } => println!(
            "unstaking {} NEURO: available on {}",
            f(&a["unstake"]["amount"]),
            a["unstake"]["available_date"].as_str().unwrap_or("?")
        ),
        WalletCommand::History { .. } => {
            println!("{} transactions (showing from {})", a["total"], a["offset"]);
            for t in a["transactions"].as_array().into_iter().flatten() {
                println!(
                    "  {}  {:<8} {:>16}  {}  {}",
                    t["timestamp"].as_str().unwrap_or("?"),
                    t["type"].as_str().unwrap_or("?"),
                    f(&t["amount"]),
                    t["status"].as_str().unwrap_or("?"),
                    t["id"].as_str().unwrap_or("?")
                );
            }
        }
    }
    Ok(())
}

fn passphrase() -> Option<String> {
    std::env::var("NEUROSHARD_WALLET_PASSPHRASE").ok()
}

/// `neuroshard setup`: creates the data directory, the node wallet and a config file with
/// the defaults, and prints where they are.
pub fn setup(paths: &Paths) -> anyhow::Result<()> {
    std::fs::create_dir_all(&paths.data_dir)?;
    let wallet =
        neuroshard_ledger::keystore::load_or_create(&paths.data_dir, passphrase().as_deref())?;
    if !paths.config_path.exists() {
        Config::default().save(&paths.config_path)?;
    }
    // The pair the REST API serves beyond loopback: the configured one, else the data
    // directory's self-signed one, made now when missing.
    let cfg = Config::load(&paths.config_path)?;
    let pair = crate::tls::Pair::for_config(&paths.data_dir, &cfg.tls);
    if cfg.tls.cert.is_empty() {
        crate::tls::ensure_self_signed(&paths.data_dir, cfg.host.as_str())?;
    }
    let cert = crate::tls::load(&pair)?;
    println!("data directory {}", paths.data_dir.display());
    println!("config         {}", paths.config_path.display());
    println!("node wallet    {}", wallet.address());
    println!("TLS cert       {}", pair.cert.display());
    println!("TLS sha256     {}", cert.fingerprint());
    Ok(())
}

/// `neuroshard token ...`.
pub fn token_command(paths: &Paths, cmd: TokenCommand) -> anyhow::Result<()> {
    let dir = &paths.data_dir;
    match cmd {
        TokenCommand::Create {
            name,
            new_wallet,
            account,
        } => {
            std::fs::create_dir_all(dir)?;
            let node = neuroshard_ledger::keystore::load_or_create(dir, passphrase().as_deref())?;
            let account = if new_wallet {
                crate::wallets::create_user_wallet(dir, passphrase().as_deref())?.address()
            } else if let Some(a) = account {
                let a = Address::parse(&a)?;
                anyhow::ensure!(
                    crate::wallets::holds(dir, &node.address(), &a),
                    "this node does not hold the key of {a}; create one with --new-wallet"
                );
                a
            } else if let Some(running) =
                crate::runfile::running(dir).and_then(|info| Address::parse(&info.wallet).ok())
            {
                // The wallet the running node runs as (it may be another one, `--wallet`).
                running
            } else {
                node.address()
            };
            let (rec, secret) = crate::auth::create(dir, &name, account)?;
            println!(
                "token {} ({}) for account {}",
                rec.id, rec.name, rec.account
            );
            println!("{secret}");
            eprintln!("keep it safe: it is shown only once");
        }
        TokenCommand::List { json } => {
            let tokens = crate::auth::list(dir)?;
            if json {
                let list: Vec<Value> = tokens
                    .iter()
                    .map(|t| json!({"id": t.id, "name": t.name, "account": t.account, "created_at": t.created_at}))
                    .collect();
                print_json(&Value::Array(list));
            } else {
                for t in tokens {
                    println!("{}  {:<20} {}  {}", t.id, t.name, t.account, t.created_at);
                }
            }
        }
        TokenCommand::Revoke { id_or_name } => {
            let rec = crate::auth::revoke(dir, &id_or_name)?;
            println!("revoked {} ({})", rec.id, rec.name);
        }
    }
    Ok(())
}
