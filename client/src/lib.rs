//! fsc: the client library and CLI for fsd.
//!
//! Downloads and uploads that resume, verify and show their progress, over fsd's framed
//! protocol (docs/PROTOCOL.md). The `fsc` binary is a thin layer over [`Client`]:
//!
//! ```no_run
//! # async fn demo() -> Result<(), fsc::Error> {
//! use std::sync::Arc;
//! let opts = fsc::Options {
//!     token: std::env::var("FSC_TOKEN").ok(),
//!     connections: 4,
//!     on_event: Some(Arc::new(|e: &fsc::Event| eprintln!("{e:?}"))),
//!     ..Default::default()
//! };
//! let client = fsc::Client::connect("127.0.0.1:7070", opts).await?;
//! client.download("data/big.bin", "big.bin".as_ref()).await?;
//! client.upload("notes.txt".as_ref(), "inbox/notes.txt", &fsc::UploadOptions::default()).await?;
//! # Ok(()) }
//! ```
//!
//! # TLS
//! fsd serves TLS 1.3 when started with `--tls-cert`/`--tls-key` (docs/PROTOCOL.md §6.1). The
//! client speaks TLS when [`Options::tls`] is set ([`Tls::new`]: the CAs to trust, an optional
//! client certificate) or when the address is `fss://HOST:PORT`; a bare `HOST:PORT` without
//! [`Options::tls`] is plain TCP. The server's certificate must be valid for HOST (a DNS name,
//! or an IP address as an IP SAN). With a client certificate and no token, Auth carries an empty
//! token: the server's credential bound to the certificate's subject CN (`NAME cert:CN rw`).
//! A failed TLS handshake (untrusted or expired certificate, wrong name, client certificate
//! refused, a plain-TCP server) is [`Error::Tls`], reported at once, never retried. A
//! cleartext client on a TLS port gets fsd's refusal "this server requires TLS" as
//! [`Error::Remote`] (BadRequest, not retryable).
//!
//! ```no_run
//! # async fn demo() -> Result<(), fsc::Error> {
//! let tls = fsc::Tls::new(Some("ca.pem".as_ref()), None)?;
//! let opts = fsc::Options { token: Some("secret".into()), tls: Some(tls), ..Default::default() };
//! let client = fsc::Client::connect("files.example.com:7070", opts).await?;
//! # let _ = client; Ok(()) }
//! ```
//!
//! Modules:
//! - `conn`: one multiplexed connection (reader/writer tasks, stream ids, stall watchdog).
//! - `client`: [`Client`], its connection pool, retries with backoff, list/stat/mkdir/rm/mv.
//! - `download`: pipelined, verified, resumable downloads (the network side of one file).
//! - `local`: the local side of a transfer: confined directory handles, the working directory
//!   (`.fsc-work/`) of partial downloads, publishing the verified file, free space, modes and
//!   the umask; `local::sink` (the part file of one download: writes, resume, preallocation,
//!   verification) and `local::state` (its resume state).
//! - `upload`: resumable uploads driven by the server's chunk bitmap.
//! - `sync`: what a transfer may skip, what `--delete` removes, `--exclude`/`--include`
//!   ([`SyncOptions`], [`Filter`]); decisions only, no I/O. `check`: the per-file checks that
//!   need I/O (`--checksum`) and the single-file entry points ([`Client::download_sync`],
//!   [`Client::upload_sync`]).
//! - `walk`: tree walks of either side, bounded and confined.
//! - `tree`: `-r` transfers; downloads write only beneath their destination directory.
//! - `tls`: [`Tls`] (rustls client configuration), server names, handshake error messages.
//! - [`progress`]: [`Event`]s and the CLI's [`progress::Reporter`] (bars, NDJSON, quiet).
//!
//! # Integrity
//! Every chunk is checked by CRC32 as it arrives (a bad one is fetched again) and the whole file
//! by BLAKE3, built from per-chunk subtree hashes as data arrives (`fsd::integrity`), never in
//! a second pass. A download appears under its final name only once verified and synced.
//!
//! # Exit codes of `fsc`
//! | code | meaning |
//! |---|---|
//! | 0 | everything arrived and verified |
//! | 1 | usage or local error |
//! | 2 | the server refused (not found, permission, exists, invalid path, ...) |
//! | 3 | integrity failure after retries |
//! | 4 | connection failed (refused, lost, stalled) after retries; a TLS handshake failure at once (not retried) |

mod batch;
mod check;
mod client;
mod conn;
mod delete;
mod download;
mod error;
mod grow;
mod link;
mod local;
pub mod progress;
mod sync;
mod tls;
mod tree;
mod upload;
mod walk;

pub use client::{Client, Entry, Kind, Options, Transfer, MAX_LIST_BYTES};
pub use conn::{Compress, MAX_DATA_FRAME};
pub use download::Dest;
pub use error::{Error, Result};
pub use progress::{Event, EventFn};
pub use sync::{Filter, Rule, SyncOptions};
pub use tls::{Tls, TLS_SCHEME};
pub use tree::TreeSummary;
pub use upload::UploadOptions;
pub use walk::{MAX_TREE_BYTES, MAX_TREE_DEPTH, MAX_TREE_ENTRIES};
