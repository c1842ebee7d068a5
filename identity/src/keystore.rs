//! The wallet keystore: `<data_dir>/wallet.json`, mode 0600, the secret either plain or
//! encrypted with a passphrase (scrypt key derivation + ChaCha20-Poly1305, address as AAD).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::address::Address;
use super::error::IdentityError;
use super::keys::Wallet;

/// File name of the keystore inside the data directory.
pub const KEYSTORE_FILE: &str = "wallet.json";
/// scrypt cost for new keystores: N = 2^15, r = 8, p = 1 (32 MiB, about 0.1 s).
pub const SCRYPT_LOG_N: u8 = 15;

#[derive(Serialize, Deserialize)]
struct KeystoreFile {
    version: u32,
    address: Address,
    #[serde(flatten)]
    secret: SecretForm,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum SecretForm {
    Plain {
        secret: String,
    },
    ScryptChacha20poly1305 {
        log_n: u8,
        r: u32,
        p: u32,
        salt: String,
        nonce: String,
        ciphertext: String,
    },
}

impl Wallet {
    /// Loads `<data_dir>/wallet.json`, or creates it with a fresh key (mode 0600, no
    /// passphrase) when it does not exist.
    pub fn load_or_create(data_dir: &Path) -> Result<Wallet, IdentityError> {
        load_or_create(data_dir, None)
    }
}

/// Loads the keystore, or creates it. With a passphrase a new keystore is encrypted, and an
/// existing encrypted one needs it; a plain keystore ignores it.
pub fn load_or_create(data_dir: &Path, passphrase: Option<&str>) -> Result<Wallet, IdentityError> {
    load_or_create_with(data_dir, passphrase, SCRYPT_LOG_N)
}

/// As [`load_or_create`] with an explicit scrypt cost for new keystores (tests use a low one).
pub fn load_or_create_with(
    data_dir: &Path,
    passphrase: Option<&str>,
    log_n: u8,
) -> Result<Wallet, IdentityError> {
    let path = data_dir.join(KEYSTORE_FILE);
    if path.exists() {
        return load(&path, passphrase);
    }
    let wallet = Wallet::generate();
    save(&path, &wallet, passphrase, log_n)?;
    Ok(wallet)
}

fn err(path: &Path, reason: impl Into<String>) -> IdentityError {
    IdentityError::Keystore {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Reads a keystore file. Refuses files readable by group or others.
pub fn load(path: &Path, passphrase: Option<&str>) -> Result<Wallet, IdentityError> {
    let meta = fs::metadata(path).map_err(|e| err(path, format!("cannot stat: {e}")))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(
            path,
            format!("permissions {mode:o} are too open, run chmod 600 on it"),
        ));
    }
    let text = fs::read_to_string(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    let file: KeystoreFile =
        serde_json::from_str(&text).map_err(|e| err(path, format!("malformed: {e}")))?;
    if file.version != 1 {
        return Err(err(path, format!("unknown version {}", file.version)));
    }
    let secret = match file.secret {
        SecretForm::Plain { secret } => decode32(path, &secret)?,
        SecretForm::ScryptChacha20poly1305 {
            log_n,
            r,
            p,
            salt,
            nonce,
            ciphertext,
        } => {
            let pass = passphrase
                .ok_or_else(|| err(path, "keystore is encrypted: a passphrase is needed"))?;
            let key = derive(path, pass, &hex_bytes(path, &salt)?, log_n, r, p)?;
            let nonce = hex_bytes(path, &nonce)?;
            if nonce.len() != 12 {
                return Err(err(path, "nonce must be 12 bytes"));
            }
            let cipher = ChaCha20Poly1305::new(Key::from_slice(&key));
            let plain = cipher
                .decrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: &hex_bytes(path, &ciphertext)?,
                        aad: &file.address.0,
                    },
                )
                .map_err(|_| err(path, "wrong passphrase or corrupted keystore"))?;
            plain
                .try_into()
                .map_err(|_| err(path, "decrypted secret is not 32 bytes"))?
        }
    };
    let wallet =
        Wallet::from_secret(&secret).map_err(|_| err(path, "secret is not a valid key"))?;
    if wallet.address() != file.address {
        return Err(err(path, "stored address does not match the key"));
    }
    Ok(wallet)
}

/// Writes a keystore atomically (temporary file with mode 0600, fsync, rename, fsync dir).
pub fn save(
    path: &Path,
    wallet: &Wallet,
    passphrase: Option<&str>,
    log_n: u8,
) -> Result<(), IdentityError> {
    let secret = wallet.secret_bytes();
    let form = match passphrase {
        None => SecretForm::Plain {
            secret: hex::encode(secret),
        },
        Some(pass) => {
            let mut rng = rand::rng();
            let mut salt = [0u8; 16];
            let mut nonce = [0u8; 12];
            rng.fill_bytes(&mut salt);
            rng.fill_bytes(&mut nonce);
            let (r, p) = (8, 1);
            let key = derive(path, pass, &salt, log_n, r, p)?;
            let cipher = ChaCha20Poly1305::new(Key::from_slice(&key));
            let ciphertext = cipher
                .encrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: &secret,
                        aad: &wallet.address().0,
                    },
                )
                .map_err(|_| err(path, "encryption failed"))?;
            SecretForm::ScryptChacha20poly1305 {
                log_n,
                r,
                p,
                salt: hex::encode(salt),
                nonce: hex::encode(nonce),
                ciphertext: hex::encode(ciphertext),
            }
        }
    };
    let file = KeystoreFile {
        version: 1,
        address: wallet.address(),
        secret: form,
    };
    let text = serde_json::to_string_pretty(&file).map_err(|e| err(path, e.to_string()))?;
    neuroshard_shared::fsx::write_atomic(path, text.as_bytes(), Some(0o600))
        .map_err(|e| err(path, format!("cannot write: {e}")))
}

fn derive(
    path: &Path,
    pass: &str,
    salt: &[u8],
    log_n: u8,
    r: u32,
    p: u32,
) -> Result<[u8; 32], IdentityError> {
    if !(10..=20).contains(&log_n) {
        return Err(err(path, format!("scrypt log_n {log_n} outside 10..=20")));
    }
    let params = scrypt::Params::new(log_n, r, p, 32)
        .map_err(|e| err(path, format!("scrypt params: {e}")))?;
    let mut out = [0u8; 32];
    scrypt::scrypt(pass.as_bytes(), salt, &params, &mut out)
        .map_err(|e| err(path, format!("scrypt: {e}")))?;
    Ok(out)
}

fn hex_bytes(path: &Path, text: &str) -> Result<Vec<u8>, IdentityError> {
    hex::decode(text).map_err(|_| err(path, "bad hex field"))
}

fn decode32(path: &Path, text: &str) -> Result<[u8; 32], IdentityError> {
    hex_bytes(path, text)?
        .try_into()
        .map_err(|_| err(path, "secret must be 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_with_mode_0600_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let w = Wallet::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEYSTORE_FILE);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = Wallet::load_or_create(dir.path()).unwrap();
        assert_eq!(w.address(), again.address());
    }

    #[test]
    fn refuses_open_permissions() {
        let dir = tempfile::tempdir().unwrap();
        Wallet::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEYSTORE_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = Wallet::load_or_create(dir.path()).unwrap_err();
        assert!(e.to_string().contains("too open"), "{e}");
    }

    #[test]
    fn encrypted_round_trip_and_wrong_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let w = load_or_create_with(dir.path(), Some("correct horse"), 10).unwrap();
        let text = fs::read_to_string(dir.path().join(KEYSTORE_FILE)).unwrap();
        assert!(!text.contains(&hex::encode(w.secret_bytes())));
        let again = load_or_create_with(dir.path(), Some("correct horse"), 10).unwrap();
        assert_eq!(again.address(), w.address());
        let wrong = load_or_create_with(dir.path(), Some("battery staple"), 10).unwrap_err();
        assert!(wrong.to_string().contains("wrong passphrase"), "{wrong}");
        let none = load_or_create_with(dir.path(), None, 10).unwrap_err();
        assert!(none.to_string().contains("passphrase is needed"), "{none}");
    }

    #[test]
    fn detects_tampered_address() {
        let dir = tempfile::tempdir().unwrap();
        Wallet::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEYSTORE_FILE);
        let text = fs::read_to_string(&path).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["address"] = serde_json::json!(Wallet::from_seed(1).address());
        fs::write(&path, v.to_string()).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let e = load(&path, None).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
    }
}
