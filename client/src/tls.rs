//! TLS 1.3 to fsd (rustls): which roots to trust, an optional client certificate (mutual TLS),
//! the server name to verify, and handshake failures turned into messages that say what to do.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};

use crate::error::{Error, Result};

/// Address scheme that selects TLS: `fss://HOST:PORT`. A bare `HOST:PORT` is plain TCP unless
/// [`crate::Options::tls`] is set.
pub const TLS_SCHEME: &str = "fss://";

/// How to speak TLS to the server: the CAs trusted to sign its certificate and, for mutual TLS,
/// our own certificate and key. Built once and shared by every connection of a
/// [`crate::Client`] (cheap to clone).
///
/// ```no_run
/// # fn demo() -> Result<(), fsc::Error> {
/// use std::path::Path;
/// // Trust a private CA and present a client certificate (its CN names a `cert:` credential).
/// let tls = fsc::Tls::new(
///     Some(Path::new("ca.pem")),
///     Some((Path::new("alice.pem"), Path::new("alice.key"))),
/// )?;
/// let opts = fsc::Options { tls: Some(tls), ..Default::default() };
/// # let _ = opts; Ok(()) }
/// ```
#[derive(Clone)]
pub struct Tls {
    config: Arc<ClientConfig>,
    identity: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("client_certificate", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// TLS 1.3 only (as fsd). `ca`: PEM file of the CA certificates to trust instead of the
    /// built-in web roots (Mozilla's, from `webpki-roots`). `identity`: PEM certificate chain and
    /// PEM private key presented to a server that asks for a client certificate.
    pub fn new(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Result<Tls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in load_certs(ca)? {
                    roots
                        .add(c)
                        .map_err(|e| Error::Usage(format!("{}: {e}", ca.display())))?;
                }
                roots
            }
            None => RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Usage(format!("TLS: {e}")))?
            .with_root_certificates(roots);
        let config = match identity {
            Some((cert, key)) => {
                let certs = load_certs(cert)?;
                let k = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, e))?;
                builder.with_client_auth_cert(certs, k).map_err(|e| {
                    Error::Usage(format!("{} / {}: {e}", cert.display(), key.display()))
                })?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(Tls {
            config: Arc::new(config),
            identity: identity.is_some(),
        })
    }

    /// Whether a client certificate is presented (then, without a token, Auth is sent with an
    /// empty token: the credential bound to the certificate's subject CN).
    pub fn has_client_certificate(&self) -> bool {
        self.identity
    }

    pub(crate) fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.config.clone())
    }
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> Error {
    match e {
        rustls::pki_types::pem::Error::Io(source) => Error::io(path.display(), source),
        rustls::pki_types::pem::Error::NoItemsFound => {
            Error::Usage(format!("{}: no PEM private key found", path.display()))
        }
        e => Error::Usage(format!("{}: {e}", path.display())),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no PEM certificate found",
            path.display()
        )));
    }
    Ok(certs)
}

/// Splits `fss://HOST:PORT` into (`HOST:PORT`, true); any other address is returned as is.
pub(crate) fn strip_scheme(addr: &str) -> (&str, bool) {
    match addr.strip_prefix(TLS_SCHEME) {
        Some(rest) => (rest.trim_end_matches('/'), true),
        None => (addr, false),
    }
}

/// The HOST of `HOST:PORT` (`[v6]:PORT` too), without brackets.
pub(crate) fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        if let Some((h, _)) = rest.split_once(']') {
            return h;
        }
    }
    match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    }
}

/// The name the server's certificate must carry: a DNS name or an IP address (IP SAN).
pub(crate) fn server_name(addr: &str) -> Result<ServerName<'static>> {
    let host = host_of(addr);
    ServerName::try_from(host.to_string())
        .map_err(|_| Error::Usage(format!("{host:?} is neither a DNS name nor an IP address")))
}

/// A failed `connect` of the TLS handshake as an [`Error::Tls`].
pub(crate) fn handshake_error(host: &str, e: &std::io::Error) -> Error {
    use std::io::ErrorKind::*;
    let reason = match rustls_error(e) {
        Some(r) => explain(r),
        None if matches!(
            e.kind(),
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
        ) =>
        {
            "the server closed the connection (is it serving plain TCP? drop --tls)".to_string()
        }
        None => e.to_string(),
    };
    Error::Tls {
        host: host.to_string(),
        reason,
    }
}

/// The rustls error inside an I/O error from tokio-rustls, if that is what it is.
pub(crate) fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// rustls' reason, followed by what it most likely means for an fsc user.
pub(crate) fn explain(e: &rustls::Error) -> String {
    use rustls::Error as E;
    let hint = match e {
        E::InvalidCertificate(CertificateError::UnknownIssuer) => Some(
            "the server's certificate is not signed by a CA we trust; pass its CA with --ca FILE",
        ),
        E::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => Some("connect by a name or address the server's certificate lists"),
        E::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => Some("the server's certificate has expired"),
        E::AlertReceived(AlertDescription::CertificateRequired) => {
            Some("the server requires a client certificate: pass --cert FILE --key FILE")
        }
        E::AlertReceived(AlertDescription::CertificateExpired) => {
            Some("the server refused our client certificate: it has expired")
        }
        E::AlertReceived(AlertDescription::CertificateRevoked) => {
            Some("the server refused our client certificate: it is revoked")
        }
        E::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::DecryptError,
        ) => Some("the server refused our client certificate"),
        E::AlertReceived(AlertDescription::ProtocolVersion) => {
            Some("the server does not speak TLS 1.3")
        }
        _ => None,
    };
    match hint {
        Some(h) => format!("{e} ({h})"),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split_into_scheme_and_host() {
        assert_eq!(strip_scheme("fss://h:1"), ("h:1", true));
        assert_eq!(strip_scheme("fss://h:1/"), ("h:1", true));
        assert_eq!(strip_scheme("h:1"), ("h:1", false));
        assert_eq!(host_of("example.com:7070"), "example.com");
        assert_eq!(host_of("127.0.0.1:7070"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7070"), "::1");
        assert!(matches!(
            server_name("127.0.0.1:1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("localhost:1").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(server_name("bad name:1").is_err());
    }

    #[test]
    fn closed_handshake_says_plain_tcp() {
        let e = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof");
        let msg = handshake_error("h", &e).to_string();
        assert_eq!(
            msg,
            "TLS handshake with h failed: the server closed the connection \
             (is it serving plain TCP? drop --tls)"
        );
        assert!(!handshake_error("h", &e).is_retryable());
    }

    #[test]
    fn missing_files_are_local_errors() {
        let e = Tls::new(Some(Path::new("/nonexistent/ca.pem")), None).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        assert_eq!(e.exit_code(), 1);
    }
}
