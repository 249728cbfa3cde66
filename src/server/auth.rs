//! Credentials: tokens with rights and an optional path prefix, compared in constant time.

use std::path::Path;

use subtle::ConstantTimeEq;

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
    /// may be `cert:COMMON_NAME` to bind the entry to a client certificate; `#` comments.
    pub fn parse(text: &str) -> Result<Credentials, String> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let bad =
                |why: &str| format!("line {}: {why} (want: NAME TOKEN read|rw [PREFIX])", n + 1);
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
            if subject.is_none() && f[1].len() < 16 {
                return Err(bad("token shorter than 16 characters"));
            }
            let prefix = f.get(3).map_or("", |p| p.trim_matches('/')).to_string();
            entries.push(Credential {
                name: f[0].into(),
                token: if subject.is_some() {
                    String::new()
                } else {
                    f[1].into()
                },
                subject,
                writable,
                prefix,
            });
        }
        if entries.is_empty() {
            return Err("no credentials in token file".into());
        }
        Ok(Credentials::new(entries))
    }

    #[allow(clippy::disallowed_methods)] // an operator's config file, not a client path
    pub fn load(path: &Path) -> Result<Credentials, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Credentials::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
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
}
