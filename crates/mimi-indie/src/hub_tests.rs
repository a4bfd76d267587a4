//! The hub's checks on commits and proposals (profile §4, §5.3), against real openmls clients.

use openmls::prelude::{Extension, Extensions, GroupContext};

use super::{Hub, Refusal};
use crate::components::{
    BaseRoomPolicy, Opaque, ParticipantListData, RoomMetaData, RoomState, ROLE_ADMIN,
    ROLE_PARTICIPANT,
};
use crate::ids::{RoomUri, UserUri};
use crate::mls::{required_capabilities, MlsClient};

const GROUP: &[u8] = b"mimi://a.test/g/r";

struct Room {
    hub: Hub,
    room: RoomUri,
    alice: MlsClient,
    bob: MlsClient,
}

fn user(domain: &str, handle: &str) -> UserUri {
    UserUri::new(domain, handle).unwrap()
}

fn state(participants: &[(&UserUri, u32)]) -> RoomState {
    let mut list = ParticipantListData::default();
    for (user, role) in participants {
        list.push(&user.to_string(), *role);
    }
    RoomState {
        participants: list,
        metadata: RoomMetaData {
            room_uri: Opaque::text("mimi://a.test/r/r"),
            room_name: Opaque::empty(),
            room_descriptions: Vec::new(),
            room_avatar: Opaque::empty(),
            room_subject: Opaque::empty(),
            room_mood: Opaque::empty(),
        },
        policy: BaseRoomPolicy::profile(false, 10),
    }
}

fn extensions(hub: &Hub, state: &RoomState) -> Extensions<GroupContext> {
    Extensions::from_vec(vec![
        Extension::ExternalSenders(vec![hub.external_sender()]),
        Extension::RequiredCapabilities(required_capabilities()),
        state.to_extension().unwrap(),
    ])
    .unwrap()
}

/// alice (admin, a.test, the hub's domain) and bob (b.test) in a room the hub follows.
fn room() -> Room {
    let (a, b) = (user("a.test", "alice"), user("b.test", "bob"));
    let mut hub = Hub::new("a.test").unwrap();
    let room = RoomUri::new("a.test", "r").unwrap();
    let mut alice = MlsClient::new(&a, "d").unwrap();
    let mut bob = MlsClient::new(&b, "d").unwrap();
    alice
        .create_group(GROUP, extensions(&hub, &state(&[(&a, ROLE_ADMIN)])))
        .unwrap();
    let (info, tree) = alice.group_info_and_tree(GROUP).unwrap();
    hub.add_room(room.clone(), info, tree).unwrap();
    let next = state(&[(&a, ROLE_ADMIN), (&b, ROLE_PARTICIPANT)]);
    let out = alice
        .commit_add(
            GROUP,
            vec![bob.key_package().unwrap()],
            extensions(&hub, &next),
        )
        .unwrap();
    let verified = hub.verify_commit(&room, out.commit, "a.test").unwrap();
    assert_eq!(verified.added.len(), 1);
    hub.apply(&room, verified).unwrap();
    alice.merge_pending(GROUP).unwrap();
    bob.join(out.welcome.unwrap(), hub.ratchet_tree(&room).unwrap())
        .unwrap();
    Room {
        hub,
        room,
        alice,
        bob,
    }
}

fn code(refusal: Refusal) -> &'static str {
    match refusal {
        Refusal::NotAllowed { code, .. } => code,
        Refusal::WrongEpoch { .. } => "wrong_epoch",
        Refusal::InvalidProposal { .. } => "invalid_proposal",
        Refusal::Mls(_) => "mls",
    }
}

#[test]
fn a_commit_is_refused_from_a_peer_that_does_not_host_its_committer() {
    let mut r = room();
    let (commit, _, _) = r.alice.commit_update(GROUP).unwrap();
    let refused = r.hub.verify_commit(&r.room, commit.clone(), "b.test");
    assert_eq!(code(refused.err().unwrap()), "not_your_client");
    assert!(r.hub.verify_commit(&r.room, commit, "a.test").is_ok());
}

#[test]
fn the_participant_list_must_match_the_members() {
    let mut r = room();
    let carol = MlsClient::new(&user("c.test", "carol"), "d").unwrap();
    let unchanged = r.alice.group_extensions(GROUP).unwrap();
    let out = r
        .alice
        .commit_add(GROUP, vec![carol.key_package().unwrap()], unchanged)
        .unwrap();
    let refused = r.hub.verify_commit(&r.room, out.commit, "a.test");
    assert_eq!(code(refused.err().unwrap()), "participant_list");
}

#[test]
fn only_an_administrator_adds_users() {
    let mut r = room();
    let (a, b, c) = (
        user("a.test", "alice"),
        user("b.test", "bob"),
        user("c.test", "carol"),
    );
    let carol = MlsClient::new(&c, "d").unwrap();
    let next = state(&[
        (&a, ROLE_ADMIN),
        (&b, ROLE_PARTICIPANT),
        (&c, ROLE_PARTICIPANT),
    ]);
    let out = r
        .bob
        .commit_add(
            GROUP,
            vec![carol.key_package().unwrap()],
            extensions(&r.hub, &next),
        )
        .unwrap();
    let refused = r.hub.verify_commit(&r.room, out.commit, "b.test");
    assert_eq!(code(refused.err().unwrap()), "not_admin");
}

#[test]
fn the_hub_stays_an_external_sender() {
    let mut r = room();
    let (a, b) = (user("a.test", "alice"), user("b.test", "bob"));
    let without_hub = Extensions::from_vec(vec![
        Extension::RequiredCapabilities(required_capabilities()),
        state(&[(&a, ROLE_ADMIN), (&b, ROLE_PARTICIPANT)])
            .to_extension()
            .unwrap(),
    ])
    .unwrap();
    let out = r.alice.commit_pending(GROUP, without_hub).unwrap();
    let refused = r.hub.verify_commit(&r.room, out.commit, "a.test");
    assert_eq!(code(refused.err().unwrap()), "external_senders");
}

#[test]
fn an_old_epochs_commit_is_wrong_epoch() {
    let mut r = room();
    let (old, _, _) = r.alice.commit_update(GROUP).unwrap();
    r.alice.clear_pending(GROUP).unwrap();
    let (fresh, _, _) = r.alice.commit_update(GROUP).unwrap();
    let verified = r.hub.verify_commit(&r.room, fresh, "a.test").unwrap();
    r.hub.apply(&r.room, verified).unwrap();
    let refused = r.hub.verify_commit(&r.room, old, "a.test");
    assert!(matches!(
        refused.err().unwrap(),
        Refusal::WrongEpoch { current: 2 }
    ));
}

#[test]
fn a_leave_is_accepted_and_commits_must_include_it() {
    let mut r = room();
    let leave = r.bob.propose_leave(GROUP).unwrap();
    assert!(r
        .hub
        .accept_proposal(&r.room, leave.clone(), "a.test")
        .is_err());
    let proposer = r
        .hub
        .accept_proposal(&r.room, leave.clone(), "b.test")
        .unwrap();
    assert_eq!(proposer.user(), &user("b.test", "bob"));
    assert_eq!(r.hub.pending_removals(&r.room).len(), 1);
    // alice never saw the proposal: her commit leaves it out.
    let (commit, _, _) = r.alice.commit_update(GROUP).unwrap();
    let refused = r.hub.verify_commit(&r.room, commit, "a.test");
    assert!(matches!(
        refused.err().unwrap(),
        Refusal::InvalidProposal { missing } if missing.len() == 1
    ));
    r.alice.clear_pending(GROUP).unwrap();
    // Once alice has it, her commit covering it (bob off the list, no admin needed) passes.
    r.alice.process(GROUP, leave).unwrap();
    let a = user("a.test", "alice");
    let out = r
        .alice
        .commit_pending(GROUP, extensions(&r.hub, &state(&[(&a, ROLE_ADMIN)])))
        .unwrap();
    let verified = r.hub.verify_commit(&r.room, out.commit, "a.test").unwrap();
    r.hub.apply(&r.room, verified).unwrap();
    assert_eq!(r.hub.members(&r.room).len(), 1);
    assert!(r.hub.pending_removals(&r.room).is_empty());
}

#[test]
fn a_non_admin_cannot_remove_others_nor_leave_the_room_without_admin() {
    let mut r = room();
    let (a, b) = (user("a.test", "alice"), user("b.test", "bob"));
    // bob drops alice from the list without removing her client: refused.
    let out = r
        .bob
        .commit_pending(GROUP, extensions(&r.hub, &state(&[(&b, ROLE_PARTICIPANT)])))
        .unwrap();
    let refused = r.hub.verify_commit(&r.room, out.commit, "b.test");
    assert_eq!(code(refused.err().unwrap()), "participant_list");
    r.bob.clear_pending(GROUP).unwrap();
    // alice demotes herself: the room would have no administrator.
    let out = r
        .alice
        .commit_pending(
            GROUP,
            extensions(
                &r.hub,
                &state(&[(&a, ROLE_PARTICIPANT), (&b, ROLE_PARTICIPANT)]),
            ),
        )
        .unwrap();
    let refused = r.hub.verify_commit(&r.room, out.commit, "a.test");
    assert_eq!(code(refused.err().unwrap()), "last_admin");
}
