//! The WRITEs of one upload outstanding on its connections, for the endgame.
//!
//! Once the reader has handed out every chunk, a lane with nothing left to send takes a chunk
//! still unacknowledged on a connection that lags far behind and sends it again on its own
//! connection; whichever acknowledgement comes first counts, and the upload is complete as soon
//! as every chunk has one (the lagging WRITEs are then abandoned, and COMMIT goes over a
//! connection with nothing in flight). The server stores a chunk written twice twice, with the
//! same bytes; one that arrives after COMMIT is refused, and nobody waits for its answer.
//!
//! Without it a file waited for its slowest connection: on a lossy long path (bbr, 1 % loss)
//! a fifth connection that `-j auto` opened near the end took 8 chunks and needed 2.7 s to
//! get them through its startup, while the other four sat idle with 3.4 s of work done.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::watch;
use tracing::debug;

use crate::local::state::Bitmap;

/// A chunk is sent a second time only if the second connection would bring it in less than
/// 1 / STEAL_MARGIN of the time the first needs for everything it has outstanding: the copy
/// crosses the same bottleneck, which pays only against a connection far behind (still in its
/// startup, or in loss recovery). The same rule as the download endgame's.
const STEAL_MARGIN: f64 = 2.0;

pub(super) struct Flights {
    table: Mutex<Table>,
    /// How many chunks have been acknowledged (by any connection).
    acked: watch::Sender<u32>,
}

struct Table {
    /// Chunks sent and not yet acknowledged: their length and CRC32 (a copy is read from the
    /// file again and must match it; keeping the bytes would hold every chunk in flight in
    /// memory, up to 8 x 16 MiB per connection, where the sent ones were only in socket
    /// buffers) and the slots of the connections carrying them (at most two).
    unacked: BTreeMap<u32, Unacked>,
    acked: Bitmap,
    slots: HashMap<usize, SlotStats>,
}

struct Unacked {
    len: u32,
    crc: u32,
    on: Vec<usize>,
}

#[derive(Default)]
struct SlotStats {
    /// When the connection's first WRITE of this upload was sent.
    since: Option<Instant>,
    /// Bytes of chunks whose first acknowledgement came over this connection.
    acked_bytes: u64,
    /// WRITEs sent over this connection still waiting for their answer.
    waiting: u32,
}

impl SlotStats {
    /// Bytes per second this connection has had acknowledged for this upload (0: none yet).
    fn rate(&self) -> f64 {
        self.since.map_or(0.0, |t| {
            self.acked_bytes as f64 / t.elapsed().as_secs_f64().max(1e-3)
        })
    }
}

/// A WRITE registered in [`Flights`] until its answer arrives or it is abandoned.
pub(super) struct Flight<'a> {
    flights: &'a Flights,
    slot: usize,
    chunk: u32,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut t = self.flights.table.lock().unwrap();
        if let Some(s) = t.slots.get_mut(&self.slot) {
            s.waiting -= 1;
        }
        // Abandoned before any acknowledgement: the copy on the other connection (if any) is
        // all that is left, or nothing, and the attempt fails on its missing count.
        if let Some(u) = t.unacked.get_mut(&self.chunk) {
            u.on.retain(|&s| s != self.slot);
        }
    }
}

impl Flight<'_> {
    pub fn chunk(&self) -> u32 {
        self.chunk
    }

    /// The chunk's acknowledgement arrived over this WRITE: true if it is the first.
    pub fn acked(self, len: u32) -> bool {
        let first = {
            let mut t = self.flights.table.lock().unwrap();
            let first = !t.acked.get(self.chunk);
            if first {
                t.acked.set(self.chunk);
                t.unacked.remove(&self.chunk);
                t.slots.entry(self.slot).or_default().acked_bytes += u64::from(len);
            }
            first
        };
        if first {
            self.flights.acked.send_modify(|n| *n += 1);
        }
        first
    }

    /// Whether another connection brought the chunk in already (then this WRITE's failure
    /// does not matter).
    pub fn acked_elsewhere(&self) -> bool {
        self.flights.table.lock().unwrap().acked.get(self.chunk)
    }
}

impl Flights {
    pub fn new(count: u32) -> Flights {
        Flights {
            table: Mutex::new(Table {
                unacked: BTreeMap::new(),
                acked: Bitmap::new(count),
                slots: HashMap::new(),
            }),
            acked: watch::channel(0).0,
        }
    }

    /// Registers chunk `chunk` (`len` bytes with CRC32 `crc`), read from the file, as sent
    /// over the connection in `slot`.
    pub fn send(&self, slot: usize, chunk: u32, len: u32, crc: u32) -> Flight<'_> {
        let mut t = self.table.lock().unwrap();
        t.unacked.insert(
            chunk,
            Unacked {
                len,
                crc,
                on: vec![slot],
            },
        );
        self.started(&mut t, slot, chunk)
    }

    fn started(&self, t: &mut Table, slot: usize, chunk: u32) -> Flight<'_> {
        let s = t.slots.entry(slot).or_default();
        s.since.get_or_insert_with(Instant::now);
        s.waiting += 1;
        Flight {
            flights: self,
            slot,
            chunk,
        }
    }

    /// The endgame (module doc): a chunk outstanding only on a connection that lags far behind
    /// the one in `slot`, to send again over `slot`: the lowest of the connection that needs
    /// the longest for what it has outstanding, with its CRC32. None when no connection lags
    /// that far.
    pub fn steal(&self, slot: usize) -> Option<(Flight<'_>, u32)> {
        let mut t = self.table.lock().unwrap();
        let mine = t.slots.get(&slot).map_or(0.0, SlotStats::rate);
        if mine == 0.0 {
            return None;
        }
        // Seconds each other connection needs for everything it has outstanding (infinite for
        // one that has had nothing acknowledged yet).
        let mut behind: HashMap<usize, f64> = HashMap::new();
        for u in t.unacked.values() {
            for &s in u.on.iter().filter(|&&s| s != slot) {
                *behind.entry(s).or_default() += f64::from(u.len);
            }
        }
        for (s, left) in behind.iter_mut() {
            *left /= t.slots.get(s).map_or(0.0, SlotStats::rate);
        }
        let (&chunk, from) = t
            .unacked
            .iter()
            .filter(|(_, u)| u.on.len() == 1 && u.on[0] != slot)
            .filter(|(_, u)| behind[&u.on[0]] > STEAL_MARGIN * f64::from(u.len) / mine)
            .map(|(i, u)| (i, u.on[0]))
            .max_by(|a, b| behind[&a.1].total_cmp(&behind[&b.1]).then(b.0.cmp(a.0)))?;
        let u = t.unacked.get_mut(&chunk).expect("just found");
        u.on.push(slot);
        let crc = u.crc;
        debug!(
            chunk,
            from,
            to = slot,
            "endgame: chunk sent over a second connection"
        );
        Some((self.started(&mut t, slot, chunk), crc))
    }

    /// Whether a chunk out on another connection than `slot`'s could still be copied to it
    /// (one not copied yet).
    pub fn stealable(&self, slot: usize) -> bool {
        self.table
            .lock()
            .unwrap()
            .unacked
            .values()
            .any(|u| u.on.len() == 1 && u.on[0] != slot)
    }

    /// Resolves at the next acknowledgement.
    pub async fn next_ack(&self) {
        let mut rx = self.acked.subscribe();
        // The sender lives in self, so this fails only if self is gone, which it cannot be.
        let _ = rx.changed().await;
    }

    /// Resolves once `count` chunks have been acknowledged.
    pub async fn all_acked(&self, count: u32) {
        let mut rx = self.acked.subscribe();
        // The sender lives in self, so this fails only if self is gone, which it cannot be.
        let _ = rx.wait_for(|&n| n >= count).await;
    }

    pub fn acked_count(&self) -> u32 {
        *self.acked.borrow()
    }

    /// WRITEs still waiting for an answer over the connection in `slot`.
    pub fn waiting(&self, slot: usize) -> u32 {
        self.table
            .lock()
            .unwrap()
            .slots
            .get(&slot)
            .map_or(0, |s| s.waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_stolen_only_from_a_connection_far_behind() {
        let f = Flights::new(4);
        // Slot 0 has one chunk acknowledged, so it has a rate; slot 1 nothing yet.
        let a = f.send(0, 0, 1024, 1);
        assert!(a.acked(1024));
        let b = f.send(1, 1, 1024, 7);
        // A connection with no rate of its own steals nothing.
        assert!(f.steal(2).is_none());
        let (copy, crc) = f.steal(0).expect("slot 1 has had nothing acknowledged");
        assert_eq!((copy.chunk(), crc), (1, 7));
        // Each chunk is copied at most once.
        assert!(f.steal(0).is_none());
        // The copy comes first: the original's late answer is not a second acknowledgement,
        // and its failure would not matter.
        assert!(copy.acked(1024));
        assert!(b.acked_elsewhere());
        assert!(!b.acked(1024));
        assert_eq!(f.acked_count(), 2);
        assert_eq!((f.waiting(0), f.waiting(1)), (0, 0));
    }

    #[test]
    fn a_connection_keeping_up_is_not_copied() {
        let f = Flights::new(8);
        for (slot, chunk) in [(0, 0), (1, 1)] {
            assert!(f.send(slot, chunk, 1 << 20, 0).acked(1 << 20));
        }
        // Slot 1 has one chunk outstanding and a rate like slot 0's: not worth a copy.
        let _b = f.send(1, 2, 1 << 20, 0);
        assert!(f.steal(0).is_none());
        assert_eq!(f.waiting(1), 1);
    }
}
