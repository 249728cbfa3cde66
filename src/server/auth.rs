//! Credentials: tokens with rights and an optional path prefix, compared in constant time.

use std::path::Path;

use subtle::ConstantTimeEq;

use super::quotas::Limits;

/// One credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// Shown in logs and used as the owner of uploads; never the secret.
    pub name: String,
    /// The secret; empty for a credential bound to a client certificate.
    pub token: String,
    /// Subject common name of a client certificate (mutual TLS) this credential is bound to.
    pub subject: Option<String>,
    pub writable: bool,
    /// Paths this credential may touch: this directory and beneath ("" = the whole root).
    pub prefix: String,
    /// Overrides of the server's per-credential quotas (0 fields: the default).
    pub quota: Limits,
}

/// The credentials a server accepts.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    entries: Vec<Credential>,
}

impl Credentials {
    pub fn new(entries: Vec<Credential>) -> Credentials {
        Credentials { entries }
    }

    /// A single read-write token on the whole root.
    pub fn single(token: &str) -> Credentials {
        Credentials::new(vec![Credential {
            name: "default".into(),
            token: token.into(),
            subject: None,
            writable: true,
            prefix: String::new(),
            quota: Limits::default(),
        }])
    }

    /// A fresh random 32-hex-digit read-write token.
    pub fn random() -> Credentials {
        Credentials::single(&hex::encode(rand::random::<[u8; 16]>()))
    }

    pub fn entries(&self) -> &[Credential] {
        &self.entries
    }

    /// The credential whose token equals `token`. Every entry is compared, each in constant
    /// time, so timing reveals neither which entry matched nor how much of a token was right.
    pub fn check(&self, token: &str) -> Option<&Credential> {
        let mut found = None;
        if token.is_empty() {
            return None;
        }
        for c in self.entries.iter().filter(|c| c.subject.is_none()) {
            let same = c.token.as_bytes().ct_eq(token.as_bytes());
            if bool::from(same) && found.is_none() {
                found = Some(c);
            }
        }
        found
    }

    /// The credential bound to a verified client certificate with this subject common name.
    pub fn check_subject(&self, subject: &str) -> Option<&Credential> {
        self.entries
            .iter()
            .find(|c| c.subject.as_deref() == Some(subject))
    }

    /// Parses a token file: one credential per line, `NAME TOKEN read|rw [PREFIX]`, where TOKEN
    /// may be `cert:COMMON_NAME` to bind the entry to a client certificate.
    ///
    /// A `#` that starts a line or follows whitespace begins a comment. A `#` inside a field is
    /// refused rather than read as a comment: `pub#2` used to become `pub` silently.
    ///
    /// Refused, with the line named: duplicate names, tokens or certificate subjects (the first
    /// would shadow the second), tokens shorter than MIN_TOKEN_LEN, control characters, and a
    /// PREFIX that is absolute, has an empty, `.` or `..` component, or names the state directory.
    pub fn parse(text: &str) -> Result<Credentials, String> {
        let mut entries: Vec<Credential> = Vec::new();
        // Line number of each entry, for "same as line N".
        let mut lines = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let bad = |why: &str| {
                format!(
                    "line {}: {why} (want: NAME TOKEN read|rw [PREFIX] [QUOTA=N ...])",
                    n + 1
                )
            };
            let f: Vec<&str> = line
                .split_whitespace()
                .take_while(|w| !w.starts_with('#'))
                .collect();
            if f.is_empty() {
                continue;
            }
            if f.iter().any(|w| w.contains('#')) {
                return Err(bad(
                    "`#` inside a field (a comment starts at a line's start or after a space)",
                ));
            }
            if f.iter().any(|w| w.chars().any(char::is_control)) {
                return Err(bad("control character in a field"));
            }
            // Quota overrides (`handles=64`) come last and are told apart by their `=`.
            let quota_at = f.iter().position(|w| w.contains('=')).unwrap_or(f.len());
            let quota = parse_quota(&f[quota_at..]).map_err(|e| bad(&e))?;
            let f = &f[..quota_at];
            if f.len() < 3 || f.len() > 4 {
                return Err(bad("wrong number of fields"));
            }
            let writable = match f[2] {
                "read" | "ro" => false,
                "rw" | "read-write" => true,
                _ => return Err(bad("rights must be read or rw")),
            };
            let subject = f[1].strip_prefix("cert:").map(str::to_string);
            if subject.as_deref() == Some("") {
                return Err(bad("empty certificate subject"));
            }
            if subject.is_none() {
                check_token(f[1]).map_err(|e| bad(&e))?;
            }
            let prefix = match f.get(3) {
                Some(p) => check_prefix(p).map_err(|e| bad(&e))?,
                None => String::new(),
            };
            let c = Credential {
                name: f[0].into(),
                token: if subject.is_some() {
                    String::new()
                } else {
                    f[1].into()
                },
                subject,
                writable,
                prefix,
                quota,
            };
            // Not secret-dependent timing worth hiding: this runs once, at start.
            let clash = entries.iter().zip(&lines).find_map(|(e, l)| {
                let what = if e.name == c.name {
                    "name"
                } else if c.subject.is_none() && e.subject.is_none() && e.token == c.token {
                    "token"
                } else if c.subject.is_some() && e.subject == c.subject {
                    "certificate subject"
                } else {
                    return None;
                };
                Some(format!("same {what} as line {l}"))
            });
            if let Some(why) = clash {
                return Err(bad(&why));
            }
            entries.push(c);
            lines.push(n + 1);
        }
        if entries.is_empty() {
            return Err("no credentials in token file".into());
        }
        Ok(Credentials::new(entries))
    }

    /// Reads a token file. Warns, as ssh does for keys, when group or others may access it.
    #[allow(clippy::disallowed_methods)] // an operator's config file, not a client path
    pub fn load(path: &Path) -> Result<Credentials, String> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let at = |e: std::io::Error| format!("{}: {e}", path.display());
        let mut file = std::fs::File::open(path).map_err(at)?;
        let mode = file.metadata().map_err(at)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                "token file {} is accessible by group or others (mode {:o}): chmod 600 it",
                path.display(),
                mode & 0o777
            );
        }
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(at)?;
        Credentials::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Shortest token accepted, in bytes: 16 random hex digits are 64 bits.
pub const MIN_TOKEN_LEN: usize = 16;

/// A token as `--token`, FSD_TOKEN or a token-file line gives it.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("empty token".into());
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!("token shorter than {MIN_TOKEN_LEN} bytes"));
    }
    if token.chars().any(char::is_control) {
        return Err("control character in token".into());
    }
    Ok(())
}

/// A token-file PREFIX, relative to the root: returned without its trailing `/`.
fn check_prefix(p: &str) -> Result<String, String> {
    if p.starts_with('/') {
        return Err(format!(
            "prefix {p:?} is absolute (want a path relative to the root)"
        ));
    }
    let p = p.strip_suffix('/').unwrap_or(p);
    for c in p.split('/') {
        let why = match c {
            "" => "has an empty component",
            "." | ".." => "has a `.` or `..` component",
            // The server refuses this name in every path: such a prefix could never be used.
            super::STATE_DIR_NAME => "names the state directory",
            _ => continue,
        };
        return Err(format!("prefix {p:?} {why}"));
    }
    Ok(p.to_string())
}

/// Quota overrides of a token-file line: `connections=N handles=N uploads=N upload-bytes=N`
/// (N > 0; upload-bytes takes a K, M, G or T suffix, powers of 1024).
fn parse_quota(fields: &[&str]) -> Result<Limits, String> {
    let mut q = Limits::default();
    for f in fields {
        let (key, value) = f.split_once('=').unwrap_or((f, ""));
        let number = |v: &str| -> Result<u64, String> {
            let (digits, unit) = match v.char_indices().last() {
                Some((i, c)) if key == "upload-bytes" && "KMGT".contains(c) => {
                    let shift = 10 * (1 + "KMGT".find(c).unwrap_or(0) as u32);
                    (&v[..i], 1u64 << shift)
                }
                _ => (v, 1),
            };
            digits
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(unit))
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("quota {f:?}: want a positive number"))
        };
        let n = number(value)?;
        let small = || usize::try_from(n).map_err(|_| format!("quota {f:?}: too large"));
        match key {
            "connections" => q.connections = small()?,
            "handles" => q.handles = small()?,
            "uploads" => q.uploads = n,
            "upload-bytes" => q.upload_bytes = n,
            _ => {
                return Err(format!(
                    "unknown quota {key:?} (connections, handles, uploads, upload-bytes)"
                ))
            }
        }
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_parses_and_checks() {
        let c = Credentials::parse(
            "# ops\nalice 0123456789abcdef0 rw\nbob fedcba98765432100 read team/b/\n",
        )
        .unwrap();
        assert_eq!(c.check("0123456789abcdef0").unwrap().name, "alice");
        let bob = c.check("fedcba98765432100").unwrap();
        assert!(!bob.writable);
        assert_eq!(bob.prefix, "team/b");
        assert!(c.check("0123456789abcdef").is_none());
        assert!(c.check("").is_none());
        assert!(Credentials::parse("x short rw").is_err());
        assert!(Credentials::parse("x 0123456789abcdef0 admin").is_err());
        let c = Credentials::parse("carol cert:carol.example rw\n").unwrap();
        assert_eq!(c.check_subject("carol.example").unwrap().name, "carol");
        assert!(
            c.check("cert:carol.example").is_none(),
            "a subject is not a secret"
        );
        assert!(c.check("").is_none());
    }

    /// Parses two valid lines and then `line`.
    fn after_two(line: &str) -> Result<Credentials, String> {
        let good = "alice 0123456789abcdef0 rw a\nbob fedcba98765432100 read b\n";
        Credentials::parse(&format!("{good}{line}\n"))
    }

    #[test]
    fn token_file_refuses_ambiguous_lines() {
        let cases = [
            ("alice 1111111111111111 rw c", "same name as line 1"),
            ("carol 0123456789abcdef0 rw c", "same token as line 1"),
            ("carol 1111111111111111 rw /abs", "absolute"),
            ("carol 1111111111111111 rw a/../b", "`..`"),
            ("carol 1111111111111111 rw ..", "`..`"),
            ("carol 1111111111111111 rw ./a", "`.`"),
            ("carol 1111111111111111 rw a//b", "empty component"),
            ("carol 1111111111111111 rw a//", "empty component"),
            ("carol 1111111111111111 rw .fsd-state", "state directory"),
            (
                "carol 1111111111111111 rw a/.fsd-state/b",
                "state directory",
            ),
            ("carol 1111111111111111 rw pub#2", "`#` inside"),
            ("carol 1111111111111111#x rw", "`#` inside"),
            ("ca#rol 1111111111111111 rw", "`#` inside"),
            ("carol 111111111111111 rw", "shorter than 16"),
            ("ca\u{1b}[2Jrol 1111111111111111 rw", "control character"),
            ("carol 1111111111111111\u{7f} rw", "control character"),
        ];
        // Every case is tried, so a failure lists all the lines wrongly handled.
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|(line, why)| match after_two(line) {
                Err(e) if e.starts_with("line 3: ") && e.contains(why) => None,
                r => Some(format!("{line:?} -> {r:?}")),
            })
            .collect();
        assert!(wrong.is_empty(), "want refused:\n{}", wrong.join("\n"));
        let c = Credentials::parse("c1 cert:carol rw\nc2 cert:carol read\n");
        assert!(c
            .unwrap_err()
            .contains("same certificate subject as line 1"));
    }

    #[test]
    fn token_file_comments_start_at_a_line_or_after_whitespace() {
        let c = Credentials::parse(
            "#all\n  # indented\nalice 0123456789abcdef0 rw pub/ # the public area\n\
             bob fedcba98765432100 read\t#tab\n",
        )
        .unwrap();
        assert_eq!(c.entries().len(), 2);
        assert_eq!(c.check("0123456789abcdef0").unwrap().prefix, "pub");
        assert_eq!(c.check("fedcba98765432100").unwrap().prefix, "");
    }

    #[test]
    fn flag_tokens_are_checked_like_file_tokens() {
        assert!(check_token("").unwrap_err().contains("empty"));
        assert!(check_token("0123456789abcde")
            .unwrap_err()
            .contains("shorter"));
        assert!(check_token("0123456789abcdef\n")
            .unwrap_err()
            .contains("control"));
        assert!(check_token("0123456789abcdef").is_ok());
        assert!(check_token(&Credentials::random().entries()[0].token).is_ok());
    }
}
