//! One user's MLS client: an openmls signer, BasicCredential (identity = the client URI) and
//! in-memory storage, its groups, and the few operations the provider needs (KeyPackages on
//! demand, create a room, commit adds, join from a Welcome, encrypt and process messages).
//! Profile §4: ciphersuite 0x0001, handshakes as PublicMessage, no ratchet_tree extension.

use std::collections::HashMap;

use openmls::messages::group_info::{GroupInfo, VerifiableGroupInfo};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::signatures::Signer;
use thiserror::Error;
use tls_codec::Serialize as _;

use crate::components::app_data_extension_type;
use crate::ids::{ClientUri, UserUri};

/// The one ciphersuite of the profile.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// An openmls operation that failed.
#[derive(Debug, Error)]
#[error("{context}: {detail}")]
pub struct MlsError {
    context: &'static str,
    detail: String,
}

impl MlsError {
    /// An error with its context.
    pub fn new(context: &'static str, detail: impl std::fmt::Debug) -> Self {
        Self {
            context,
            detail: format!("{detail:?}"),
        }
    }
}

/// `map_err` helper: `.map_err(mls("what failed"))`.
pub fn mls<E: std::fmt::Debug>(context: &'static str) -> impl Fn(E) -> MlsError {
    move |e| MlsError::new(context, e)
}

/// Leaf capabilities every client of the profile advertises: app_data_dictionary, basic.
pub fn capabilities() -> Capabilities {
    Capabilities::new(
        None,
        Some(&[CIPHERSUITE]),
        Some(&[app_data_extension_type()]),
        None,
        Some(&[CredentialType::Basic]),
    )
}

/// The `RequiredCapabilities` of the profile (extension types `[0x0006]`, basic credentials).
pub fn required_capabilities() -> RequiredCapabilitiesExtension {
    RequiredCapabilitiesExtension::new(&[app_data_extension_type()], &[], &[CredentialType::Basic])
}

/// The group configuration used to join (mixed wire formats, no ratchet_tree extension).
fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(3)
        .use_ratchet_tree_extension(false)
        .build()
}

/// A commit this client made and has not merged yet.
pub struct CommitOutput {
    pub commit: MlsMessageIn,
    pub welcome: Option<Welcome>,
    pub group_info: Option<GroupInfo>,
}

/// What processing one handshake or application message gave.
pub enum Processed {
    /// An application message and the sender's credential identity.
    Application { sender: Vec<u8>, bytes: Vec<u8> },
    /// A commit was merged; `removed` if it removed this client.
    Commit { removed: bool },
    /// A proposal was stored as pending.
    Proposal,
}

/// One user's single MLS client.
pub struct MlsClient {
    uri: ClientUri,
    provider: OpenMlsRustCrypto,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
    groups: HashMap<Vec<u8>, MlsGroup>,
}

impl MlsClient {
    /// A new client `device` of `user`.
    pub fn new(user: &UserUri, device: &str) -> Result<Self, MlsError> {
        let uri = ClientUri::new(user, device).map_err(mls("client uri"))?;
        let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm())
            .map_err(mls("signature key"))?;
        let provider = OpenMlsRustCrypto::default();
        signer.store(provider.storage()).map_err(mls("store key"))?;
        let credential = CredentialWithKey {
            credential: BasicCredential::new(uri.to_string().into_bytes()).into(),
            signature_key: signer.public().into(),
        };
        Ok(Self {
            uri,
            provider,
            signer,
            credential,
            groups: HashMap::new(),
        })
    }

    /// The client URI.
    pub fn uri(&self) -> &ClientUri {
        &self.uri
    }

    /// The client's credential and signature key.
    pub fn credential(&self) -> &CredentialWithKey {
        &self.credential
    }

    /// The crypto provider (for verifying and hashing).
    pub fn provider(&self) -> &OpenMlsRustCrypto {
        &self.provider
    }

    /// Random bytes from the client's provider.
    pub fn random<const N: usize>(&self) -> Result<[u8; N], MlsError> {
        self.provider
            .rand()
            .random_array::<N>()
            .map_err(mls("random"))
    }

    /// `SignWithLabel(key, label, content)` (RFC 9420 §5.1.2).
    pub fn sign_with_label(&self, label: &str, content: &[u8]) -> Result<Vec<u8>, MlsError> {
        let sign_content = SignContent::new(label, content.into())
            .tls_serialize_detached()
            .map_err(mls("sign content"))?;
        self.signer.sign(&sign_content).map_err(mls("sign"))
    }

    /// A fresh KeyPackage (its private parts kept in storage until a Welcome uses them).
    pub fn key_package(&self) -> Result<KeyPackage, MlsError> {
        let bundle = KeyPackage::builder()
            .leaf_node_capabilities(capabilities())
            .build(
                CIPHERSUITE,
                &self.provider,
                &self.signer,
                self.credential.clone(),
            )
            .map_err(mls("build KeyPackage"))?;
        Ok(bundle.key_package().clone())
    }

    /// The KeyPackageRef of a KeyPackage.
    pub fn key_package_ref(&self, key_package: &KeyPackage) -> Result<Vec<u8>, MlsError> {
        Ok(key_package
            .hash_ref(self.provider.crypto())
            .map_err(mls("KeyPackageRef"))?
            .as_slice()
            .to_vec())
    }

    /// Creates a group (epoch 0, only this client) with the given GroupContext extensions.
    pub fn create_group(
        &mut self,
        group_id: &[u8],
        extensions: Extensions<GroupContext>,
    ) -> Result<(), MlsError> {
        let group = MlsGroup::builder()
            .with_group_id(GroupId::from_slice(group_id))
            .ciphersuite(CIPHERSUITE)
            .with_wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(false)
            .max_past_epochs(3)
            .with_capabilities(capabilities())
            .with_group_context_extensions(extensions)
            .build(&self.provider, &self.signer, self.credential.clone())
            .map_err(mls("create group"))?;
        self.groups.insert(group_id.to_vec(), group);
        Ok(())
    }

    fn group(&self, group_id: &[u8]) -> Result<&MlsGroup, MlsError> {
        self.groups
            .get(group_id)
            .ok_or_else(|| MlsError::new("group", "not a member"))
    }

    /// Whether this client is in the group.
    pub fn is_member(&self, group_id: &[u8]) -> bool {
        self.groups.get(group_id).is_some_and(MlsGroup::is_active)
    }

    /// The group's current GroupContext extensions.
    pub fn group_extensions(&self, group_id: &[u8]) -> Result<Extensions<GroupContext>, MlsError> {
        Ok(self.group(group_id)?.extensions().clone())
    }

    /// The GroupInfo (without tree) and the ratchet tree, as a hub needs them to follow the group.
    pub fn group_info_and_tree(
        &self,
        group_id: &[u8],
    ) -> Result<(VerifiableGroupInfo, RatchetTreeIn), MlsError> {
        let group = self.group(group_id)?;
        let info: MlsMessageIn = group
            .export_group_info(self.provider.crypto(), &self.signer, false)
            .map_err(mls("export GroupInfo"))?
            .into();
        let MlsMessageBodyIn::GroupInfo(info) = info.extract() else {
            return Err(MlsError::new("export GroupInfo", "not a GroupInfo"));
        };
        Ok((info, group.export_ratchet_tree().into()))
    }

    /// Commits adding `key_packages` together with a GroupContextExtensions proposal carrying
    /// `extensions` (all of the GroupContext's extensions). Not merged until the hub accepts.
    pub fn commit_add(
        &mut self,
        group_id: &[u8],
        key_packages: Vec<KeyPackage>,
        extensions: Extensions<GroupContext>,
    ) -> Result<CommitOutput, MlsError> {
        let provider = &self.provider;
        let signer = &self.signer;
        let group = self
            .groups
            .get_mut(group_id)
            .ok_or_else(|| MlsError::new("group", "not a member"))?;
        let bundle = group
            .commit_builder()
            .propose_adds(key_packages)
            .propose_group_context_extensions(extensions)
            .map_err(mls("GroupContextExtensions proposal"))?
            .load_psks(provider.storage())
            .map_err(mls("load psks"))?
            .create_group_info(true)
            .build(provider.rand(), provider.crypto(), signer, |_| true)
            .map_err(mls("build commit"))?
            .stage_commit(provider)
            .map_err(mls("stage commit"))?;
        let (commit, welcome, group_info) = bundle.into_contents();
        Ok(CommitOutput {
            commit: commit.into(),
            welcome,
            group_info,
        })
    }

    /// Commits a self-update (fresh leaf keys, no proposals), as a follower's client may do.
    /// Returns the commit, its GroupInfo and the ratchet tree of the new epoch.
    pub fn commit_update(
        &mut self,
        group_id: &[u8],
    ) -> Result<(MlsMessageIn, GroupInfo, RatchetTreeIn), MlsError> {
        let provider = &self.provider;
        let signer = &self.signer;
        let group = self
            .groups
            .get_mut(group_id)
            .ok_or_else(|| MlsError::new("group", "not a member"))?;
        let bundle = group
            .commit_builder()
            .force_self_update(true)
            .load_psks(provider.storage())
            .map_err(mls("load psks"))?
            .create_group_info(true)
            .build(provider.rand(), provider.crypto(), signer, |_| true)
            .map_err(mls("build commit"))?
            .stage_commit(provider)
            .map_err(mls("stage commit"))?;
        let (commit, _, group_info) = bundle.into_contents();
        let group_info = group_info.ok_or_else(|| MlsError::new("commit", "no GroupInfo"))?;
        let staged = group
            .pending_commit()
            .ok_or_else(|| MlsError::new("commit", "not staged"))?;
        let tree = staged
            .export_ratchet_tree(provider.crypto(), group.export_ratchet_tree())
            .map_err(mls("new ratchet tree"))?
            .ok_or_else(|| MlsError::new("commit", "no ratchet tree"))?;
        Ok((commit.into(), group_info, tree.into()))
    }

    /// A Remove proposal for this client's own leaf (leaving), as a PublicMessage.
    pub fn propose_leave(&mut self, group_id: &[u8]) -> Result<MlsMessageIn, MlsError> {
        let provider = &self.provider;
        let signer = &self.signer;
        let group = self
            .groups
            .get_mut(group_id)
            .ok_or_else(|| MlsError::new("group", "not a member"))?;
        Ok(group
            .leave_group(provider, signer)
            .map_err(mls("leave proposal"))?
            .into())
    }

    /// Commits the pending proposals with a GroupContextExtensions proposal carrying
    /// `extensions`. Not merged until the hub accepts.
    pub fn commit_pending(
        &mut self,
        group_id: &[u8],
        extensions: Extensions<GroupContext>,
    ) -> Result<CommitOutput, MlsError> {
        let provider = &self.provider;
        let signer = &self.signer;
        let group = self
            .groups
            .get_mut(group_id)
            .ok_or_else(|| MlsError::new("group", "not a member"))?;
        let bundle = group
            .commit_builder()
            .consume_proposal_store(true)
            .propose_group_context_extensions(extensions)
            .map_err(mls("GroupContextExtensions proposal"))?
            .load_psks(provider.storage())
            .map_err(mls("load psks"))?
            .create_group_info(true)
            .build(provider.rand(), provider.crypto(), signer, |_| true)
            .map_err(mls("build commit"))?
            .stage_commit(provider)
            .map_err(mls("stage commit"))?;
        let (commit, welcome, group_info) = bundle.into_contents();
        Ok(CommitOutput {
            commit: commit.into(),
            welcome,
            group_info,
        })
    }

    /// Merges the pending commit after the hub accepted it.
    pub fn merge_pending(&mut self, group_id: &[u8]) -> Result<(), MlsError> {
        let provider = &self.provider;
        let group = self
            .groups
            .get_mut(group_id)
            .ok_or_else(|| MlsError::new("group", "not a member"))?;
        group
            .merge_pending_commit(provider)
            .map_err(mls("merge pending commit"))
    }

    /// Drops the pending commit after the hub refused it.
    pub fn clear_pending(&mut self, group_id: &[u8]) -> Result<(), MlsError> {
        let provider = &self.provider;
        let group = self
            .groups
            .get_mut(group_id)
            .ok_or_else(|| MlsError::new("group", "not a member"))?;
        group
            .clear_pending_commit(provider.storage())
            .map_err(mls("clear pending commit"))
    }

    /// Whether one of this client's KeyPackages is among the Welcome's recipients.
    pub fn joins_with(&self, welcome: &Welcome, refs: &[Vec<u8>]) -> bool {
        welcome.secrets().iter().any(|s| {
            refs.iter()
                .any(|r| r.as_slice() == s.new_member().as_slice())
        })
    }

    /// Joins from a Welcome and the ratchet tree; returns the group id.
    pub fn join(&mut self, welcome: Welcome, tree: RatchetTreeIn) -> Result<Vec<u8>, MlsError> {
        let group =
            StagedWelcome::new_from_welcome(&self.provider, &join_config(), welcome, Some(tree))
                .map_err(mls("stage Welcome"))?
                .into_group(&self.provider)
                .map_err(mls("join from Welcome"))?;
        let id = group.group_id().as_slice().to_vec();
        self.groups.insert(id.clone(), group);
        Ok(id)
    }

    /// Drops a group this client joined by mistake.
    pub fn forget(&mut self, group_id: &[u8]) {
        if let Some(mut group) = self.groups.remove(group_id) {
            if let Err(e) = group.delete(self.provider.storage()) {
                tracing::warn!(error = ?e, "could not delete group state");
            }
        }
    }

    /// Encrypts an application message.
    pub fn encrypt(&mut self, group_id: &[u8], plaintext: &[u8]) -> Result<MlsMessageIn, MlsError> {
        let provider = &self.provider;
        let signer = &self.signer;
        let group = self
            .groups
            .get_mut(group_id)
            .ok_or_else(|| MlsError::new("group", "not a member"))?;
        let out = group
            .create_message(provider, signer, plaintext)
            .map_err(mls("encrypt"))?;
        Ok(out.into())
    }

    /// Processes a commit, proposal or application message of one of this client's groups.
    pub fn process(
        &mut self,
        group_id: &[u8],
        message: MlsMessageIn,
    ) -> Result<Processed, MlsError> {
        let provider = &self.provider;
        let group = self
            .groups
            .get_mut(group_id)
            .ok_or_else(|| MlsError::new("group", "not a member"))?;
        let message = message
            .try_into_protocol_message()
            .map_err(mls("not a protocol message"))?;
        let processed = group
            .process_message(provider, message)
            .map_err(mls("process message"))?;
        let sender = match processed.credential().credential_type() {
            CredentialType::Basic => BasicCredential::try_from(processed.credential().clone())
                .map(|c| c.identity().to_vec())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => Ok(Processed::Application {
                sender,
                bytes: app.into_bytes(),
            }),
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let removed = staged.self_removed();
                group
                    .merge_staged_commit(provider, *staged)
                    .map_err(mls("merge commit"))?;
                if removed {
                    self.groups.remove(group_id);
                }
                Ok(Processed::Commit { removed })
            }
            ProcessedMessageContent::ProposalMessage(proposal) => {
                group
                    .store_pending_proposal(provider.storage(), *proposal)
                    .map_err(mls("store proposal"))?;
                Ok(Processed::Proposal)
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => Err(MlsError::new(
                "process message",
                "external join proposals are not supported",
            )),
            #[allow(unreachable_patterns)]
            _ => Err(MlsError::new("process message", "unsupported content")),
        }
    }
}

/// Verifies `SignWithLabel(key, label, content)` (RFC 9420 §5.1.2) with openmls' crypto.
pub fn verify_with_label(
    crypto: &impl OpenMlsCrypto,
    public_key: &[u8],
    label: &str,
    content: &[u8],
    signature: &[u8],
) -> Result<(), MlsError> {
    let sign_content = SignContent::new(label, content.into())
        .tls_serialize_detached()
        .map_err(mls("sign content"))?;
    crypto
        .verify_signature(
            CIPHERSUITE.signature_algorithm(),
            &sign_content,
            public_key,
            signature,
        )
        .map_err(mls("signature"))
}

/// The identity of a BasicCredential, if it is one.
pub fn basic_identity(credential: &Credential) -> Option<String> {
    if credential.credential_type() != CredentialType::Basic {
        return None;
    }
    let basic = BasicCredential::try_from(credential.clone()).ok()?;
    String::from_utf8(basic.identity().to_vec()).ok()
}
