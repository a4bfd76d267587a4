//! Wire tests with real MLS objects: every body round-trips byte for byte, decodes strictly,
//! and no input makes a decoder panic.

use super::testing::{sample, Sample};
use super::*;
use proptest::prelude::*;
use std::sync::OnceLock;

fn s() -> &'static Sample {
    static SAMPLE: OnceLock<Sample> = OnceLock::new();
    SAMPLE.get_or_init(sample)
}

/// Encodes, decodes, re-encodes; checks the bytes are stable and that any truncation or an
/// extra byte is refused.
fn check<T: Body + PartialEq + std::fmt::Debug>(value: &T) -> Vec<u8> {
    let wire = value.encode();
    let back = T::decode(&wire).unwrap();
    assert_eq!(&back, value);
    assert_eq!(back.encode(), wire);
    let mut longer = wire.clone();
    longer.push(0);
    assert!(T::decode(&longer).is_err(), "trailing byte accepted");
    for cut in [0, 1, wire.len() / 2, wire.len() - 1] {
        if cut >= wire.len() {
            continue;
        }
        assert!(
            T::decode(&wire[..cut]).is_err(),
            "truncated at {cut} accepted"
        );
    }
    wire
}

fn key_material_request() -> KeyMaterialRequest {
    let tbs = key_material::KeyMaterialRequestTbs {
        protocol: MLS10,
        requesting_user: IdentifierUri::new("mimi://chirp.test/u/alice"),
        target_user: IdentifierUri::new("mimi://wave.test/u/bob"),
        room_id: IdentifierUri::new("mimi://chirp.test/r/x"),
        acceptable_ciphersuites: vec![CIPHERSUITE],
        required_capabilities: RequiredCapabilities::encode(
            &openmls::prelude::RequiredCapabilitiesExtension::new(
                &[openmls::prelude::ExtensionType::Unknown(0x0006)],
                &[],
                &[openmls::prelude::CredentialType::Basic],
            ),
        )
        .unwrap(),
        requester_signature_key: s().signature_key.clone().into(),
        requester_credential: s().credential.clone(),
    };
    tbs.signed(vec![7; 64])
}

#[test]
fn key_material_bodies_round_trip() {
    let req = key_material_request();
    let wire = check(&req);
    // The MLS objects sit inline: the credential's bytes appear verbatim.
    let cred = s().credential.bytes();
    assert!(wire.windows(cred.len()).any(|w| w == cred));
    // The TBS is the request minus its trailing signature.
    let tbs = tls_codec::Serialize::tls_serialize_detached(&req.tbs()).unwrap();
    assert_eq!(&wire[..tbs.len()], tbs.as_slice());
    // 64 bytes need a two-byte MLS varint length.
    assert_eq!(wire.len(), tbs.len() + 2 + 64);
    check(&KeyMaterialResponse {
        protocol: MLS10,
        user_status: UserCode::PartialSuccess as u8,
        user_uri: IdentifierUri::new("mimi://wave.test/u/bob"),
        clients: vec![
            ClientKeyMaterial::Success {
                client_uri: IdentifierUri::new("mimi://wave.test/d/bob/1"),
                key_package: s().key_package.clone(),
            },
            ClientKeyMaterial::KeyMaterialExhausted {
                client_uri: IdentifierUri::new("mimi://wave.test/d/bob/2"),
            },
            ClientKeyMaterial::NothingCompatible {
                client_uri: IdentifierUri::new("mimi://wave.test/d/bob/3"),
                client_capabilities: None,
            },
        ],
    });
    check(&KeyMaterialResponse::refused(
        UserCode::NoConsent,
        "mimi://wave.test/u/bob",
    ));
}

#[test]
fn handshake_bundles_select_on_the_mls_content_type() {
    let commit = HandshakeBundle::Commit {
        commit: s().commit.clone(),
        welcome: Some(s().welcome.clone()),
        group_info: GroupInfoOption::Full {
            group_info: s().group_info.clone(),
        },
        ratchet_tree: RatchetTreeOption::Full {
            ratchet_tree: s().ratchet_tree.clone(),
        },
    };
    let wire = check(&commit);
    // No protocol byte: the body starts with the MLSMessage (version 1, public_message 1).
    assert_eq!(&wire[..4], &[0, 1, 0, 1]);
    check(&HandshakeBundle::Proposal {
        proposal: s().proposal.clone(),
        more_proposals: vec![],
    });
    // An application message cannot start a bundle.
    let mut wrong = s().application.bytes().to_vec();
    wrong.push(0);
    assert!(UpdateRequest::decode(&wrong).is_err());
    check(&UpdateRoomResponse::WrongEpoch {
        error_description: opaque("stale"),
        current_epoch: 9,
    });
    check(&UpdateRoomResponse::InvalidProposal {
        error_description: opaque("pending"),
        invalid_proposals: vec![vec![1; 32].into()],
    });
    check(&RatchetTreeOption::DistributionService);
}

#[test]
fn fanout_messages_concatenate_and_select_on_the_message() {
    let n = NotifyRequest {
        messages: vec![
            FanoutMessage {
                timestamp: 1,
                message: MlsMessage::from_welcome(&s().welcome).unwrap(),
                extra: FanoutExtra::Welcome {
                    ratchet_tree: RatchetTreeOption::Full {
                        ratchet_tree: s().ratchet_tree.clone(),
                    },
                },
            },
            FanoutMessage::plain(2, s().commit.clone()).unwrap(),
            FanoutMessage::plain(3, s().application.clone()).unwrap(),
            FanoutMessage::plain(4, s().proposal.clone()).unwrap(),
        ],
    };
    let wire = check(&n);
    let first = n.messages[0].encode();
    assert_eq!(&wire[..first.len()], first.as_slice());
    assert_eq!(&first[..8], &1u64.to_be_bytes());
    let app = n.messages[2].encode();
    assert_eq!(app.last(), Some(&0), "no frank: optional<Frank> absent");
    assert!(NotifyRequest::decode(&[]).is_err());
    assert!(FanoutMessage::plain(0, MlsMessage::from_welcome(&s().welcome).unwrap()).is_none());
    assert_eq!(
        MlsMessage::from_welcome(&s().welcome)
            .unwrap()
            .to_welcome()
            .unwrap(),
        s().welcome
    );
}

#[test]
fn submit_consent_query_abuse_and_group_info_round_trip() {
    check(&SubmitMessageRequest::new(
        s().application.clone(),
        "mimi://wave.test/u/bob",
    ));
    check(&SubmitMessageResponse::new(SubmitStatus::Accepted {
        accepted_timestamp: 5,
        frank: None,
    }));
    check(&SubmitMessageResponse::new(SubmitStatus::EpochTooOld {
        current_epoch: 3,
    }));
    let mut grant = ConsentEntry::new(
        ConsentOperation::Grant,
        "mimi://chirp.test/u/alice",
        "mimi://wave.test/u/bob",
    );
    grant.client_key_packages.push(s().key_package.clone());
    check(&grant);
    let request = ConsentEntry::new(
        ConsentOperation::Request,
        "mimi://chirp.test/u/alice",
        "mimi://wave.test/u/bob",
    );
    let wire = check(&request);
    // No clientKeyPackages outside grant: the body ends in optional room (0) and an empty
    // dictionary (0).
    assert_eq!(&wire[wire.len() - 2..], &[0, 0]);
    check(&IdentifierRequest::handle("im:bob@wave.test"));
    check(&IdentifierRequest {
        query_elements: vec![QueryElement {
            search_type: 7,
            field_name: opaque("email"),
            search_value: opaque("bob@wave.test"),
        }],
        id_request_extensions: AppDataDictionary::default(),
    });
    check(&IdentifierResponse::new(
        QueryCode::Success,
        vec![IdentifierUri::new("mimi://wave.test/u/bob")],
    ));
    check(&AbuseReport {
        reporting_user: IdentifierUri::new("mimi://wave.test/u/bob"),
        alleged_abuser_uri: IdentifierUri::new("mimi://chirp.test/u/alice"),
        reason_code: 0,
        note: opaque("spam"),
        messages: vec![AbusiveMessage {
            message_content: vec![1, 2].into(),
            frank: Frank {
                server_frank: [9; 32],
                franking_signature_ciphersuite: 1,
                franking_integrity_signature: vec![3].into(),
            },
            accepted_timestamp: 7,
        }],
        abuse_extensions: AppDataDictionary::default(),
    });
    check(&GroupInfoRequest {
        protocol: MLS10,
        cipher_suite: CIPHERSUITE,
        requesting_signature_key: s().signature_key.clone().into(),
        requesting_credential: s().credential.clone(),
        group_info_public_key: vec![4; 32].into(),
        joining_code: Vec::new().into(),
        signature: vec![5; 64].into(),
    });
    let success = GroupInfoResponse {
        version: MLS10,
        room_id: b"mimi://chirp.test/r/x".to_vec().into(),
        result: GroupInfoResult::Success {
            cipher_suite: CIPHERSUITE,
            hub_sender: ExternalSender {
                signature_key: vec![1; 32].into(),
                credential: s().credential.clone(),
            },
            encrypted_groupinfo_and_tree: HpkeCiphertext {
                kem_output: vec![2; 32].into(),
                ciphertext: vec![3; 40].into(),
            },
            signature: vec![4; 64].into(),
        },
    };
    check(&success);
    assert!(success.sign_content().unwrap().is_some());
    check(&GroupInfoResponse::refused(
        b"mimi://chirp.test/r/x",
        GroupInfoResult::NotAuthorized,
    ));
    check(&GroupInfoRatchetTreeTbe {
        group_info: s().group_info.clone(),
        ratchet_tree: RatchetTreeOption::Full {
            ratchet_tree: s().ratchet_tree.clone(),
        },
        pending_proposals: vec![PendingProposal {
            proposal: s().proposal.clone(),
            hub_accepted_time: 1,
        }],
    });
}

#[test]
fn unknown_protocols_and_tags_are_refused() {
    let mut k = key_material_request();
    k.protocol = 2;
    assert_eq!(k.check(), Err(WireError::Protocol(2)));
    // ConsentOperation 9 does not exist.
    let mut wire = ConsentEntry::new(ConsentOperation::Cancel, "a", "b").encode();
    wire[0] = 9;
    assert!(ConsentEntry::decode(&wire).is_err());
    // GroupInfoCode 0 is reserved.
    let mut wire = GroupInfoResponse::refused(b"r", GroupInfoResult::NoSuchRoom).encode();
    let last = wire.len() - 1;
    wire[last] = 0;
    assert!(GroupInfoResponse::decode(&wire).is_err());
}

proptest! {
    #[test]
    fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = NotifyRequest::decode(&data);
        let _ = UpdateRequest::decode(&data);
        let _ = UpdateRoomResponse::decode(&data);
        let _ = SubmitMessageRequest::decode(&data);
        let _ = SubmitMessageResponse::decode(&data);
        let _ = KeyMaterialRequest::decode(&data);
        let _ = KeyMaterialResponse::decode(&data);
        let _ = ConsentEntry::decode(&data);
        let _ = IdentifierRequest::decode(&data);
        let _ = IdentifierResponse::decode(&data);
        let _ = AbuseReport::decode(&data);
        let _ = GroupInfoRequest::decode(&data);
        let _ = GroupInfoResponse::decode(&data);
        let _ = EphemeralMessage::decode(&data);
        let _ = room_state::RoomState::decode(&data);
    }

    /// Flipping one byte of real bodies never panics a decoder (MLS-shaped input reaches the
    /// deep parsers).
    #[test]
    fn mutated_bodies_never_panic(pos in 0usize..4000, byte in any::<u8>()) {
        let bodies = [
            NotifyRequest { messages: vec![FanoutMessage::plain(1, s().commit.clone()).unwrap()] }.encode(),
            HandshakeBundle::Commit {
                commit: s().commit.clone(),
                welcome: Some(s().welcome.clone()),
                group_info: GroupInfoOption::Full { group_info: s().group_info.clone() },
                ratchet_tree: RatchetTreeOption::Full { ratchet_tree: s().ratchet_tree.clone() },
            }.encode(),
            key_material_request().encode(),
        ];
        for body in bodies {
            let mut wire = body.clone();
            let i = pos % wire.len();
            wire[i] = byte;
            let _ = NotifyRequest::decode(&wire);
            let _ = UpdateRequest::decode(&wire);
            let _ = KeyMaterialRequest::decode(&wire);
        }
    }
}
