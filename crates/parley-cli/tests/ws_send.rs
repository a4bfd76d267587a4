//! Sending over the push WebSocket (`send` frames, docs/client-api.md): in JSON and in binary
//! (CBOR) framing, a message is answered `sent` with its place in the room once durable and
//! reaches the other member end to end; a refused send is answered `refused` with the status
//! and error body HTTP would give and stores nothing; a frame that is not one closes the
//! connection.

mod providers;

use parley_client::{Push, PushConnection, PushOptions};
use parley_proto::RoomId;
use providers::*;
use std::time::Duration;

async fn next_answer(conn: &mut PushConnection) -> Push {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match conn.next_push().await.unwrap() {
                Some(answer @ (Push::Sent { .. } | Push::Refused { .. })) => return answer,
                Some(_) => continue,
                None => panic!("the server closed the connection"),
            }
        }
    })
    .await
    .expect("no answer to a send")
}

/// The texts `device` gets in `room` on its next sync.
async fn texts(device: &mut parley_client::Device, room: &RoomId) -> Vec<String> {
    let events = sync(device).await;
    messages_in(events, room)
        .into_iter()
        .map(|(_, text)| text)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_over_the_websocket_are_durable_answered_and_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::one_server(dir.path(), |_| {}).await;
    let mut alice = net.register("alice@chirp.test").await;
    let mut bob = net.register("bob@wave.test").await;
    let room = alice.direct_room(bob.user()).await.unwrap();
    sync(&mut bob).await;

    let mut last_event = 0;
    for binary in [false, true] {
        let options = PushOptions {
            ephemeral: false,
            binary,
        };
        let mut conn = alice.api().connect_push_opts(options).await.unwrap();
        let first = alice
            .encrypt_text(&room, &format!("one (binary {binary})"))
            .unwrap();
        let second = alice
            .encrypt_text(&room, &format!("two (binary {binary})"))
            .unwrap();
        conn.send_messages([(1, &room, first.as_slice()), (2, &room, second.as_slice())])
            .await
            .unwrap();
        let mut events = Vec::new();
        for _ in 0..2 {
            match next_answer(&mut conn).await {
                Push::Sent { id, accepted } => events.push((id, accepted.event)),
                other => panic!("binary {binary}: {other:?}"),
            }
        }
        events.sort();
        assert_eq!(
            events.iter().map(|e| e.0).collect::<Vec<_>>(),
            [1, 2],
            "each send answered once, by its id"
        );
        assert!(
            events[0].1 > last_event && events[1].1 > last_event,
            "{events:?}"
        );
        last_event = events[0].1.max(events[1].1);
        let got = texts(&mut bob, &room).await;
        assert_eq!(
            got.len(),
            2,
            "binary {binary}: bob reads both, decrypted: {got:?}"
        );
        assert!(got.contains(&format!("one (binary {binary})")), "{got:?}");
        assert!(got.contains(&format!("two (binary {binary})")), "{got:?}");

        // Refused as over HTTP: an unknown room is 404, garbage is 400; nothing is stored.
        let nowhere = RoomId::parse("mimi://chirp.test/r/nowhere").unwrap();
        conn.send_messages([(3, &nowhere, first.as_slice())])
            .await
            .unwrap();
        match next_answer(&mut conn).await {
            Push::Refused {
                id: 3,
                status: 404,
                error,
            } => {
                assert_eq!(error.error, "unknown_room", "{error:?}")
            }
            other => panic!("{other:?}"),
        }
        conn.send_messages([(4, &room, &b"not an MLS message"[..])])
            .await
            .unwrap();
        match next_answer(&mut conn).await {
            Push::Refused {
                id: 4, status: 400, ..
            } => {}
            other => panic!("{other:?}"),
        }
        assert!(texts(&mut bob, &room).await.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_is_not_one_closes_the_connection() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let dir = tempfile::tempdir().unwrap();
    let net = Providers::one_server(dir.path(), |_| {}).await;
    let alice = net.register("alice@chirp.test").await;
    let url = net
        .server_of("chirp.test")
        .url()
        .replace("http://", "ws://")
        + "/v1/ws?binary=true";
    for bad in [
        Message::binary(vec![0xff, 0x00, 0x13]),
        Message::text("{\"type\":\"entries\",\"entries\":[]}"),
    ] {
        let mut request = url.as_str().into_client_request().unwrap();
        let token = alice.api().access_token().unwrap().to_owned();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        ws.send(bad).await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => continue,
                }
            }
        })
        .await;
        assert!(end.is_ok(), "the connection stayed open");
    }
}
