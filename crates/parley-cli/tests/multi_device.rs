//! Multi-device end to end, through the client library and an in-process server: a device that
//! logs in joins all of its user's rooms (added by the user's existing devices), shares what
//! its user sends, leaves every room when removed; and a busy group with devices coming and going
//! where every device decrypts every message sent while it was a member.

mod providers;

use parley_client::{ClientError, Device, Event};
use parley_proto::ids::DeviceUri;
use parley_proto::{DeviceId, MessageId, RoomId, UserId};
use providers::*;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;

fn joined(events: &[Event]) -> BTreeSet<RoomId> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Joined { room, .. } => Some(room.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_device_joins_every_room_shares_messages_and_can_be_removed() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let mut laptop = register(dir.path(), &server, "alice@chirp.test").await;
    let mut bob = register(dir.path(), &server, "bob@wave.test").await;
    let alice = laptop.user().clone();
    let group = laptop
        .create_room(Some("team"), std::slice::from_ref(bob.user()))
        .await
        .unwrap();
    let direct = bob.direct_room(&alice).await.unwrap();
    sync(&mut laptop).await;
    laptop.send_text(&group, "before the phone").await.unwrap();
    read(&mut bob, &group).await;

    // The phone logs in: it has no rooms until one of alice's devices syncs and adds it.
    let mut phone = login(dir.path(), &server, &alice, "phone").await;
    assert!(joined(&sync(&mut phone).await).is_empty());
    assert_eq!(laptop.devices().await.unwrap().len(), 2);
    sync(&mut laptop).await;
    let rooms = joined(&sync(&mut phone).await);
    assert_eq!(rooms, BTreeSet::from([group.clone(), direct.clone()]));
    let phone_uri = phone.device_uri().clone();
    sync(&mut bob).await;
    for room in [&group, &direct] {
        assert!(bob.room_devices(room).unwrap().contains(&phone_uri));
    }

    // From then on the phone receives every new message (not the ones from before it joined).
    bob.send_text(&group, "hello both").await.unwrap();
    bob.send_text(&direct, "psst").await.unwrap();
    for device in [&mut laptop, &mut phone] {
        assert_eq!(
            read(device, &group).await,
            from("bob@wave.test", &["hello both"])
        );
    }
    assert_eq!(
        phone
            .history(&direct, 10)
            .unwrap()
            .iter()
            .map(|h| h.text.as_str())
            .collect::<Vec<_>>(),
        ["psst"]
    );

    // What alice sends from the phone reaches bob and her laptop, as from alice.
    phone.send_text(&group, "from my phone").await.unwrap();
    phone.send_text(&direct, "phone, direct").await.unwrap();
    assert_eq!(
        read(&mut bob, &group).await,
        from("alice@chirp.test", &["from my phone"])
    );
    let on_laptop: Vec<_> = sync(&mut laptop)
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::Message {
                room, sender, text, ..
            } => Some((room, sender.to_string(), text)),
            _ => None,
        })
        .collect();
    assert_eq!(
        on_laptop,
        [
            (
                group.clone(),
                alice.to_string(),
                "from my phone".to_string()
            ),
            (
                direct.clone(),
                alice.to_string(),
                "phone, direct".to_string()
            )
        ]
    );
    let last = laptop.history(&direct, 1).unwrap().remove(0);
    assert_eq!(
        (last.sender, last.text.as_str()),
        (alice.clone(), "phone, direct")
    );

    // A file alice sends from the phone is saved by the laptop too, and deleting the message
    // from the laptop deletes the upload (the server's copy) with it.
    let photo = dir.path().join("photo.jpg");
    std::fs::write(&photo, noise(10_000, 5)).unwrap();
    let sent = phone.send_file(&group, &photo).await.unwrap();
    let is_it = |e: &Event| matches!(e, Event::Message { id, .. } if *id == sent.message.id);
    sync_until(&mut laptop, is_it).await;
    sync_until(&mut bob, is_it).await;
    let upload = dir
        .path()
        .join("server/assets")
        .join(sent.url.rsplit('/').next().unwrap());
    assert!(upload.is_file());
    laptop.delete(&group, &sent.message.id).await.unwrap();
    assert!(!upload.exists(), "the upload goes with its message");
    for device in [&mut bob, &mut phone] {
        sync_until(
            device,
            |e| matches!(e, Event::Delete { target, .. } if *target == sent.message.id),
        )
        .await;
    }

    // Bob cannot take alice's devices out of their direct room; alice can, her own.
    let refused = bob.remove_member(&direct, &alice).await.unwrap_err();
    assert_eq!(refused.code(), Some("policy"), "{refused}");

    // Removing a device: refused for this device itself and for unknown ids.
    let this = laptop.device_id().clone();
    assert!(matches!(
        laptop.remove_device(&this).await,
        Err(ClientError::InvalidInput(_))
    ));
    let nobody = DeviceId::from_random([7; 8]);
    assert!(matches!(
        laptop.remove_device(&nobody).await,
        Err(ClientError::UnknownDevice(_))
    ));
    let mut phone_push = phone.api().connect_push_with(true).await.unwrap();
    laptop.remove_device(phone.device_id()).await.unwrap();
    assert_eq!(laptop.devices().await.unwrap().len(), 1);
    // Its open push connection is closed: no more entries, no typing indicators.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match phone_push.next_push().await {
                Ok(Some(_)) => continue,
                end => break end,
            }
        }
    })
    .await;
    assert!(
        matches!(closed, Ok(Ok(None)) | Ok(Err(_))),
        "still open: {closed:?}"
    );
    let gone = phone.sync(None).await.unwrap_err();
    assert!(matches!(gone, ClientError::DeviceRemoved), "{gone}");
    assert!(gone.to_string().contains("removed"), "{gone}");

    // Out of every room; everyone else goes on.
    sync(&mut bob).await;
    for room in [&group, &direct] {
        assert!(!bob.room_devices(room).unwrap().contains(&phone_uri));
        assert!(!laptop.room_devices(room).unwrap().contains(&phone_uri));
    }
    bob.send_text(&group, "after the phone").await.unwrap();
    bob.send_text(&direct, "just you").await.unwrap();
    let texts: Vec<_> = sync(&mut laptop)
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::Message { text, .. } => Some(text),
            _ => None,
        })
        .collect();
    assert_eq!(texts, ["after the phone", "just you"]);
    laptop.send_text(&group, "still here").await.unwrap();
    assert_eq!(
        read(&mut bob, &group).await,
        from("alice@chirp.test", &["still here"])
    );
    server.shutdown().await;
}

/// A device deleted from the account without first leaving its rooms (say, the removing device
/// crashed half-way) is taken out of them by the user's other devices, which the server tells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_device_is_taken_out_of_rooms_by_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let mut laptop = register(dir.path(), &server, "alice@chirp.test").await;
    let mut bob = register(dir.path(), &server, "bob@wave.test").await;
    let alice = laptop.user().clone();
    let group = laptop
        .create_room(None, std::slice::from_ref(bob.user()))
        .await
        .unwrap();
    let mut tablet = login(dir.path(), &server, &alice, "tablet").await;
    sync(&mut laptop).await;
    assert_eq!(
        joined(&sync(&mut tablet).await),
        BTreeSet::from([group.clone()])
    );
    let tablet_uri = tablet.device_uri().clone();

    laptop
        .api()
        .delete_device(tablet.device_id())
        .await
        .unwrap();
    sync(&mut laptop).await;
    assert!(!laptop.room_devices(&group).unwrap().contains(&tablet_uri));
    sync(&mut bob).await;
    assert_eq!(
        bob.room_devices(&group).unwrap().len(),
        2,
        "bob and alice's laptop"
    );
    bob.send_text(&group, "hi").await.unwrap();
    assert_eq!(
        read(&mut laptop, &group).await,
        from("bob@wave.test", &["hi"])
    );
    server.shutdown().await;
}

/// `?device=` claims one device's KeyPackage and spends none of the others'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_for_one_device_spends_only_its_key_package() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let laptop = register(dir.path(), &server, "alice@chirp.test").await;
    let alice = laptop.user().clone();
    let phone = login(dir.path(), &server, &alice, "phone").await;
    let room = RoomId::from_random(alice.domain(), [3; 16]);
    let stock = |d: &Device| {
        let api = d.api().clone();
        async move { api.key_package_count().await.unwrap().remaining }
    };
    let (laptop_before, phone_before) = (stock(&laptop).await, stock(&phone).await);
    let request = laptop
        .claim_request(&alice, &room, Some(phone.device_id()))
        .unwrap();
    let claimed = laptop
        .api()
        .claim_key_packages(&alice, &request)
        .await
        .unwrap();
    let devices: Vec<&str> = claimed
        .key_packages
        .iter()
        .map(|k| k.device_id.as_str())
        .collect();
    assert_eq!(devices, [phone.device_id().as_str()]);
    assert_eq!(stock(&phone).await, phone_before - 1);
    assert_eq!(
        stock(&laptop).await,
        laptop_before,
        "the laptop's stock is untouched"
    );
    let request = laptop
        .claim_request(&alice, &room, Some(&DeviceId::from_random([7; 8])))
        .unwrap();
    let unknown = laptop
        .api()
        .claim_key_packages(&alice, &request)
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Some("unknown_device"), "{unknown}");
    server.shutdown().await;
}

/// A user leaves with all their devices: otherwise the device left behind would add the leaver
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_takes_all_of_the_users_devices_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let mut laptop = register(dir.path(), &server, "alice@chirp.test").await;
    let mut bob = register(dir.path(), &server, "bob@wave.test").await;
    let alice = laptop.user().clone();
    let mut phone = login(dir.path(), &server, &alice, "phone").await;
    let group = laptop
        .create_room(Some("leavers"), std::slice::from_ref(bob.user()))
        .await
        .unwrap();
    assert_eq!(
        joined(&sync(&mut phone).await),
        BTreeSet::from([group.clone()])
    );

    phone.leave(&group).await.unwrap();
    let events = sync(&mut laptop).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Removed { room } if *room == group)),
        "{events:?}"
    );
    sync(&mut bob).await; // commits the phone's leave
    assert_eq!(
        bob.room_devices(&group).unwrap(),
        [bob.device_uri().clone()]
    );
    sync(&mut laptop).await;
    sync(&mut phone).await;
    assert_eq!(
        bob.room_devices(&group).unwrap().len(),
        1,
        "nobody added alice back"
    );
    assert!(laptop.send_text(&group, "let me in").await.is_err());

    // The only user of a room cannot leave it: nobody would complete the removal.
    let alone = laptop.create_room(Some("alone"), &[]).await.unwrap();
    sync(&mut phone).await;
    let refused = phone.leave(&alone).await.unwrap_err();
    assert!(matches!(refused, ClientError::InvalidInput(_)), "{refused}");
    assert_eq!(laptop.room_devices(&alone).unwrap().len(), 2);
    server.shutdown().await;
}

/// A deterministic pseudo-random sequence (no dependency, same run every time).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// One device in the busy group, alive until removed from its account.
struct Slot {
    device: Device,
    alive: bool,
}

/// The busy group: who sent what to whom, and who decrypted what.
struct Busy {
    dir: PathBuf,
    url: String,
    room: RoomId,
    slots: Vec<Slot>,
    /// Each message sent, with the devices that were members (besides the sender) when sent.
    sent: Vec<(MessageId, HashSet<DeviceUri>)>,
    received: HashMap<DeviceUri, HashSet<MessageId>>,
    logins: usize,
}

impl Busy {
    fn alive_of(&self, user: &UserId) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].alive && self.slots[i].device.user() == user)
            .collect()
    }

    /// Syncs a device and records the messages it decrypted; any failure fails the test.
    async fn sync(&mut self, i: usize) {
        let events = sync(&mut self.slots[i].device).await;
        self.record(i, events);
    }

    fn record(&mut self, i: usize, events: Vec<Event>) {
        let uri = self.slots[i].device.device_uri().clone();
        for e in events {
            assert!(
                !matches!(e, Event::Error { .. } | Event::Undecodable { .. }),
                "{uri}: {e:?}"
            );
            if let Event::Message { id, .. } = e {
                assert!(
                    self.received.entry(uri.clone()).or_default().insert(id),
                    "{uri} got {id} twice"
                );
            }
        }
    }

    /// A device that logged in joins when its Welcome is processed: sync it first if need be.
    async fn ensure_joined(&mut self, i: usize) {
        if self.slots[i].device.room_devices(&self.room).is_err() {
            self.sync(i).await;
        }
    }

    /// Sends from device `i` and notes who must decrypt it: the group's other devices in the
    /// epoch the message was accepted in, which is the sender's epoch when `send` returns.
    async fn send(&mut self, i: usize, text: &str) {
        self.ensure_joined(i).await;
        let device = &mut self.slots[i].device;
        let sent = device.send_text(&self.room, text).await.unwrap();
        let me = device.device_uri().clone();
        let members: HashSet<DeviceUri> = device
            .room_devices(&self.room)
            .unwrap()
            .into_iter()
            .filter(|d| *d != me)
            .collect();
        self.sent.push((sent.id, members));
    }

    /// A new device of `user`; the user's existing devices sync (two at once when there are
    /// two: they race to add it and the hub lets one win), which adds it to the group.
    async fn login(&mut self, user: &UserId) {
        let existing = self.alive_of(user);
        self.logins += 1;
        let name = format!("{user}-{}", self.logins);
        let device = login_at(&self.dir.join(name), &self.url, user).await;
        self.slots.push(Slot {
            device,
            alive: true,
        });
        match existing.as_slice() {
            [one] => self.sync(*one).await,
            [a, b, ..] => {
                let (a, b) = (*a, *b);
                let (low, high) = self.slots.split_at_mut(b);
                let (ea, eb) = tokio::join!(low[a].device.sync(None), high[0].device.sync(None));
                self.record(a, ea.unwrap());
                self.record(b, eb.unwrap());
            }
            [] => unreachable!("every user keeps a device"),
        }
    }

    /// Device `by` removes device `victim` of the same user, after the victim read everything
    /// it was sent (its queue is dropped with it).
    async fn remove(&mut self, by: usize, victim: usize) {
        self.sync(victim).await;
        let id = self.slots[victim].device.device_id().clone();
        self.slots[by].device.remove_device(&id).await.unwrap();
        self.slots[victim].alive = false;
        let gone = self.slots[victim].device.sync(None).await.unwrap_err();
        assert!(matches!(gone, ClientError::DeviceRemoved), "{gone}");
    }

    /// A message while another device syncs (and may commit: add or remove a device), so
    /// sends race commits and must be retried in the new epoch.
    async fn send_while_syncing(&mut self, sender: usize, syncer: usize, text: &str) {
        self.ensure_joined(sender).await;
        let (low, high) = if sender < syncer {
            let (l, h) = self.slots.split_at_mut(syncer);
            (&mut l[sender], &mut h[0])
        } else {
            let (l, h) = self.slots.split_at_mut(sender);
            (&mut h[0], &mut l[syncer])
        };
        let (sent, events) = tokio::join!(
            low.device.send_text(&self.room, text),
            high.device.sync(None)
        );
        let sent = sent.unwrap();
        let me = low.device.device_uri().clone();
        let members: HashSet<DeviceUri> = low
            .device
            .room_devices(&self.room)
            .unwrap()
            .into_iter()
            .filter(|d| *d != me)
            .collect();
        self.sent.push((sent.id, members));
        self.record(syncer, events.unwrap());
    }
}

/// The check: several users with one to three devices each, devices logging in and being
/// removed while messages flow; at the end every device that was a member when a message was
/// sent has decrypted it, nothing failed to decrypt, and the group holds exactly the devices that
/// exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn busy_group_with_devices_coming_and_going_decrypts_everything() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let users: Vec<UserId> = ["alice@chirp.test", "bob@wave.test", "carol@chirp.test"]
        .iter()
        .map(|u| UserId::parse(u).unwrap())
        .collect();
    let mut slots = Vec::new();
    for user in &users {
        slots.push(Slot {
            device: register(dir.path(), &server, &user.to_string()).await,
            alive: true,
        });
    }
    let room = slots[0]
        .device
        .create_room(Some("busy"), &users[1..])
        .await
        .unwrap();
    let mut busy = Busy {
        dir: dir.path().to_owned(),
        url: server.url(),
        room,
        slots,
        sent: Vec::new(),
        received: HashMap::new(),
        logins: 0,
    };
    for i in 0..busy.slots.len() {
        busy.sync(i).await;
    }

    let mut rng = Lcg(0x5eed);
    for step in 0..60 {
        let alive: Vec<usize> = (0..busy.slots.len())
            .filter(|&i| busy.slots[i].alive)
            .collect();
        let user = users[rng.below(users.len())].clone();
        let own = busy.alive_of(&user);
        match rng.below(10) {
            0 if own.len() < 3 => busy.login(&user).await,
            1 if own.len() > 1 => {
                let by = own[rng.below(own.len())];
                let victims: Vec<usize> = own.iter().copied().filter(|&v| v != by).collect();
                busy.remove(by, victims[rng.below(victims.len())]).await;
            }
            2 | 3 => {
                let (sender, syncer) =
                    (alive[rng.below(alive.len())], alive[rng.below(alive.len())]);
                if sender != syncer {
                    busy.send_while_syncing(sender, syncer, &format!("step {step}"))
                        .await;
                }
            }
            4 | 5 => busy.sync(alive[rng.below(alive.len())]).await,
            _ => {
                let sender = alive[rng.below(alive.len())];
                busy.send(sender, &format!("step {step}")).await;
            }
        }
    }
    // Everyone catches up (twice: a first sync may still commit a device change).
    for _ in 0..2 {
        for i in 0..busy.slots.len() {
            if busy.slots[i].alive {
                busy.sync(i).await;
            }
        }
    }

    eprintln!(
        "STATS logins {} sent {} removed {}",
        busy.logins,
        busy.sent.len(),
        busy.slots.iter().filter(|s| !s.alive).count()
    );
    assert!(
        busy.logins >= 3 && busy.sent.len() >= 20,
        "a busy enough run"
    );
    assert!(busy.slots.iter().any(|s| !s.alive), "a device was removed");
    let empty = HashSet::new();
    for (id, members) in &busy.sent {
        for device in members {
            let got = busy.received.get(device).unwrap_or(&empty);
            assert!(got.contains(id), "{device} never decrypted {id}");
        }
    }
    let existing: HashSet<DeviceUri> = busy
        .slots
        .iter()
        .filter(|s| s.alive)
        .map(|s| s.device.device_uri().clone())
        .collect();
    for slot in busy.slots.iter().filter(|s| s.alive) {
        let in_room: HashSet<DeviceUri> = slot
            .device
            .room_devices(&busy.room)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(in_room, existing, "as {} sees it", slot.device.device_uri());
    }
    server.shutdown().await;
}
