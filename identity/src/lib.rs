//! Who signs: wallet keys and recoverable secp256k1 signatures ([`keys`]), Ethereum-style
//! addresses ([`address`]) and the keystore that keeps a key on disk ([`keystore`]).
//!
//! * **Keys.** A secp256k1 key per wallet ([`Wallet`]); signatures are recoverable ECDSA over
//!   keccak-256 digests, low-S only, so a signature has exactly one valid encoding.
//! * **Addresses** are Ethereum's: `0x` + the last 20 bytes of keccak-256 of the uncompressed
//!   public key, EIP-55 cased ([`Address`]).
//! * **Canonical encoding** ([`encode`]): the one byte form of signed content (ledger blocks,
//!   proofs, the peer protocol's signed calls), so one value has one digest on every node.
//! * **Keystore.** `wallet.json`, mode 0600, written atomically, the secret plain or encrypted
//!   with a passphrase (scrypt + ChaCha20-Poly1305, the address as associated data).
//!
//! **Invariant:** no tokio, no sqlx, no network: this crate is plain, synchronous code.

pub mod address;
pub mod encode;
pub mod error;
pub mod keys;
pub mod keystore;

pub use address::Address;
pub use error::IdentityError;
pub use keys::{Hash32, Sig65, Wallet};
