//! The open-file limit (RLIMIT_NOFILE), for both ends: each raises its soft limit to the hard
//! one at start and sizes what holds descriptors (fsd its connections and handles, fsc its
//! batches of small files) by what it then has.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raises the soft limit on open files to the hard limit, as programs that hold many sockets
/// or files do. A soft limit of 256 or 1024 (common defaults) made fsc's tree downloads fail
/// with "Too many open files" (review D, stop 30).
pub fn raise() {
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// The soft limit on open files in force.
pub fn limit() -> usize {
    getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| usize::try_from(soft).unwrap_or(usize::MAX))
        .unwrap_or(1024)
}
