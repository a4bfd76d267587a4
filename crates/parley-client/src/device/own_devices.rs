//! Multi-device: a user's devices share the user's rooms. A device that logs in is added to the
//! rooms by the user's existing devices (no external commit): after the server signals a change
//! of the user's devices (a `devices` queue entry), or after joining a room, a device compares
//! the account's device list with its rooms' members and commits the difference. Removing a
//! device commits its removal from every room, then deletes it from the account.

use std::collections::BTreeSet;

use parley_proto::api::DeviceInfo;
use parley_proto::ids::DeviceUri;
use parley_proto::{DeviceId, RoomId};

use super::{CommitPlan, Device, Event};
use crate::error::{ClientError, Result};
use crate::mls::ValidatedKeyPackage;

/// How one room's devices of this user differ from the user's device list.
struct DeviceChange {
    /// Listed devices the room lacks.
    add: Vec<DeviceId>,
    /// Devices in the room that the account no longer lists.
    remove: Vec<DeviceUri>,
}

/// Whether a failure may go away by itself (network, hub busy or moving on, a new device that
/// has not uploaded its KeyPackages yet), so the work is simply tried again at the next sync.
fn is_temporary(e: &ClientError) -> bool {
    e.is_retryable()
        || matches!(e, ClientError::Unreachable(_))
        || e.code() == Some("no_key_packages")
}

impl Device {
    /// This user's devices, as the server lists them (`GET /v1/devices`).
    pub fn devices(
        &self,
    ) -> impl std::future::Future<Output = Result<Vec<DeviceInfo>>> + Send + '_ {
        // Borrows only the API client: a future holding `&Device` would not be `Send`.
        self.api.devices()
    }

    /// The devices in the room's group as this device sees it, every member's (ours too).
    pub fn room_devices(&self, room: &RoomId) -> Result<Vec<DeviceUri>> {
        self.require_member(room)?;
        self.mls.members(self.profile.conn(), room)
    }

    /// Removes another device of this user: first from every room this device is in, by one
    /// commit per room removing just that device, then from the account
    /// (`DELETE /v1/devices/{id}`: the server revokes its token and drops its queue). Should a
    /// room refuse, the device stays on the account, and calling this again finishes the job.
    /// The user's other devices, which the server tells of the change, take the device out of
    /// rooms this device is not in. This device itself cannot be removed here.
    pub async fn remove_device(&mut self, device: &DeviceId) -> Result<()> {
        if device == self.device_id() {
            return Err(ClientError::InvalidInput(format!(
                "{device} is the device you are using; remove it from another of your devices"
            )));
        }
        if !self.listed_devices().await?.contains(device) {
            return Err(ClientError::UnknownDevice(device.clone()));
        }
        // Be in every room we are due to be in before looking for the device's leaves.
        self.catch_up().await?;
        let target = DeviceUri::new(self.user().clone(), device.clone());
        let plan = CommitPlan::RemoveDevices(vec![target.clone()]);
        for room in self.rooms_holding(&target)? {
            match self.commit(&room, &plan).await {
                // Removed from the room ourselves meanwhile: not ours to clean up.
                Ok(_) | Err(ClientError::NotMember(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.api.delete_device(device).await?;
        tracing::info!(%device, "device removed");
        Ok(())
    }

    /// The ids of this user's devices, as the server lists them. (`&mut`: a future holding
    /// `&Device` would not be `Send`.)
    async fn listed_devices(&mut self) -> Result<BTreeSet<DeviceId>> {
        self.api
            .devices()
            .await?
            .iter()
            .map(|d| {
                DeviceId::parse(&d.device_id).map_err(|e| {
                    ClientError::Protocol(format!("server listed a bad device id: {e}"))
                })
            })
            .collect()
    }

    /// The rooms this device is in whose group holds `device`.
    fn rooms_holding(&self, device: &DeviceUri) -> Result<Vec<RoomId>> {
        Ok(self
            .groups()?
            .into_iter()
            .filter(|(_, members)| members.contains(device))
            .map(|(room, _)| room)
            .collect())
    }

    /// Every room this device is in, with the devices of its group.
    fn groups(&self) -> Result<Vec<(RoomId, Vec<DeviceUri>)>> {
        let conn = self.profile.conn();
        let mut groups = Vec::new();
        for room in self.mls.rooms(conn)? {
            match self.mls.members(conn, &room) {
                Ok(members) => groups.push((room, members)),
                Err(ClientError::NotMember(_)) => {} // left, or removed
                Err(e) => return Err(e),
            }
        }
        Ok(groups)
    }

    /// [`Device::sync_own_devices`], leaving what fails for the next sync; only a failing
    /// profile, or this device's own removal, is an error.
    pub(super) async fn sync_own_devices_quietly(&mut self) -> Result<()> {
        match self.sync_own_devices().await {
            Err(e @ (ClientError::Storage(_) | ClientError::DeviceRemoved)) => Err(e),
            Err(e) => {
                tracing::warn!("cannot bring this user's devices and rooms in step yet: {e}");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Brings this user's devices and this device's rooms in step, if the server signalled a
    /// change of the user's devices, or this device joined a room, since the last check: adds
    /// the user's devices a room lacks (claiming just that device's KeyPackage for the room)
    /// and removes the devices the account no longer has. Every device of the user does this;
    /// the hub takes the first commit, and the others, after catching up, find nothing to do.
    async fn sync_own_devices(&mut self) -> Result<()> {
        if !self.profile.devices_stale()? {
            return Ok(());
        }
        // Cleared before looking, so that a signal processed meanwhile (by a catch-up inside a
        // commit) leaves it set for the next sync.
        self.profile.set_devices_stale(false)?;
        let outcome = self.bring_devices_in_step().await;
        if !matches!(outcome, Ok(true)) {
            self.profile.set_devices_stale(true)?;
        }
        outcome.map(drop)
    }

    /// One pass of [`Device::sync_own_devices`]; `false` if a room must be tried again later.
    async fn bring_devices_in_step(&mut self) -> Result<bool> {
        let listed = self.listed_devices().await?;
        // Every room's change is worked out before any commit: a catch-up inside a commit may
        // bring in a device that logged in after `listed` was read, which must not look deleted.
        let changes = self.device_changes(&listed)?;
        let mut done = true;
        for (room, change) in changes {
            match self.apply_device_change(&room, change).await {
                // Removed from the room meanwhile: nothing of ours to change there.
                Ok(()) | Err(ClientError::NotMember(_)) => {}
                Err(e @ (ClientError::Storage(_) | ClientError::DeviceRemoved)) => return Err(e),
                Err(e) if is_temporary(&e) => {
                    tracing::warn!(%room, "cannot bring our devices in step yet: {e}");
                    done = false;
                }
                Err(e) => {
                    tracing::warn!(%room, "cannot bring our devices in step: {e}");
                    self.profile.push_event(&Event::Error {
                        room: Some(room.clone()),
                        detail: format!("cannot add or remove a device of yours: {e}"),
                    })?;
                }
            }
        }
        Ok(done)
    }

    /// For every room this device is in: this user's listed devices its group lacks, and its
    /// devices of this user that the account no longer lists.
    fn device_changes(&self, listed: &BTreeSet<DeviceId>) -> Result<Vec<(RoomId, DeviceChange)>> {
        let mut changes = Vec::new();
        for (room, members) in self.groups()? {
            let present: BTreeSet<DeviceId> = members
                .into_iter()
                .filter(|d| d.user == *self.user())
                .map(|d| d.device)
                .collect();
            let change = DeviceChange {
                add: listed.difference(&present).cloned().collect(),
                remove: present
                    .difference(listed)
                    .filter(|d| *d != self.device_id())
                    .map(|d| DeviceUri::new(self.user().clone(), d.clone()))
                    .collect(),
            };
            if !change.add.is_empty() || !change.remove.is_empty() {
                changes.push((room, change));
            }
        }
        Ok(changes)
    }

    /// Carries out one room's change: one commit removing the gone devices, then one adding
    /// the missing ones.
    async fn apply_device_change(&mut self, room: &RoomId, change: DeviceChange) -> Result<()> {
        if !change.remove.is_empty() {
            self.commit(room, &CommitPlan::RemoveDevices(change.remove))
                .await?;
        }
        let mut key_packages = Vec::new();
        for device in &change.add {
            // Another device of ours may have added it meanwhile: then its package is kept.
            let uri = DeviceUri::new(self.user().clone(), device.clone());
            if self.room_devices(room)?.contains(&uri) {
                continue;
            }
            key_packages.extend(self.claim_own_device(room, device).await?);
        }
        if !key_packages.is_empty() {
            self.commit(room, &CommitPlan::Add(key_packages)).await?;
        }
        Ok(())
    }

    /// KeyPackages of this user's other devices for `room`, so they share the rooms this device
    /// creates. Claimed one device at a time, so this device's own package is not spent.
    pub(super) async fn own_other_devices_key_packages(
        &mut self,
        room: &RoomId,
    ) -> Result<Vec<ValidatedKeyPackage>> {
        let mut key_packages = Vec::new();
        for device in self.listed_devices().await? {
            if device != *self.device_id() {
                key_packages.extend(self.claim_own_device(room, &device).await?);
            }
        }
        Ok(key_packages)
    }

    /// One KeyPackage of this user's `device` for `room`; `None` if the device is gone (removed
    /// meanwhile) or offered nothing usable.
    async fn claim_own_device(
        &mut self,
        room: &RoomId,
        device: &DeviceId,
    ) -> Result<Option<ValidatedKeyPackage>> {
        let user = self.user().clone();
        let request = self.claim_request(&user, room, Some(device))?;
        let claimed = match self.api.claim_key_packages(&user, &request).await {
            Ok(claimed) => claimed,
            Err(e) if e.code() == Some("unknown_device") => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(self
            .validate_claimed(&user, &claimed.key_packages)
            .into_iter()
            .find(|kp| kp.device.device == *device))
    }

    /// Before leaving: MLS lets each device propose only its own removal, and a device of ours
    /// left behind would add this one back (see [`Device::sync`]), so the user's other devices
    /// are removed first, by one commit.
    pub(super) async fn remove_other_own_devices(&mut self, room: &RoomId) -> Result<()> {
        let members = self.mls.members(self.profile.conn(), room)?;
        if members.iter().all(|d| d.user == *self.user()) {
            return Err(ClientError::InvalidInput(format!(
                "you are the only member of room {room}: nobody would remain to complete your leaving"
            )));
        }
        self.commit(room, &CommitPlan::RemoveOtherOwnDevices)
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_proto::api::ErrorBody;

    fn refused(status: u16, code: &str, retryable: bool) -> ClientError {
        let body = ErrorBody {
            error: code.into(),
            message: "x".into(),
            retryable,
        };
        ClientError::from_body(status, body)
    }

    #[test]
    fn only_passing_failures_are_left_for_the_next_sync() {
        for e in [
            refused(409, "wrong_epoch", true),
            refused(503, "peer_unreachable", true),
            refused(409, "no_key_packages", false),
            ClientError::Unreachable("down".into()),
        ] {
            assert!(is_temporary(&e), "{e}");
        }
        for e in [
            refused(403, "policy", false),
            refused(403, "room_full", false),
            ClientError::Protocol("x".into()),
        ] {
            assert!(!is_temporary(&e), "{e}");
        }
    }
}
