//! Sending and receiving files (encrypted media): the sender encrypts each file with a fresh
//! AES-128-GCM key, uploads the ciphertext to its own provider and sends an external part
//! (URL, key, nonce, hash, size, type, name); receivers' syncs download it through their own
//! provider, check the hash, decrypt, and save it into the profile's `downloads/` folder.

use std::path::{Path, PathBuf};
use std::time::Duration;

use parley_proto::content::{ExternalPart, ENC_ALG_AES_128_GCM, HASH_ALG_SHA256};
use parley_proto::{Meaning, MessageId, MimiContent, RoomId};

use super::{now_ms, Arrival, Device, Event, SentMessage};
use crate::error::{ClientError, Result};
use crate::media::{self, Sealed};
use crate::profile::{HistoryEntry, PendingDownload};

pub use crate::profile::DOWNLOADS_DIR;

/// Failed attempts after which a file that cannot be fetched is given up on: it may never
/// become fetchable (a URL at a provider that does not exist, say).
const MAX_DOWNLOAD_ATTEMPTS: u32 = 15;
/// Wait before the second attempt at a file; it doubles with each failure, up to
/// [`MAX_RETRY_DELAY`]: the attempts span about five hours, however often the device syncs.
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(5);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);
/// The error code of a download whose asset its provider does not have (any more).
const UNKNOWN_ASSET: &str = "unknown_asset";

/// Why a received file was discarded without being fetched.
#[derive(Debug, thiserror::Error)]
enum GaveUp {
    /// Its provider no longer has it, and its message was not deleted (that is no error).
    #[error("no longer available at its provider (deleted there, or expired); discarded")]
    Gone,
    /// The provider's deadline for it passed while it could not be fetched.
    #[error("expired at its provider before it could be fetched ({0}); discarded")]
    Expired(ClientError),
    /// It failed [`MAX_DOWNLOAD_ATTEMPTS`] times in a row; `last` is why, the last time.
    #[error("still cannot be fetched after {attempts} attempts ({last}); discarded")]
    TooManyAttempts { attempts: u32, last: ClientError },
}

/// A file sent by [`Device::send_file`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SentFile {
    #[serde(flatten)]
    pub message: SentMessage,
    /// The name receivers see.
    pub name: String,
    /// Bytes uploaded (the encrypted file).
    pub size: u64,
    /// Where the encrypted file is stored (at our provider).
    pub url: String,
}

/// A received file, checked and saved.
struct SavedFile {
    path: PathBuf,
    /// Its safe name, as the sender gave it.
    name: String,
    /// How its message reads as text.
    text: String,
    reply_to: Option<MessageId>,
    /// Where its ciphertext is stored.
    url: String,
}

/// How a message with a file reads as text, in history and in its event.
fn file_text(name: &str, description: &str) -> String {
    if description.trim().is_empty() {
        format!("[file {name}]")
    } else {
        description.to_owned()
    }
}

impl Device {
    /// The folder received files are saved into (`downloads/` in the profile).
    pub fn downloads_dir(&self) -> PathBuf {
        self.profile.downloads_dir()
    }

    /// Sends the file at `path` to the room: encrypted with a fresh key, uploaded to our
    /// provider, then announced in a message with an external part. A file over the provider's
    /// limit is [`ClientError::AttachmentTooLarge`] (refused while uploading, nothing sent). If
    /// the message cannot be sent, the upload is deleted again.
    pub async fn send_file(&mut self, room: &RoomId, path: &Path) -> Result<SentFile> {
        self.require_member(room)?;
        let name = path
            .file_name()
            .map(|n| media::safe_file_name(&n.to_string_lossy()))
            .ok_or_else(|| ClientError::InvalidInput(format!("{} is no file", path.display())))?;
        let sealed = seal_in_background(path.to_owned()).await?;
        let (key, nonce, hash) = (sealed.key, sealed.nonce, sealed.hash);
        let size = sealed.ciphertext.len() as u64;
        let uploaded = self.api.upload_asset(sealed.ciphertext).await?;
        if uploaded.size != size || uploaded.sha256 != hex::encode(hash) {
            self.forget_upload(&uploaded.url).await;
            return Err(ClientError::Protocol(
                "the provider stored something else than the file uploaded".into(),
            ));
        }
        let part = ExternalPart {
            content_type: media::content_type_for(&name).to_owned(),
            url: uploaded.url.clone(),
            // Seconds; the provider's deadline, after which the URL no longer answers.
            expires: u32::try_from(uploaded.expires_at / 1000).unwrap_or(u32::MAX),
            size,
            enc_alg: ENC_ALG_AES_128_GCM,
            key: key.to_vec(),
            nonce: nonce.to_vec(),
            aad: Vec::new(),
            hash_alg: HASH_ALG_SHA256,
            content_hash: hash.to_vec(),
            description: String::new(),
            filename: name.clone(),
        };
        let sent = match self.post_file(room, part).await {
            Ok(sent) => sent,
            Err(e) => {
                self.forget_upload(&uploaded.url).await;
                return Err(e);
            }
        };
        tracing::info!(%room, id = %sent.id, size, "file sent");
        Ok(SentFile {
            message: sent,
            name,
            size,
            url: uploaded.url,
        })
    }

    async fn post_file(&mut self, room: &RoomId, part: ExternalPart) -> Result<SentMessage> {
        let content = self
            .content_for(room, |me, uri| {
                MimiContent::attachment(rand::random(), me, uri, part)
            })
            .await?;
        self.post_content(room, content).await
    }

    /// Best effort: an upload no message refers to is only clutter until it expires.
    pub(super) async fn forget_upload(&mut self, url: &str) {
        if let Err(e) = self.api.delete_asset(url).await {
            tracing::warn!(url, "cannot delete an unused upload: {e}");
        }
    }

    /// Files a received message with a file: it waits as a pending download for the end of the
    /// sync (which may not do network I/O in here), and is reported once the file is saved. A
    /// file this device sent itself only goes into history.
    pub(super) fn file_attachment(
        &self,
        at: &Arrival<'_>,
        file: &ExternalPart,
        reply_to: Option<MessageId>,
        content: &MimiContent,
    ) -> Result<Option<Event>> {
        let expires_at = content.expires.map(|e| e.deadline_ms(at.now));
        if expires_at.is_some_and(|deadline| deadline <= at.now) {
            return Ok(None);
        }
        let name = media::safe_file_name(&file.filename);
        if at.sent_here {
            let mut entry = HistoryEntry::new(
                at.room.clone(),
                at.event,
                at.author.clone(),
                at.id,
                file_text(&name, &file.description),
                at.ts,
            );
            entry.reply_to = reply_to;
            entry.expires_at = expires_at;
            self.profile.add_history(&entry)?;
            self.profile.set_asset_url(at.room, &at.id, &file.url)?;
            return Ok(None);
        }
        if let Err(e) = media::check_part(file) {
            return Ok(Some(Event::Error {
                room: Some(at.room.clone()),
                detail: format!("file {name} from {} cannot be received: {e}", at.author),
            }));
        }
        self.profile.add_download(&PendingDownload {
            room: at.room.clone(),
            id: at.id,
            event: at.event,
            sender: at.author.clone(),
            ts: at.ts,
            expires_at,
            content: content.encode(),
            attempts: 0,
        })?;
        Ok(None)
    }

    /// Downloads, checks, decrypts and saves the files of received messages, then reports each
    /// as a message event with its path. A file that fails its hash or does not decrypt, or
    /// that its provider no longer has, is discarded and reported as an error event. One that
    /// cannot be fetched for now (network, a provider down) stays pending for the next sync,
    /// without holding up the others, until [`MAX_DOWNLOAD_ATTEMPTS`] or its provider's
    /// deadline for it; the files of expired messages are dropped unfetched.
    pub(super) async fn fetch_downloads(&mut self) -> Result<()> {
        self.profile.purge_expired(now_ms())?;
        for pending in self.profile.pending_downloads(now_ms())? {
            let Err(e) = self.fetch_download(&pending).await else {
                continue;
            };
            let our_provider_unreachable = matches!(e, ClientError::Unreachable(_));
            self.download_failed(&pending, e)?;
            if our_provider_unreachable {
                // The others would fail alike; they are not to blame, so not tried now.
                break;
            }
        }
        Ok(())
    }

    /// Deals with a failed download: retried later if it may yet work, else discarded.
    fn download_failed(&self, pending: &PendingDownload, e: ClientError) -> Result<()> {
        if matches!(e, ClientError::Storage(_)) {
            return Err(e);
        }
        if e.code() == Some(UNKNOWN_ASSET) {
            return self.file_discarded(pending, &GaveUp::Gone);
        }
        if !(e.is_retryable() || matches!(e, ClientError::Unreachable(_))) {
            return self.file_discarded(pending, &e);
        }
        let attempts = pending.attempts.saturating_add(1);
        if provider_deadline_passed(pending) {
            return self.file_discarded(pending, &GaveUp::Expired(e));
        }
        if attempts >= MAX_DOWNLOAD_ATTEMPTS {
            return self.file_discarded(pending, &GaveUp::TooManyAttempts { attempts, last: e });
        }
        let wait = retry_delay(attempts);
        tracing::warn!(id = %pending.id, attempts, ?wait, "cannot fetch a file yet: {e}");
        let retry_at = now_ms().saturating_add(wait.as_millis() as u64);
        self.profile
            .set_download_attempts(&pending.id, attempts, retry_at)
    }

    /// Fetches, checks, decrypts and saves one pending file, and reports it.
    async fn fetch_download(&mut self, pending: &PendingDownload) -> Result<()> {
        let (file, reply_to) = stored_file(pending)?;
        let saved = self.fetch_file(pending, &file, reply_to).await?;
        self.file_downloaded(pending, saved)
    }

    /// Fetches, checks, decrypts and saves the file `file` of a pending download.
    async fn fetch_file(
        &mut self,
        pending: &PendingDownload,
        file: &ExternalPart,
        reply_to: Option<MessageId>,
    ) -> Result<SavedFile> {
        media::check_part(file)?;
        let ciphertext = self
            .api
            .download(&file.url, &pending.room, file.size)
            .await?;
        let name = media::safe_file_name(&file.filename);
        let (file, dir, save_as) = (file.clone(), self.downloads_dir(), name.clone());
        let (description, url) = (file.description.clone(), file.url.clone());
        let path = tokio::task::spawn_blocking(move || {
            let plaintext = media::open(&file, ciphertext)?;
            media::save(&dir, &save_as, &plaintext)
        })
        .await
        .map_err(|e| ClientError::Storage(format!("file task failed: {e}")))??;
        Ok(SavedFile {
            path,
            url,
            text: file_text(&name, &description),
            name,
            reply_to,
        })
    }

    /// Files a saved file's message in history and reports it.
    fn file_downloaded(&self, pending: &PendingDownload, saved: SavedFile) -> Result<()> {
        let mut entry = HistoryEntry::new(
            pending.room.clone(),
            pending.event,
            pending.sender.clone(),
            pending.id,
            saved.text.clone(),
            pending.ts,
        );
        entry.reply_to = saved.reply_to;
        entry.expires_at = pending.expires_at;
        // Kept with the message, so the file goes when the message expires or is deleted.
        let saved_file = saved
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        tracing::info!(id = %pending.id, path = %saved.path.display(), "file received");
        let event = Event::Message {
            room: pending.room.clone(),
            sender: pending.sender.clone(),
            id: pending.id,
            text: saved.text,
            ts: pending.ts,
            reply_to: saved.reply_to,
            expires_at: pending.expires_at,
            file: Some(saved.path.to_string_lossy().into_owned()),
            name: Some(saved.name),
        };
        self.profile.transaction(|| {
            self.profile.add_history(&entry)?;
            self.profile
                .set_asset_url(&pending.room, &pending.id, &saved.url)?;
            if let Some(name) = &saved_file {
                self.profile
                    .set_saved_file(&pending.room, &pending.id, name)?;
            }
            self.profile.remove_download(&pending.id)?;
            self.profile.push_event(&event)
        })
    }

    fn file_discarded(&self, pending: &PendingDownload, why: &dyn std::fmt::Display) -> Result<()> {
        tracing::warn!(id = %pending.id, "file discarded: {why}");
        let name = stored_file(pending).map_or_else(
            |_| pending.id.to_string(),
            |(file, _)| media::safe_file_name(&file.filename),
        );
        let event = Event::Error {
            room: Some(pending.room.clone()),
            detail: format!("file {name} from {}: {why}", pending.sender),
        };
        self.profile.transaction(|| {
            self.profile.remove_download(&pending.id)?;
            self.profile.push_event(&event)
        })
    }
}

/// The file part of a pending download's stored message, and what the message replies to.
fn stored_file(pending: &PendingDownload) -> Result<(ExternalPart, Option<MessageId>)> {
    let content = MimiContent::decode(&pending.content)
        .map_err(|e| ClientError::Protocol(format!("stored file message: {e}")))?;
    match content.meaning() {
        Meaning::File { file, reply_to } => Ok((file.clone(), reply_to)),
        _ => Err(ClientError::Protocol(
            "stored file message holds no file".into(),
        )),
    }
}

/// Whether the provider's deadline for a pending file (the part's `expires`, seconds since
/// the epoch, 0 for none) has passed: after it, the file cannot be fetched any more.
fn provider_deadline_passed(pending: &PendingDownload) -> bool {
    stored_file(pending)
        .is_ok_and(|(file, _)| file.expires != 0 && u64::from(file.expires) * 1000 <= now_ms())
}

/// How long to wait after the `failures`-th failed attempt at a file.
fn retry_delay(failures: u32) -> Duration {
    let doubled = FIRST_RETRY_DELAY.saturating_mul(1 << failures.saturating_sub(1).min(16));
    doubled.min(MAX_RETRY_DELAY)
}

/// Reads and encrypts a file off the async runtime (large files take a while).
async fn seal_in_background(path: PathBuf) -> Result<Sealed> {
    let sealed = tokio::task::spawn_blocking(move || media::seal_file(&path))
        .await
        .map_err(|e| ClientError::Storage(format!("file task failed: {e}")))??;
    Ok(sealed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_up_to_an_hour_and_span_hours_in_all() {
        assert_eq!(retry_delay(1), FIRST_RETRY_DELAY);
        assert_eq!(retry_delay(2), FIRST_RETRY_DELAY * 2);
        assert_eq!(retry_delay(40), MAX_RETRY_DELAY);
        let span: Duration = (1..MAX_DOWNLOAD_ATTEMPTS).map(retry_delay).sum();
        assert!(span > Duration::from_secs(4 * 3600), "{span:?}");
        assert!(span < Duration::from_secs(8 * 3600), "{span:?}");
    }

    #[test]
    fn files_read_as_their_name_or_description() {
        assert_eq!(file_text("a.pdf", ""), "[file a.pdf]");
        assert_eq!(file_text("a.pdf", "the report"), "the report");
    }
}
