//! The byte strings MIMI signs and encrypts with MLS's labelled operations (RFC 9420 §5.1.2,
//! §5.1.3). Callers sign or seal them with openmls's crypto; nothing here is cryptographic.

use tls_codec::{Serialize as _, TlsSerialize, TlsSize, VLBytes};

pub const KEY_MATERIAL_REQUEST_TBS: &str = "KeyMaterialRequestTBS";
pub const GROUP_INFO_REQUEST_TBS: &str = "GroupInfoRequestTBS";
pub const GROUP_INFO_RESPONSE_TBS: &str = "GroupInfoResponseTBS";
/// EncryptWithLabel label of the groupInfo answer (§5.6).
pub const GROUP_INFO_ENCRYPTION: &str = "GroupInfo and ratchet_tree encryption";

#[derive(TlsSerialize, TlsSize)]
struct Labelled {
    label: VLBytes,
    content: VLBytes,
}

fn labelled(label: &str, content: &[u8]) -> Vec<u8> {
    Labelled {
        label: format!("MLS 1.0 {label}").into_bytes().into(),
        content: content.to_vec().into(),
    }
    .tls_serialize_detached()
    // Vectors this short always encode.
    .unwrap_or_default()
}

/// `SignContent` for SignWithLabel(key, label, content): `struct { opaque label<V> = "MLS 1.0 " +
/// label; opaque content<V>; }`, the bytes the signature scheme signs.
pub fn sign_content(label: &str, content: &[u8]) -> Vec<u8> {
    labelled(label, content)
}

/// `EncryptContext` for EncryptWithLabel(key, label, context, plaintext): the HPKE `info`.
pub fn encrypt_context(label: &str, context: &[u8]) -> Vec<u8> {
    labelled(label, context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_carry_the_mls_prefix_and_lengths() {
        let c = sign_content("KeyMaterialRequestTBS", &[1, 2]);
        let label = b"MLS 1.0 KeyMaterialRequestTBS";
        assert_eq!(c[0] as usize, label.len());
        assert_eq!(&c[1..1 + label.len()], label);
        assert_eq!(&c[1 + label.len()..], &[2, 1, 2]);
    }
}
