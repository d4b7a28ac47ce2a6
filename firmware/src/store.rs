//! Where the outbox is kept durable. [`RamOnly`] keeps nothing; `flash-outbox` adds
//! `flash::FlashOutbox`.

use embassy_sync::blocking_mutex::raw::RawMutex;

use crate::{Client, Seq};

/// A persistence layer under the RAM outbox, driven by the run loop.
///
/// Contract: `sync` mirrors the outbox into durable storage — forgets records the outbox
/// removed from its front (acked or dropped), records renumberings, stores new records in
/// order — and returns the seq below which every record is durable. The run loop never sends
/// a record at or above that seq, so a record on the wire is always on flash first. The run
/// loop calls `sync` in every state (in session, before each connection attempt, after each
/// push while backing off), so records reach storage while no gateway is reachable too.
#[allow(async_fn_in_trait)]
pub trait Store {
    /// Bring durable storage up to date with `client`'s outbox; returns the durable limit.
    async fn sync<M: RawMutex, const N: usize>(&mut self, client: &Client<M, N>) -> Seq;
}

/// No persistence: a reboot loses the outbox, and the first Welcome after it resumes at the
/// gateway's high-water + 1.
#[derive(Debug, Default, Clone, Copy)]
pub struct RamOnly;

impl Store for RamOnly {
    async fn sync<M: RawMutex, const N: usize>(&mut self, client: &Client<M, N>) -> Seq {
        client.lock(|s| s.shift = 0);
        Seq::MAX
    }
}
