//! Typing indicators: ephemeral messages, end-to-end encrypted like any message but never
//! stored or queued by the providers, so only the members connected right now see them.
//!
//! Reading one never changes what this device has stored: the MLS step runs in a savepoint
//! that is rolled back. Otherwise an indicator that overtook queued messages of the same sender
//! (it travels outside the queues) would advance the sender's ratchet past them, and more than
//! a few of them would then fail to decrypt.

use std::time::Duration;

use parley_proto::api::EphemeralRequest;
use parley_proto::{Meaning, MimiContent, RoomId};

use super::{content_author, Device, Event};
use crate::error::{ClientError, Result};
use crate::mls::{self, Incoming};

/// How long a typing indicator shows its sender as typing, unless their message comes first.
pub const TYPING_SHOWN_FOR: Duration = Duration::from_secs(5);

impl Device {
    /// Tells the room's members connected right now that this user is typing. Best effort:
    /// nobody offline will ever see it, and failing to send it is harmless.
    pub async fn send_typing(&mut self, room: &RoomId) -> Result<()> {
        self.require_member(room)?;
        let content = MimiContent::typing(rand::random(), &self.user().to_uri(), room.as_str());
        // Encrypting consumes a generation of our sender ratchet: that must be stored, or the
        // next message would reuse its key and nonce.
        let message = self.profile.transaction(|| {
            self.mls
                .encrypt(self.profile.conn(), room, &content.encode(), None)
        })?;
        self.api
            .post_ephemeral(room, &EphemeralRequest { message })
            .await
    }

    /// Reads an ephemeral message pushed for `room` (see [`crate::Live::next`]): a typing
    /// indicator from another user becomes [`Event::Typing`]; anything else, our own, one from
    /// a user our user blocked, or what does not decrypt (a room we are not in, an epoch we have
    /// not reached yet) is dropped.
    pub fn open_ephemeral(&self, room: &str, data: &[u8]) -> Option<Event> {
        self.read_ephemeral(room, data)
            .inspect_err(|e| tracing::debug!(room, "ephemeral message dropped: {e}"))
            .ok()
            .flatten()
    }

    fn read_ephemeral(&self, room: &str, data: &[u8]) -> Result<Option<Event>> {
        let room = RoomId::parse(room)
            .map_err(|e| ClientError::Protocol(format!("ephemeral message for a bad room: {e}")))?;
        // Only application data: processing must never merge a commit or store a proposal.
        if !mls::is_application_message(data) {
            return Ok(None);
        }
        let incoming = self
            .profile
            .without_saving(|| self.mls.process(self.profile.conn(), &room, data))?;
        let Incoming::Application { sender, plaintext } = incoming else {
            return Ok(None);
        };
        let content = MimiContent::decode(&plaintext)
            .map_err(|e| ClientError::Protocol(format!("ephemeral content: {e}")))?;
        let author = content_author(&content, &sender)?;
        if author == *self.user()
            || self.blocked.users.contains(&author)
            || content.meaning() != Meaning::Typing
        {
            return Ok(None);
        }
        Ok(Some(Event::Typing {
            room,
            sender: author,
        }))
    }
}
