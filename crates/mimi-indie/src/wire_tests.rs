//! Unit tests of the wire structs: known encodings, round trips with real MLS objects, trailing
//! bytes refused, mismatched `select`s refused, and decoders that never panic.

use openmls::prelude::{Extension, Extensions, MlsMessageOut, ProtocolVersion, Welcome};
use proptest::prelude::*;
use tls_codec::{Deserialize, Serialize, VLBytes};

use crate::components::{
    BaseRoomPolicy, Opaque, ParticipantListData, RoomMetaData, RoomState, ROLE_ADMIN,
};
use crate::hub::Hub;
use crate::ids::UserUri;
use crate::mls::{capabilities, required_capabilities, verify_with_label, MlsClient};
use crate::wire::*;

/// Real MLS objects: a group of alice and bob with a commit, its Welcome, GroupInfo, tree and
/// an application message.
struct Fixture {
    alice: MlsClient,
    commit: openmls::prelude::MlsMessageIn,
    welcome: Welcome,
    group_info: openmls::messages::group_info::VerifiableGroupInfo,
    tree: openmls::prelude::RatchetTreeIn,
    application: openmls::prelude::MlsMessageIn,
    key_package: openmls::prelude::KeyPackageIn,
}

fn room_state(user: &str) -> RoomState {
    let mut participants = ParticipantListData::default();
    participants.push(user, ROLE_ADMIN);
    RoomState {
        participants,
        metadata: RoomMetaData {
            room_uri: Opaque::text("mimi://a.test/r/x"),
            room_name: Opaque::text("x"),
            room_descriptions: Vec::new(),
            room_avatar: Opaque::empty(),
            room_subject: Opaque::empty(),
            room_mood: Opaque::empty(),
        },
        policy: BaseRoomPolicy::profile(false, 10),
    }
}

fn fixture() -> Fixture {
    let alice_uri = UserUri::new("a.test", "alice").unwrap();
    let bob_uri = UserUri::new("b.test", "bob").unwrap();
    let mut alice = MlsClient::new(&alice_uri, "d1").unwrap();
    let bob = MlsClient::new(&bob_uri, "d1").unwrap();
    let hub = Hub::new("a.test").unwrap();
    let mut state = room_state(&alice_uri.to_string());
    let extensions = |state: &RoomState| {
        Extensions::from_vec(vec![
            Extension::ExternalSenders(vec![hub.external_sender()]),
            Extension::RequiredCapabilities(required_capabilities()),
            state.to_extension().unwrap(),
        ])
        .unwrap()
    };
    let group_id = b"mimi://a.test/g/x".to_vec();
    alice.create_group(&group_id, extensions(&state)).unwrap();
    state.participants.push(&bob_uri.to_string(), 2);
    let key_package = bob.key_package().unwrap();
    let out = alice
        .commit_add(&group_id, vec![key_package.clone()], extensions(&state))
        .unwrap();
    alice.merge_pending(&group_id).unwrap();
    let (group_info, tree) = alice.group_info_and_tree(&group_id).unwrap();
    let application = alice.encrypt(&group_id, b"hello").unwrap();
    Fixture {
        alice,
        commit: out.commit,
        welcome: out.welcome.unwrap(),
        group_info,
        tree,
        application,
        key_package: key_package.into(),
    }
}

fn welcome_message(f: &Fixture) -> openmls::prelude::MlsMessageIn {
    MlsMessageOut::from_welcome(f.welcome.clone(), ProtocolVersion::Mls10).into()
}

/// Encodes, decodes and re-encodes; checks the decode is exact and equal.
fn round_trip<T: Serialize + Deserialize + PartialEq + std::fmt::Debug>(value: &T) -> Vec<u8> {
    let bytes = encode(value).unwrap();
    let back: T = decode(&bytes).unwrap();
    assert_eq!(&back, value);
    assert_eq!(encode(&back).unwrap(), bytes);
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(decode::<T>(&trailing).is_err(), "trailing byte accepted");
    if !bytes.is_empty() {
        assert!(
            decode::<T>(&bytes[..bytes.len() - 1]).is_err(),
            "truncation accepted"
        );
    }
    bytes
}

#[test]
fn known_encodings() {
    assert_eq!(
        encode(&IdentifierUri::new("mimi://a/u/b")).unwrap(),
        b"\x0cmimi://a/u/b"
    );
    let policy = encode(&BaseRoomPolicy::profile(false, 100)).unwrap();
    assert_eq!(
        policy,
        [0, 0, 0, 1, 1, 0, 0, 0, 100, 0, 0, 0, 0, 4, 0x00, 0x22, 0x00, 0x23]
    );
    let answer = UpdateRoomResponse {
        outcome: UpdateOutcome::Success {
            accepted_timestamp: 0x0102,
        },
        error_description: String::new(),
    };
    assert_eq!(encode(&answer).unwrap(), [0, 0, 0, 0, 0, 0, 0, 0, 1, 2]);
    let submit = SubmitMessageResponse {
        protocol: Protocol::Mls10,
        status: SubmitStatus::EpochTooOld(7),
    };
    assert_eq!(encode(&submit).unwrap(), [1, 2, 0, 0, 0, 0, 0, 0, 0, 7]);
    assert!(
        decode::<Protocol>(&[0]).is_err(),
        "reserved protocol refused"
    );
    assert!(
        decode::<Protocol>(&[2]).is_err(),
        "unknown protocol refused"
    );
}

#[test]
fn key_material_request_round_trips_and_verifies() {
    let f = fixture();
    let credential = f.alice.credential();
    let tbs = KeyMaterialRequestTbs {
        protocol: Protocol::Mls10,
        requesting_user: IdentifierUri::new("mimi://a.test/u/alice"),
        target_user: IdentifierUri::new("mimi://b.test/u/bob"),
        room_id: IdentifierUri::new("mimi://a.test/r/x"),
        acceptable_ciphersuites: vec![1],
        required_capabilities: required_capabilities(),
        requester_signature_key: credential.signature_key.clone(),
        requester_credential: credential.credential.clone(),
    };
    let signature = f
        .alice
        .sign_with_label("KeyMaterialRequestTBS", &encode(&tbs).unwrap())
        .unwrap();
    let request = KeyMaterialRequest {
        tbs: tbs.clone(),
        signature: signature.clone().into(),
    };
    let bytes = round_trip(&request);
    let back: KeyMaterialRequest = decode(&bytes).unwrap();
    let crypto = openmls_rust_crypto::RustCrypto::default();
    let content = encode(&back.tbs).unwrap();
    let key = back.tbs.requester_signature_key.as_slice();
    assert!(verify_with_label(&crypto, key, "KeyMaterialRequestTBS", &content, &signature).is_ok());
    assert!(verify_with_label(&crypto, key, "OtherLabel", &content, &signature).is_err());
}

#[test]
fn key_material_response_round_trips() {
    let f = fixture();
    let response = KeyMaterialResponse {
        protocol: Protocol::Mls10,
        user_status: KeyMaterialUserCode::PartialSuccess,
        user_uri: IdentifierUri::new("mimi://b.test/u/bob"),
        clients: vec![
            ClientKeyMaterial::Success {
                client_uri: IdentifierUri::new("mimi://b.test/d/bob/d1"),
                key_package: f.key_package.clone(),
            },
            ClientKeyMaterial::KeyMaterialExhausted {
                client_uri: IdentifierUri::new("mimi://b.test/d/bob/d2"),
            },
            ClientKeyMaterial::NothingCompatible {
                client_uri: IdentifierUri::new("mimi://b.test/d/bob/d3"),
                capabilities: Some(capabilities()),
            },
            ClientKeyMaterial::NothingCompatible {
                client_uri: IdentifierUri::new("mimi://b.test/d/bob/d4"),
                capabilities: None,
            },
        ],
    };
    round_trip(&response);
    let mut bad = encode(&KeyMaterialResponse {
        clients: vec![ClientKeyMaterial::KeyMaterialExhausted {
            client_uri: IdentifierUri::new("x"),
        }],
        ..response
    })
    .unwrap();
    // The client code is the byte after protocol, user code, URI and vector length.
    let at = 1 + 1 + 1 + "mimi://b.test/u/bob".len() + 1;
    bad[at] = 9;
    assert!(decode::<KeyMaterialResponse>(&bad).is_err());
}

#[test]
fn handshake_bundles_round_trip() {
    let f = fixture();
    for (welcome, group_info, ratchet_tree) in [
        (
            Some(f.welcome.clone()),
            GroupInfoOption::Full(f.group_info.clone()),
            RatchetTreeOption::Full(f.tree.clone()),
        ),
        (
            None,
            GroupInfoOption::Partial(PartialGroupInfo {
                ratchet_tree_presence: 0,
                group_info_extensions: Vec::new(),
                signature: vec![1, 2, 3].into(),
            }),
            RatchetTreeOption::HttpsUri(TreeUrl {
                url: b"https://a.test/tree".as_slice().into(),
                tree_signature: vec![9].into(),
            }),
        ),
        (
            None,
            GroupInfoOption::Full(f.group_info.clone()),
            RatchetTreeOption::OutOfBand(vec![4].into()),
        ),
        (
            None,
            GroupInfoOption::Full(f.group_info.clone()),
            RatchetTreeOption::DistributionService,
        ),
    ] {
        round_trip(&HandshakeBundle {
            proposal_or_commit: f.commit.clone(),
            extra: HandshakeExtra::Commit {
                welcome,
                group_info,
                ratchet_tree,
            },
        });
    }
    let wrong = HandshakeBundle {
        proposal_or_commit: f.commit.clone(),
        extra: HandshakeExtra::Proposal {
            more_proposals: Vec::new(),
        },
    };
    assert!(encode(&wrong).is_err(), "a commit with a proposal's extra");
    let not_handshake = HandshakeBundle {
        proposal_or_commit: f.application.clone(),
        extra: HandshakeExtra::Proposal {
            more_proposals: Vec::new(),
        },
    };
    assert!(encode(&not_handshake).is_err());
    let mut bytes = encode(&f.application).unwrap();
    bytes.push(0);
    assert!(
        decode::<HandshakeBundle>(&bytes).is_err(),
        "a PrivateMessage is no handshake"
    );
}

#[test]
fn fanout_messages_round_trip_and_split() {
    let f = fixture();
    let messages = vec![
        FanoutMessage {
            timestamp: 1,
            message: f.commit.clone(),
            extra: FanoutExtra::Commit {
                external_proposals: Vec::new(),
            },
        },
        FanoutMessage {
            timestamp: 2,
            message: welcome_message(&f),
            extra: FanoutExtra::Welcome {
                ratchet_tree: RatchetTreeOption::Full(f.tree.clone()),
            },
        },
        FanoutMessage {
            timestamp: 3,
            message: f.application.clone(),
            extra: FanoutExtra::Application { frank: None },
        },
        FanoutMessage {
            timestamp: 4,
            message: f.application.clone(),
            extra: FanoutExtra::Application {
                frank: Some(Frank {
                    server_frank: [7; 32],
                    franking_signature_ciphersuite: 1,
                    franking_integrity_signature: vec![1, 2].into(),
                }),
            },
        },
    ];
    let mut body = Vec::new();
    for message in &messages {
        let bytes = round_trip(message);
        body.extend(bytes);
    }
    let split = decode_notify_body(&body).unwrap();
    assert_eq!(split.len(), messages.len());
    let mut joined = Vec::new();
    for ((message, raw), expected) in split.iter().zip(&messages) {
        assert_eq!(message, expected);
        joined.extend_from_slice(raw);
    }
    assert_eq!(joined, body);
    assert!(decode_notify_body(&[]).is_err());
    let mut trailing = body.clone();
    trailing.push(0);
    assert!(decode_notify_body(&trailing).is_err());
    let mismatched = FanoutMessage {
        timestamp: 0,
        message: f.application.clone(),
        extra: FanoutExtra::Welcome {
            ratchet_tree: RatchetTreeOption::DistributionService,
        },
    };
    assert!(encode(&mismatched).is_err());
}

#[test]
fn submit_and_update_bodies_round_trip() {
    let f = fixture();
    round_trip(&SubmitMessageRequest {
        protocol: Protocol::Mls10,
        app_message: f.application.clone(),
        sending_uri: IdentifierUri::new("mimi://a.test/u/alice"),
    });
    for status in [
        SubmitStatus::Accepted(SubmitAccepted {
            accepted_timestamp: 5,
            frank: None,
        }),
        SubmitStatus::NotAllowed,
        SubmitStatus::EpochTooOld(3),
    ] {
        round_trip(&SubmitMessageResponse {
            protocol: Protocol::Mls10,
            status,
        });
    }
    for outcome in [
        UpdateOutcome::Success {
            accepted_timestamp: 9,
        },
        UpdateOutcome::WrongEpoch { current_epoch: 4 },
        UpdateOutcome::NotAllowed,
        UpdateOutcome::InvalidProposal {
            invalid_proposals: vec![VLBytes::from(vec![1u8; 32])],
        },
    ] {
        round_trip(&UpdateRoomResponse {
            outcome,
            error_description: "not_admin: nope".into(),
        });
    }
    assert!(
        decode::<UpdateRoomResponse>(&[2, 1, 0xff]).is_err(),
        "non-UTF-8 description"
    );
}

#[test]
fn consent_entries_round_trip() {
    let f = fixture();
    round_trip(&ConsentEntry {
        operation: ConsentOperation::Grant,
        requester_uri: IdentifierUri::new("mimi://a.test/u/alice"),
        target_uri: IdentifierUri::new("mimi://b.test/u/bob"),
        room_id: Some(IdentifierUri::new("mimi://a.test/r/x")),
        client_key_packages: vec![f.key_package.clone()],
        consent_extensions: AppDataDictionary {
            component_data: vec![ComponentData {
                component_id: 0x8000,
                data: vec![1].into(),
            }],
        },
    });
    let request = ConsentEntry {
        operation: ConsentOperation::Request,
        requester_uri: IdentifierUri::new("mimi://a.test/u/alice"),
        target_uri: IdentifierUri::new("mimi://b.test/u/bob"),
        room_id: None,
        client_key_packages: Vec::new(),
        consent_extensions: AppDataDictionary::default(),
    };
    let bytes = round_trip(&request);
    assert_eq!(bytes[0], 1);
    assert_eq!(*bytes.last().unwrap(), 0, "empty extensions");
    let with_packages = ConsentEntry {
        client_key_packages: vec![f.key_package],
        ..request
    };
    assert!(
        encode(&with_packages).is_err(),
        "only a grant carries KeyPackages"
    );
}

#[test]
fn room_state_round_trips_through_the_group_context() {
    let state = room_state("mimi://a.test/u/alice");
    let dictionary = state.to_dictionary().unwrap();
    assert!(dictionary.is_well_ordered());
    round_trip(&dictionary);
    assert_eq!(RoomState::from_dictionary(&dictionary).unwrap(), state);
    let extensions = Extensions::single(state.to_extension().unwrap()).unwrap();
    assert_eq!(RoomState::from_extensions(&extensions).unwrap(), state);
    let mut reversed = dictionary.clone();
    reversed.component_data.reverse();
    assert!(
        RoomState::from_dictionary(&reversed).is_err(),
        "unordered entries"
    );
    let f = fixture();
    let (_, tree) = f.alice.group_info_and_tree(b"mimi://a.test/g/x").unwrap();
    assert_eq!(encode(&tree).unwrap(), encode(&f.tree).unwrap());
}

/// Flips one byte of a valid encoding and decodes it: must not panic.
fn mutate(bytes: &[u8], at: usize, value: u8) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if !out.is_empty() {
        let at = at % out.len();
        out[at] = value;
    }
    out
}

fn decode_everything(bytes: &[u8]) {
    let _ = decode::<KeyMaterialRequest>(bytes);
    let _ = decode::<KeyMaterialResponse>(bytes);
    let _ = decode::<HandshakeBundle>(bytes);
    let _ = decode::<UpdateRoomResponse>(bytes);
    let _ = decode::<SubmitMessageRequest>(bytes);
    let _ = decode::<SubmitMessageResponse>(bytes);
    let _ = decode::<ConsentEntry>(bytes);
    let _ = decode::<AppDataDictionary>(bytes);
    let _ = decode::<ParticipantListData>(bytes);
    let _ = decode::<RoomMetaData>(bytes);
    let _ = decode::<BaseRoomPolicy>(bytes);
    let _ = decode_notify_body(bytes);
}

proptest! {
    #[test]
    fn decoders_never_panic_on_noise(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_everything(&bytes);
    }
}

#[test]
fn decoders_never_panic_on_mutated_bodies() {
    let f = fixture();
    let bodies = [
        encode(&FanoutMessage {
            timestamp: 1,
            message: welcome_message(&f),
            extra: FanoutExtra::Welcome {
                ratchet_tree: RatchetTreeOption::Full(f.tree.clone()),
            },
        })
        .unwrap(),
        encode(&HandshakeBundle {
            proposal_or_commit: f.commit.clone(),
            extra: HandshakeExtra::Commit {
                welcome: Some(f.welcome.clone()),
                group_info: GroupInfoOption::Full(f.group_info.clone()),
                ratchet_tree: RatchetTreeOption::Full(f.tree.clone()),
            },
        })
        .unwrap(),
    ];
    let mut runner = proptest::test_runner::TestRunner::default();
    for body in bodies {
        runner
            .run(&(any::<usize>(), any::<u8>()), |(at, value)| {
                decode_everything(&mutate(&body, at, value));
                Ok(())
            })
            .unwrap();
    }
}
