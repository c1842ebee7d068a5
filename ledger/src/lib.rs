//! The NEURO ledger: wallets, signed account chains, Proof of Neural Work rewards, staking.
//!
//! # Design
//! * **Keys.** A secp256k1 key per wallet ([`Wallet`], keystore `wallet.json`, mode 0600,
//!   optionally scrypt + ChaCha20-Poly1305 encrypted). Addresses are Ethereum's: `0x` + the last
//!   20 bytes of keccak-256 of the uncompressed public key, EIP-55 cased ([`Address`]). Both
//!   come from the `neuroshard-identity` crate, re-exported here as [`keys`], [`address`] and
//!   [`keystore`].
//! * **Account chains.** Every state change is a block on its owner's chain, signed by the owner
//!   (recoverable ECDSA over keccak-256 of a canonical binary encoding, low-S only): `send`
//!   (amount + fee, fee burned), `receive` (claims a send addressed to the account, by hash),
//!   `stake`, `unstake` (starts a 7-day cooldown) and `reward` (mints the reward of a proof the
//!   account itself signed). A block names its previous block and its height (the nonce).
//! * **Determinism.** The state is a pure function of the set of blocks held
//!   ([`state::LedgerState`]): a chain is walked from height 0; a block is evaluated when its
//!   previous block and (for a receive) its source are evaluated; its outcome (effect or void)
//!   depends only on those. A block without effect (overdraft, locked stake, bad proof) still
//!   extends its chain, so the chain structure never depends on economics. Hence any arrival
//!   order of the same blocks gives the same balances and the same [`Ledger::root_hash`].
//! * **Double spends.** Spending the same funds twice means either an overdraft (the second
//!   send is void) or two blocks on the same previous block: equivocation. Then the account is
//!   frozen at that height on every node that holds both blocks (gossip carries both; an
//!   [`Evidence`] message bundles them): neither fork counts, receives of their sends are void,
//!   and all funds the account holds below the fork are burned (slashed). There is no reporter
//!   reward: who reported first is not deterministic.
//! * **Who mints.** Only a reward block on the proof signer's own chain mints, for a proof whose
//!   `node_id` is that account. Every node re-verifies on receipt: signature, plausibility, the
//!   epoch, the age window against the block's timestamp, replay (same proof id in the chain),
//!   one proof per epoch, at most 120 per hour, and that the claimed amount equals the rules'
//!   amount for the stake the account had at that point. Rules that depend on the local clock
//!   (proof age vs now, blocks more than 60 s in the future) are admission checks only.
//! * **Amounts** are integer units (1 NEURO = 10^9 units) everywhere; f64 only for JSON.
//! * **Invariant:** minted == sum(available + staked + cooldown) + unclaimed sends + burned.
//! * **Storage** ([`store::Store`]): sqlx over SQLite (WAL, synchronous FULL) or PostgreSQL; the
//!   blocks are the only ledger table; the state is derived in memory at open. One writer (one
//!   node process) per database. [`db`] opens the database (URL → backend, one Any pool, WAL
//!   on SQLite) for the ledger and for the daemon's tracker.
//!
//! **Invariant:** no axum, no tonic, no prost, no engine: the ledger's API is plain Rust types;
//! REST and gRPC conversions live at the edges in the daemon.

pub mod account;
pub mod amount;
pub mod block;
pub mod dates;
pub mod db;
pub mod error;
pub mod fraud;
pub mod inference;
pub mod judge;
pub mod proof;
pub mod receipt;
pub mod rewards;
pub mod rules;
pub mod service;
pub mod state;
pub mod store;
pub mod units;
pub mod views;

// Keys, addresses, the keystore and the canonical encoding live in `neuroshard-identity`; they
// are re-exported under their old paths (`neuroshard_ledger::keys::Wallet`, ...) so the
// ledger's API stays whole.
pub use neuroshard_identity::{IdentityError, address, encode, keys, keystore};

pub use account::{Effect, HistoryEntry, Outcome, VoidReason};
pub use address::Address;
pub use amount::{UNITS_PER_NEURO, parse_neuro_f64, transfer_fee, units_to_neuro};
pub use block::{Block, Evidence, Message, Op, SignedBlock};
pub use error::LedgerError;
pub use keys::{Hash32, Sig65, Wallet};
pub use proof::{Proof, ProofType, RejectReason, SignedProof};
pub use rules::Rules;
pub use service::{Applied, BlockStatus, Ledger};
pub use views::{
    Balance, ProofAccepted, ProofEntry, ProofPage, ProofStats, SendReceipt, StakeReceipt, Staking,
    TransactionPage, UnstakeReceipt,
};
