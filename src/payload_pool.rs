//! Buffers of large DATA payloads, used again instead of freed.
//!
//! A large DATA payload is read into an allocation of its own, exactly its size, so that it never
//! pins a buffer other frames were read into ([`crate::protocol::FrameCodec::own_payload_buffer`]).
//! A fresh multi-MiB allocation comes from mmap: the kernel faults in and zeroes every page of
//! every chunk, and unmaps it again when the chunk is freed. Measured on a 1 GiB upload to fsd
//! (stop 30, docs/BENCHMARKS.md): ~64,000 minor faults and ~15 % more CPU than when payloads
//! were slices of a shared buffer. A pool keeps the last few freed payload buffers and hands
//! one to the next payload of exactly its size (chunks of one transfer all have one size but
//! the last).
//!
//! Bounded in bytes: what the pool keeps is memory no budget counts, so it stays small beside
//! the received-DATA budgets (docs/SECURITY.md §6). A buffer is taken back only when nothing
//! else refers to it, so a payload still in use is never handed out twice.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

/// Payloads smaller than this are not pooled: they come from malloc's heap anyway.
const MIN_POOLED: usize = 256 * 1024;

pub struct PayloadPool {
    /// Free buffers, oldest first; each is empty with `capacity() == ` its payloads' size.
    free: Mutex<Free>,
    max_bytes: usize,
}

#[derive(Default)]
struct Free {
    buffers: VecDeque<BytesMut>,
    bytes: usize,
}

impl PayloadPool {
    /// A pool keeping at most `max_bytes` of free buffers.
    pub fn new(max_bytes: usize) -> PayloadPool {
        PayloadPool {
            free: Mutex::new(Free::default()),
            max_bytes,
        }
    }

    /// An empty buffer whose capacity is exactly `len`: a free one of that size if the pool has
    /// one, else a new allocation. The reader relies on the exact capacity to read nothing
    /// beyond the payload into it.
    pub fn take(&self, len: usize) -> BytesMut {
        if len >= MIN_POOLED {
            let mut free = self.free.lock().expect("pool lock");
            if let Some(i) = free.buffers.iter().rposition(|b| b.capacity() == len) {
                let buf = free.buffers.remove(i).expect("index found above");
                free.bytes -= len;
                return buf;
            }
        }
        BytesMut::with_capacity(len)
    }

    /// Keeps `payload`'s allocation for a later [`PayloadPool::take`], if nothing else refers
    /// to it and it is worth keeping; the oldest free buffers make room for it.
    pub fn give_back(&self, payload: Bytes) {
        if payload.len() < MIN_POOLED || payload.len() > self.max_bytes {
            return;
        }
        let Ok(mut buf) = payload.try_into_mut() else {
            return;
        };
        // Only whole allocations sized for one payload: a slice of a larger one is not.
        if buf.capacity() != buf.len() {
            return;
        }
        buf.clear();
        let len = buf.capacity();
        let mut free = self.free.lock().expect("pool lock");
        while free.bytes + len > self.max_bytes {
            let Some(old) = free.buffers.pop_front() else {
                break;
            };
            free.bytes -= old.capacity();
        }
        free.bytes += len;
        free.buffers.push_back(buf);
    }

    /// Bytes held in free buffers.
    pub fn free_bytes(&self) -> usize {
        self.free.lock().expect("pool lock").bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    fn filled(pool: &PayloadPool, len: usize) -> Bytes {
        let mut b = pool.take(len);
        b.resize(len, 7);
        b.freeze()
    }

    #[test]
    fn a_freed_payload_is_handed_out_again_with_its_exact_size() {
        let pool = PayloadPool::new(8 * MIB);
        let p = filled(&pool, MIB);
        let addr = p.as_ptr();
        pool.give_back(p);
        assert_eq!(pool.free_bytes(), MIB);
        // Another size does not take it.
        assert_ne!(pool.take(2 * MIB).as_ptr(), addr);
        let again = pool.take(MIB);
        assert_eq!(again.as_ptr(), addr);
        assert_eq!((again.len(), again.capacity()), (0, MIB));
        assert_eq!(pool.free_bytes(), 0);
    }

    #[test]
    fn a_payload_still_referred_to_is_not_taken_back() {
        let pool = PayloadPool::new(8 * MIB);
        let p = filled(&pool, MIB);
        let other = p.clone();
        pool.give_back(p);
        assert_eq!(pool.free_bytes(), 0);
        // A slice of a larger allocation is not taken back either.
        pool.give_back(filled(&pool, 2 * MIB).slice(..MIB));
        assert_eq!(pool.free_bytes(), 0);
        drop(other);
    }

    #[test]
    fn the_pool_keeps_at_most_its_bytes_newest_first() {
        let pool = PayloadPool::new(3 * MIB);
        pool.give_back(filled(&pool, 2 * MIB));
        assert_eq!(pool.free_bytes(), 2 * MIB);
        // Three 1 MiB buffers at once (each taken while the others are held).
        let ones: Vec<Bytes> = (0..3).map(|_| filled(&pool, MIB)).collect();
        for one in ones {
            pool.give_back(one);
        }
        // The 2 MiB one, oldest, made room: taking 2 MiB now allocates and leaves the rest.
        assert_eq!(pool.free_bytes(), 3 * MIB);
        drop(pool.take(2 * MIB));
        assert_eq!(pool.free_bytes(), 3 * MIB);
        // Small payloads are not pooled.
        pool.give_back(filled(&pool, 4096));
        assert_eq!(pool.free_bytes(), 3 * MIB);
    }
}
