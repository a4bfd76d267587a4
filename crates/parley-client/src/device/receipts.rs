//! Delivered and read receipts (draft-mahy-mimi-message-status): status reports are MIMI
//! content like any message, end-to-end encrypted to the room. A receiving device reports the
//! messages it got as delivered, batched in one report per room per sync; `mark_read` reports
//! what it has as read. Receipts are never sent for our own messages, nor for receipts.

use parley_proto::{Meaning, MessageId, MessageStatus, MimiContent, RoomId, StatusReport};
use serde::{Deserialize, Serialize};

use super::{Arrival, Device, Event};
use crate::error::{ClientError, Result};

/// Most messages one report names: a report of 500 is about 18 KiB, well inside any
/// provider's message size limit.
const MAX_REPORT: usize = 500;

/// What a receipt says about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiptStatus {
    /// A device of the reporting user received the message.
    Delivered,
    /// The reporting user read it.
    Read,
}

impl ReceiptStatus {
    fn of(status: MessageStatus) -> Option<Self> {
        match status {
            MessageStatus::Delivered => Some(Self::Delivered),
            MessageStatus::Read => Some(Self::Read),
            // Other statuses (unread, expired, deleted, ...) are not shown.
            _ => None,
        }
    }

    fn status(self) -> MessageStatus {
        match self {
            Self::Delivered => MessageStatus::Delivered,
            Self::Read => MessageStatus::Read,
        }
    }
}

/// Whether receiving this content deserves a delivered receipt: messages people write (text,
/// files, content we cannot render), not reactions, edits, deletes, or receipts.
fn wants_receipt(content: &MimiContent) -> bool {
    matches!(
        content.meaning(),
        Meaning::Text { .. } | Meaning::File { .. } | Meaning::Unsupported { .. }
    )
}

impl Device {
    /// Notes a received message for the delivered receipt the end of the sync sends (inside
    /// the transaction that files the message, so a crash loses neither).
    pub(super) fn note_delivery(&self, at: &Arrival<'_>, content: &MimiContent) -> Result<()> {
        if at.author != self.user() && wants_receipt(content) {
            self.profile.add_receipt_due(at.room, &at.id)?;
        }
        Ok(())
    }

    /// Reads a status report from a member: one event per delivered or read status that its
    /// user had not reported yet. A read report from another of our own devices marks those
    /// messages read here too, and is not shown.
    pub(super) fn file_status(&self, at: &Arrival<'_>, report: &[u8]) -> Result<Vec<Event>> {
        let report = match StatusReport::decode(report) {
            Ok(report) => report,
            Err(e) => {
                return Ok(vec![Event::Undecodable {
                    room: at.room.clone(),
                    sender: at.author.clone(),
                    ts: at.ts,
                    detail: format!("status report: {e}"),
                }])
            }
        };
        let mut events = Vec::new();
        for (target, status) in report.0 {
            let Some(status) = ReceiptStatus::of(status) else {
                continue;
            };
            // Only for messages this device has: anything else would be kept, and shown, for
            // ids that name nothing.
            if !self.profile.knows_message(at.room, &target, at.now)? {
                continue;
            }
            let fresh =
                self.profile
                    .record_receipt(at.room, &target, at.author, status.status().code())?;
            if at.author == self.user() {
                if status == ReceiptStatus::Read {
                    self.profile.mark_read(at.room, &[target])?;
                }
            } else if fresh {
                events.push(Event::Receipt {
                    room: at.room.clone(),
                    sender: at.author.clone(),
                    target,
                    status,
                });
            }
        }
        Ok(events)
    }

    /// Sends the delivered receipts noted during this sync: one report per room. Receipts are
    /// a courtesy: failures never fail the sync; what could not be sent for want of the network
    /// is tried again next time, anything else is dropped.
    pub(super) async fn send_due_receipts(&mut self) -> Result<()> {
        for (room, ids) in self.profile.receipts_due()? {
            match self
                .send_report(&room, &ids, ReceiptStatus::Delivered)
                .await
            {
                Ok(()) => {}
                Err(e @ ClientError::Storage(_)) => return Err(e),
                Err(e) if e.is_retryable() || matches!(e, ClientError::Unreachable(_)) => {
                    tracing::debug!(%room, "delivered receipts wait for the next sync: {e}");
                    continue;
                }
                Err(e) => tracing::warn!(%room, "delivered receipts dropped: {e}"),
            }
            self.profile.clear_receipts_due(&room, &ids)?;
        }
        Ok(())
    }

    /// Reports every message of the room this device has (from others, not yet reported read)
    /// as read. Returns how many it reported; 0 sends nothing.
    pub async fn mark_read(&mut self, room: &RoomId) -> Result<usize> {
        self.require_member(room)?;
        let unread = self.profile.unread(room, self.user())?;
        if unread.is_empty() {
            return Ok(0);
        }
        self.send_report(room, &unread, ReceiptStatus::Read).await?;
        self.profile.mark_read(room, &unread)?;
        tracing::info!(%room, count = unread.len(), "marked read");
        Ok(unread.len())
    }

    /// Sends `status` for `ids` to the room, in reports of at most [`MAX_REPORT`].
    async fn send_report(
        &mut self,
        room: &RoomId,
        ids: &[MessageId],
        status: ReceiptStatus,
    ) -> Result<()> {
        self.require_member(room)?;
        for batch in ids.chunks(MAX_REPORT) {
            let report = StatusReport(batch.iter().map(|id| (*id, status.status())).collect());
            let content = self
                .content_for(room, |me, uri| {
                    MimiContent::status(rand::random(), me, uri, &report)
                })
                .await?;
            self.post_content(room, content).await?;
        }
        Ok(())
    }
}
