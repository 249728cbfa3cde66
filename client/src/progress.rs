//! Transfer events and the three ways fsc shows them: indicatif bars on a terminal, NDJSON with
//! `--json`, nothing otherwise. The library only emits [`Event`]s through a callback; the
//! [`Reporter`] is what the CLI plugs in.
//!
//! Paths, names and messages in events often come from the server. Everything printed for a
//! person goes through [`escape`] (a name with an escape sequence cannot drive the terminal);
//! NDJSON goes through [`json`], exact JSON that decodes to the very same strings.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// Whether `c` must not reach a terminal raw: C0 controls, DEL, C1 controls, and the Unicode
/// bidirectional controls that reorder what is displayed (Trojan Source, CVE-2021-42574).
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` fit to print: unchanged if it holds no control character; otherwise every control
/// character as `\xNN` (ASCII) or `\u{NNNN}`, and every backslash doubled, so the escaped
/// form cannot be mistaken for a name that really holds those characters.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if is_unsafe(c) && (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if is_unsafe(c) => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A name that may not be UTF-8 (a local file name), fit to print: [`escape`] of it if it is
/// UTF-8; otherwise every byte that is not part of valid UTF-8 as `\xNN`, with the same
/// escapes as [`escape`] for the rest (control characters, backslashes doubled), so
/// `caf\xe9.txt` names the file whose name has the byte 0xE9 there. The result holds no
/// control character: [`escape`] leaves it as it is.
pub fn escape_bytes(name: &[u8]) -> String {
    if let Ok(s) = std::str::from_utf8(name) {
        return escape(s).into_owned();
    }
    let mut out = String::with_capacity(name.len() + 8);
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if is_unsafe(c) && u32::from(c) < 0x80 => {
                    out.push_str(&format!("\\x{:02x}", u32::from(c)))
                }
                c if is_unsafe(c) => out.push_str(&format!("\\u{{{:04x}}}", u32::from(c))),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// `v` as one line of JSON in which every control character (C1 and bidirectional controls
/// too, which JSON would allow raw) is a `\uNNNN` escape: the same value to a JSON parser,
/// harmless on a terminal.
pub fn json<T: Serialize + ?Sized>(v: &T) -> String {
    let raw = serde_json::to_string(v).expect("serializes");
    if !raw.chars().any(is_unsafe) {
        return raw;
    }
    // serde_json already escaped C0 and DEL is not special; outside strings JSON is ASCII,
    // so anything left to escape is inside a string, where \uNNNN means the same character.
    let mut out = String::with_capacity(raw.len() + 16);
    for c in raw.chars() {
        if is_unsafe(c) {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Something that happened during a transfer. Serialized as one NDJSON object per line with an
/// `"event"` field naming the variant.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A tree transfer found its work: `files` files, `bytes` bytes in total.
    Plan { files: u64, bytes: u64 },
    /// A file transfer started; `resumed` bytes were already in place (verified).
    Start {
        path: String,
        local: String,
        size: u64,
        resumed: u64,
    },
    /// `done` of `size` bytes are in place; `transferred` bytes moved over the network so far.
    Progress {
        path: String,
        done: u64,
        size: u64,
        transferred: u64,
    },
    /// A chunk failed its CRC32 (or arrived malformed) and is fetched again.
    Corrupt { path: String, chunk: u32 },
    /// The remote file changed since the partial download began: starting over.
    Restart { path: String, reason: String },
    /// A recoverable failure; the transfer resumes after `delay_ms`.
    Retry {
        path: String,
        attempt: u32,
        delay_ms: u64,
        error: String,
    },
    /// An entry that is not transferred (symlink, special file).
    Skip { path: String, reason: String },
    /// A file not transferred because the destination already holds it: `reason` says how
    /// that was decided ("same size and mtime", or "same BLAKE3" with `--checksum`).
    Unchanged {
        path: String,
        local: String,
        bytes: u64,
        reason: String,
    },
    /// `--delete` removed `path` (and everything beneath it) from the destination.
    Deleted { path: String },
    /// `--delete` left the directory `path` in place, with `reason`: it holds entries the
    /// filter excludes (excluded entries are never deleted), or was found not empty. What
    /// else it held is deleted (a [`Event::Deleted`] each).
    Kept { path: String, reason: String },
    /// `-l`: the symlink `path` → `target` was created (or replaced) at the destination.
    Linked { path: String, target: String },
    /// `--dry-run`: what a real run would do with `path`: `action` is "copy" (new), "update",
    /// "delete", "keep" (a directory `--delete` leaves in place) or "mkdir"; `reason` says why.
    DryRun {
        action: String,
        path: String,
        reason: String,
    },
    /// The file arrived complete and verified: `bytes` is its size, `transferred` the bytes
    /// moved over the network in this run, `blake3` its whole-file hash.
    Done {
        path: String,
        local: String,
        bytes: u64,
        transferred: u64,
        blake3: String,
    },
    /// The file failed for good.
    Error {
        path: String,
        code: i32,
        message: String,
    },
}

/// The callback type the library calls with each event. It must be cheap: it runs on the
/// transfer's tasks.
pub type EventFn = Arc<dyn Fn(&Event) + Send + Sync>;

/// How the CLI shows events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Bars on stderr (only meaningful when stderr is a terminal).
    Bars,
    /// NDJSON events to stdout, or to stderr when stdout carries the data.
    Json { to_stderr: bool },
    /// Nothing.
    Quiet,
}

/// Renders [`Event`]s for a terminal or as NDJSON.
pub struct Reporter {
    mode: Mode,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    multi: Option<MultiProgress>,
    total: Option<ProgressBar>,
    bars: HashMap<String, ProgressBar>,
    /// Last progress event written per file, to throttle NDJSON progress lines.
    last_json: HashMap<String, Instant>,
}

/// In a tree, files smaller than this get no bar of their own.
const OWN_BAR_MIN: u64 = 1 << 20;
/// NDJSON progress lines per file at most this often (start, done and errors are never dropped).
const JSON_PROGRESS_EVERY: Duration = Duration::from_millis(200);

impl Reporter {
    pub fn new(mode: Mode) -> Arc<Reporter> {
        let mut state = State::default();
        if mode == Mode::Bars {
            state.multi = Some(MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        }
        Arc::new(Reporter {
            mode,
            state: Mutex::new(state),
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The callback to hand to [`crate::Options::on_event`].
    pub fn callback(self: &Arc<Self>) -> EventFn {
        let me = self.clone();
        Arc::new(move |e| me.event(e))
    }

    /// Prints one event.
    pub fn event(&self, e: &Event) {
        if let (Event::DryRun { .. }, Mode::Quiet | Mode::Bars) = (e, self.mode) {
            // What a dry run would do is its result, not progress: always printed.
            println!("{}", dry_run_line(e));
            return;
        }
        match self.mode {
            Mode::Quiet => {}
            Mode::Json { to_stderr } => self.json(e, to_stderr),
            Mode::Bars => self.bars(e),
        }
    }

    fn json(&self, e: &Event, to_stderr: bool) {
        if let Event::Progress { path, .. } = e {
            let mut st = self.state.lock().unwrap();
            let now = Instant::now();
            match st.last_json.get(path) {
                Some(t) if now.duration_since(*t) < JSON_PROGRESS_EVERY => return,
                _ => st.last_json.insert(path.clone(), now),
            };
        }
        if let Event::Done { path, .. } | Event::Error { path, .. } = e {
            self.state.lock().unwrap().last_json.remove(path);
        }
        let mut line = json(e).into_bytes();
        line.push(b'\n');
        // One write per line so concurrent events never interleave inside a line.
        let _ = if to_stderr {
            std::io::stderr().lock().write_all(&line)
        } else {
            let mut out = std::io::stdout().lock();
            out.write_all(&line).and_then(|_| out.flush())
        };
    }

    fn bars(&self, e: &Event) {
        let mut st = self.state.lock().unwrap();
        let Some(multi) = st.multi.clone() else {
            return;
        };
        match e {
            Event::Plan { bytes, files } => {
                let bar = multi.add(ProgressBar::new(*bytes));
                bar.set_style(style());
                bar.set_message(format!("{files} files"));
                st.total = Some(bar);
            }
            Event::Start {
                path,
                size,
                resumed,
                ..
            } => {
                if st.total.is_some() && *size < OWN_BAR_MIN {
                    // Small files in a tree only move the total bar (at Done).
                    return;
                }
                let bar = match &st.total {
                    // Keep the total bar last.
                    Some(total) => multi.insert_before(total, ProgressBar::new(*size)),
                    None => multi.add(ProgressBar::new(*size)),
                };
                bar.set_style(style());
                bar.set_message(short(&escape(path)));
                bar.set_position(*resumed);
                if let Some(t) = &st.total {
                    t.inc(*resumed);
                }
                st.bars.insert(path.clone(), bar);
            }
            Event::Progress { path, done, .. } => {
                if let Some(bar) = st.bars.get(path) {
                    let delta = done.saturating_sub(bar.position());
                    bar.set_position(*done);
                    if let Some(t) = &st.total {
                        t.inc(delta);
                    }
                }
            }
            Event::Done { path, bytes, .. } => {
                let shown = st.bars.remove(path).map_or(0, |bar| {
                    bar.finish_and_clear();
                    bar.position()
                });
                match &st.total {
                    Some(t) => t.inc(bytes.saturating_sub(shown)),
                    None => {
                        let path = escape(path);
                        let _ = multi.println(format!("{path}: {bytes} bytes, verified"));
                    }
                }
            }
            Event::Error { path, message, .. } => {
                if let Some(bar) = st.bars.remove(path) {
                    bar.abandon();
                }
                let _ = multi.println(format!("{}: {}", escape(path), escape(message)));
            }
            Event::Retry { path, error, .. } => {
                let _ = multi.println(format!("{}: {}; retrying", escape(path), escape(error)));
            }
            Event::Restart { path, reason } => {
                let line = format!("{}: {}; starting over", escape(path), escape(reason));
                let _ = multi.println(line);
                if let Some(bar) = st.bars.get(path) {
                    bar.set_position(0);
                }
            }
            Event::Skip { path, reason } => {
                let _ = multi.println(format!("{}: skipped ({})", escape(path), escape(reason)));
            }
            Event::Unchanged {
                path,
                bytes,
                reason,
                ..
            } => match &st.total {
                Some(t) => t.inc(*bytes),
                None => {
                    let line = format!("{}: unchanged ({})", escape(path), escape(reason));
                    let _ = multi.println(line);
                }
            },
            Event::Deleted { path } => {
                let _ = multi.println(format!("deleted {}", escape(path)));
            }
            Event::Kept { path, reason } => {
                let _ = multi.println(format!("kept {} ({})", escape(path), escape(reason)));
            }
            Event::Linked { path, target } => {
                let _ = multi.println(format!("linked {} -> {}", escape(path), escape(target)));
            }
            // Printed to stdout by `event`.
            Event::DryRun { .. } => {}
            Event::Corrupt { .. } => {}
        }
    }

    /// Clears the bars (call before printing a final message).
    pub fn finish(&self) {
        let mut st = self.state.lock().unwrap();
        if let Some(t) = st.total.take() {
            t.finish_and_clear();
        }
        for (_, b) in st.bars.drain() {
            b.finish_and_clear();
        }
    }
}

/// `would update a/b (mtime differs)`
fn dry_run_line(e: &Event) -> String {
    match e {
        Event::DryRun {
            action,
            path,
            reason,
        } => format!("would {action} {} ({})", escape(path), escape(reason)),
        _ => String::new(),
    }
}

fn style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{msg:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    )
    .expect("valid template")
    .progress_chars("=> ")
}

/// The last 24 characters of a path, for the bar label.
fn short(path: &str) -> String {
    let n = path.chars().count();
    if n <= 24 {
        path.to_string()
    } else {
        let tail: String = path.chars().skip(n - 23).collect();
        format!("…{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_with_an_event_field() {
        let e = Event::Done {
            path: "a/b".into(),
            local: "b".into(),
            bytes: 5,
            transferred: 3,
            blake3: "ab".into(),
        };
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "done");
        assert_eq!(v["bytes"], 5);
        assert_eq!(v["transferred"], 3);
        let e = Event::Error {
            path: "x".into(),
            code: 2,
            message: "nope".into(),
        };
        assert_eq!(serde_json::to_value(&e).unwrap()["event"], "error");
    }

    #[test]
    fn names_that_are_not_utf8_are_shown_byte_for_byte() {
        assert_eq!(escape_bytes(b"caf\xe9.txt"), "caf\\xe9.txt");
        assert_eq!(escape_bytes(b"a\\b\xff\x1b"), "a\\\\b\\xff\\x1b");
        assert_eq!(escape_bytes("naïve".as_bytes()), "naïve");
        assert_eq!(escape(&escape_bytes(b"d\xff\n")), escape_bytes(b"d\xff\n"));
    }

    #[test]
    fn control_characters_are_escaped_and_json_stays_exact() {
        let hostile = "a\x1b[2Jb\u{9b}c\u{202e}d\\e\x7f\n";
        let shown = escape(hostile);
        assert_eq!(shown, "a\\x1b[2Jb\\u{009b}c\\u{202e}d\\\\e\\x7f\\x0a");
        assert!(!shown.chars().any(is_unsafe));
        assert_eq!(escape("plain/ünïcode name"), "plain/ünïcode name");
        let e = Event::Skip {
            path: hostile.into(),
            reason: "r".into(),
        };
        let line = json(&e);
        assert!(!line.chars().any(is_unsafe), "{line}");
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["path"], hostile, "the JSON decodes to the exact name");
    }
}
