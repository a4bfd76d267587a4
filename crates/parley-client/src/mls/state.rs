//! A room's state inside its MLS group: the GroupContext extensions every Parley room carries
//! (docs/mimi-profile.md §4), and how a commit changes the participant list and roles, with the
//! room policy checked client-side so refusals read well (the hub enforces the same rules).

use std::collections::BTreeSet;

use openmls::prelude::{
    Capabilities, CredentialType, Extension, ExtensionType, Extensions, ExternalSender,
    GroupContext, RequiredCapabilitiesExtension, UnknownExtension,
};
use parley_proto::mimi::room_state::{RoomState, APP_DATA_DICTIONARY, ROLE_ADMIN, ROLE_MEMBER};
use parley_proto::UserId;

use crate::error::{ClientError, Result};

/// The `app_data_dictionary` extension as openmls 0.9 sees it without its `extensions-draft`
/// feature: an unknown extension, which openmls carries but does not interpret.
pub const ROOM_STATE: ExtensionType = ExtensionType::Unknown(APP_DATA_DICTIONARY);

/// The capabilities of every leaf this device creates: the room state extension (openmls
/// refuses a GroupContext extension a leaf does not list), and `last_resort` for a last-resort
/// KeyPackage (a leaf must list every KeyPackage extension it carries).
pub fn leaf_capabilities(last_resort: bool) -> Capabilities {
    let mut extensions = vec![ROOM_STATE];
    if last_resort {
        extensions.push(ExtensionType::LastResort);
    }
    Capabilities::builder().extensions(extensions).build()
}

/// The room's `required_capabilities`: every member supports the room state extension.
pub fn group_requirements() -> RequiredCapabilitiesExtension {
    RequiredCapabilitiesExtension::new(&[ROOM_STATE], &[], &[])
}

/// The `requiredCapabilities` of a MIMI `KeyMaterialRequest` (docs/mimi-profile.md §5).
pub fn claim_requirements() -> RequiredCapabilitiesExtension {
    RequiredCapabilitiesExtension::new(&[ROOM_STATE], &[], &[CredentialType::Basic])
}

/// The room state as a GroupContext extension.
fn extension(state: &RoomState) -> Result<Extension> {
    let data = state
        .encode()
        .map_err(|e| ClientError::mls("cannot encode the room state", e))?;
    Ok(Extension::Unknown(
        APP_DATA_DICTIONARY,
        UnknownExtension(data),
    ))
}

/// A new room's GroupContext extensions: its hub as external sender, the requirements, and
/// the room state.
pub fn initial_extensions(
    hub: ExternalSender,
    state: &RoomState,
) -> Result<Extensions<GroupContext>> {
    Extensions::from_vec(vec![
        Extension::ExternalSenders(vec![hub]),
        Extension::RequiredCapabilities(group_requirements()),
        extension(state)?,
    ])
    .map_err(|e| ClientError::mls("invalid GroupContext extensions", e))
}

/// The group's extensions with the room state replaced, for a GroupContextExtensions proposal
/// (which replaces all of them, so the others are carried over).
pub fn with_state(
    current: &Extensions<GroupContext>,
    state: &RoomState,
) -> Result<Extensions<GroupContext>> {
    let mut extensions = current.clone();
    extensions
        .add_or_replace(extension(state)?)
        .map_err(|e| ClientError::mls("invalid GroupContext extensions", e))?;
    Ok(extensions)
}

/// Reads the room state from a group's extensions.
pub fn read(extensions: &Extensions<GroupContext>) -> Result<RoomState> {
    let data = extensions.unknown(APP_DATA_DICTIONARY).ok_or_else(|| {
        ClientError::Protocol("the group holds no room state (app_data_dictionary)".into())
    })?;
    RoomState::decode(&data.0)
        .map_err(|e| ClientError::Protocol(format!("the group's room state: {e}")))
}

/// What a commit does to the room's users, for [`next`].
#[derive(Debug, Clone)]
pub struct Outcome<'a> {
    /// The committing device's user.
    pub committer: &'a UserId,
    /// The users with devices in the group once the commit is merged.
    pub after: BTreeSet<UserId>,
    /// Users losing devices through removals the committer asks for (not their own leaving).
    pub removed: BTreeSet<UserId>,
    /// A user the committer makes an admin.
    pub promote: Option<&'a UserId>,
}

/// The room state after a commit, `None` if it does not change; or the policy's refusal.
///
/// A direct room's participants never change, and only a user's own devices may be removed
/// from it. In a group room the participants are exactly the users with devices: users added
/// join as members, users whose last device goes are dropped. Adding users, removing other
/// users and changing roles take an admin; a group room keeps an admin, so should none remain
/// (the last one left), every remaining user is promoted.
pub fn next(old: &RoomState, outcome: &Outcome<'_>) -> Result<Option<RoomState>> {
    let room = &old.room;
    let committer = outcome.committer;
    let listed: BTreeSet<UserId> = old.participants.keys().cloned().collect();
    if old.direct {
        if outcome.removed.iter().any(|u| u != committer) {
            return Err(ClientError::policy(format!(
                "room {room} is a direct room: only a user's own devices can be removed from it"
            )));
        }
        if outcome.promote.is_some() {
            return Err(ClientError::policy(format!(
                "room {room} is a direct room, which has no admins"
            )));
        }
        if outcome.after != listed {
            return Err(ClientError::policy(format!(
                "room {room} is a direct room: its participants never change"
            )));
        }
        return Ok(None);
    }
    let is_admin = old.is_admin(committer);
    let dropped_by_us = outcome
        .removed
        .iter()
        .any(|u| u != committer && !outcome.after.contains(u));
    if dropped_by_us && !is_admin {
        return Err(ClientError::not_admin(format!(
            "only an admin may remove other users from room {room}"
        )));
    }
    if outcome.after.difference(&listed).next().is_some() && !is_admin {
        return Err(ClientError::not_admin(format!(
            "only an admin may add users to room {room}"
        )));
    }
    let mut new = old.clone();
    new.participants = outcome
        .after
        .iter()
        .map(|u| {
            (
                u.clone(),
                old.participants.get(u).copied().unwrap_or(ROLE_MEMBER),
            )
        })
        .collect();
    if let Some(user) = outcome.promote {
        promote(&mut new, user, is_admin)?;
    }
    if new.admins().next().is_none() {
        for role in new.participants.values_mut() {
            *role = ROLE_ADMIN;
        }
    }
    Ok((new != *old).then_some(new))
}

/// Makes `user` an admin of the state's room, if the committer may.
fn promote(state: &mut RoomState, user: &UserId, committer_is_admin: bool) -> Result<()> {
    let room = &state.room;
    if !committer_is_admin {
        return Err(ClientError::not_admin(format!(
            "only an admin may change roles in room {room}"
        )));
    }
    match state.participants.get_mut(user) {
        None => Err(ClientError::InvalidInput(format!(
            "{user} is not a member of room {room}"
        ))),
        Some(role) if *role == ROLE_ADMIN => Err(ClientError::InvalidInput(format!(
            "{user} is already an admin of room {room}"
        ))),
        Some(role) => {
            *role = ROLE_ADMIN;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_proto::{Domain, RoomId};

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    fn users(list: &[&str]) -> BTreeSet<UserId> {
        list.iter().map(|s| user(s)).collect()
    }

    fn room() -> RoomId {
        RoomId::from_random(&Domain::parse("chirp.test").unwrap(), [1; 16])
    }

    /// alice (admin) and bob (member) in a group room.
    fn group() -> RoomState {
        let mut s = RoomState::group(room(), "team", &user("alice@chirp.test"), None);
        s.participants.insert(user("bob@wave.test"), ROLE_MEMBER);
        s
    }

    fn outcome<'a>(committer: &'a UserId, after: &[&str], removed: &[&str]) -> Outcome<'a> {
        Outcome {
            committer,
            after: users(after),
            removed: users(removed),
            promote: None,
        }
    }

    fn check(old: &RoomState, outcome: &Outcome<'_>, expected: Option<&[(&str, u32)]>) {
        let new = next(old, outcome).unwrap();
        let got: Option<Vec<(String, u32)>> = new.map(|s| {
            s.participants
                .iter()
                .map(|(u, r)| (u.to_string(), *r))
                .collect()
        });
        let want = expected.map(|e| e.iter().map(|(u, r)| (u.to_string(), *r)).collect());
        assert_eq!(got, want);
    }

    fn refusal(old: &RoomState, outcome: &Outcome<'_>) -> (Option<String>, String) {
        let e = next(old, outcome).unwrap_err();
        (e.code().map(str::to_owned), e.to_string())
    }

    #[test]
    fn admins_add_and_remove_users_members_may_not() {
        let (alice, bob) = (user("alice@chirp.test"), user("bob@wave.test"));
        let s = group();
        let with_carol = ["alice@chirp.test", "bob@wave.test", "carol@chirp.test"];
        check(
            &s,
            &outcome(&alice, &with_carol, &[]),
            Some(&[
                ("alice@chirp.test", ROLE_ADMIN),
                ("bob@wave.test", ROLE_MEMBER),
                ("carol@chirp.test", ROLE_MEMBER),
            ]),
        );
        let (code, text) = refusal(&s, &outcome(&bob, &with_carol, &[]));
        assert_eq!(code.as_deref(), Some("not_admin"));
        assert!(text.contains("only an admin may add"), "{text}");
        check(
            &s,
            &outcome(&alice, &["alice@chirp.test"], &["bob@wave.test"]),
            Some(&[("alice@chirp.test", ROLE_ADMIN)]),
        );
        let (code, text) = refusal(
            &s,
            &outcome(&bob, &["bob@wave.test"], &["alice@chirp.test"]),
        );
        assert_eq!(code.as_deref(), Some("not_admin"));
        assert!(text.contains("only an admin may remove"), "{text}");
    }

    #[test]
    fn own_devices_and_other_users_new_devices_change_nothing() {
        let bob = user("bob@wave.test");
        let s = group();
        let both = ["alice@chirp.test", "bob@wave.test"];
        // bob removes one of his devices, or adds a device of alice's: the users stay.
        check(&s, &outcome(&bob, &both, &["bob@wave.test"]), None);
        check(&s, &outcome(&bob, &both, &[]), None);
        // Removing one of alice's two devices drops nobody, so takes no admin either.
        check(&s, &outcome(&bob, &both, &["alice@chirp.test"]), None);
    }

    #[test]
    fn leavers_are_dropped_and_an_admin_always_remains() {
        let bob = user("bob@wave.test");
        let mut s = group();
        s.participants.insert(user("carol@chirp.test"), ROLE_MEMBER);
        // carol left: anyone may commit it.
        check(
            &s,
            &outcome(&bob, &["alice@chirp.test", "bob@wave.test"], &[]),
            Some(&[
                ("alice@chirp.test", ROLE_ADMIN),
                ("bob@wave.test", ROLE_MEMBER),
            ]),
        );
        // alice, the only admin, left: everyone remaining is promoted.
        check(
            &s,
            &outcome(&bob, &["bob@wave.test", "carol@chirp.test"], &[]),
            Some(&[
                ("bob@wave.test", ROLE_ADMIN),
                ("carol@chirp.test", ROLE_ADMIN),
            ]),
        );
    }

    #[test]
    fn only_admins_promote_members() {
        let (alice, bob, carol) = (
            user("alice@chirp.test"),
            user("bob@wave.test"),
            user("carol@chirp.test"),
        );
        let s = group();
        let both = ["alice@chirp.test", "bob@wave.test"];
        let mut promotion = outcome(&alice, &both, &[]);
        promotion.promote = Some(&bob);
        check(
            &s,
            &promotion,
            Some(&[
                ("alice@chirp.test", ROLE_ADMIN),
                ("bob@wave.test", ROLE_ADMIN),
            ]),
        );
        let mut by_member = outcome(&bob, &both, &[]);
        by_member.promote = Some(&bob);
        let (code, text) = refusal(&s, &by_member);
        assert_eq!(code.as_deref(), Some("not_admin"));
        assert!(text.contains("only an admin may change roles"), "{text}");
        for target in [&alice, &carol] {
            let mut odd = outcome(&alice, &both, &[]);
            odd.promote = Some(target);
            assert!(matches!(next(&s, &odd), Err(ClientError::InvalidInput(_))));
        }
    }

    #[test]
    fn direct_rooms_keep_their_two_users() {
        let (alice, bob) = (user("alice@chirp.test"), user("bob@wave.test"));
        let s = RoomState::direct(room(), &alice, &bob, None);
        let both = ["alice@chirp.test", "bob@wave.test"];
        check(&s, &outcome(&alice, &both, &["alice@chirp.test"]), None);
        for bad in [
            outcome(&alice, &["alice@chirp.test"], &["bob@wave.test"]),
            outcome(&alice, &both, &["bob@wave.test"]),
            outcome(
                &alice,
                &["alice@chirp.test", "bob@wave.test", "carol@chirp.test"],
                &[],
            ),
        ] {
            assert_eq!(refusal(&s, &bad).0.as_deref(), Some("policy"));
        }
        let mut promotion = outcome(&alice, &both, &[]);
        promotion.promote = Some(&bob);
        assert_eq!(refusal(&s, &promotion).0.as_deref(), Some("policy"));
    }

    #[test]
    fn the_state_round_trips_through_group_context_extensions() {
        let s = group();
        let hub = ExternalSender::new(
            vec![7; 32].into(),
            openmls::prelude::BasicCredential::new(b"mimi://chirp.test".to_vec()).into(),
        );
        let extensions = initial_extensions(hub, &s).unwrap();
        assert_eq!(read(&extensions).unwrap(), s);
        assert!(extensions.external_senders().is_some());
        let required = extensions.required_capabilities().unwrap();
        assert_eq!(required.extension_types(), &[ROOM_STATE]);
        let mut changed = s.clone();
        changed.name = "renamed".into();
        let replaced = with_state(&extensions, &changed).unwrap();
        assert_eq!(read(&replaced).unwrap(), changed);
        assert!(
            replaced.external_senders().is_some() && replaced.required_capabilities().is_some()
        );
        assert!(read(&Extensions::empty()).is_err());
    }
}
