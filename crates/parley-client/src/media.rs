//! Encrypted files on the device (draft-ietf-mimi-content external parts): encryption with a
//! fresh AES-128-GCM key per file, the checks a download must pass before it is decrypted, and
//! saving it under a name a peer cannot turn into a path elsewhere. No network I/O here.
//!
//! AES-GCM is one-shot, so a file is held in memory once, whole: read into a buffer with room
//! for the tag, encrypted in place, handed to the upload without a copy; a download is collected
//! into one buffer, checked, decrypted in place and written out. Hence [`MAX_FILE_BYTES`].

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read as _, Write as _};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes128Gcm, Key, Nonce};
use parley_proto::content::{ExternalPart, ENC_ALG_AES_128_GCM, HASH_ALG_SHA256};
use sha2::{Digest, Sha256};

/// AES-128-GCM key, nonce and tag sizes.
pub const KEY_BYTES: usize = 16;
pub const NONCE_BYTES: usize = 12;
pub const TAG_BYTES: usize = 16;
/// The largest file this device sends or accepts: it is held in memory whole (see above).
pub const MAX_FILE_BYTES: u64 = 1 << 30;
/// Longest file name kept from a sender, in UTF-8 bytes: file systems limit names to 255
/// bytes (not characters), and a copy's ` (NNNN)` must still fit.
const MAX_NAME_BYTES: usize = 200;
/// Longest name a file is ever saved under, in bytes (`NAME_MAX` of common file systems).
const MAX_SAVED_NAME_BYTES: usize = 255;
/// Longest extension (with its dot, in bytes) kept apart when a name is shortened: anything
/// longer is no extension worth keeping but part of the name.
const MAX_EXT_BYTES: usize = 16;
/// Name used when a sender's file name has nothing usable left.
const FALLBACK_NAME: &str = "file";
/// Names tried before giving up on finding a free one (`name (1).ext`, ...).
const MAX_NAME_ATTEMPTS: u32 = 10_000;

/// Why a file could not be sent, fetched or saved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    /// The file reference uses an algorithm or field sizes this client does not support.
    #[error("unsupported file reference: {0}")]
    Unsupported(String),
    /// Too large to hold in memory (see [`MAX_FILE_BYTES`]).
    #[error("the file is {0} bytes; this client handles files up to {MAX_FILE_BYTES} bytes")]
    TooLarge(u64),
    /// The downloaded bytes are not what the sender uploaded.
    #[error(
        "the download does not match the file's hash (altered in storage or transit); discarded"
    )]
    HashMismatch,
    /// The bytes match the hash but do not decrypt with the key in the message.
    #[error("the file does not decrypt with its key; discarded")]
    Decrypt,
    /// Reading or writing a local file failed.
    #[error("{0}")]
    Io(String),
}

/// A file encrypted for upload, with what the external part must say about it.
pub struct Sealed {
    /// The encrypted file followed by the GCM tag: what is uploaded.
    pub ciphertext: Vec<u8>,
    pub key: [u8; KEY_BYTES],
    pub nonce: [u8; NONCE_BYTES],
    /// SHA-256 of `ciphertext`: the draft's `contentHash` is of the content at the URL.
    pub hash: [u8; 32],
}

/// Reads `path` and encrypts it with a fresh key and nonce (and the draft's default empty aad).
pub fn seal_file(path: &Path) -> Result<Sealed, MediaError> {
    let io = |e: std::io::Error| MediaError::Io(format!("cannot read {}: {e}", path.display()));
    let mut file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len > MAX_FILE_BYTES {
        return Err(MediaError::TooLarge(len));
    }
    // Room for the tag up front, so encrypting in place never reallocates (which would copy).
    let capacity = usize::try_from(len).map_err(|_| MediaError::TooLarge(len))? + TAG_BYTES;
    let mut data = Vec::with_capacity(capacity);
    file.read_to_end(&mut data).map_err(io)?;
    seal(data)
}

/// Encrypts `data` in place with a fresh key and nonce.
pub fn seal(mut data: Vec<u8>) -> Result<Sealed, MediaError> {
    let key: [u8; KEY_BYTES] = rand::random();
    let nonce: [u8; NONCE_BYTES] = rand::random();
    data.reserve_exact(TAG_BYTES);
    Aes128Gcm::new(Key::<Aes128Gcm>::from_slice(&key))
        .encrypt_in_place(Nonce::from_slice(&nonce), b"", &mut data)
        .map_err(|_| MediaError::TooLarge(data.len() as u64))?;
    let hash = Sha256::digest(&data).into();
    Ok(Sealed {
        ciphertext: data,
        key,
        nonce,
        hash,
    })
}

/// Whether this client can fetch and decrypt what `file` refers to: AES-128-GCM with a 16-byte
/// key and 12-byte nonce, a SHA-256 hash, and a size it accepts.
pub fn check_part(file: &ExternalPart) -> Result<(), MediaError> {
    if file.enc_alg != ENC_ALG_AES_128_GCM || file.hash_alg != HASH_ALG_SHA256 {
        return Err(MediaError::Unsupported(format!(
            "encryption algorithm {} / hash algorithm {} (only AES-128-GCM and SHA-256)",
            file.enc_alg, file.hash_alg
        )));
    }
    if file.key.len() != KEY_BYTES
        || file.nonce.len() != NONCE_BYTES
        || file.content_hash.len() != 32
    {
        return Err(MediaError::Unsupported(
            "key, nonce or hash of the wrong size".into(),
        ));
    }
    if file.size > MAX_FILE_BYTES {
        return Err(MediaError::TooLarge(file.size));
    }
    if file.size < TAG_BYTES as u64 {
        return Err(MediaError::Unsupported(
            "a size too small for an encrypted file".into(),
        ));
    }
    Ok(())
}

/// Checks a download against the part's hash, then decrypts it in place.
pub fn open(file: &ExternalPart, mut data: Vec<u8>) -> Result<Vec<u8>, MediaError> {
    check_part(file)?;
    // The hash first: a tampered blob is reported as such, not as a bad key.
    if Sha256::digest(&data).as_slice() != file.content_hash.as_slice() {
        return Err(MediaError::HashMismatch);
    }
    Aes128Gcm::new(Key::<Aes128Gcm>::from_slice(&file.key))
        .decrypt_in_place(Nonce::from_slice(&file.nonce), &file.aad, &mut data)
        .map_err(|_| MediaError::Decrypt)?;
    Ok(data)
}

/// A file name from a peer made safe to save: only its last path component (of either
/// separator style), without control and reserved characters or leading dots (so neither
/// `..` nor a hidden dotfile), at most [`MAX_NAME_BYTES`] bytes (its extension kept); never
/// empty.
pub fn safe_file_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = last
        .chars()
        .filter(|c| !c.is_control() && !matches!(c, ':' | '*' | '?' | '"' | '<' | '>' | '|'))
        .collect();
    let trimmed = cleaned.trim().trim_start_matches('.').trim();
    let (stem, ext) = split_extension(trimmed);
    let kept = fit_name(stem, "", ext, MAX_NAME_BYTES);
    if kept.trim().is_empty() || kept.starts_with('.') {
        FALLBACK_NAME.to_owned()
    } else {
        kept
    }
}

/// `name` as stem and extension (with its dot); an extension only if it is short and not the
/// whole name.
fn split_extension(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(dot) if dot > 0 && name.len() - dot <= MAX_EXT_BYTES => name.split_at(dot),
        _ => (name, ""),
    }
}

/// `stem` + `suffix` + `ext`, with `stem` cut (at a character boundary) so that the whole is at
/// most `max` bytes.
fn fit_name(stem: &str, suffix: &str, ext: &str, max: usize) -> String {
    let room = max.saturating_sub(suffix.len() + ext.len());
    let kept = if stem.len() <= room {
        stem
    } else {
        let cut = stem
            .char_indices()
            .map(|(i, c)| i + c.len_utf8())
            .take_while(|end| *end <= room)
            .last()
            .unwrap_or(0);
        // No space left dangling before the extension.
        stem[..cut].trim_end()
    };
    format!("{kept}{suffix}{ext}")
}

/// Writes `data` into `dir` under `name` (already made safe), or `stem (N).ext` if that is
/// taken; never replaces or follows an existing file. Returns the path written.
pub fn save(dir: &Path, name: &str, data: &[u8]) -> Result<PathBuf, MediaError> {
    let io = |e: std::io::Error| MediaError::Io(format!("cannot save into {}: {e}", dir.display()));
    create_private_dir(dir).map_err(io)?;
    let (path, mut file) = create_unique(dir, name).map_err(io)?;
    let written = file.write_all(data).and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&path);
        return Err(io(e));
    }
    Ok(path)
}

/// Creates a new file named `name`, or the first free `stem (N).ext`, the stem shortened where
/// needed to stay within [`MAX_SAVED_NAME_BYTES`]. `create_new` fails on anything existing, a
/// symlink included, so nothing outside `dir` is ever written.
fn create_unique(dir: &Path, name: &str) -> std::io::Result<(PathBuf, File)> {
    let (stem, ext) = split_extension(name);
    for n in 0..MAX_NAME_ATTEMPTS {
        let suffix = if n == 0 {
            String::new()
        } else {
            format!(" ({n})")
        };
        let candidate = fit_name(stem, &suffix, ext, MAX_SAVED_NAME_BYTES);
        let path = dir.join(candidate);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        ErrorKind::AlreadyExists,
        format!("too many files named like {name:?}"),
    ))
}

/// Creates `dir` readable by its owner only: the profile (keys, token) and its downloads
/// folder (what peers sent).
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// The media type to announce for a file, from its extension (receivers only display it).
pub fn content_type_for(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "mp4" | "m4v" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "mp3" => "audio/mpeg",
        "m4a" => "audio/mp4",
        "ogg" | "oga" | "opus" => "audio/ogg",
        "wav" => "audio/wav",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "json" => "application/json",
        "txt" => "text/plain;charset=utf-8",
        "md" => "text/markdown",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part_for(sealed: &Sealed) -> ExternalPart {
        ExternalPart {
            content_type: "application/octet-stream".into(),
            url: "https://chirp.test/v1/assets/00112233445566778899aabbccddeeff".into(),
            expires: 0,
            size: sealed.ciphertext.len() as u64,
            enc_alg: ENC_ALG_AES_128_GCM,
            key: sealed.key.to_vec(),
            nonce: sealed.nonce.to_vec(),
            aad: Vec::new(),
            hash_alg: HASH_ALG_SHA256,
            content_hash: sealed.hash.to_vec(),
            description: String::new(),
            filename: "x.bin".into(),
        }
    }

    #[test]
    fn files_round_trip_and_tampering_is_caught() {
        let plain: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let sealed = seal(plain.clone()).unwrap();
        assert_eq!(sealed.ciphertext.len(), plain.len() + TAG_BYTES);
        assert_ne!(&sealed.ciphertext[..plain.len()], plain.as_slice());
        let part = part_for(&sealed);
        assert_eq!(open(&part, sealed.ciphertext.clone()).unwrap(), plain);

        let mut tampered = sealed.ciphertext.clone();
        tampered[10] ^= 1;
        assert_eq!(open(&part, tampered), Err(MediaError::HashMismatch));
        // Matching hash, wrong key: a sender that lies about the key.
        let mut wrong_key = part.clone();
        wrong_key.key[0] ^= 1;
        assert_eq!(
            open(&wrong_key, sealed.ciphertext.clone()),
            Err(MediaError::Decrypt)
        );
        // Every file gets its own key and nonce.
        let again = seal(plain).unwrap();
        assert_ne!((again.key, again.nonce), (sealed.key, sealed.nonce));
    }

    #[test]
    fn only_supported_references_are_fetched() {
        let part = part_for(&seal(vec![1, 2, 3]).unwrap());
        assert!(check_part(&part).is_ok());
        let mut other = part.clone();
        other.enc_alg = 2; // AES-256-GCM
        assert!(matches!(
            check_part(&other),
            Err(MediaError::Unsupported(_))
        ));
        let mut short = part.clone();
        short.nonce.pop();
        assert!(check_part(&short).is_err());
        let mut huge = part;
        huge.size = MAX_FILE_BYTES + 1;
        assert_eq!(
            check_part(&huge),
            Err(MediaError::TooLarge(MAX_FILE_BYTES + 1))
        );
    }

    #[test]
    fn peer_file_names_cannot_leave_the_folder() {
        for (given, safe) in [
            ("report.pdf", "report.pdf"),
            ("../../.bashrc", "bashrc"),
            ("..\\..\\evil.exe", "evil.exe"),
            ("/etc/passwd", "passwd"),
            ("..", "file"),
            ("", "file"),
            ("a\u{0}b\nc.txt", "abc.txt"),
            ("dir/", "file"),
            ("what?<>:*|\".txt", "what.txt"),
            ("  spaced name.md  ", "spaced name.md"),
        ] {
            assert_eq!(safe_file_name(given), safe, "{given:?}");
        }
        assert_eq!(safe_file_name(&"x".repeat(500)).len(), MAX_NAME_BYTES);
    }

    #[test]
    fn long_names_are_cut_by_bytes_keeping_the_extension() {
        // 90 three-byte characters: under a character limit, over the bytes a name may have.
        let name = safe_file_name(&format!("{}.pdf", "報".repeat(90)));
        assert!(name.len() <= MAX_NAME_BYTES, "{} bytes", name.len());
        assert_eq!(name, format!("{}.pdf", "報".repeat(65)));
        // A cut never splits a character, and an implausibly long "extension" is name.
        let odd = safe_file_name(&format!("a.{}", "é".repeat(150)));
        assert!(
            odd.len() <= MAX_NAME_BYTES && odd.starts_with("a."),
            "{odd}"
        );
    }

    #[test]
    fn long_non_ascii_file_names_can_be_saved_again_and_again() {
        let dir = tempfile::tempdir().unwrap();
        let name = safe_file_name(&format!("{}.pdf", "報".repeat(90)));
        for _ in 0..3 {
            save(dir.path(), &name, b"x").unwrap();
        }
        // A name that fits once but not as `name (1).ext`: the copy's stem is shortened.
        let fits = format!("{}.pdf", "報".repeat(83));
        assert_eq!(fits.len(), 253);
        let first = save(dir.path(), &fits, b"1").unwrap();
        let second = save(dir.path(), &fits, b"2").unwrap();
        assert_eq!(first, dir.path().join(&fits));
        let second_name = second.file_name().unwrap().to_str().unwrap();
        assert!(second_name.len() <= MAX_SAVED_NAME_BYTES);
        assert!(second_name.ends_with(" (1).pdf"), "{second_name}");
        assert_eq!(std::fs::read(&second).unwrap(), b"2");
    }

    #[test]
    fn saving_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let downloads = dir.path().join("downloads");
        let first = save(&downloads, "photo.jpg", b"one").unwrap();
        let second = save(&downloads, "photo.jpg", b"two").unwrap();
        let third = save(&downloads, "README", b"three").unwrap();
        let fourth = save(&downloads, "README", b"four").unwrap();
        assert_eq!(first, downloads.join("photo.jpg"));
        assert_eq!(second, downloads.join("photo (1).jpg"));
        assert_eq!(fourth, downloads.join("README (1)"));
        assert_eq!(std::fs::read(&first).unwrap(), b"one");
        assert_eq!(std::fs::read(&second).unwrap(), b"two");
        assert_eq!(std::fs::read(&third).unwrap(), b"three");
        #[cfg(unix)]
        {
            // A symlink planted under the wanted name is skipped, not followed.
            let outside = dir.path().join("outside");
            std::os::unix::fs::symlink(&outside, downloads.join("link.txt")).unwrap();
            let saved = save(&downloads, "link.txt", b"data").unwrap();
            assert_eq!(saved, downloads.join("link (1).txt"));
            assert!(!outside.exists());
        }
    }

    #[test]
    fn content_types_come_from_extensions() {
        assert_eq!(content_type_for("a.JPG"), "image/jpeg");
        assert_eq!(content_type_for("voice.opus"), "audio/ogg");
        assert_eq!(content_type_for("noext"), "application/octet-stream");
    }
}
