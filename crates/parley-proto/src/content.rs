//! MIMI message content (draft-ietf-mimi-content-08): the CBOR plaintext inside every MLS
//! application message, and the MessageId derived from it. Constructors build the draft's
//! message kinds (Markdown text, reply, reaction, edit, delete, expiring, attachment), message
//! status reports (draft-mahy-mimi-message-status-01: delivered and read receipts), and
//! [`MimiContent::meaning`] reads them back.
//!
//! Encoding goes through `ciborium::Value` so the array layout follows the draft's CDDL exactly
//! (`mimiContent = [salt, replaces, topicId, expires, inReplyTo, extensions, nestedPart]`).

use ciborium::Value;
use sha2::{Digest, Sha256};
use std::fmt;

/// Largest content we will decode; larger input is refused before parsing.
pub const MAX_CONTENT_BYTES: usize = 1 << 20;
/// How deeply multipart parts may nest.
const MAX_PART_DEPTH: usize = 4;
/// Extension keys from the draft's `extensions` map.
const EXT_SENDER_URI: i64 = 1;
const EXT_ROOM_URI: i64 = 2;
/// The content type of a plain text body (also a reaction's).
pub const TEXT_PLAIN: &str = "text/plain;charset=utf-8";
/// The content type of a message body: GitHub Flavored Markdown for MIMI, which every MIMI
/// client must accept (rendering it as plain text counts).
pub const TEXT_MARKDOWN: &str = "text/markdown;variant=GFM-MIMI";

/// Why content could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentError {
    #[error("content is {0} bytes, over the {MAX_CONTENT_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("content is not valid CBOR: {0}")]
    Cbor(String),
    #[error("content does not match the MIMI content schema: {0}")]
    Schema(&'static str),
}

/// `MessageId = bstr .size 32`: hash algorithm id (0x01, SHA-256) then 31 bytes of hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 32]);

impl MessageId {
    /// The draft's derivation: `0x01 || SHA-256(len16(sender) sender len16(room) room message salt)[..31]`.
    pub fn compute(sender_uri: &str, room_uri: &str, encoded_content: &[u8], salt: &[u8]) -> Self {
        let mut h = Sha256::new();
        for uri in [sender_uri, room_uri] {
            // URIs are bounded far below 64 KiB by identifier validation; saturate rather than wrap.
            let len = u16::try_from(uri.len()).unwrap_or(u16::MAX);
            h.update(len.to_be_bytes());
            h.update(uri.as_bytes());
        }
        h.update(encoded_content);
        h.update(salt);
        let digest = h.finalize();
        let mut id = [0u8; 32];
        id[0] = 0x01;
        id[1..].copy_from_slice(&digest[..31]);
        Self(id)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = hex::decode(s).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    fn from_slice(b: &[u8]) -> Option<Self> {
        Some(Self(b.try_into().ok()?))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.to_hex())
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// `Expiration = [relative: bool, time: uint .size 4]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiration {
    pub relative: bool,
    pub time: u32,
}

impl Expiration {
    /// Gone at `unix_secs` (seconds since the Unix epoch) for every receiver alike.
    pub fn at(unix_secs: u32) -> Self {
        Self {
            relative: false,
            time: unix_secs,
        }
    }

    /// When a message with this expiration stops being shown, in milliseconds since the Unix
    /// epoch: absolute times as given, relative ones counted from `received_ms`, the moment
    /// this receiver got it (the draft counts from reading; a client that shows what it
    /// receives reads it then).
    pub fn deadline_ms(&self, received_ms: u64) -> u64 {
        let secs_ms = u64::from(self.time) * 1000;
        if self.relative {
            received_ms.saturating_add(secs_ms)
        } else {
            secs_ms
        }
    }
}

/// The draft's base dispositions; unknown values are kept as-is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disposition(pub u8);

impl Disposition {
    pub const UNSPECIFIED: Self = Self(0);
    pub const RENDER: Self = Self(1);
    pub const REACTION: Self = Self(2);
    pub const ATTACHMENT: Self = Self(6);
}

/// The media type of a message status report (draft-mahy-mimi-message-status).
pub const MESSAGE_STATUS: &str = "application/mimi-message-status";
/// The media type of Parley's typing indicator (a Parley extension: MIMI defines none). It is
/// only ever sent as an ephemeral message, never stored or queued; its content is empty.
pub const TYPING: &str = "application/vnd.parley.typing";
/// Most entries one status report may hold when decoded (a report is a list of 35-byte pairs;
/// the whole content is bounded by [`MAX_CONTENT_BYTES`] anyway).
pub const MAX_STATUS_ENTRIES: usize = 10_000;

/// `encAlg` for AES-128-GCM: its number in the IANA AEAD Algorithms registry
/// (`AEAD_AES_128_GCM`, RFC 5116), which the draft makes mandatory to implement.
pub const ENC_ALG_AES_128_GCM: u16 = 1;
/// `hashAlg` for SHA-256: its number in the IANA Named Information Hash Algorithm registry.
pub const HASH_ALG_SHA256: u8 = 1;

/// `ExternalPart`: a reference to encrypted content stored elsewhere (attachments). As the
/// draft defines them, `size` and `contentHash` describe the content at `url` (here: the
/// ciphertext), so a receiver can check a download before decrypting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalPart {
    pub content_type: String,
    pub url: String,
    pub expires: u32,
    pub size: u64,
    pub enc_alg: u16,
    pub key: Vec<u8>,
    pub nonce: Vec<u8>,
    pub aad: Vec<u8>,
    pub hash_alg: u8,
    pub content_hash: Vec<u8>,
    pub description: String,
    pub filename: String,
}

/// The status of one message at the reporting user (draft-mahy-mimi-message-status's
/// `baseStatus`; values it does not define are kept as `Unknown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageStatus {
    Unread,
    Delivered,
    Read,
    Expired,
    Deleted,
    Hidden,
    Error,
    Unknown(u8),
}

impl MessageStatus {
    pub fn code(self) -> u8 {
        match self {
            Self::Unread => 0,
            Self::Delivered => 1,
            Self::Read => 2,
            Self::Expired => 3,
            Self::Deleted => 4,
            Self::Hidden => 5,
            Self::Error => 6,
            Self::Unknown(code) => code,
        }
    }

    pub fn from_code(code: u8) -> Self {
        match code {
            0 => Self::Unread,
            1 => Self::Delivered,
            2 => Self::Read,
            3 => Self::Expired,
            4 => Self::Deleted,
            5 => Self::Hidden,
            6 => Self::Error,
            other => Self::Unknown(other),
        }
    }
}

/// `MessageStatusReport = [* PerMessageStatus]`, `PerMessageStatus = [messageId, status]`: the
/// status of several messages of one room at the reporting user, sent as a single part of type
/// [`MESSAGE_STATUS`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusReport(pub Vec<(MessageId, MessageStatus)>);

impl StatusReport {
    pub fn encode(&self) -> Vec<u8> {
        let value = Value::Array(
            self.0
                .iter()
                .map(|(id, status)| {
                    Value::Array(vec![
                        Value::Bytes(id.0.to_vec()),
                        Value::from(status.code()),
                    ])
                })
                .collect(),
        );
        let mut out = Vec::new();
        ciborium::into_writer(&value, &mut out).expect("CBOR into Vec is infallible");
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ContentError> {
        if bytes.len() > MAX_CONTENT_BYTES {
            return Err(ContentError::TooLarge(bytes.len()));
        }
        let value: Value =
            ciborium::from_reader(bytes).map_err(|e| ContentError::Cbor(e.to_string()))?;
        let Value::Array(items) = value else {
            return Err(ContentError::Schema("a status report is an array"));
        };
        if items.len() > MAX_STATUS_ENTRIES {
            return Err(ContentError::Schema("too many entries in a status report"));
        }
        items
            .into_iter()
            .map(|item| match item {
                Value::Array(pair) => match <[Value; 2]>::try_from(pair) {
                    Ok([Value::Bytes(id), status]) => Ok((
                        MessageId::from_slice(&id)
                            .ok_or(ContentError::Schema("MessageId must be 32 bytes"))?,
                        MessageStatus::from_code(uint(&status)?),
                    )),
                    _ => Err(ContentError::Schema(
                        "a status entry is [messageId, status]",
                    )),
                },
                _ => Err(ContentError::Schema("a status entry is an array")),
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

/// The body of a `NestedPart`, by cardinality.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartBody {
    /// `nullpart`: e.g. a delete.
    Null,
    Single {
        content_type: String,
        content: Vec<u8>,
    },
    External(Box<ExternalPart>),
    Multi {
        semantics: u8,
        parts: Vec<NestedPart>,
    },
}

/// `NestedPart = [disposition, language, (NullPart // SinglePart // ExternalPart // MultiPart)]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NestedPart {
    pub disposition: Disposition,
    pub language: String,
    pub body: PartBody,
}

/// What a message means to a messaging client, read from its fields as the draft's examples
/// use them. Content that fits none of these is [`Meaning::Unsupported`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning<'a> {
    /// A text message, possibly a reply (`inReplyTo`).
    Text {
        text: &'a str,
        reply_to: Option<MessageId>,
    },
    /// A reaction (disposition `reaction`, a text part) to the message in `inReplyTo`.
    Reaction { target: MessageId, emoji: &'a str },
    /// A new text for the message in `replaces`.
    Edit { target: MessageId, text: &'a str },
    /// The message in `replaces` is retracted (a null part); also removes a reaction.
    Delete { target: MessageId },
    /// A message status report (receipts): its CBOR body, for [`StatusReport::decode`].
    Status { report: &'a [u8] },
    /// The sender is typing (Parley's ephemeral indicator, content type [`TYPING`]).
    Typing,
    /// A file (image, voice message, video, ...) stored elsewhere: an external part.
    File {
        file: &'a ExternalPart,
        reply_to: Option<MessageId>,
    },
    /// Anything else: multipart, inline non-text parts; `reply_to` as for text.
    Unsupported { reply_to: Option<MessageId> },
}

/// One MIMI content message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MimiContent {
    pub salt: [u8; 16],
    pub replaces: Option<MessageId>,
    pub topic_id: Vec<u8>,
    pub expires: Option<Expiration>,
    pub in_reply_to: Option<MessageId>,
    pub sender_uri: Option<String>,
    pub room_uri: Option<String>,
    pub part: NestedPart,
}

impl MimiContent {
    /// Content from `sender_uri` in `room_uri` with one part and nothing else set.
    fn with_part(salt: [u8; 16], sender_uri: &str, room_uri: &str, part: NestedPart) -> Self {
        Self {
            salt,
            replaces: None,
            topic_id: Vec::new(),
            expires: None,
            in_reply_to: None,
            sender_uri: Some(sender_uri.to_owned()),
            room_uri: Some(room_uri.to_owned()),
            part,
        }
    }

    /// A plain text message rendered inline.
    pub fn text(salt: [u8; 16], sender_uri: &str, room_uri: &str, text: &str) -> Self {
        Self::with_part(
            salt,
            sender_uri,
            room_uri,
            text_part(Disposition::RENDER, TEXT_PLAIN, text),
        )
    }

    /// A Markdown message (GFM for MIMI) rendered inline. HTML tags in `text` are escaped
    /// first, as the variant requires of senders (see [`crate::markdown::no_html`]).
    pub fn markdown(salt: [u8; 16], sender_uri: &str, room_uri: &str, text: &str) -> Self {
        let body = crate::markdown::no_html(text);
        Self::with_part(
            salt,
            sender_uri,
            room_uri,
            text_part(Disposition::RENDER, TEXT_MARKDOWN, &body),
        )
    }

    /// A reaction to `target`: the draft's reaction example (disposition `reaction`, a plain
    /// text part, the target in `inReplyTo`).
    pub fn reaction(
        salt: [u8; 16],
        sender_uri: &str,
        room_uri: &str,
        target: MessageId,
        emoji: &str,
    ) -> Self {
        let part = text_part(Disposition::REACTION, TEXT_PLAIN, emoji);
        Self::with_part(salt, sender_uri, room_uri, part).replying_to(target)
    }

    /// A file sent as an attachment: the draft's attachment example (disposition
    /// `attachment`, an external part naming the encrypted upload, its key and hash).
    pub fn attachment(
        salt: [u8; 16],
        sender_uri: &str,
        room_uri: &str,
        file: ExternalPart,
    ) -> Self {
        let part = NestedPart {
            disposition: Disposition::ATTACHMENT,
            language: String::new(),
            body: PartBody::External(Box::new(file)),
        };
        Self::with_part(salt, sender_uri, room_uri, part)
    }

    /// A message status report (delivered and read receipts, ...) about messages of the room.
    /// The draft leaves the disposition open; `unspecified` keeps other clients from rendering
    /// it as a message.
    pub fn status(salt: [u8; 16], sender_uri: &str, room_uri: &str, report: &StatusReport) -> Self {
        let part = NestedPart {
            disposition: Disposition::UNSPECIFIED,
            language: String::new(),
            body: PartBody::Single {
                content_type: MESSAGE_STATUS.to_owned(),
                content: report.encode(),
            },
        };
        Self::with_part(salt, sender_uri, room_uri, part)
    }

    /// "I am typing": Parley's typing indicator, sent as an ephemeral message only.
    pub fn typing(salt: [u8; 16], sender_uri: &str, room_uri: &str) -> Self {
        let part = NestedPart {
            disposition: Disposition::UNSPECIFIED,
            language: String::new(),
            body: PartBody::Single {
                content_type: TYPING.to_owned(),
                content: Vec::new(),
            },
        };
        Self::with_part(salt, sender_uri, room_uri, part)
    }

    /// A new Markdown text for `target` (`replaces` with the new body).
    pub fn edit(
        salt: [u8; 16],
        sender_uri: &str,
        room_uri: &str,
        target: MessageId,
        text: &str,
    ) -> Self {
        let mut content = Self::markdown(salt, sender_uri, room_uri, text);
        content.replaces = Some(target);
        content
    }

    /// Retracts `target` (`replaces` with a null part); for a reaction, an "unlike".
    pub fn delete(salt: [u8; 16], sender_uri: &str, room_uri: &str, target: MessageId) -> Self {
        let part = NestedPart {
            disposition: Disposition::RENDER,
            language: String::new(),
            body: PartBody::Null,
        };
        let mut content = Self::with_part(salt, sender_uri, room_uri, part);
        content.replaces = Some(target);
        content
    }

    /// The same content as a reply to `target`.
    pub fn replying_to(mut self, target: MessageId) -> Self {
        self.in_reply_to = Some(target);
        self
    }

    /// The same content, expiring as `expires` says.
    pub fn expiring(mut self, expires: Expiration) -> Self {
        self.expires = Some(expires);
        self
    }

    /// What this content means to a messaging client. `replaces` decides first (an edit or a
    /// delete), then the reaction disposition with a target; unknown dispositions count as
    /// `render`, as the draft requires.
    pub fn meaning(&self) -> Meaning<'_> {
        let text = self.text_body();
        match (self.replaces, &self.part.body, text) {
            (Some(target), PartBody::Null, _) => Meaning::Delete { target },
            (Some(target), _, Some(text)) => Meaning::Edit { target, text },
            (Some(_), _, None) => Meaning::Unsupported {
                reply_to: self.in_reply_to,
            },
            (None, _, Some(emoji)) if self.part.disposition == Disposition::REACTION => {
                match self.in_reply_to {
                    Some(target) => Meaning::Reaction { target, emoji },
                    // A reaction to nothing reads best as what it says.
                    None => Meaning::Text {
                        text: emoji,
                        reply_to: None,
                    },
                }
            }
            (None, _, Some(text)) => Meaning::Text {
                text,
                reply_to: self.in_reply_to,
            },
            (
                None,
                PartBody::Single {
                    content_type,
                    content,
                },
                None,
            ) if content_type == MESSAGE_STATUS => Meaning::Status { report: content },
            (None, PartBody::Single { content_type, .. }, None) if content_type == TYPING => {
                Meaning::Typing
            }
            (None, PartBody::External(file), None) => Meaning::File {
                file,
                reply_to: self.in_reply_to,
            },
            (None, _, None) => Meaning::Unsupported {
                reply_to: self.in_reply_to,
            },
        }
    }

    /// The text of a single text part, if this message is one.
    pub fn text_body(&self) -> Option<&str> {
        match &self.part.body {
            PartBody::Single {
                content_type,
                content,
            } if content_type.starts_with("text/") => std::str::from_utf8(content).ok(),
            _ => None,
        }
    }

    /// This message's id, derived from its encoding as the draft requires.
    pub fn message_id(&self) -> MessageId {
        MessageId::compute(
            self.sender_uri.as_deref().unwrap_or_default(),
            self.room_uri.as_deref().unwrap_or_default(),
            &self.encode(),
            &self.salt,
        )
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut extensions = Vec::new();
        if let Some(s) = &self.sender_uri {
            extensions.push((Value::from(EXT_SENDER_URI), Value::from(s.as_str())));
        }
        if let Some(r) = &self.room_uri {
            extensions.push((Value::from(EXT_ROOM_URI), Value::from(r.as_str())));
        }
        let value = Value::Array(vec![
            Value::Bytes(self.salt.to_vec()),
            opt_id(&self.replaces),
            Value::Bytes(self.topic_id.clone()),
            match self.expires {
                None => Value::Null,
                Some(e) => Value::Array(vec![Value::Bool(e.relative), Value::from(e.time)]),
            },
            opt_id(&self.in_reply_to),
            Value::Map(extensions),
            encode_part(&self.part),
        ]);
        let mut out = Vec::new();
        // Writing CBOR into a Vec cannot fail: the only error source is the writer.
        ciborium::into_writer(&value, &mut out).expect("CBOR into Vec is infallible");
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ContentError> {
        if bytes.len() > MAX_CONTENT_BYTES {
            return Err(ContentError::TooLarge(bytes.len()));
        }
        let value: Value =
            ciborium::from_reader(bytes).map_err(|e| ContentError::Cbor(e.to_string()))?;
        let Value::Array(items) = value else {
            return Err(ContentError::Schema("content is not an array"));
        };
        let [salt, replaces, topic, expires, reply, ext, part] = <[Value; 7]>::try_from(items)
            .map_err(|_| ContentError::Schema("content needs 7 items"))?;
        let salt = match salt {
            Value::Bytes(b) => <[u8; 16]>::try_from(b)
                .map_err(|_| ContentError::Schema("salt must be 16 bytes"))?,
            _ => return Err(ContentError::Schema("salt must be bytes")),
        };
        let expires = match expires {
            Value::Null => None,
            Value::Array(a) => match a.as_slice() {
                [Value::Bool(relative), time] => Some(Expiration {
                    relative: *relative,
                    time: uint(time)?,
                }),
                _ => return Err(ContentError::Schema("bad expiration")),
            },
            _ => return Err(ContentError::Schema("bad expiration")),
        };
        let (sender_uri, room_uri) = decode_extensions(ext)?;
        Ok(Self {
            salt,
            replaces: decode_opt_id(replaces)?,
            topic_id: bytes_of(topic, "topicId must be bytes")?,
            expires,
            in_reply_to: decode_opt_id(reply)?,
            sender_uri,
            room_uri,
            part: decode_part(part, 0)?,
        })
    }
}

/// A single text part.
fn text_part(disposition: Disposition, content_type: &str, text: &str) -> NestedPart {
    NestedPart {
        disposition,
        language: String::new(),
        body: PartBody::Single {
            content_type: content_type.to_owned(),
            content: text.as_bytes().to_vec(),
        },
    }
}

fn opt_id(id: &Option<MessageId>) -> Value {
    id.map_or(Value::Null, |id| Value::Bytes(id.0.to_vec()))
}

fn decode_opt_id(v: Value) -> Result<Option<MessageId>, ContentError> {
    match v {
        Value::Null => Ok(None),
        Value::Bytes(b) => MessageId::from_slice(&b)
            .map(Some)
            .ok_or(ContentError::Schema("MessageId must be 32 bytes")),
        _ => Err(ContentError::Schema("MessageId must be bytes or null")),
    }
}

fn decode_extensions(v: Value) -> Result<(Option<String>, Option<String>), ContentError> {
    let Value::Map(entries) = v else {
        return Err(ContentError::Schema("extensions must be a map"));
    };
    let (mut sender, mut room) = (None, None);
    for (k, v) in entries {
        let key = k.as_integer().and_then(|i| i64::try_from(i).ok());
        match (key, v) {
            (Some(EXT_SENDER_URI), Value::Text(s)) => sender = Some(s),
            (Some(EXT_ROOM_URI), Value::Text(s)) => room = Some(s),
            (Some(EXT_SENDER_URI | EXT_ROOM_URI), _) => {
                return Err(ContentError::Schema("senderUri/roomUri must be text"))
            }
            _ => {} // unknown extensions are ignored, as the draft requires
        }
    }
    Ok((sender, room))
}

fn encode_part(p: &NestedPart) -> Value {
    let mut items = vec![
        Value::from(p.disposition.0),
        Value::from(p.language.as_str()),
    ];
    match &p.body {
        PartBody::Null => items.push(Value::from(0)),
        PartBody::Single {
            content_type,
            content,
        } => items.extend([
            Value::from(1),
            Value::from(content_type.as_str()),
            Value::Bytes(content.clone()),
        ]),
        PartBody::External(e) => items.extend([
            Value::from(2),
            Value::from(e.content_type.as_str()),
            Value::from(e.url.as_str()),
            Value::from(e.expires),
            Value::from(e.size),
            Value::from(e.enc_alg),
            Value::Bytes(e.key.clone()),
            Value::Bytes(e.nonce.clone()),
            Value::Bytes(e.aad.clone()),
            Value::from(e.hash_alg),
            Value::Bytes(e.content_hash.clone()),
            Value::from(e.description.as_str()),
            Value::from(e.filename.as_str()),
        ]),
        PartBody::Multi { semantics, parts } => items.extend([
            Value::from(3),
            Value::from(*semantics),
            Value::Array(parts.iter().map(encode_part).collect()),
        ]),
    }
    Value::Array(items)
}

fn uint<T: TryFrom<i128>>(v: &Value) -> Result<T, ContentError> {
    v.as_integer()
        .and_then(|i| T::try_from(i128::from(i)).ok())
        .ok_or(ContentError::Schema(
            "expected an unsigned integer in range",
        ))
}

fn text_of(v: Value, what: &'static str) -> Result<String, ContentError> {
    match v {
        Value::Text(s) => Ok(s),
        _ => Err(ContentError::Schema(what)),
    }
}

fn bytes_of(v: Value, what: &'static str) -> Result<Vec<u8>, ContentError> {
    match v {
        Value::Bytes(b) => Ok(b),
        _ => Err(ContentError::Schema(what)),
    }
}

fn decode_part(v: Value, depth: usize) -> Result<NestedPart, ContentError> {
    if depth > MAX_PART_DEPTH {
        return Err(ContentError::Schema("parts nested too deeply"));
    }
    let Value::Array(items) = v else {
        return Err(ContentError::Schema("NestedPart must be an array"));
    };
    let mut it = items.into_iter();
    let mut next = || {
        it.next()
            .ok_or(ContentError::Schema("NestedPart too short"))
    };
    let disposition = Disposition(uint(&next()?)?);
    let language = text_of(next()?, "language must be text")?;
    let cardinality: u8 = uint(&next()?)?;
    let body = match cardinality {
        0 => PartBody::Null,
        1 => PartBody::Single {
            content_type: text_of(next()?, "contentType must be text")?,
            content: bytes_of(next()?, "content must be bytes")?,
        },
        2 => PartBody::External(Box::new(ExternalPart {
            content_type: text_of(next()?, "contentType must be text")?,
            url: text_of(next()?, "url must be text")?,
            expires: uint(&next()?)?,
            size: uint(&next()?)?,
            enc_alg: uint(&next()?)?,
            key: bytes_of(next()?, "key must be bytes")?,
            nonce: bytes_of(next()?, "nonce must be bytes")?,
            aad: bytes_of(next()?, "aad must be bytes")?,
            hash_alg: uint(&next()?)?,
            content_hash: bytes_of(next()?, "contentHash must be bytes")?,
            description: text_of(next()?, "description must be text")?,
            filename: text_of(next()?, "filename must be text")?,
        })),
        3 => {
            let semantics = uint(&next()?)?;
            let Value::Array(parts) = next()? else {
                return Err(ContentError::Schema("parts must be an array"));
            };
            if parts.len() < 2 {
                return Err(ContentError::Schema("a multipart needs at least 2 parts"));
            }
            let parts = parts
                .into_iter()
                .map(|p| decode_part(p, depth + 1))
                .collect::<Result<_, _>>()?;
            PartBody::Multi { semantics, parts }
        }
        _ => return Err(ContentError::Schema("unknown part cardinality")),
    };
    if next().is_ok() {
        return Err(ContentError::Schema("NestedPart has extra items"));
    }
    Ok(NestedPart {
        disposition,
        language,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALICE: &str = "mimi://chirp.test/u/alice";
    const ROOM: &str = "mimi://chirp.test/r/00112233445566778899aabbccddeeff";

    #[test]
    fn text_round_trips_and_has_a_stable_id() {
        let m = MimiContent::text([9; 16], ALICE, ROOM, "hello, wave");
        let bytes = m.encode();
        let back = MimiContent::decode(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.text_body(), Some("hello, wave"));
        let id = m.message_id();
        assert_eq!(id.0[0], 0x01);
        assert_eq!(id, back.message_id());
        // A different salt gives a different id for the same text.
        assert_ne!(
            id,
            MimiContent::text([8; 16], ALICE, ROOM, "hello, wave").message_id()
        );
    }

    #[test]
    fn message_id_matches_the_drafts_formula() {
        let m = MimiContent::text([1; 16], ALICE, ROOM, "x");
        let enc = m.encode();
        let mut input = Vec::new();
        input.extend_from_slice(&(ALICE.len() as u16).to_be_bytes());
        input.extend_from_slice(ALICE.as_bytes());
        input.extend_from_slice(&(ROOM.len() as u16).to_be_bytes());
        input.extend_from_slice(ROOM.as_bytes());
        input.extend_from_slice(&enc);
        input.extend_from_slice(&[1; 16]);
        let digest = Sha256::digest(&input);
        assert_eq!(&m.message_id().0[1..], &digest[..31]);
    }

    #[test]
    fn layout_is_the_drafts_seven_item_array() {
        let m = MimiContent::text([0; 16], ALICE, ROOM, "hi");
        let v: Value = ciborium::from_reader(m.encode().as_slice()).unwrap();
        let items = v.as_array().unwrap();
        assert_eq!(items.len(), 7);
        assert_eq!(items[0].as_bytes().unwrap().len(), 16);
        assert!(items[1].is_null() && items[3].is_null() && items[4].is_null());
        // NestedPart: [render=1, "", single=1, contentType, content]
        let part = items[6].as_array().unwrap();
        assert_eq!(part.len(), 5);
        assert_eq!(part[2], Value::from(1));
    }

    #[test]
    fn malformed_content_is_an_error() {
        for bad in [
            &b""[..],
            &[0xff],
            &[0x80],                      // empty array
            &[0x87, 0, 0, 0, 0, 0, 0, 0], // seven integers
        ] {
            assert!(MimiContent::decode(bad).is_err());
        }
        assert_eq!(
            MimiContent::decode(&vec![0; MAX_CONTENT_BYTES + 1]),
            Err(ContentError::TooLarge(MAX_CONTENT_BYTES + 1))
        );
    }

    fn target() -> MessageId {
        MimiContent::text([7; 16], ALICE, ROOM, "the original").message_id()
    }

    #[test]
    fn markdown_uses_the_gfm_mimi_type_and_escapes_html() {
        let m = MimiContent::markdown([1; 16], ALICE, ROOM, "**big** <b>news</b>");
        let PartBody::Single { content_type, .. } = &m.part.body else {
            panic!("a single part");
        };
        assert_eq!(content_type, TEXT_MARKDOWN);
        assert_eq!(m.text_body(), Some("**big** &lt;b>news&lt;/b>"));
        assert_eq!(
            m.meaning(),
            Meaning::Text {
                text: "**big** &lt;b>news&lt;/b>",
                reply_to: None
            }
        );
        assert_eq!(MimiContent::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn replies_reactions_edits_and_deletes_mean_what_they_say() {
        let reply = MimiContent::markdown([1; 16], ALICE, ROOM, "right on").replying_to(target());
        let reaction = MimiContent::reaction([2; 16], ALICE, ROOM, target(), "\u{2764}");
        let edit = MimiContent::edit([3; 16], ALICE, ROOM, target(), "fixed");
        let delete = MimiContent::delete([4; 16], ALICE, ROOM, target());
        let cases = [
            (
                &reply,
                Meaning::Text {
                    text: "right on",
                    reply_to: Some(target()),
                },
            ),
            (
                &reaction,
                Meaning::Reaction {
                    target: target(),
                    emoji: "\u{2764}",
                },
            ),
            (
                &edit,
                Meaning::Edit {
                    target: target(),
                    text: "fixed",
                },
            ),
            (&delete, Meaning::Delete { target: target() }),
        ];
        for (content, meaning) in cases {
            let back = MimiContent::decode(&content.encode()).unwrap();
            assert_eq!(&back, content);
            assert_eq!(back.meaning(), meaning);
            assert_ne!(back.message_id(), target());
        }
        // The draft's layout: the reaction disposition, the target in inReplyTo (item 4); an
        // edit's and a delete's target in replaces (item 1), a delete's part a null part.
        let v: Value = ciborium::from_reader(reaction.encode().as_slice()).unwrap();
        let items = v.as_array().unwrap();
        assert_eq!(items[4].as_bytes().unwrap(), &target().0);
        assert_eq!(items[6].as_array().unwrap()[0], Value::from(2));
        let v: Value = ciborium::from_reader(delete.encode().as_slice()).unwrap();
        let items = v.as_array().unwrap();
        assert_eq!(items[1].as_bytes().unwrap(), &target().0);
        assert_eq!(items[6].as_array().unwrap()[2], Value::from(0));
    }

    #[test]
    fn attachments_use_the_drafts_external_part_layout() {
        let file = ExternalPart {
            content_type: "video/mp4".into(),
            url: "https://example.com/storage/8ksB4bSrrRE.mp4".into(),
            expires: 0,
            size: 708_234_961,
            enc_alg: ENC_ALG_AES_128_GCM,
            key: vec![0x21; 16],
            nonce: vec![0xc8; 12],
            aad: vec![],
            hash_alg: HASH_ALG_SHA256,
            content_hash: vec![0x9a; 32],
            description: "2 hours of key signing video".into(),
            filename: "bigfile.mp4".into(),
        };
        let m = MimiContent::attachment([1; 16], ALICE, ROOM, file.clone());
        let v: Value = ciborium::from_reader(m.encode().as_slice()).unwrap();
        let part = v.as_array().unwrap()[6].as_array().unwrap().clone();
        // [attachment=6, "", external=2, contentType, url, expires, size, encAlg=1, key, nonce,
        //  aad, hashAlg=1, contentHash, description, filename]
        assert_eq!(part.len(), 15);
        assert_eq!(
            (&part[0], &part[2], &part[7], &part[11]),
            (
                &Value::from(6),
                &Value::from(2),
                &Value::from(1),
                &Value::from(1)
            )
        );
        assert_eq!(part[14], Value::from("bigfile.mp4"));
        assert_eq!(
            m.meaning(),
            Meaning::File {
                file: &file,
                reply_to: None
            }
        );
        // Replacing a message by a file is no edit Parley understands.
        let mut odd = m.clone();
        odd.replaces = Some(target());
        assert_eq!(odd.meaning(), Meaning::Unsupported { reply_to: None });
    }

    #[test]
    fn status_reports_follow_the_drafts_example() {
        // draft-mahy-mimi-message-status-01, section 5: four messages read, read, unread,
        // expired; its CBOR is 84 82 58 20 <id> 02 ...
        let id = |first: u8| {
            let mut id = [first; 32];
            id[0] = 0x01;
            MessageId(id)
        };
        let report = StatusReport(vec![
            (id(0x7c), MessageStatus::Read),
            (id(0x53), MessageStatus::Read),
            (id(0x8d), MessageStatus::Unread),
            (id(0xe5), MessageStatus::Expired),
        ]);
        let typing = MimiContent::typing([2; 16], ALICE, ROOM);
        assert_eq!(
            MimiContent::decode(&typing.encode()).unwrap().meaning(),
            Meaning::Typing
        );
        let bytes = report.encode();
        assert_eq!(&bytes[..4], &[0x84, 0x82, 0x58, 0x20]);
        assert_eq!(bytes[4..36], id(0x7c).0);
        assert_eq!(bytes[36], 0x02);
        assert_eq!(StatusReport::decode(&bytes).unwrap(), report);
        let m = MimiContent::status([1; 16], ALICE, ROOM, &report);
        let back = MimiContent::decode(&m.encode()).unwrap();
        assert_eq!(back.meaning(), Meaning::Status { report: &bytes });
        assert_eq!(back.text_body(), None);
        // Statuses the draft does not define are kept, not refused.
        let odd = StatusReport(vec![(id(1), MessageStatus::from_code(200))]);
        assert_eq!(
            StatusReport::decode(&odd.encode()).unwrap().0[0].1,
            MessageStatus::Unknown(200)
        );
        for bad in [&[0xa0][..], &[0x81, 0x01], &[0x81, 0x82, 0x41, 0x00, 0x01]] {
            assert!(StatusReport::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn odd_combinations_are_read_safely() {
        // A reaction without a target is shown as text; an unknown disposition renders.
        let mut lonely = MimiContent::reaction([1; 16], ALICE, ROOM, target(), "+1");
        lonely.in_reply_to = None;
        assert_eq!(
            lonely.meaning(),
            Meaning::Text {
                text: "+1",
                reply_to: None
            }
        );
        let mut odd = MimiContent::text([1; 16], ALICE, ROOM, "hi");
        odd.part.disposition = Disposition(200);
        assert!(matches!(odd.meaning(), Meaning::Text { text: "hi", .. }));
        // A replacement with a body that is no text, and a null part without `replaces`.
        let mut binary = MimiContent::edit([1; 16], ALICE, ROOM, target(), "x");
        binary.part.body = PartBody::Single {
            content_type: "image/png".into(),
            content: vec![1, 2],
        };
        assert_eq!(binary.meaning(), Meaning::Unsupported { reply_to: None });
        let mut null = MimiContent::delete([1; 16], ALICE, ROOM, target());
        null.replaces = None;
        assert_eq!(null.meaning(), Meaning::Unsupported { reply_to: None });
    }

    #[test]
    fn expirations_give_a_deadline() {
        let at = Expiration::at(1_700_000_000);
        assert_eq!(
            at.deadline_ms(5),
            1_700_000_000_000,
            "absolute ignores arrival"
        );
        let relative = Expiration {
            relative: true,
            time: 30,
        };
        assert_eq!(relative.deadline_ms(1_000), 31_000);
        let m = MimiContent::markdown([1; 16], ALICE, ROOM, "soon gone").expiring(at);
        let back = MimiContent::decode(&m.encode()).unwrap();
        assert_eq!(back.expires, Some(at));
        let v: Value = ciborium::from_reader(m.encode().as_slice()).unwrap();
        let expires = v.as_array().unwrap()[3].as_array().unwrap().clone();
        assert_eq!(
            expires,
            vec![Value::Bool(false), Value::from(1_700_000_000u32)]
        );
    }

    fn arb_external() -> impl Strategy<Value = ExternalPart> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..40);
        (
            (
                "[a-z/]{1,20}",
                "\\PC{0,40}",
                any::<u32>(),
                any::<u64>(),
                any::<u16>(),
            ),
            (bytes(), bytes(), bytes(), any::<u8>(), bytes()),
            ("\\PC{0,20}", "\\PC{0,20}"),
        )
            .prop_map(
                |(
                    (content_type, url, expires, size, enc_alg),
                    (key, nonce, aad, hash_alg, content_hash),
                    (description, filename),
                )| ExternalPart {
                    content_type,
                    url,
                    expires,
                    size,
                    enc_alg,
                    key,
                    nonce,
                    aad,
                    hash_alg,
                    content_hash,
                    description,
                    filename,
                },
            )
    }

    fn arb_part() -> impl Strategy<Value = NestedPart> {
        let leaf = prop_oneof![
            Just(PartBody::Null),
            arb_external().prop_map(|e| PartBody::External(Box::new(e))),
            (
                "[a-z/]{1,20}",
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(content_type, content)| PartBody::Single {
                    content_type,
                    content
                }),
        ];
        let body = leaf.prop_recursive(2, 8, 4, |inner| {
            (0u8..3, proptest::collection::vec(inner, 2..4)).prop_map(|(semantics, bodies)| {
                PartBody::Multi {
                    semantics,
                    parts: bodies
                        .into_iter()
                        .map(|body| NestedPart {
                            disposition: Disposition::RENDER,
                            language: "en".into(),
                            body,
                        })
                        .collect(),
                }
            })
        });
        (0u8..10, "[a-z]{0,5}", body).prop_map(|(d, language, body)| NestedPart {
            disposition: Disposition(d),
            language,
            body,
        })
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = MimiContent::decode(&bytes);
        }

        #[test]
        fn mutated_content_never_panics(pos in 0usize..200, byte in any::<u8>()) {
            let mut enc = MimiContent::text([3; 16], ALICE, ROOM, "some text to mutate").encode();
            let i = pos % enc.len();
            enc[i] = byte;
            let _ = MimiContent::decode(&enc);
        }

        #[test]
        fn rich_content_round_trips_with_its_meaning(
            salt in any::<[u8; 16]>(),
            target in any::<[u8; 32]>(),
            text in "\\PC{0,40}",
            kind in 0u8..4,
            expires in proptest::option::of((any::<bool>(), any::<u32>())),
        ) {
            let target = MessageId(target);
            let mut m = match kind {
                0 => MimiContent::markdown(salt, ALICE, ROOM, &text).replying_to(target),
                1 => MimiContent::reaction(salt, ALICE, ROOM, target, &text),
                2 => MimiContent::edit(salt, ALICE, ROOM, target, &text),
                _ => MimiContent::delete(salt, ALICE, ROOM, target),
            };
            m.expires = expires.map(|(relative, time)| Expiration { relative, time });
            let back = MimiContent::decode(&m.encode()).unwrap();
            prop_assert_eq!(&back, &m);
            let meaning = back.meaning();
            let fits = match (kind, meaning) {
                (0, Meaning::Text { reply_to, .. }) => reply_to == Some(target),
                (1, Meaning::Reaction { target: t, emoji }) => t == target && emoji == text,
                (2, Meaning::Edit { target: t, .. }) | (3, Meaning::Delete { target: t }) => {
                    t == target
                }
                _ => false,
            };
            prop_assert!(fits, "kind {} read as {:?}", kind, meaning);
        }

        #[test]
        fn attachments_round_trip_as_files(
            salt in any::<[u8; 16]>(),
            file in arb_external(),
            reply in proptest::option::of(any::<[u8; 32]>()),
        ) {
            let mut m = MimiContent::attachment(salt, ALICE, ROOM, file.clone());
            m.in_reply_to = reply.map(MessageId);
            let back = MimiContent::decode(&m.encode()).unwrap();
            prop_assert_eq!(&back, &m);
            prop_assert_eq!(back.part.disposition, Disposition::ATTACHMENT);
            prop_assert_eq!(
                back.meaning(),
                Meaning::File { file: &file, reply_to: reply.map(MessageId) }
            );
        }

        #[test]
        fn status_reports_round_trip(
            entries in proptest::collection::vec((any::<[u8; 32]>(), any::<u8>()), 0..20),
        ) {
            let report = StatusReport(
                entries
                    .into_iter()
                    .map(|(id, code)| (MessageId(id), MessageStatus::from_code(code)))
                    .collect(),
            );
            for (_, status) in &report.0 {
                prop_assert_eq!(MessageStatus::from_code(status.code()), *status);
            }
            prop_assert_eq!(StatusReport::decode(&report.encode()).unwrap(), report);
        }

        #[test]
        fn status_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = StatusReport::decode(&bytes);
        }

        #[test]
        fn any_content_round_trips(salt in any::<[u8; 16]>(), part in arb_part(), reply in proptest::option::of(any::<[u8; 32]>())) {
            let m = MimiContent {
                salt,
                replaces: None,
                topic_id: vec![],
                expires: Some(Expiration { relative: true, time: 60 }),
                in_reply_to: reply.map(MessageId),
                sender_uri: Some(ALICE.into()),
                room_uri: None,
                part,
            };
            prop_assert_eq!(MimiContent::decode(&m.encode()).unwrap(), m);
        }
    }
}
