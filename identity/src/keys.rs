//! Wallet keys and recoverable secp256k1 signatures (r || s || v, low-S only), plus the 32-byte
//! hash type used for block and proof identities.

use std::fmt;

use k256::ecdsa::{RecoveryId, Signature as EcdsaSignature, SigningKey, VerifyingKey};
use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha3::{Digest, Keccak256};

use super::address::Address;
use super::error::IdentityError;

/// keccak-256 of `domain || bytes`: the digest every signature in the ledger is made over.
pub fn keccak(domain: &[u8], bytes: &[u8]) -> Hash32 {
    let mut h = Keccak256::new();
    h.update(domain);
    h.update(bytes);
    Hash32(h.finalize().into())
}

/// A 32-byte hash, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hash32(pub [u8; 32]);

impl Hash32 {
    pub const ZERO: Hash32 = Hash32([0; 32]);

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Result<Self, IdentityError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).map_err(|_| IdentityError::InvalidMessage {
            reason: format!(
                "bad 32-byte hex hash {:?}",
                text.chars().take(80).collect::<String>()
            ),
        })?;
        Ok(Hash32(out))
    }
}

impl fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl Serialize for Hash32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Hash32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Hash32::from_hex(&text).map_err(serde::de::Error::custom)
    }
}

/// A recoverable signature: r (32) || s (32) || recovery id (1).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sig65(pub [u8; 65]);

impl fmt::Debug for Sig65 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sig65({}..)", &hex::encode(&self.0[..8]))
    }
}

impl Serialize for Sig65 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Sig65 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 65];
        hex::decode_to_slice(&text, &mut out)
            .map_err(|_| serde::de::Error::custom("signature must be 130 hex digits"))?;
        Ok(Sig65(out))
    }
}

/// Recovers the signer's address of `sig` over `digest`. Rejects malformed signatures, high-S
/// signatures (so a signature has exactly one valid encoding) and bad recovery ids.
pub fn recover_signer(
    digest: &Hash32,
    sig: &Sig65,
    what: &'static str,
) -> Result<Address, IdentityError> {
    let bad = |reason: &str| IdentityError::BadSignature {
        what,
        reason: reason.to_string(),
    };
    let signature =
        EcdsaSignature::from_slice(&sig.0[..64]).map_err(|_| bad("malformed r or s"))?;
    if signature.normalize_s().is_some() {
        return Err(bad("high-s signature"));
    }
    let recid = RecoveryId::from_byte(sig.0[64]).ok_or_else(|| bad("bad recovery id"))?;
    let key = VerifyingKey::recover_from_prehash(&digest.0, &signature, recid)
        .map_err(|_| bad("public key cannot be recovered"))?;
    use k256::ecdsa::signature::hazmat::PrehashVerifier;
    key.verify_prehash(&digest.0, &signature)
        .map_err(|_| bad("signature does not verify"))?;
    Ok(Address::from_verifying_key(&key))
}

/// A wallet: one secp256k1 signing key and its address.
#[derive(Clone)]
pub struct Wallet {
    key: SigningKey,
    address: Address,
}

impl fmt::Debug for Wallet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Wallet({})", self.address)
    }
}

impl Wallet {
    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        loop {
            let mut bytes = [0u8; 32];
            rng.fill_bytes(&mut bytes);
            if let Ok(w) = Self::from_secret(&bytes) {
                return w;
            }
        }
    }

    /// A wallet from 32 secret bytes (fails for zero or values not below the curve order).
    pub fn from_secret(secret: &[u8; 32]) -> Result<Self, IdentityError> {
        let key = SigningKey::from_slice(secret).map_err(|_| IdentityError::Keystore {
            path: String::new(),
            reason: "secret key is not a valid secp256k1 scalar".into(),
        })?;
        let address = Address::from_verifying_key(key.verifying_key());
        Ok(Wallet { key, address })
    }

    /// Deterministic test wallet from a seed (tests and examples only).
    pub fn from_seed(seed: u64) -> Self {
        let digest = keccak(b"neuroshard-test-wallet", &seed.to_be_bytes());
        Self::from_secret(&digest.0).unwrap_or_else(|_| Self::from_seed(seed.wrapping_add(1 << 63)))
    }

    pub fn address(&self) -> Address {
        self.address
    }

    /// The 32 secret bytes: the keystore saves them and the peer-to-peer transport is keyed
    /// with them (its peer id is this wallet's key). Never logged, never sent.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.key.to_bytes().into()
    }

    /// The public key in compressed SEC1 form (33 bytes).
    pub fn public_key_sec1(&self) -> [u8; 33] {
        let point = self.key.verifying_key().to_encoded_point(true);
        let mut out = [0u8; 33];
        out.copy_from_slice(point.as_bytes());
        out
    }

    /// Signs a 32-byte digest (low-S, RFC 6979 deterministic nonce).
    pub fn sign_digest(&self, digest: &Hash32) -> Sig65 {
        let (sig, recid) = self
            .key
            .sign_prehash_recoverable(&digest.0)
            .expect("signing a 32-byte prehash with a valid key cannot fail");
        let (sig, recid) = match sig.normalize_s() {
            Some(normalized) => (
                normalized,
                RecoveryId::new(!recid.is_y_odd(), recid.is_x_reduced()),
            ),
            None => (sig, recid),
        };
        let mut out = [0u8; 65];
        out[..64].copy_from_slice(&sig.to_bytes());
        out[64] = recid.to_byte();
        Sig65(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_recover() {
        let w = Wallet::from_seed(7);
        let d = keccak(b"t", b"hello");
        let sig = w.sign_digest(&d);
        assert_eq!(recover_signer(&d, &sig, "test").unwrap(), w.address());
        let other = keccak(b"t", b"hellp");
        let recovered = recover_signer(&other, &sig, "test");
        assert!(recovered.map(|a| a != w.address()).unwrap_or(true));
    }

    #[test]
    fn rejects_high_s_and_garbage() {
        let w = Wallet::from_seed(8);
        let d = keccak(b"t", b"x");
        let sig = w.sign_digest(&d);
        let parsed = EcdsaSignature::from_slice(&sig.0[..64]).unwrap();
        // Flip s to n - s: the same signature in its high-S form must be refused.
        let (r, s) = parsed.split_scalars();
        let high = EcdsaSignature::from_scalars(r.to_bytes(), (-*s).to_bytes()).unwrap();
        let mut bad = sig;
        bad.0[..64].copy_from_slice(&high.to_bytes());
        bad.0[64] ^= 1;
        let e = recover_signer(&d, &bad, "test").unwrap_err();
        assert_eq!(e.code(), "BAD_SIGNATURE");
        assert!(recover_signer(&d, &Sig65([0; 65]), "test").is_err());
        let mut bad_recid = sig;
        bad_recid.0[64] = 9;
        assert!(recover_signer(&d, &bad_recid, "test").is_err());
    }

    #[test]
    fn generated_wallets_differ() {
        assert_ne!(Wallet::generate().address(), Wallet::generate().address());
    }
}
