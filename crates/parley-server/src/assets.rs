//! Encrypted attachments (MIMI external parts). Owns the `assets` table and `DATA/assets/`.
//!
//! Clients encrypt a file with a fresh key and upload only the ciphertext to their own provider,
//! which streams it to disk (never holding it whole in memory), refusing it as soon as it passes
//! the domain's size limit. An asset is named by its URL, `https://DOMAIN/v1/assets/ID`, DOMAIN
//! being the hosting provider's. Downloads are streamed too: from the local disk when this
//! provider hosts the asset; for an asset hosted elsewhere, through the room's hub
//! (`proxyDownload`), so the hosting provider never learns who reads it. Assets expire with the
//! domain's retention and may be deleted earlier by their uploader.

use crate::accounts::AuthDevice;
use crate::clock::now_ms;
use crate::config::ServerConfig;
use crate::error::{ServiceError, ServiceResult};
use crate::store::{Store, StoreError};
use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::Response;
use futures_util::{Stream, StreamExt};
use parley_proto::{Domain, UserId};
use rusqlite::{params, OptionalExtension};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const DAY_MS: u64 = 86_400_000;
/// How long the rest of a refused upload is still read (and thrown away). The refusal is
/// answered at once, but closing a connection with unread data resets it, and the client would
/// see a broken connection instead of the `413`; reading on a little lets the answer arrive.
const LINGER: Duration = Duration::from_secs(2);

/// An asset id: 32 lowercase hex characters (128 random bits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetId(String);

impl AssetId {
    pub fn parse(s: &str) -> ServiceResult<Self> {
        let ok = s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(ServiceError::bad(
                "invalid_asset",
                "asset ids are 32 hex digits",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `https://DOMAIN/v1/assets/ID` → (hosting domain, id).
pub fn parse_asset_url(url: &str) -> ServiceResult<(Domain, AssetId)> {
    let bad = || ServiceError::bad("invalid_asset_url", "expected https://DOMAIN/v1/assets/ID");
    let rest = url.strip_prefix("https://").ok_or_else(bad)?;
    let (host, id) = rest.split_once("/v1/assets/").ok_or_else(bad)?;
    let domain = Domain::parse(host).map_err(|_| bad())?;
    Ok((domain, AssetId::parse(id)?))
}

pub fn asset_url(domain: &Domain, id: &AssetId) -> String {
    format!("https://{domain}/v1/assets/{}", id.as_str())
}

/// Answer to an upload: where the asset lives and what was stored.
pub use parley_proto::api::UploadedAsset;

pub struct Assets {
    store: Store,
    config: Arc<ServerConfig>,
    dir: PathBuf,
}

impl Assets {
    pub fn new(store: Store, config: Arc<ServerConfig>) -> Result<Self, StoreError> {
        let dir = config.data.join("assets");
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::DataDir(dir.clone(), e))?;
        Ok(Self { store, config, dir })
    }

    fn path(&self, id: &AssetId) -> PathBuf {
        self.dir.join(id.as_str())
    }

    /// How much `uploader` may upload now: the domain's per-file limit, or what is left of
    /// the user's storage quota, whichever is smaller.
    async fn bound_for(&self, uploader: &UserId) -> ServiceResult<UploadBound> {
        let (max_file, quota) = self
            .config
            .domain(uploader.domain().as_str())
            .map_or((0, 0), |d| {
                (d.max_upload_bytes, d.max_stored_bytes_per_user)
            });
        let user = uploader.to_string();
        let stored = self
            .store
            .read(move |c| stored_by(c, &user, now_ms()))
            .await?;
        Ok(UploadBound {
            max_file,
            quota,
            left: quota.saturating_sub(stored),
        })
    }

    /// `POST /v1/assets`: streams the body to disk, refusing it once it passes the bound (at
    /// once when `Content-Length` already says so). Acknowledged only once the file is synced
    /// and recorded.
    pub async fn upload(
        &self,
        caller: &AuthDevice,
        declared: Option<u64>,
        body: Body,
    ) -> ServiceResult<UploadedAsset> {
        let bound = self.bound_for(&caller.user).await?;
        let mut stream = body.into_data_stream();
        if let Some(n) = declared.filter(|&n| n > bound.bytes()) {
            linger(stream);
            return Err(bound.refusal(Some(n)));
        }
        let id = AssetId(hex::encode(rand::random::<[u8; 16]>()));
        let partial = self.dir.join(format!("{}.partial", id.as_str()));
        let written = write_stream(&partial, &mut stream, bound.bytes()).await;
        let (size, digest) = match written {
            Ok(done) => done,
            Err(e) => {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(match e {
                    WriteError::TooLarge => {
                        linger(stream);
                        bound.refusal(None)
                    }
                    WriteError::Body(why) => ServiceError::bad("upload_interrupted", why),
                    WriteError::Disk(why) => ServiceError::Internal(why),
                });
            }
        };
        tokio::fs::rename(&partial, self.path(&id))
            .await
            .map_err(|e| ServiceError::Internal(format!("cannot store asset: {e}")))?;
        let days = self
            .config
            .domain(caller.user.domain().as_str())
            .map_or(30, |d| d.retention_days);
        let expires_at = now_ms().saturating_add(days.saturating_mul(DAY_MS));
        let (key, uploader) = (id.as_str().to_owned(), caller.user.to_string());
        let (sha, quota) = (digest.clone(), bound.quota);
        // The quota again, in the recording transaction: the user's concurrent uploads were
        // each bounded by what was left before any of them finished.
        let recorded =
            self.store
                .write(move |c| {
                    let now = now_ms();
                    if stored_by(c, &uploader, now)?.saturating_add(size) > quota {
                        return Ok(false);
                    }
                    c.execute(
                    "INSERT INTO assets (asset_id, uploader, size, sha256, created_at, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![key, uploader, size as i64, sha, now as i64, expires_at as i64],
                )?;
                    Ok(true)
                })
                .await?;
        if !recorded {
            let _ = tokio::fs::remove_file(self.path(&id)).await;
            return Err(quota_exceeded(quota));
        }
        tracing::info!(asset = id.as_str(), size, uploader = %caller.user, "asset stored");
        Ok(UploadedAsset {
            url: asset_url(caller.user.domain(), &id),
            size,
            sha256: hex::encode(&digest),
            expires_at,
        })
    }

    /// A stored asset as a streamed body with its size (`404` when unknown or expired).
    pub async fn read(&self, id: &AssetId) -> ServiceResult<(Body, u64)> {
        let key = id.as_str().to_owned();
        let now = now_ms() as i64;
        let size: Option<i64> = self
            .store
            .read(move |c| {
                Ok(c.query_row(
                    "SELECT size FROM assets WHERE asset_id = ?1 AND expires_at > ?2",
                    params![key, now],
                    |r| r.get(0),
                )
                .optional()?)
            })
            .await?;
        let size = size.ok_or_else(|| unknown_asset(id))?;
        let file = tokio::fs::File::open(self.path(id))
            .await
            .map_err(|_| unknown_asset(id))?;
        Ok((
            // 64 KiB reads: the 4 KiB default costs a syscall and a frame per page.
            Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024)),
            size as u64,
        ))
    }

    /// `DELETE /v1/assets/{id}`: the uploading user may delete it before it expires.
    pub async fn delete(&self, caller: &AuthDevice, id: &AssetId) -> ServiceResult<()> {
        let (key, user) = (id.as_str().to_owned(), caller.user.to_string());
        let deleted = self
            .store
            .write(move |c| {
                Ok(c.execute(
                    "DELETE FROM assets WHERE asset_id = ?1 AND uploader = ?2",
                    params![key, user],
                )? > 0)
            })
            .await?;
        if !deleted {
            return Err(unknown_asset(id));
        }
        let _ = tokio::fs::remove_file(self.path(id)).await;
        Ok(())
    }

    /// Deletes expired assets (rows, then files); returns how many.
    pub async fn expire(&self, now: u64) -> Result<usize, StoreError> {
        let ids: Vec<String> = self
            .store
            .write(move |c| {
                let mut st =
                    c.prepare("DELETE FROM assets WHERE expires_at <= ?1 RETURNING asset_id")?;
                let rows = st.query_map(params![now as i64], |r| r.get(0))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await?;
        for id in &ids {
            let _ = tokio::fs::remove_file(self.dir.join(id)).await;
        }
        Ok(ids.len())
    }
}

fn unknown_asset(id: &AssetId) -> ServiceError {
    ServiceError::not_found("unknown_asset", format!("no asset {}", id.as_str()))
}

/// Bytes of attachments `uploader` has stored that have not expired by `now`.
fn stored_by(c: &rusqlite::Connection, uploader: &str, now: u64) -> Result<u64, StoreError> {
    let total: i64 = c
        .prepare_cached(
            "SELECT COALESCE(SUM(size), 0) FROM assets WHERE uploader = ?1 AND expires_at > ?2",
        )?
        .query_row(params![uploader, now as i64], |r| r.get(0))?;
    Ok(total.max(0) as u64)
}

/// What one upload may take (see [`Assets::bound_for`]).
struct UploadBound {
    max_file: u64,
    quota: u64,
    left: u64,
}

impl UploadBound {
    fn bytes(&self) -> u64 {
        self.max_file.min(self.left)
    }

    /// Why an upload over [`UploadBound::bytes`] is refused: the per-file limit when its
    /// `size` is known to pass it (the file can never be sent), else the tighter of the two.
    fn refusal(&self, size: Option<u64>) -> ServiceError {
        let never_fits = size.is_some_and(|n| n > self.max_file);
        if self.left < self.max_file && !never_fits {
            quota_exceeded(self.quota)
        } else {
            ServiceError::too_large(
                "asset_too_large",
                format!(
                    "attachments on this domain are limited to {} bytes",
                    self.max_file
                ),
            )
        }
    }
}

fn quota_exceeded(quota: u64) -> ServiceError {
    ServiceError::too_large(
        "quota_exceeded",
        format!(
            "a user's stored attachments on this domain are limited to {quota} bytes; \
             delete some, or wait for them to expire"
        ),
    )
}

enum WriteError {
    TooLarge,
    Body(String),
    Disk(String),
}

/// Reads what is left of a refused upload for a while, discarding it (see [`LINGER`]).
fn linger(mut body: axum::body::BodyDataStream) {
    tokio::spawn(async move {
        let drain = async { while let Some(Ok(_)) = body.next().await {} };
        let _ = tokio::time::timeout(LINGER, drain).await;
    });
}

/// Writes a body stream to `path`, hashing it, and fails once more than `limit` bytes came.
async fn write_stream(
    path: &std::path::Path,
    body: &mut (impl Stream<Item = Result<Bytes, axum::Error>> + Unpin),
    limit: u64,
) -> Result<(u64, Vec<u8>), WriteError> {
    let disk = |e: std::io::Error| WriteError::Disk(e.to_string());
    let mut file = tokio::fs::File::create(path).await.map_err(disk)?;
    let mut hash = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| WriteError::Body(e.to_string()))?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(WriteError::TooLarge);
        }
        hash.update(&chunk);
        file.write_all(&chunk).await.map_err(disk)?;
    }
    file.sync_all().await.map_err(disk)?;
    Ok((size, hash.finalize().to_vec()))
}

/// Streams a peer's download answer on (status errors become ours).
pub fn relay_download(upstream: reqwest::Response) -> Result<Response, ServiceError> {
    match upstream.status().as_u16() {
        200 => {}
        404 => {
            return Err(ServiceError::not_found(
                "unknown_asset",
                "no such asset (expired or deleted)",
            ))
        }
        s => {
            return Err(ServiceError::unavailable(
                "peer_refused",
                format!("the asset's provider answered HTTP {s}"),
            ))
        }
    }
    let size = upstream.content_length();
    Ok(asset_response(
        axum::body::Body::from_stream(upstream.bytes_stream()),
        size,
    ))
}

/// An asset's bytes as a download answer.
pub fn asset_response(body: axum::body::Body, size: Option<u64>) -> Response {
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(size) = size {
        headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(size));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asset_urls_round_trip_and_bad_ones_are_refused() {
        let d = Domain::parse("chirp.test").unwrap();
        let id = AssetId::parse("0123456789abcdef0123456789abcdef").unwrap();
        let url = asset_url(&d, &id);
        assert_eq!(
            url,
            "https://chirp.test/v1/assets/0123456789abcdef0123456789abcdef"
        );
        assert_eq!(parse_asset_url(&url).unwrap(), (d, id));
        for bad in [
            "http://chirp.test/v1/assets/0123456789abcdef0123456789abcdef",
            "https://chirp.test/v1/assets/../../etc/passwd",
            "https://chirp.test/v1/assets/0123",
            "https://a b/v1/assets/0123456789abcdef0123456789abcdef",
        ] {
            assert!(parse_asset_url(bad).is_err(), "{bad}");
        }
    }
}
