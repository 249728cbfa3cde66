//! Micro-benchmarks of the per-byte costs the protocol adds: frame encode/decode, the CRC32
//! manifest of a 1 GiB file (in memory), and BLAKE3 of 1 GiB (plain, and from per-chunk subtree
//! hashes as the client builds it). Run with `cargo bench --bench integrity`.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fsd::integrity::{chunk_cv, root_hash};
use fsd::protocol::{chunk_count, flags, Cmd, Frame, FrameCodec, DEFAULT_CHUNK_SIZE};
use tokio_util::codec::{Decoder, Encoder};

const GIB: usize = 1 << 30;

fn frames(c: &mut Criterion) {
    let payload = Bytes::from(vec![0xA5u8; DEFAULT_CHUNK_SIZE as usize]);
    let frame = Frame::new(Cmd::READ, 7, flags::DATA, payload.clone());
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.bench_function("encode 1 MiB data frame", |b| {
        let mut codec = FrameCodec::new(DEFAULT_CHUNK_SIZE);
        let mut buf = BytesMut::with_capacity(2 << 20);
        b.iter(|| {
            buf.clear();
            codec.encode(frame.clone(), &mut buf).unwrap();
        })
    });
    let mut wire = BytesMut::new();
    FrameCodec::new(DEFAULT_CHUNK_SIZE)
        .encode(frame.clone(), &mut wire)
        .unwrap();
    g.bench_function("decode + verify 1 MiB data frame", |b| {
        let mut codec = FrameCodec::new(DEFAULT_CHUNK_SIZE);
        b.iter(|| {
            let mut buf = wire.clone();
            codec.decode(&mut buf).unwrap().unwrap().unwrap()
        })
    });
    let small = Frame::new(
        Cmd::STAT,
        3,
        flags::END,
        Bytes::from_static(b"\x0a\x08some/path"),
    );
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode+decode small control frame", |b| {
        let mut codec = FrameCodec::new(DEFAULT_CHUNK_SIZE);
        let mut buf = BytesMut::new();
        b.iter(|| {
            codec.encode(small.clone(), &mut buf).unwrap();
            codec.decode(&mut buf).unwrap().unwrap().unwrap()
        })
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let data: Vec<u8> = (0..GIB)
        .map(|i| (i as u32).wrapping_mul(2654435761) as u8)
        .collect();
    let cs = DEFAULT_CHUNK_SIZE as usize;
    let mut g = c.benchmark_group("1 GiB");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(GIB as u64));
    g.bench_function("CRC32 manifest (per 1 MiB chunk)", |b| {
        b.iter(|| data.chunks(cs).map(crc32fast::hash).collect::<Vec<u32>>())
    });
    g.bench_function("BLAKE3 one thread", |b| b.iter(|| blake3::hash(&data)));
    g.bench_function("BLAKE3 rayon", |b| {
        b.iter(|| blake3::Hasher::new().update_rayon(&data).finalize())
    });
    g.bench_function("BLAKE3 from per-chunk subtrees", |b| {
        b.iter(|| {
            let n = chunk_count(GIB as u64, DEFAULT_CHUNK_SIZE);
            let cvs: Vec<_> = data
                .chunks(cs)
                .enumerate()
                .map(|(i, ch)| chunk_cv(ch, i as u32, DEFAULT_CHUNK_SIZE, GIB as u64))
                .collect();
            assert_eq!(cvs.len(), n as usize);
            root_hash(&cvs, DEFAULT_CHUNK_SIZE, GIB as u64)
        })
    });
    g.finish();
}

criterion_group!(benches, frames, hashing);
criterion_main!(benches);
