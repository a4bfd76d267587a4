//! Real MLS objects (openmls) for the wire tests.

use super::mls::{GroupInfo, MlsMessage, RatchetTree, Welcome};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;

pub struct Sample {
    pub key_package: super::mls::KeyPackage,
    pub commit: MlsMessage,
    pub welcome: Welcome,
    pub group_info: GroupInfo,
    pub ratchet_tree: RatchetTree,
    pub application: MlsMessage,
    pub proposal: MlsMessage,
    pub credential: super::mls::Credential,
    pub signature_key: Vec<u8>,
}

fn member(provider: &OpenMlsRustCrypto, name: &str) -> (SignatureKeyPair, CredentialWithKey) {
    let signer = SignatureKeyPair::new(SignatureScheme::ED25519).unwrap();
    signer.store(provider.storage()).unwrap();
    let credential = CredentialWithKey {
        credential: BasicCredential::new(name.as_bytes().to_vec()).into(),
        signature_key: signer.public().into(),
    };
    (signer, credential)
}

fn bytes(value: impl tls_codec::Serialize) -> Vec<u8> {
    value.tls_serialize_detached().unwrap()
}

/// A two-member group: alice adds bob, then sends a message and proposes her removal.
pub fn sample() -> Sample {
    let suite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
    let alice_p = OpenMlsRustCrypto::default();
    let bob_p = OpenMlsRustCrypto::default();
    let (alice, alice_cred) = member(&alice_p, "mimi://chirp.test/d/alice/0000000000000001");
    let (bob, bob_cred) = member(&bob_p, "mimi://wave.test/d/bob/0000000000000002");
    let bob_kp = openmls::prelude::KeyPackage::builder()
        .build(suite, &bob_p, &bob, bob_cred)
        .unwrap();
    let config = MlsGroupCreateConfig::builder()
        .ciphersuite(suite)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .build();
    let mut group = MlsGroup::new(&alice_p, &alice, &config, alice_cred.clone()).unwrap();
    let (commit, welcome, _) = group
        .add_members(&alice_p, &alice, &[bob_kp.key_package().clone()])
        .unwrap();
    group.merge_pending_commit(&alice_p).unwrap();
    // Bare structures: an MLSMessage minus its version and wire format.
    let welcome = bytes(welcome)[4..].to_vec();

    let group_info = bytes(
        group
            .export_group_info(alice_p.crypto(), &alice, false)
            .unwrap(),
    )[4..]
        .to_vec();
    let application = group.create_message(&alice_p, &alice, b"hi").unwrap();
    let proposal = group.leave_group(&alice_p, &alice).unwrap();
    Sample {
        key_package: super::mls::KeyPackage::from_bytes(bytes(bob_kp.key_package().clone()))
            .unwrap(),
        commit: MlsMessage::from_bytes(bytes(commit)).unwrap(),
        welcome: Welcome::from_bytes(welcome).unwrap(),
        group_info: GroupInfo::from_bytes(group_info).unwrap(),
        ratchet_tree: RatchetTree::from_bytes(bytes(group.export_ratchet_tree())).unwrap(),
        application: MlsMessage::from_bytes(bytes(application)).unwrap(),
        proposal: MlsMessage::from_bytes(bytes(proposal)).unwrap(),
        credential: super::mls::Credential::from_bytes(bytes(alice_cred.credential)).unwrap(),
        signature_key: alice.public().to_vec(),
    }
}
