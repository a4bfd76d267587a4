//! MIMI content (draft-ietf-mimi-content-08, CBOR) as Parley clients send and read it
//! (docs/client-api.md, "Message content"): one inline `render` part of type
//! `text/markdown;variant=GFM-MIMI`, the `senderUri` (1) and `roomUri` (2) extensions, and the
//! 32-byte MessageId `0x01 || SHA-256(len‖senderUri‖len‖roomUri‖message‖salt)[..31]`.

use ciborium::Value;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The content type Parley sends text as.
pub const MARKDOWN: &str = "text/markdown;variant=GFM-MIMI";

const DISPOSITION_RENDER: u8 = 1;
const CARDINALITY_NULL: u8 = 0;
const CARDINALITY_SINGLE: u8 = 1;
const EXT_SENDER_URI: u8 = 1;
const EXT_ROOM_URI: u8 = 2;

/// Content that is not MIMI content this crate can read.
#[derive(Debug, Error)]
pub enum ContentError {
    #[error("content is not CBOR: {0}")]
    Cbor(String),
    #[error("content is not a MIMI content array: {0}")]
    Shape(&'static str),
    #[error("could not encode content: {0}")]
    Encode(String),
}

/// A 32-byte MessageId.
pub type MessageId = [u8; 32];

/// The body of a decoded message, as far as this provider cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// A single `text/*` part.
    Text(String),
    /// A null part (a delete).
    Null,
    /// Anything else (multipart, external, non-text).
    Unsupported,
}

/// The fields of a MIMI content message this provider reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    pub salt: [u8; 16],
    pub replaces: Option<Vec<u8>>,
    pub in_reply_to: Option<Vec<u8>>,
    pub sender_uri: Option<String>,
    pub room_uri: Option<String>,
    pub body: Body,
}

/// Computes the MessageId of an encoded message.
pub fn message_id(sender_uri: &str, room_uri: &str, message: &[u8], salt: &[u8]) -> MessageId {
    let mut hash = Sha256::new();
    for uri in [sender_uri, room_uri] {
        // The draft's lengths are uint16; longer URIs cannot occur in a valid message.
        let len = u16::try_from(uri.len()).unwrap_or(u16::MAX);
        hash.update(len.to_be_bytes());
        hash.update(uri.as_bytes());
    }
    hash.update(message);
    hash.update(salt);
    let digest = hash.finalize();
    let mut id = [0u8; 32];
    id[0] = 0x01;
    id[1..].copy_from_slice(&digest[..31]);
    id
}

/// Escapes the `<` that would open an HTML tag outside backtick code, as GFM-MIMI asks.
pub fn escape_markdown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_code = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '`' => in_code = !in_code,
            '<' if !in_code
                && chars
                    .peek()
                    .is_some_and(|n| n.is_ascii_alphabetic() || matches!(n, '/' | '!' | '?')) =>
            {
                out.push_str("&lt;");
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// Encodes a text message; returns the bytes and their MessageId.
pub fn encode_text(
    salt: [u8; 16],
    sender_uri: &str,
    room_uri: &str,
    text: &str,
) -> Result<(Vec<u8>, MessageId), ContentError> {
    let value = Value::Array(vec![
        Value::Bytes(salt.to_vec()),
        Value::Null,
        Value::Bytes(Vec::new()),
        Value::Null,
        Value::Null,
        Value::Map(vec![
            (
                Value::Integer(EXT_SENDER_URI.into()),
                Value::Text(sender_uri.into()),
            ),
            (
                Value::Integer(EXT_ROOM_URI.into()),
                Value::Text(room_uri.into()),
            ),
        ]),
        Value::Array(vec![
            Value::Integer(DISPOSITION_RENDER.into()),
            Value::Text(String::new()),
            Value::Integer(CARDINALITY_SINGLE.into()),
            Value::Text(MARKDOWN.into()),
            Value::Bytes(escape_markdown(text).into_bytes()),
        ]),
    ]);
    let mut bytes = Vec::new();
    ciborium::into_writer(&value, &mut bytes).map_err(|e| ContentError::Encode(e.to_string()))?;
    let id = message_id(sender_uri, room_uri, &bytes, &salt);
    Ok((bytes, id))
}

fn optional_bytes(value: &Value) -> Result<Option<Vec<u8>>, ContentError> {
    match value {
        Value::Null => Ok(None),
        Value::Bytes(b) => Ok(Some(b.clone())),
        _ => Err(ContentError::Shape("message id is neither null nor bytes")),
    }
}

fn small_uint(value: &Value) -> Option<u64> {
    match value {
        Value::Integer(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

fn read_body(part: &Value) -> Result<Body, ContentError> {
    let Value::Array(fields) = part else {
        return Err(ContentError::Shape("nestedPart is not an array"));
    };
    let cardinality = fields.get(2).and_then(small_uint);
    match (cardinality, fields.get(3), fields.get(4)) {
        (Some(c), _, _) if c == u64::from(CARDINALITY_NULL) => Ok(Body::Null),
        (Some(c), Some(Value::Text(content_type)), Some(Value::Bytes(content)))
            if c == u64::from(CARDINALITY_SINGLE) && content_type.starts_with("text/") =>
        {
            Ok(String::from_utf8(content.clone()).map_or(Body::Unsupported, Body::Text))
        }
        (Some(_), _, _) => Ok(Body::Unsupported),
        (None, _, _) => Err(ContentError::Shape("nestedPart has no cardinality")),
    }
}

/// Decodes MIMI content.
pub fn decode(bytes: &[u8]) -> Result<Content, ContentError> {
    let value: Value =
        ciborium::from_reader(bytes).map_err(|e| ContentError::Cbor(e.to_string()))?;
    let Value::Array(fields) = value else {
        return Err(ContentError::Shape("not an array"));
    };
    let [salt, replaces, _topic, _expires, in_reply_to, extensions, part] = fields.as_slice()
    else {
        return Err(ContentError::Shape("not seven fields"));
    };
    let salt = match salt {
        Value::Bytes(b) => <[u8; 16]>::try_from(b.as_slice())
            .map_err(|_| ContentError::Shape("salt is not 16 bytes"))?,
        _ => return Err(ContentError::Shape("salt is not bytes")),
    };
    let Value::Map(extensions) = extensions else {
        return Err(ContentError::Shape("extensions is not a map"));
    };
    let extension = |key: u8| {
        extensions
            .iter()
            .find_map(|(k, v)| match (small_uint(k), v) {
                (Some(k), Value::Text(t)) if k == u64::from(key) => Some(t.clone()),
                _ => None,
            })
    };
    Ok(Content {
        salt,
        replaces: optional_bytes(replaces)?,
        in_reply_to: optional_bytes(in_reply_to)?,
        sender_uri: extension(EXT_SENDER_URI),
        room_uri: extension(EXT_ROOM_URI),
        body: read_body(part)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// draft-ietf-mimi-content-08, examples/original.cbor and its message ID.
    const ORIGINAL: &str = "87505eed9406c2545547ab6f09f20a18b003f640f6f6a20178206d696d693a2f2f6578616d706c652e636f6d2f752f616c6963652d736d6974680278256d696d693a2f2f6578616d706c652e636f6d2f722f656e67696e656572696e675f7465616d85016001781e746578742f6d61726b646f776e3b76617269616e743d47464d2d4d494d49583948692065766572796f6e652c207765206a75737420736869707065642072656c6561736520322e302e205f5f476f6f642020776f726b5f5f21";
    const ORIGINAL_ID: &str = "017ce54837404c3696e0c747b985cb172716d0ed0a3d249ca63ace7d82a096f4";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn reads_the_drafts_example_and_its_message_id() {
        let bytes = unhex(ORIGINAL);
        let content = decode(&bytes).unwrap();
        let sender = content.sender_uri.clone().unwrap();
        let room = content.room_uri.clone().unwrap();
        assert_eq!(sender, "mimi://example.com/u/alice-smith");
        assert_eq!(
            content.body,
            Body::Text("Hi everyone, we just shipped release 2.0. __Good  work__!".into())
        );
        let id = message_id(&sender, &room, &bytes, &content.salt);
        assert_eq!(id.to_vec(), unhex(ORIGINAL_ID));
    }

    #[test]
    fn our_encoding_is_byte_identical_to_the_drafts() {
        let bytes = unhex(ORIGINAL);
        let salt: [u8; 16] = bytes[2..18].try_into().unwrap();
        let (ours, id) = encode_text(
            salt,
            "mimi://example.com/u/alice-smith",
            "mimi://example.com/r/engineering_team",
            "Hi everyone, we just shipped release 2.0. __Good  work__!",
        )
        .unwrap();
        assert_eq!(ours, bytes);
        assert_eq!(id.to_vec(), unhex(ORIGINAL_ID));
    }

    #[test]
    fn escapes_html_outside_code() {
        assert_eq!(escape_markdown("a <b> `<c>` 1 < 2"), "a &lt;b> `<c>` 1 < 2");
    }

    #[test]
    fn refuses_what_is_not_mimi_content() {
        assert!(decode(b"\x01").is_err());
        assert!(decode(&[0x80]).is_err());
        assert!(decode(b"").is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = decode(&bytes);
        }
    }
}
