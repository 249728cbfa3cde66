//! Namespace commands: List, Stat, Mkdir, Remove, Rename. File-system calls block, so they run
//! on the blocking pool.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use super::connection::{Failure, Session};
use crate::protocol::{msg, MAX_CONTROL_PAYLOAD};

/// Entries per List page unless the client asks for fewer; and the most it may ask for.
const LIST_PAGE: usize = 1000;
const LIST_PAGE_MAX: usize = 4096;

/// Runs `f` on the blocking pool with the session.
pub async fn blocking<T: Send + 'static>(
    session: &Arc<Session>,
    f: impl FnOnce(&Session) -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    let s = session.clone();
    let slot = session.account.blocking_slot().await;
    // Counted from here until the job ends: fsd working for the client, not idle.
    s.working.fetch_add(1, Ordering::Relaxed);
    let working = Working(session.clone());
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let _working = working;
        f(&s)
    })
    .await?
}

/// A blocking job counted in its session's `working` until dropped.
struct Working(Arc<Session>);

impl Drop for Working {
    fn drop(&mut self) {
        self.0.working.fetch_sub(1, Ordering::Relaxed);
    }
}

fn ok() -> Result<Bytes, Failure> {
    Ok(Bytes::from(msg::Ok {}.encode_to_vec()))
}

pub async fn list(session: &Arc<Session>, payload: Bytes) -> Result<Bytes, Failure> {
    let req = msg::ListRequest::decode(payload)?;
    let limit = match req.limit as usize {
        0 => LIST_PAGE,
        n => n.min(LIST_PAGE_MAX),
    };
    let path = if req.path == "." {
        String::new()
    } else {
        req.path
    };
    let mut cursors = session.lists.clone().lock_owned().await;
    blocking(session, move |s| {
        let p = s.path(&path)?;
        let (mut entries, mut more, unlisted) =
            s.root().list(p, &req.after, limit, &mut cursors)?;
        // Long names and symlink targets could push a page past the control-frame limit: end
        // the page early instead (the client pages on with `after`).
        let mut total = 16;
        if let Some(fit) = entries.iter().position(|e| {
            total += e.encoded_len() + 8;
            total > MAX_CONTROL_PAYLOAD as usize
        }) {
            entries.truncate(fit.max(1));
            more = true;
        }
        Ok(Bytes::from(
            msg::ListResponse {
                entries,
                more,
                unlisted,
            }
            .encode_to_vec(),
        ))
    })
    .await
}

pub async fn stat(session: &Arc<Session>, payload: Bytes) -> Result<Bytes, Failure> {
    let req = msg::StatRequest::decode(payload)?;
    blocking(session, move |s| {
        let p = s.path(&req.path)?;
        let mut entry = s.root().stat(p)?;
        entry.name = req.path.clone();
        Ok(Bytes::from(
            msg::StatResponse { entry: Some(entry) }.encode_to_vec(),
        ))
    })
    .await
}

pub async fn mkdir(session: &Arc<Session>, payload: Bytes) -> Result<Bytes, Failure> {
    let req = msg::MkdirRequest::decode(payload)?;
    blocking(session, move |s| {
        s.require_write()?;
        let mode = if req.mode_bits == 0 {
            0o755
        } else {
            req.mode_bits & 0o7777
        };
        let path = s.path(&req.path)?;
        s.root().mkdir(path, req.parents, mode)?;
        if req.mtime_ns != 0 {
            s.root().set_dir_mtime(path, req.mtime_ns)?;
        }
        tracing::info!(path = ?req.path, "mkdir");
        ok()
    })
    .await
}

pub async fn symlink(session: &Arc<Session>, payload: Bytes) -> Result<Bytes, Failure> {
    let req = msg::SymlinkRequest::decode(payload)?;
    blocking(session, move |s| {
        s.require_write()?;
        let path = s.path(&req.path)?;
        s.root().symlink(path, &req.target)?;
        tracing::info!(path = ?req.path, target = ?req.target, "symlink");
        ok()
    })
    .await
}

pub async fn remove(session: &Arc<Session>, payload: Bytes) -> Result<Bytes, Failure> {
    let req = msg::RemoveRequest::decode(payload)?;
    blocking(session, move |s| {
        s.require_write()?;
        s.root().remove(s.path(&req.path)?, req.recursive)?;
        tracing::info!(path = ?req.path, recursive = req.recursive, "removed");
        ok()
    })
    .await
}

pub async fn rename(session: &Arc<Session>, payload: Bytes) -> Result<Bytes, Failure> {
    let req = msg::RenameRequest::decode(payload)?;
    blocking(session, move |s| {
        s.require_write()?;
        s.root()
            .rename(s.path(&req.from)?, s.path(&req.to)?, req.no_clobber)?;
        tracing::info!(from = ?req.from, to = ?req.to, "renamed");
        ok()
    })
    .await
}
