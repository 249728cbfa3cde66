//! fsc: the command-line client of fsd. A thin layer over the `fsc` library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use fsc::progress::{escape, json, Mode, Reporter};
use fsc::{Client, Dest, Event, Filter, Options, Rule, SyncOptions, TreeSummary, UploadOptions};

macro_rules! exit_codes {
    () => {
        "Exit codes:
  0  everything arrived and verified
  1  usage or local error
  2  the server refused (not found, permission denied, exists, invalid path, ...)
  3  integrity failure after retries
  4  connection failed (refused, lost, stalled) after retries; a failed TLS
     handshake (untrusted, expired or misnamed certificate, client certificate
     refused, server not speaking TLS) at once: it is not retried"
    };
}
macro_rules! transport {
    () => {
        "Server address and TLS:
  HOST:PORT        plain TCP (or TLS with --tls, --ca or --cert)
  fss://HOST:PORT  TLS 1.3; the server's certificate must be valid for HOST
                   (a DNS name or an IP address)
  H1:P1,H2:P2      several fsd nodes serving one root (shared file system): chunks
                   are spread over them (at least one connection each) and a node
                   that dies is left for the others
  --tls            verify the server against the built-in web roots (Mozilla's)
  --ca FILE        trust only the CA certificate(s) in FILE (PEM) instead
  --cert FILE --key FILE
                   present a client certificate (mutual TLS); without --token
                   or FSC_TOKEN it authenticates as the server's credential
                   bound to the certificate (token file: NAME cert:CN rw)
  Without TLS on a TLS port, fsd answers \"this server requires TLS\" (exit 2)."
    };
}
const AFTER_HELP: &str = concat!(transport!(), "\n\n", exit_codes!());

/// Resumable, verified file transfers with an fsd server.
#[derive(Parser, Debug)]
#[command(name = "fsc", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug)]
struct Global {
    /// Access token (or set FSC_TOKEN).
    #[arg(long, env = "FSC_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Print NDJSON events (one object per line, with an "event" field) instead of bars.
    #[arg(long, global = true)]
    json: bool,
    /// No progress output, and no notes of what was skipped (failures are always listed).
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Retries after a lost connection, a stall or a retryable server error.
    #[arg(long, default_value_t = 5, global = true, value_name = "N")]
    retries: u32,
    /// Seconds without any data (while waiting for some) before a connection is dropped.
    #[arg(long, default_value_t = 30.0, global = true, value_name = "SECS")]
    stall_timeout: f64,
    /// Speak TLS 1.3; verify the server against the built-in web roots (same as fss://).
    #[arg(long, global = true)]
    tls: bool,
    /// Trust the CA certificate(s) in this PEM file instead of the web roots (implies --tls).
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS (implies --tls; needs --key).
    #[arg(long, global = true, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, global = true, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// TCP congestion control: `auto` (BBR when the kernel offers it and this process may use
    /// it: it keeps long, lossy paths full where cubic collapses; on a path with an RTT under
    /// 1 ms the system default), `system` (the system default), or a name from /proc/sys/net/ipv4/tcp_available_congestion_control; one that
    /// is not available or not allowed falls back to the system default with a warning.
    #[arg(
        long,
        global = true,
        default_value = "auto",
        value_name = "auto|system|NAME"
    )]
    congestion: String,
    /// Limit the whole run (all connections, both directions) to RATE bytes per second:
    /// `20M` = 20,000,000 (K, M, G, T decimal), `20Mi` = 20 × 2^20 (Ki, Mi, Gi, Ti binary).
    #[arg(long, global = true, value_name = "RATE", value_parser = fsd::net::parse_rate)]
    bwlimit: Option<u64>,
    /// Background transfer: yield to other traffic on the path, like LEDBAT. The sender (fsc
    /// for uploads; fsd, when it supports it, for downloads) watches the queueing delay (RTT
    /// above the path's minimum) and paces itself down when it grows past ~5 ms, back up when
    /// it shrinks. Alone on a link it still fills it. `-j auto` keeps it on one connection.
    #[arg(long, global = true)]
    background: bool,
}

#[derive(Args, Debug)]
struct Transfer {
    /// Transfer a directory tree.
    #[arg(short, long)]
    recursive: bool,
    /// Parallel connections (1..64): one big file is split across them, many files spread over
    /// them. `auto` (the default): one, and on a long path (round trip of 1 ms or more) more,
    /// up to 8, added one at a time while each raises the run's measured throughput — one
    /// connection's send buffer limits it under loss; the first that does not is retired and
    /// the rest serve the rest of the run. Where the first connection sees packets lost at
    /// random (not from a full queue), four at once, then as before. `--background` keeps
    /// auto at one.
    #[arg(short = 'j', long = "jobs", default_value = "auto", value_name = "N|auto",
          value_parser = parse_jobs)]
    jobs: u16,
    /// Compress chunks on the wire with zstd: `auto` (the default) compresses at level 1 only
    /// on a long path (round trip over 1 ms) slower than 250 MB/s; `-z` alone means level 3
    /// on any path; `--compress=N` level N (1-19, capped by the server); `off` never.
    /// Either way a file whose chunks do not shrink goes uncompressed.
    #[arg(short = 'z', long = "compress", value_name = "auto|off|LEVEL",
          num_args = 0..=1, require_equals = true, default_value = "auto",
          default_missing_value = "3", value_parser = parse_compress)]
    compress: fsc::Compress,
}

/// `auto`, `off` (or 0), or a zstd level 1-19.
fn parse_compress(s: &str) -> Result<fsc::Compress, String> {
    match s {
        "auto" => Ok(fsc::Compress::Auto),
        "off" | "0" => Ok(fsc::Compress::Off),
        n => match n.parse::<u32>() {
            Ok(l) if (1..=fsd::compress::MAX_LEVEL).contains(&l) => Ok(fsc::Compress::Level(l)),
            _ => Err(format!(
                "expected auto, off or a level 1-{}",
                fsd::compress::MAX_LEVEL
            )),
        },
    }
}

/// What a transfer may skip, delete or leave out. Filters are gitignore lines matched against
/// paths relative to the tree's top; the last rule that matches decides.
#[derive(Args, Debug)]
struct SyncArgs {
    /// Compare files of equal size by whole-file BLAKE3 instead of size and mtime (reads
    /// every such local file; the server reports its hash without sending the data).
    #[arg(short = 'c', long)]
    checksum: bool,
    /// With -r: remove destination entries that the source lacks (excluded ones, and the
    /// directories holding them, are kept); refused, and the run fails, if any listing of
    /// either side failed.
    #[arg(long, requires = "recursive")]
    delete: bool,
    /// Print what would be copied, updated, deleted and skipped; change nothing.
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// With -r: leave out entries matching PATTERN (a gitignore line: `*.log`, `build/`,
    /// `/top-only`, `a/**/b`; repeatable).
    #[arg(long, value_name = "PATTERN", requires = "recursive")]
    exclude: Vec<String>,
    /// With -r: keep entries matching PATTERN even if an earlier rule excluded them (the
    /// gitignore line `!PATTERN`; repeatable). A later rule wins over an earlier one.
    #[arg(long, value_name = "PATTERN", requires = "recursive")]
    include: Vec<String>,
    /// With -r: gitignore lines from FILE (`#` comments, `!PATTERN` re-includes), in the
    /// rule order where the option stands.
    #[arg(long, value_name = "FILE", requires = "recursive")]
    exclude_from: Vec<PathBuf>,
    /// With -r: copy symlinks as symlinks, if their target is relative and stays inside the
    /// tree (others are skipped with a note; without -l every symlink is). Never followed.
    #[arg(short = 'l', long, requires = "recursive")]
    links: bool,
}

impl SyncArgs {
    /// The options, with the filter rules in command-line order (`sub`: the subcommand's
    /// matches, which know where each rule stood).
    fn options(&self, sub: &ArgMatches) -> anyhow::Result<SyncOptions> {
        let mut rules: Vec<(usize, Rule)> = Vec::new();
        let at = |id: &str| sub.indices_of(id).into_iter().flatten();
        rules.extend(
            at("exclude")
                .zip(&self.exclude)
                .map(|(i, p)| (i, Rule::Exclude(p.clone()))),
        );
        rules.extend(
            at("include")
                .zip(&self.include)
                .map(|(i, p)| (i, Rule::Include(p.clone()))),
        );
        rules.extend(
            at("exclude_from")
                .zip(&self.exclude_from)
                .map(|(i, f)| (i, Rule::ExcludeFrom(f.clone()))),
        );
        rules.sort_by_key(|r| r.0);
        let rules: Vec<Rule> = rules.into_iter().map(|r| r.1).collect();
        Ok(SyncOptions {
            checksum: self.checksum,
            delete: self.delete,
            dry_run: self.dry_run,
            filter: Filter::new(&rules)?,
            links: self.links,
        })
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Download a file (or a directory with -r); re-run to resume. Files already there (same
    /// size and mtime, or same BLAKE3 with -c) are left alone.
    #[command(after_help = concat!("Examples:
  fsc download 127.0.0.1:7070 isos/big.iso            # -> ./big.iso
  fsc download -j 4 127.0.0.1:7070 isos/big.iso /tmp/big.iso
  fsc download --bwlimit 20M 127.0.0.1:7070 isos/big.iso  # at most 20 MB/s
  fsc download --background 127.0.0.1:7070 isos/big.iso  # yields to other traffic
  fsc download 127.0.0.1:7070 logs/today.log - | less  # to stdout
  fsc download -r 127.0.0.1:7070 photos ./photos
  fsc download -r --delete --exclude '*.tmp' 127.0.0.1:7070 photos ./photos  # mirror
  fsc download -r -n --delete 127.0.0.1:7070 photos ./photos   # what would change
  fsc download --ca ca.pem fss://files.example.com:7070 isos/big.iso
  fsc download --ca ca.pem --cert me.pem --key me.key fss://10.0.0.5:7070 a.bin

", transport!(), "\n\n", exit_codes!()))]
    Download {
        /// Server: HOST:PORT, or fss://HOST:PORT for TLS; several nodes of one root: HOST:PORT,HOST:PORT.
        #[arg(value_name = "HOST:PORT")]
        server: String,
        /// Remote path.
        remote: String,
        /// Local path (default: the remote base name in the current directory; `-`: stdout).
        local: Option<String>,
        /// Give files and directories the server's permission bits exactly (never setuid,
        /// setgid or sticky), those that were there already too, as rsync -p does; without
        /// it, created ones get those bits less the umask and existing ones keep their mode.
        /// The destination directory itself, if it existed, keeps its mode either way.
        #[arg(short, long)]
        preserve: bool,
        #[command(flatten)]
        t: Transfer,
        #[command(flatten)]
        sync: SyncArgs,
    },
    /// Upload a file (or a directory with -r); re-run to resume. Files already there (same
    /// size and mtime, or same BLAKE3 with -c) are left alone; missing parent directories of
    /// the destination are created.
    #[command(after_help = concat!("Examples:
  fsc upload 127.0.0.1:7070 big.iso isos/big.iso
  fsc upload -r -j 4 127.0.0.1:7070 ./photos backup/photos
  fsc upload -r --delete --exclude-from .fscignore 127.0.0.1:7070 ./site www/site
  fsc upload --tls fss://files.example.com:7070 big.iso isos/big.iso

", transport!(), "\n\n", exit_codes!()))]
    Upload {
        /// Server: HOST:PORT, or fss://HOST:PORT for TLS; several nodes of one root: HOST:PORT,HOST:PORT.
        #[arg(value_name = "HOST:PORT")]
        server: String,
        /// Local file or directory.
        local: PathBuf,
        /// Remote path (default: the local base name, at the root).
        remote: Option<String>,
        /// Fail instead of replacing an existing remote file (even an identical one: no
        /// file is skipped as unchanged).
        #[arg(long)]
        no_clobber: bool,
        #[command(flatten)]
        t: Transfer,
        #[command(flatten)]
        sync: SyncArgs,
    },
    /// List a remote directory.
    #[command(after_help = "Example:\n  fsc ls 127.0.0.1:7070 isos")]
    Ls {
        /// Server: HOST:PORT, or fss://HOST:PORT for TLS; several nodes of one root: HOST:PORT,HOST:PORT.
        #[arg(value_name = "HOST:PORT")]
        server: String,
        /// Remote directory (default: the root).
        #[arg(default_value = "")]
        path: String,
    },
    /// Show a remote path's metadata.
    #[command(after_help = "Example:\n  fsc stat 127.0.0.1:7070 isos/big.iso")]
    Stat {
        /// Server: HOST:PORT, or fss://HOST:PORT for TLS; several nodes of one root: HOST:PORT,HOST:PORT.
        #[arg(value_name = "HOST:PORT")]
        server: String,
        path: String,
    },
    /// Create a remote directory.
    #[command(after_help = "Example:\n  fsc mkdir -p 127.0.0.1:7070 backup/2026/11")]
    Mkdir {
        /// Server: HOST:PORT, or fss://HOST:PORT for TLS; several nodes of one root: HOST:PORT,HOST:PORT.
        #[arg(value_name = "HOST:PORT")]
        server: String,
        path: String,
        /// Create missing parents; no error if it exists.
        #[arg(short, long)]
        parents: bool,
    },
    /// Remove a remote file or directory.
    #[command(after_help = "Example:\n  fsc rm -r 127.0.0.1:7070 backup/old")]
    Rm {
        /// Server: HOST:PORT, or fss://HOST:PORT for TLS; several nodes of one root: HOST:PORT,HOST:PORT.
        #[arg(value_name = "HOST:PORT")]
        server: String,
        path: String,
        /// Remove a directory and everything in it.
        #[arg(short, long)]
        recursive: bool,
    },
    /// Rename a remote path.
    #[command(after_help = "Example:\n  fsc mv 127.0.0.1:7070 inbox/a.txt archive/a.txt")]
    Mv {
        /// Server: HOST:PORT, or fss://HOST:PORT for TLS; several nodes of one root: HOST:PORT,HOST:PORT.
        #[arg(value_name = "HOST:PORT")]
        server: String,
        from: String,
        to: String,
        /// Fail if the destination exists.
        #[arg(long)]
        no_clobber: bool,
    },
    /// Print a shell completion script.
    #[command(after_help = "Example:\n  fsc completions bash > /etc/bash_completion.d/fsc")]
    Completions { shell: clap_complete::Shell },
}

fn main() -> ExitCode {
    fsd::nofile::raise();
    // Parsed through the matches: they keep where each filter rule stood.
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Ok((Cli::from_arg_matches(&m)?, m)));
    let (cli, matches) = match parsed {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // Help and version are not errors; usage errors exit 1 (2 means "remote refused").
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    keep_freed_memory();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    ExitCode::from(rt.block_on(run(cli, matches)) as u8)
}

/// Chunk buffers (1 MiB each) are allocated on the reader thread and freed on a disk thread.
/// By default glibc serves them with mmap or trims them back to the kernel, so every chunk
/// lands in fresh pages and pays a page fault per 4 KiB; keeping freed memory for reuse
/// removes that (the window bounds how much is live).
fn keep_freed_memory() {
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// Runs the command; returns the exit code.
async fn run(cli: Cli, matches: ArgMatches) -> i32 {
    let data_on_stdout = matches!(&cli.cmd, Cmd::Download { local: Some(l), .. } if l == "-");
    let mode = if cli.global.json {
        Mode::Json {
            to_stderr: data_on_stdout,
        }
    } else if cli.global.quiet || !std::io::stderr().is_terminal() {
        // No progress; what was skipped or failed is still said at the end (`tree_code`).
        Mode::Quiet
    } else {
        Mode::Bars
    };
    let reporter = Reporter::new(mode);
    let r = dispatch(cli, &matches, &reporter).await;
    reporter.finish();
    match r {
        Ok(code) => code,
        Err(e) => {
            let code = e
                .downcast_ref::<fsc::Error>()
                .map_or(1, fsc::Error::exit_code);
            if let Mode::Json { .. } = mode {
                reporter.event(&Event::Error {
                    path: String::new(),
                    code,
                    message: e.to_string(),
                });
            }
            // Error messages may quote the server: escaped like every server string.
            eprintln!("fsc: {}", escape(&e.to_string()));
            if let Some(e) = e.downcast_ref::<fsc::Error>() {
                hint(e);
            }
            code
        }
    }
}

/// Connections of `-j auto`, at most.
const AUTO_JOBS: u16 = 8;

/// `-j N` (1..64), or `auto` as 0.
fn parse_jobs(s: &str) -> Result<u16, String> {
    if s == "auto" {
        return Ok(0);
    }
    match s.parse::<u16>() {
        Ok(n @ 1..=64) => Ok(n),
        _ => Err(format!(
            "{s:?}: expected a number of connections 1..64, or auto"
        )),
    }
}

fn options(
    g: &Global,
    t: Option<&Transfer>,
    reporter: &std::sync::Arc<Reporter>,
) -> anyhow::Result<Options> {
    let jobs = match t {
        // A background transfer yields per connection (fsd::ledbat); growing would add to
        // what it takes, so auto keeps it on one.
        Some(t) if t.jobs == 0 && g.background => 1,
        Some(t) => t.jobs,
        None => 1,
    };
    anyhow::ensure!(
        g.stall_timeout.is_finite() && g.stall_timeout > 0.0,
        "--stall-timeout must be positive"
    );
    let tls = if g.tls || g.ca.is_some() || g.cert.is_some() {
        let identity = g.cert.as_deref().zip(g.key.as_deref());
        Some(fsc::Tls::new(g.ca.as_deref(), identity)?)
    } else {
        None
    };
    let (congestion, warning) = fsd::net::choose_congestion(&g.congestion);
    if let Some(w) = warning {
        eprintln!("fsc: warning: --congestion: {w}");
    }
    Ok(Options {
        token: g.token.clone(),
        tls,
        congestion,
        congestion_long_paths_only: g.congestion == "auto",
        bwlimit: g.bwlimit,
        background: g.background,
        connections: if jobs == 0 { AUTO_JOBS } else { jobs } as usize,
        grow: jobs == 0,
        // Not a flag: tests and benchmarks make loopback look like a long path with it.
        assume_rtt: std::env::var("FSC_ASSUME_RTT_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis),
        compress: t.map_or(fsc::Compress::Auto, |t| t.compress),
        retries: g.retries,
        stall_timeout: Duration::from_secs_f64(g.stall_timeout),
        on_event: Some(reporter.callback()),
        ..Options::default()
    })
}

async fn connect(server: &str, opts: Options) -> anyhow::Result<Client> {
    Ok(Client::connect(server, opts).await?)
}

/// Exit code of a transfer whose per-file errors were already reported as events.
fn reported(r: fsc::Result<()>, path: &str, quiet: bool) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            if !quiet {
                eprintln!("fsc: {}: {}", escape(path), escape(&e.message_for(path)));
                hint(&e);
            }
            e.exit_code()
        }
    }
}

/// A next step for errors that have an obvious one.
fn hint(e: &fsc::Error) {
    use fsd::protocol::ErrorCode;
    match e {
        fsc::Error::Remote { code, .. } if *code == ErrorCode::NotAuthenticated => {
            eprintln!("fsc: hint: pass --token or set FSC_TOKEN (or --cert/--key for a certificate-bound credential)");
        }
        fsc::Error::Remote { code, message, .. }
            if *code == ErrorCode::BadRequest && message.contains("requires TLS") =>
        {
            eprintln!("fsc: hint: add --tls (--ca FILE for a private CA) or use fss://HOST:PORT");
        }
        _ => {}
    }
}

/// The end of a tree transfer: what was skipped (unless `-q`, `--json` or bars, which said
/// it as it happened) and what failed (unless `--json`, whose events said it) to stderr,
/// whether or not it is a terminal; the summary line with bars; the exit code.
fn tree_code(s: &TreeSummary, g: &Global, reporter: &Reporter) -> i32 {
    if reporter.mode() == Mode::Quiet && !g.quiet {
        for (path, reason) in &s.skips {
            eprintln!("fsc: {}: skipped ({})", escape(path), escape(reason));
        }
        let more = s
            .skipped
            .saturating_sub(u64::try_from(s.skips.len()).unwrap_or(u64::MAX));
        if more > 0 {
            eprintln!("fsc: ... and {more} more skipped");
        }
    }
    if !g.json {
        for (path, e) in &s.failed {
            eprintln!("fsc: {}: {}", escape(path), escape(&e.message_for(path)));
        }
        if s.failed_more > 0 {
            eprintln!("fsc: ... and {} more failed", s.failed_more);
        }
    }
    if reporter.mode() == Mode::Bars {
        reporter.finish();
        eprintln!(
            "{} files, {} bytes verified ({} over the network), {} unchanged, {} deleted, \
             {} kept, {} symlinks, {} skipped, {} failed",
            s.files,
            s.bytes,
            s.transferred,
            s.unchanged,
            s.deleted,
            s.kept,
            s.links,
            s.skipped,
            u64::try_from(s.failed.len()).unwrap_or(u64::MAX) + s.failed_more
        );
    }
    s.exit_code()
}

async fn dispatch(
    cli: Cli,
    matches: &ArgMatches,
    reporter: &std::sync::Arc<Reporter>,
) -> anyhow::Result<i32> {
    let g = &cli.global;
    let sub = matches.subcommand().map_or(matches, |(_, m)| m);
    // In JSON mode the error events already say it; don't say it twice on stderr.
    let quiet = g.json;
    match cli.cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "fsc", &mut std::io::stdout());
            Ok(0)
        }
        Cmd::Download {
            server,
            remote,
            local,
            preserve,
            t,
            sync,
        } => {
            let sync = sync.options(sub)?;
            let opts = Options {
                preserve,
                dry_run: sync.dry_run,
                ..options(g, Some(&t), reporter)?
            };
            let client = connect(&server, opts).await?;
            let default_local = || -> anyhow::Result<PathBuf> {
                let base = remote
                    .trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .unwrap_or("");
                anyhow::ensure!(
                    !base.is_empty() && base != "." && base != "..",
                    "{remote:?} has no base name: give a local path"
                );
                Ok(PathBuf::from(base))
            };
            if t.recursive {
                let local = match local {
                    Some(l) if l == "-" => anyhow::bail!("-r cannot write to stdout"),
                    Some(l) => PathBuf::from(l),
                    None => default_local()?,
                };
                let s = client.download_tree(&remote, &local, &sync).await?;
                return Ok(tree_code(&s, g, reporter));
            }
            let dest = match local {
                Some(l) if l == "-" => Dest::Stdout,
                Some(l) => Dest::Path(l.into()),
                None => Dest::Path(default_local()?),
            };
            let r = client.download_sync(&remote, dest, &sync).await.map(|_| ());
            Ok(reported(r, &remote, quiet))
        }
        Cmd::Upload {
            server,
            local,
            remote,
            no_clobber,
            t,
            sync,
        } => {
            let sync = sync.options(sub)?;
            let remote = match remote {
                Some(r) => r,
                None => local
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_string)
                    .with_context(|| format!("{}: no usable base name", local.display()))?,
            };
            let opts = Options {
                dry_run: sync.dry_run,
                ..options(g, Some(&t), reporter)?
            };
            let client = connect(&server, opts).await?;
            let opts = UploadOptions { no_clobber };
            if t.recursive {
                let s = client.upload_tree(&local, &remote, &opts, &sync).await?;
                return Ok(tree_code(&s, g, reporter));
            }
            let r = client
                .upload_sync(&local, &remote, &opts, &sync)
                .await
                .map(|_| ());
            Ok(reported(r, &remote, quiet))
        }
        Cmd::Ls { server, path } => {
            let client = connect(&server, options(g, None, reporter)?).await?;
            // Page by page: a listing that never ends costs time, not memory.
            let mut out = std::io::stdout().lock();
            let unlisted = client
                .list_each(&path, |e| {
                    use std::io::Write;
                    let line = if g.json { json(&e) } else { format_entry(&e) };
                    writeln!(out, "{line}").map_err(|err| fsc::Error::Io {
                        path: "<stdout>".into(),
                        source: err,
                    })
                })
                .await?;
            if unlisted > 0 {
                eprintln!(
                    "fsc: {}: {unlisted} name(s) not listed: not UTF-8",
                    fsc::progress::escape(&path)
                );
            }
            Ok(0)
        }
        Cmd::Stat { server, path } => {
            let client = connect(&server, options(g, None, reporter)?).await?;
            let e = client.stat(&path).await?;
            if g.json {
                println!("{}", json(&e));
            } else {
                println!("{}", format_entry(&e));
            }
            Ok(0)
        }
        Cmd::Mkdir {
            server,
            path,
            parents,
        } => {
            let client = connect(&server, options(g, None, reporter)?).await?;
            client.mkdir(&path, parents, 0).await?;
            Ok(0)
        }
        Cmd::Rm {
            server,
            path,
            recursive,
        } => {
            let client = connect(&server, options(g, None, reporter)?).await?;
            client.remove(&path, recursive).await?;
            Ok(0)
        }
        Cmd::Mv {
            server,
            from,
            to,
            no_clobber,
        } => {
            let client = connect(&server, options(g, None, reporter)?).await?;
            client.rename(&from, &to, no_clobber).await?;
            Ok(0)
        }
    }
}

/// `drwxr-xr-x     4096 2026-11-22 10:00:00 name/`
fn format_entry(e: &fsc::Entry) -> String {
    let kind = match e.kind {
        fsc::Kind::Dir => 'd',
        fsc::Kind::Symlink => 'l',
        fsc::Kind::File => '-',
        fsc::Kind::Other => '?',
    };
    let mut perms = String::with_capacity(9);
    for shift in [6, 3, 0] {
        let b = (e.mode >> shift) & 7;
        perms.push(if b & 4 != 0 { 'r' } else { '-' });
        perms.push(if b & 2 != 0 { 'w' } else { '-' });
        perms.push(if b & 1 != 0 { 'x' } else { '-' });
    }
    let secs = e.mtime_ns.div_euclid(1_000_000_000);
    // Names and link targets come from the server: escaped, never raw to the terminal.
    let name = escape(&e.name);
    let name = match (&e.kind, &e.target) {
        (fsc::Kind::Dir, _) => format!("{name}/"),
        (fsc::Kind::Symlink, Some(t)) => format!("{name} -> {}", escape(t)),
        _ => name.into_owned(),
    };
    format!("{kind}{perms} {:>12} {} {name}", e.size, utc(secs))
}

/// A Unix time as `YYYY-MM-DD HH:MM:SS` (UTC), without a date crate.
fn utc(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn dates_format_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
    }

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let c = Cli::try_parse_from([
            "fsc",
            "download",
            "-j",
            "4",
            "h:1",
            "a/b",
            "--json",
            "--retries",
            "2",
        ])
        .unwrap();
        assert!(c.global.json);
        assert_eq!(c.global.retries, 2);
        assert!(matches!(
            c.cmd,
            Cmd::Download {
                t: Transfer { jobs: 4, .. },
                ..
            }
        ));
        assert_eq!(parse_jobs("auto"), Ok(0));
        assert_eq!(parse_jobs("64"), Ok(64));
        for bad in ["0", "65", "", "many"] {
            assert!(parse_jobs(bad).is_err(), "{bad}");
        }
    }
}
