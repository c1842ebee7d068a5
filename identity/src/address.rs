//! Ethereum-style addresses: `0x` + 40 hex digits, the last 20 bytes of keccak-256 of the
//! uncompressed public key (without its 0x04 prefix), written with the EIP-55 checksum casing.

use std::fmt;
use std::str::FromStr;

use k256::ecdsa::VerifyingKey;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha3::{Digest, Keccak256};

use super::error::IdentityError;

/// A 20-byte account address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address(pub [u8; 20]);

impl Address {
    /// The address of a public key.
    pub fn from_verifying_key(key: &VerifyingKey) -> Self {
        let point = key.to_encoded_point(false);
        let digest = Keccak256::digest(&point.as_bytes()[1..]);
        let mut out = [0u8; 20];
        out.copy_from_slice(&digest[12..]);
        Address(out)
    }

    /// The address of a public key in SEC1 form (33 bytes compressed or 65 uncompressed),
    /// as the peer-to-peer transport carries it: a libp2p secp256k1 peer id holds the
    /// compressed key, so a peer id and a wallet address are two views of one key.
    pub fn from_sec1_public_key(bytes: &[u8]) -> Result<Self, IdentityError> {
        let key =
            VerifyingKey::from_sec1_bytes(bytes).map_err(|_| IdentityError::InvalidAddress {
                input: hex::encode(bytes),
                reason: "not a secp256k1 public key",
            })?;
        Ok(Address::from_verifying_key(&key))
    }

    /// Parses `0x` + 40 hex digits. All-lowercase and all-uppercase digits are accepted as
    /// they are; mixed case must be a correct EIP-55 checksum.
    pub fn parse(input: &str) -> Result<Self, IdentityError> {
        let bad = |reason| IdentityError::InvalidAddress {
            input: input.chars().take(64).collect(),
            reason,
        };
        let hex_part = input
            .strip_prefix("0x")
            .ok_or_else(|| bad("must start with 0x"))?;
        if hex_part.len() != 40 {
            return Err(bad("must have exactly 40 hex digits after 0x"));
        }
        let mut bytes = [0u8; 20];
        hex::decode_to_slice(hex_part, &mut bytes)
            .map_err(|_| bad("contains non-hex characters"))?;
        let address = Address(bytes);
        let has_lower = hex_part.bytes().any(|b| b.is_ascii_lowercase());
        let has_upper = hex_part.bytes().any(|b| b.is_ascii_uppercase());
        if has_lower && has_upper && address.to_checksum()[2..] != *hex_part {
            return Err(bad("mixed-case address with a wrong EIP-55 checksum"));
        }
        Ok(address)
    }

    /// EIP-55 checksum form.
    pub fn to_checksum(&self) -> String {
        let lower = hex::encode(self.0);
        let hash = Keccak256::digest(lower.as_bytes());
        let mut out = String::with_capacity(42);
        out.push_str("0x");
        for (i, c) in lower.chars().enumerate() {
            let nibble = (hash[i / 2] >> (if i % 2 == 0 { 4 } else { 0 })) & 0x0f;
            if c.is_ascii_alphabetic() && nibble >= 8 {
                out.push(c.to_ascii_uppercase());
            } else {
                out.push(c);
            }
        }
        out
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_checksum())
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({})", self.to_checksum())
    }
}

impl FromStr for Address {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Address::parse(s)
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_checksum())
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Address::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k256::ecdsa::SigningKey;

    #[test]
    fn sec1_public_keys_give_the_wallet_address() {
        let wallet = crate::Wallet::from_seed(7);
        let compressed = wallet.public_key_sec1();
        assert_eq!(
            Address::from_sec1_public_key(&compressed).unwrap(),
            wallet.address()
        );
        let key = SigningKey::from_slice(&wallet.secret_bytes()).unwrap();
        let uncompressed = key.verifying_key().to_encoded_point(false);
        assert_eq!(
            Address::from_sec1_public_key(uncompressed.as_bytes()).unwrap(),
            wallet.address()
        );
        assert_ne!(
            Address::from_sec1_public_key(&crate::Wallet::from_seed(8).public_key_sec1()).unwrap(),
            wallet.address()
        );
        for bad in [&[][..], &[5u8; 33][..], &compressed[..32]] {
            assert!(Address::from_sec1_public_key(bad).is_err());
        }
    }

    #[test]
    fn eip55_vectors() {
        // Test vectors from EIP-55.
        for v in [
            "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
            "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
            "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
            "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
        ] {
            let a = Address::parse(v).unwrap();
            assert_eq!(a.to_checksum(), v);
            assert_eq!(Address::parse(&v.to_lowercase()).unwrap(), a);
        }
    }

    #[test]
    fn address_of_private_key_one() {
        // Private key 1 has the well-known address 0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf.
        let mut sk = [0u8; 32];
        sk[31] = 1;
        let key = SigningKey::from_slice(&sk).unwrap();
        let a = Address::from_verifying_key(key.verifying_key());
        assert_eq!(
            a.to_checksum(),
            "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "0x",
            "5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
            "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAe",
            "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAedd",
            "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeZ",
            "0x5AAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
        ] {
            let e = Address::parse(bad).unwrap_err();
            assert_eq!(e.code(), "INVALID_ADDRESS", "{bad}");
        }
    }

    #[test]
    fn serde_round_trip() {
        let a = Address::parse("0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed").unwrap();
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, "\"0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed\"");
        assert_eq!(serde_json::from_str::<Address>(&json).unwrap(), a);
    }
}
