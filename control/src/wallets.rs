//! The wallets whose keys this node holds: the node wallet (`wallet.json`, which earns the
//! node's rewards) and user wallets under `<data_dir>/wallets/<address>.json`, created by
//! `neuroshard token create --new-wallet`. An API token acts for one of these accounts, and the
//! daemon signs that account's blocks with its key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use neuroshard_ledger::keystore::{self, SCRYPT_LOG_N};
use neuroshard_ledger::{Address, LedgerError, Wallet};
use parking_lot::Mutex;

const WALLETS_DIR: &str = "wallets";

fn wallet_path(data_dir: &Path, address: &Address) -> PathBuf {
    data_dir
        .join(WALLETS_DIR)
        .join(format!("{}.json", address.to_checksum()))
}

/// Creates a user wallet keystore (mode 0600) and returns it.
pub fn create_user_wallet(
    data_dir: &Path,
    passphrase: Option<&str>,
) -> Result<Wallet, LedgerError> {
    let dir = data_dir.join(WALLETS_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| LedgerError::Keystore {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let wallet = Wallet::generate();
    keystore::save(
        &wallet_path(data_dir, &wallet.address()),
        &wallet,
        passphrase,
        SCRYPT_LOG_N,
    )?;
    Ok(wallet)
}

/// Whether this node holds the key of `address`.
pub fn holds(data_dir: &Path, node: &Address, address: &Address) -> bool {
    address == node || wallet_path(data_dir, address).exists()
}

/// The keys of the accounts API tokens act for, loaded on first use.
pub struct Keyring {
    data_dir: PathBuf,
    passphrase: Option<String>,
    node: Arc<Wallet>,
    loaded: Mutex<HashMap<Address, Arc<Wallet>>>,
}

impl Keyring {
    pub fn new(data_dir: &Path, node: Arc<Wallet>, passphrase: Option<String>) -> Keyring {
        Keyring {
            data_dir: data_dir.to_path_buf(),
            passphrase,
            node,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    pub fn node(&self) -> &Arc<Wallet> {
        &self.node
    }

    /// Whether this node holds the key of `address` (the node wallet or a user wallet).
    pub fn holds(&self, address: &Address) -> bool {
        holds(&self.data_dir, &self.node.address(), address)
    }

    /// The wallet of `address`, when this node holds its key.
    pub fn wallet(&self, address: &Address) -> Result<Arc<Wallet>, LedgerError> {
        if *address == self.node.address() {
            return Ok(self.node.clone());
        }
        let mut loaded = self.loaded.lock();
        if let Some(w) = loaded.get(address) {
            return Ok(w.clone());
        }
        let wallet = Arc::new(keystore::load(
            &wallet_path(&self.data_dir, address),
            self.passphrase.as_deref(),
        )?);
        if wallet.address() != *address {
            return Err(LedgerError::Keystore {
                path: wallet_path(&self.data_dir, address).display().to_string(),
                reason: format!("holds the key of {}, not {address}", wallet.address()),
            });
        }
        loaded.insert(*address, wallet.clone());
        Ok(wallet)
    }
}

/// Claims the transfers waiting for each of `accounts` whose key this node holds, on a task
/// of its own (a write must not be cut between its commit and the state update), so that a
/// transfer is the recipient's as soon as this node has it rather than at its next proof of
/// work. The receive blocks go out with the next gossip push. Returns the task, which yields
/// the number of transfers claimed.
pub fn claim_now(
    keyring: &Arc<Keyring>,
    ledger: &Arc<neuroshard_ledger::Ledger>,
    accounts: Vec<Address>,
) -> Option<tokio::task::JoinHandle<usize>> {
    let mine: Vec<Address> = accounts.into_iter().filter(|a| keyring.holds(a)).collect();
    if mine.is_empty() {
        return None;
    }
    let (keyring, ledger) = (keyring.clone(), ledger.clone());
    Some(tokio::spawn(async move {
        let mut claimed = 0;
        for account in mine {
            let wallet = match keyring.wallet(&account) {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(%account, error = %e, "cannot claim incoming transfers: no usable key");
                    continue;
                }
            };
            let now = chrono::Utc::now().timestamp();
            match ledger.claim_incoming(&wallet, now).await {
                Ok(hashes) if !hashes.is_empty() => {
                    tracing::info!(%account, transfers = hashes.len(), "incoming transfers claimed on arrival");
                    claimed += hashes.len();
                }
                Ok(_) => {}
                // A chain whose next block waits for its dependencies, or a frozen account:
                // the next proof of work or write claims it, or nothing can.
                Err(e) => {
                    tracing::debug!(%account, error = %e, "incoming transfers not claimed now")
                }
            }
        }
        claimed
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_wallets_are_found_by_address() {
        let dir = tempfile::tempdir().unwrap();
        let node = Arc::new(Wallet::from_seed(7));
        let user = create_user_wallet(dir.path(), None).unwrap();
        let ring = Keyring::new(dir.path(), node.clone(), None);
        assert_eq!(
            ring.wallet(&node.address()).unwrap().address(),
            node.address()
        );
        assert_eq!(
            ring.wallet(&user.address()).unwrap().address(),
            user.address()
        );
        assert!(holds(dir.path(), &node.address(), &user.address()));
        let stranger = Wallet::from_seed(8).address();
        assert!(!holds(dir.path(), &node.address(), &stranger));
        assert!(ring.wallet(&stranger).is_err());
    }
}
