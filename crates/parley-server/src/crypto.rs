//! The provider's own MLS-level cryptography, all through openmls's crypto provider: the hub's
//! signing key per hosted domain (its MLS `ExternalSender`, which signs `groupInfo` answers),
//! verifying a client's SignWithLabel signature (signed `keyMaterial` and `groupInfo` requests),
//! and EncryptWithLabel (RFC 9420 §5.1.3) for `groupInfo`. Owns `hub_keys`.

use crate::store::{Store, StoreError};
use openmls::prelude::{BasicCredential, Ciphersuite, Credential, SignatureScheme};
use openmls_rust_crypto::RustCrypto;
use openmls_traits::crypto::OpenMlsCrypto;
use parley_proto::mimi::{self, signing, ExternalSender, HpkeCiphertext};
use rusqlite::{params, OptionalExtension};
use std::collections::HashMap;
use tls_codec::Serialize as _;

const SUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("no hub key for {0}")]
    NoKey(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("cryptography failed: {0}")]
    Failed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One domain's hub key.
struct HubKey {
    private: Vec<u8>,
    public: Vec<u8>,
    /// TLS-encoded `ExternalSender` (public key, BasicCredential `mimi://DOMAIN`).
    external_sender: Vec<u8>,
}

/// The hub signing keys of every hosted domain, made on first start and kept in the database.
pub struct HubKeys {
    keys: HashMap<String, HubKey>,
}

impl HubKeys {
    /// Loads the keys of `domains`, generating and storing the missing ones.
    pub async fn load(store: &Store, domains: Vec<String>) -> Result<Self, CryptoError> {
        let rows = store
            .write(move |c| {
                let mut out = Vec::new();
                for domain in domains {
                    let existing: Option<(Vec<u8>, Vec<u8>)> = c
                        .query_row(
                            "SELECT private_key, public_key FROM hub_keys WHERE domain = ?1",
                            params![domain],
                            |r| Ok((r.get(0)?, r.get(1)?)),
                        )
                        .optional()?;
                    let (private, public) = match existing {
                        Some(pair) => pair,
                        None => {
                            let pair = RustCrypto::default()
                                .signature_key_gen(SignatureScheme::ED25519)
                                .map_err(|e| StoreError::Task(format!("hub key: {e:?}")))?;
                            c.execute(
                                "INSERT INTO hub_keys (domain, private_key, public_key) VALUES (?1, ?2, ?3)",
                                params![domain, pair.0, pair.1],
                            )?;
                            pair
                        }
                    };
                    out.push((domain, private, public));
                }
                Ok(out)
            })
            .await?;
        let mut keys = HashMap::new();
        for (domain, private, public) in rows {
            let external_sender = external_sender(&domain, &public)?;
            keys.insert(
                domain,
                HubKey {
                    private,
                    public,
                    external_sender,
                },
            );
        }
        Ok(Self { keys })
    }

    fn key(&self, domain: &str) -> Result<&HubKey, CryptoError> {
        self.keys
            .get(domain)
            .ok_or_else(|| CryptoError::NoKey(domain.to_owned()))
    }

    /// The hub's TLS-encoded `ExternalSender` for `domain`.
    pub fn external_sender(&self, domain: &str) -> Result<&[u8], CryptoError> {
        Ok(&self.key(domain)?.external_sender)
    }

    /// The hub's public signature key for `domain`.
    pub fn public_key(&self, domain: &str) -> Result<&[u8], CryptoError> {
        Ok(&self.key(domain)?.public)
    }

    /// SignWithLabel with the hub key of `domain`, over bytes from [`signing::sign_content`].
    pub fn sign(&self, domain: &str, sign_content: &[u8]) -> Result<Vec<u8>, CryptoError> {
        RustCrypto::default()
            .sign(
                SignatureScheme::ED25519,
                sign_content,
                &self.key(domain)?.private,
            )
            .map_err(|e| CryptoError::Failed(format!("{e:?}")))
    }
}

/// The `ExternalSender` a hub of `domain` with `public` key is known by in its rooms.
fn external_sender(domain: &str, public: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let credential: Credential =
        BasicCredential::new(format!("mimi://{domain}").into_bytes()).into();
    let sender = ExternalSender {
        signature_key: public.to_vec().into(),
        credential: mimi::Credential::encode(&credential)
            .map_err(|e| CryptoError::Failed(e.to_string()))?,
    };
    sender
        .tls_serialize_detached()
        .map_err(|e| CryptoError::Failed(e.to_string()))
}

/// Verifies an Ed25519 signature made with SignWithLabel: `sign_content` from
/// [`signing::sign_content`].
pub fn verify(public_key: &[u8], sign_content: &[u8], signature: &[u8]) -> Result<(), CryptoError> {
    RustCrypto::default()
        .verify_signature(
            SignatureScheme::ED25519,
            sign_content,
            public_key,
            signature,
        )
        .map_err(|_| CryptoError::BadSignature)
}

/// EncryptWithLabel(public_key, label, context, plaintext) for the Parley ciphersuite.
pub fn encrypt_with_label(
    public_key: &[u8],
    label: &str,
    context: &[u8],
    plaintext: &[u8],
) -> Result<HpkeCiphertext, CryptoError> {
    let info = signing::encrypt_context(label, context);
    let sealed = RustCrypto::default()
        .hpke_seal(SUITE.hpke_config(), public_key, &info, &[], plaintext)
        .map_err(|e| CryptoError::Failed(format!("{e:?}")))?;
    Ok(HpkeCiphertext {
        kem_output: sealed.kem_output.as_slice().to_vec().into(),
        ciphertext: sealed.ciphertext.as_slice().to_vec().into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hub_keys_persist_sign_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let keys = HubKeys::load(&store, vec!["chirp.test".into()])
            .await
            .unwrap();
        let again = HubKeys::load(&store, vec!["chirp.test".into()])
            .await
            .unwrap();
        assert_eq!(
            keys.public_key("chirp.test").unwrap(),
            again.public_key("chirp.test").unwrap(),
            "the key is made once and kept"
        );
        let content = signing::sign_content("GroupInfoResponseTBS", b"tbs");
        let sig = keys.sign("chirp.test", &content).unwrap();
        let pk = keys.public_key("chirp.test").unwrap();
        assert!(verify(pk, &content, &sig).is_ok());
        let other = signing::sign_content("GroupInfoResponseTBS", b"tbz");
        assert!(verify(pk, &other, &sig).is_err());
        assert!(keys.sign("wave.test", &content).is_err());
        let sender = keys.external_sender("chirp.test").unwrap();
        assert!(sender.windows(17).any(|w| w == b"mimi://chirp.test"));
    }

    #[test]
    fn encryption_to_an_hpke_key_produces_a_kem_output() {
        let pair = RustCrypto::default()
            .derive_hpke_keypair(SUITE.hpke_config(), &[7; 32])
            .unwrap();
        let ct = encrypt_with_label(
            &pair.public,
            "GroupInfo and ratchet_tree encryption",
            b"r",
            b"x",
        )
        .unwrap();
        assert_eq!(ct.kem_output.as_slice().len(), 32);
        let opened = RustCrypto::default()
            .hpke_open(
                SUITE.hpke_config(),
                &openmls_traits::types::HpkeCiphertext {
                    kem_output: ct.kem_output.as_slice().to_vec().into(),
                    ciphertext: ct.ciphertext.as_slice().to_vec().into(),
                },
                &pair.private,
                &signing::encrypt_context("GroupInfo and ratchet_tree encryption", b"r"),
                &[],
            )
            .unwrap();
        assert_eq!(opened, b"x");
    }
}
