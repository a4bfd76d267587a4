//! The provider's in-memory state and the logic on it that never waits on the network: local
//! users and their clients, consent records, KeyPackages handed out, rooms followed, the
//! follower's dedup digests, and delivering fanned-out messages to local clients. Everything
//! here runs under one `std::sync::Mutex`; network calls happen outside it (see `provider`).

use std::collections::{BTreeMap, HashMap, HashSet};

use openmls::prelude::{KeyPackage, MlsMessageBodyIn, MlsMessageIn};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::components::RoomState;
use crate::content::{self, Body, MessageId};
use crate::hub::Hub;
use crate::ids::{ClientUri, RoomUri, UserUri};
use crate::mls::{MlsClient, MlsError, Processed};
use crate::wire::{ConsentOperation, FanoutExtra, FanoutMessage, RatchetTreeOption};

/// A message a local user received in a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The sender's user URI (checked against the MLS credential).
    pub sender: String,
    /// The text of the message's part.
    pub text: String,
    /// Its MessageId.
    pub message_id: MessageId,
}

/// A consent message another provider sent us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentEvent {
    pub operation: ConsentOperation,
    pub requester: String,
    pub target: String,
    pub room: Option<String>,
}

/// A local user: one MLS client, the rooms it is in, and what it received.
pub struct LocalUser {
    pub uri: UserUri,
    pub client: MlsClient,
    /// Room URI → MLS group id.
    pub rooms: HashMap<RoomUri, Vec<u8>>,
    pub inbox: HashMap<RoomUri, Vec<ReceivedMessage>>,
}

/// A KeyPackage this provider handed out through `keyMaterial`.
struct HandedOut {
    handle: String,
    room: RoomUri,
}

/// Everything the provider keeps.
pub struct State {
    pub domain: String,
    pub users: BTreeMap<String, LocalUser>,
    /// (local target, requester): the target consented to the requester fetching its KeyPackages.
    pub consents: HashSet<(String, String)>,
    /// (local requester, remote target): the target's provider told us the target granted.
    pub granted_to_us: HashSet<(String, String)>,
    pub consent_events: Vec<ConsentEvent>,
    handed_out: HashMap<Vec<u8>, HandedOut>,
    /// Rooms hubbed elsewhere that we follow → their hub's domain.
    pub following: HashMap<RoomUri, String>,
    seen: HashMap<RoomUri, HashSet<[u8; 32]>>,
    pub hub: Hub,
}

impl State {
    /// Empty state for `domain`.
    pub fn new(domain: &str) -> Result<Self, MlsError> {
        Ok(Self {
            domain: domain.to_owned(),
            users: BTreeMap::new(),
            consents: HashSet::new(),
            granted_to_us: HashSet::new(),
            consent_events: Vec::new(),
            handed_out: HashMap::new(),
            following: HashMap::new(),
            seen: HashMap::new(),
            hub: Hub::new(domain)?,
        })
    }

    /// The local user named by a user URI, if it is ours.
    pub fn user_by_uri(&self, uri: &UserUri) -> Option<&LocalUser> {
        (uri.domain() == self.domain)
            .then(|| self.users.get(uri.handle()))
            .flatten()
    }

    /// Hands out a fresh KeyPackage of a local user for `room`, remembering its ref.
    pub fn hand_out(&mut self, handle: &str, room: &RoomUri) -> Result<KeyPackage, MlsError> {
        let user = self
            .users
            .get(handle)
            .ok_or_else(|| MlsError::new("hand out KeyPackage", "unknown user"))?;
        let key_package = user.client.key_package()?;
        let reference = user.client.key_package_ref(&key_package)?;
        self.handed_out.insert(
            reference,
            HandedOut {
                handle: handle.to_owned(),
                room: room.clone(),
            },
        );
        if room.hub() != self.domain {
            self.following.insert(room.clone(), room.hub().to_owned());
        }
        Ok(key_package)
    }

    /// Applies one FanoutMessage of a followed room once: false if it was seen before.
    pub fn apply_fanout_once(
        &mut self,
        room: &RoomUri,
        message: FanoutMessage,
        raw: &[u8],
    ) -> bool {
        let digest: [u8; 32] = Sha256::digest(raw).into();
        if !self.seen.entry(room.clone()).or_default().insert(digest) {
            debug!(%room, "duplicate FanoutMessage ignored");
            return false;
        }
        self.deliver(room, message, None);
        true
    }

    /// Delivers a fanned-out message to the local clients it is for (all but `except`).
    pub fn deliver(&mut self, room: &RoomUri, message: FanoutMessage, except: Option<&str>) {
        match message.extra {
            FanoutExtra::Welcome { ratchet_tree } => {
                self.deliver_welcome(room, message.message, ratchet_tree)
            }
            _ => {
                let handles: Vec<String> = self
                    .users
                    .iter()
                    .filter(|(h, u)| Some(h.as_str()) != except && u.rooms.contains_key(room))
                    .map(|(h, _)| h.clone())
                    .collect();
                for handle in handles {
                    self.deliver_to(&handle, room, message.message.clone());
                }
            }
        }
    }

    fn deliver_welcome(&mut self, room: &RoomUri, message: MlsMessageIn, tree: RatchetTreeOption) {
        let MlsMessageBodyIn::Welcome(welcome) = message.extract() else {
            return;
        };
        let RatchetTreeOption::Full(tree) = tree else {
            warn!(%room, "Welcome without a full ratchet tree: cannot join");
            return;
        };
        let recipients: Vec<(Vec<u8>, String)> = welcome
            .secrets()
            .iter()
            .filter_map(|s| {
                let reference = s.new_member().as_slice().to_vec();
                let handed = self.handed_out.get(&reference)?;
                (handed.room == *room).then(|| (reference, handed.handle.clone()))
            })
            .collect();
        for (reference, handle) in recipients {
            let Some(user) = self.users.get_mut(&handle) else {
                continue;
            };
            match user.client.join(welcome.clone(), tree.clone()) {
                Ok(group_id) if !names_room(&user.client, &group_id, room) => {
                    warn!(%room, "Welcome to a group of another room: dropped");
                    user.client.forget(&group_id);
                }
                Ok(group_id) => {
                    info!(%room, user = %user.uri, "joined from Welcome");
                    user.rooms.insert(room.clone(), group_id);
                    self.handed_out.remove(&reference);
                }
                Err(e) => warn!(%room, user = %user.uri, error = %e, "could not join"),
            }
        }
    }

    fn deliver_to(&mut self, handle: &str, room: &RoomUri, message: MlsMessageIn) {
        let Some(user) = self.users.get_mut(handle) else {
            return;
        };
        let Some(group_id) = user.rooms.get(room).cloned() else {
            return;
        };
        match user.client.process(&group_id, message) {
            Ok(Processed::Application { sender, bytes }) => {
                if let Some(received) = read_content(room, &sender, &bytes) {
                    user.inbox.entry(room.clone()).or_default().push(received);
                }
            }
            Ok(Processed::Commit { removed: true }) => {
                info!(%room, user = %user.uri, "removed from room");
                user.rooms.remove(room);
            }
            Ok(_) => {}
            Err(e) => warn!(%room, user = %user.uri, error = %e, "could not process message"),
        }
    }
}

/// Whether the group's `room_metadata` names `room` (a notify body is all for the URL's room).
fn names_room(client: &MlsClient, group_id: &[u8], room: &RoomUri) -> bool {
    client
        .group_extensions(group_id)
        .ok()
        .and_then(|e| RoomState::from_extensions(&e).ok())
        .is_some_and(|state| {
            state.metadata.room_uri.value.as_slice() == room.to_string().as_bytes()
        })
}

/// Decodes MIMI content and checks it against the MLS sender and the room (client-api.md).
fn read_content(room: &RoomUri, sender_credential: &[u8], bytes: &[u8]) -> Option<ReceivedMessage> {
    let client = std::str::from_utf8(sender_credential)
        .ok()
        .and_then(|c| ClientUri::parse(c).ok());
    let Some(client) = client else {
        warn!(%room, "application message from a credential that is not a client URI");
        return None;
    };
    let decoded = match content::decode(bytes) {
        Ok(decoded) => decoded,
        Err(e) => {
            warn!(%room, sender = %client, error = %e, "undecodable content");
            return None;
        }
    };
    let sender = client.user().to_string();
    let room_uri = room.to_string();
    if decoded.sender_uri.as_deref() != Some(sender.as_str())
        || decoded.room_uri.as_deref() != Some(room_uri.as_str())
    {
        warn!(%room, sender = %client, "senderUri/roomUri do not match the MLS sender and room");
        return None;
    }
    let text = match decoded.body {
        Body::Text(text) => text,
        Body::Null | Body::Unsupported => "[unsupported content]".to_owned(),
    };
    Some(ReceivedMessage {
        message_id: content::message_id(&sender, &room_uri, bytes, &decoded.salt),
        sender,
        text,
    })
}
