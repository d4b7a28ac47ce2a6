//! `Client::push_with` (a per-push overflow policy, and how many records a push dropped) and
//! the outbox figures of `Status`, on a client that is not running (pushes never need the
//! network).

use cairn_firmware::{Client, OverflowPolicy, PushError, Value};
use embassy_sync::blocking_mutex::raw::NoopRawMutex;

const N: usize = 256;

fn values(k: u64) -> [Value<'static>; 2] {
    [Value::U64(k), Value::F32(1.5)]
}

/// Pushes with `RejectNewest` until the outbox refuses; returns how many fitted.
fn fill(client: &Client<NoopRawMutex, N>) -> u64 {
    for k in 0..1000 {
        match client.push_with(1, &values(k), OverflowPolicy::RejectNewest) {
            Ok(p) => assert_eq!(p.dropped, 0, "RejectNewest dropped a record"),
            Err(PushError::Full) => return k,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("a {N}-byte outbox took 1000 records");
}

#[test]
fn test_push_with_reject_newest_in_a_drop_oldest_client() {
    let client: Client<NoopRawMutex, N> = Client::new(OverflowPolicy::DropOldest);
    let empty = client.status();
    assert_eq!((empty.outbox_bytes, empty.outbox_capacity), (0, N as u32));

    // RejectNewest for these pushes only: the DropOldest client refuses once it is full.
    let fitted = fill(&client);
    let full = client.status();
    assert!(fitted > 2);
    assert_eq!((full.pushed, full.rejected, full.dropped), (fitted, 1, 0));
    assert_eq!(full.queued as u64, fitted);
    assert!(full.outbox_bytes > 0 && full.outbox_bytes <= full.outbox_capacity);
    assert_eq!(full.outbox_bytes as usize, client.outbox_bytes_used());

    // The client's own policy is untouched: a plain push into the full outbox drops.
    client.push(1, &values(1)).unwrap();
    let after = client.status();
    assert!(
        after.dropped > 0,
        "the plain push after push_with did not drop"
    );
    assert_eq!(after.rejected, 1);

    // push_with(DropOldest) reports what it dropped; the reports add up to Status::dropped.
    // (Seqs of never-sent records are provisional: dropping renumbers them down.)
    let mut reported = 0;
    for k in 0..20 {
        let p = client
            .push_with(1, &values(k), OverflowPolicy::DropOldest)
            .unwrap();
        reported += u64::from(p.dropped);
    }
    assert!(reported > 0);
    assert_eq!(client.status().dropped, after.dropped + reported);
}

#[test]
fn test_push_with_drop_oldest_in_a_reject_newest_client() {
    let client: Client<NoopRawMutex, N> = Client::new(OverflowPolicy::RejectNewest);
    fill(&client);
    assert_eq!(client.status().rejected, 1);
    let p = client
        .push_with(
            3,
            &[Value::U64(9), Value::F32(1.5)],
            OverflowPolicy::DropOldest,
        )
        .unwrap();
    assert!(p.dropped >= 1);
    assert_eq!(client.status().rejected, 1);
    // And back to the client's RejectNewest for the next plain push.
    assert_eq!(
        client.push(1, &[Value::U64(9), Value::F32(1.5)]),
        Err(PushError::Full)
    );
}
