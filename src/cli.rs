//! Command-line flags, exactly as typed: every flag has an environment twin (`ROLLCALL_` + the
//! flag in upper snake case) and a default shown in `--help`. Validation happens in `config.rs`.
//!
//! The doc comments below are the `--help` text, written for a terminal (`[::]:53`,
//! `redis://:password@host/db`), not for rustdoc: its link and HTML checks are off here.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "rollcall",
    version = env!("ROLLCALL_VERSION"),
    about = "Service discovery for elastic container stacks: authoritative DNS + HTTP registration API",
    long_about = "rollcall keeps a live set of nodes per role (registered over HTTP with a TTL) and \
                  answers DNS for them: `dig appserver.cluster` returns every live appserver.\n\n\
                  Every flag also reads an environment variable: ROLLCALL_ + the flag in upper snake \
                  case (--dns-listen -> ROLLCALL_DNS_LISTEN). The names shared by several commands \
                  mean the same thing in each (ROLLCALL_API, ROLLCALL_TOKEN, ROLLCALL_TOKEN_FILE, \
                  ROLLCALL_CA_FILE, ROLLCALL_CLIENT_CERT, ROLLCALL_CLIENT_KEY, \
                  ROLLCALL_CONFIG, ROLLCALL_LOG_FORMAT); a flag that would mean something else in \
                  another command carries its command's name: hipache-sync's --role and --port are \
                  ROLLCALL_HIPACHE_ROLE and ROLLCALL_HIPACHE_PORT, status's --role, --json and \
                  --watch are ROLLCALL_STATUS_ROLE, _JSON and _WATCH (ROLLCALL_ROLE and \
                  ROLLCALL_PORT are the agent's). A token given on the command line wins over \
                  one inherited from the environment."
)]
pub struct Cli {
    /// Log format: text for people, json for log collectors. Filter with RUST_LOG (default info).
    #[arg(long, global = true, env = "ROLLCALL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// TOML file with defaults for any flag: top-level `log-format`, and one table per
    /// subcommand (`[serve]`, `[register]`, `[hipache-sync]`, `[status]`, `[docker]`) whose keys are flag
    /// names (`dns-listen = "0.0.0.0:53"`). Flags and environment variables override it;
    /// unknown keys are an error.
    #[arg(long, global = true, env = "ROLLCALL_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// The command line's definition, as parsed and as shown: `-h` gives each flag's first
/// sentence, `--help` (and the man pages) the whole text.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    summarised(Cli::command())
}

/// Splits every flag's help into a one-sentence `help` and the full `long_help`.
fn summarised(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| {
        if a.get_long_help().is_some() {
            return a;
        }
        let Some(full) = a.get_help().map(|h| h.to_string()) else {
            return a;
        };
        match first_sentence(&full) {
            Some(short) => a.help(short).long_help(full),
            None => a,
        }
    })
    .mut_subcommands(summarised)
}

/// The text before its first ". " that starts a new sentence (an upper-case letter follows),
/// or None when there is only one sentence. "e.g. 0.0.0.0:53" does not end one.
fn first_sentence(text: &str) -> Option<String> {
    let mut from = 0;
    while let Some(i) = text[from..].find(". ") {
        let end = from + i;
        if text[end + 2..].starts_with(|c: char| c.is_ascii_uppercase()) {
            return Some(text[..end].to_string());
        }
        from = end + 2;
    }
    None
}

/// Why the command line could not be turned into a [`Cli`].
#[derive(Debug)]
pub enum CliError {
    /// clap's own outcome: usage errors, and also `--help` / `--version` (`e.exit()` prints them).
    Clap(clap::Error),
    /// The config file is unreadable or has a bad key (exit code 2).
    Config(String),
}

/// Parses the command line, with defaults from `--config FILE` where neither a flag nor its
/// environment variable gives a value.
pub fn parse_with_config(argv: Vec<std::ffi::OsString>) -> Result<Cli, CliError> {
    use clap::FromArgMatches;
    let cmd = command();
    // A first, lenient pass finds --config and the subcommand.
    let pre = cmd
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(&argv)
        .ok();
    let path = pre
        .as_ref()
        .and_then(|m| m.get_one::<PathBuf>("config").cloned())
        .or_else(|| {
            std::env::var_os("ROLLCALL_CONFIG")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
    let sub = pre
        .as_ref()
        .and_then(|m| m.subcommand_name().map(str::to_owned));
    let mut argv = argv;
    if let (Some(path), Some(sub)) = (path, sub) {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| CliError::Config(format!("--config {}: {e}", path.display())))?;
        let doc: toml::Table = text.parse().map_err(|e| {
            CliError::Config(format!("--config {}: not valid TOML: {e}", path.display()))
        })?;
        let sub_cmd = cmd
            .find_subcommand(&sub)
            .expect("parsed subcommand exists")
            .clone();
        let mut extra: Vec<std::ffi::OsString> = Vec::new();
        let subcommands = ["serve", "register", "hipache-sync", "status", "docker"];
        for (key, value) in &doc {
            let key = key.replace('_', "-");
            if subcommands.contains(&key.as_str()) {
                let toml::Value::Table(table) = value else {
                    return Err(CliError::Config(format!(
                        "--config {}: [{key}] must be a table",
                        path.display()
                    )));
                };
                if key != sub {
                    // Not this command's table: checked all the same, so that a typo in
                    // any table is found the first time the file is used.
                    let other = cmd.find_subcommand(&key).expect("a known subcommand");
                    for k in table.keys() {
                        check_key(other, &path, &format!("[{key}]"), &k.replace('_', "-"))
                            .map_err(CliError::Config)?;
                    }
                    continue;
                }
                for (k, v) in table {
                    config_arg(
                        &sub_cmd,
                        &path,
                        &format!("[{key}]"),
                        &k.replace('_', "-"),
                        v,
                        &argv,
                        &mut extra,
                    )
                    .map_err(CliError::Config)?;
                }
            } else {
                config_arg(&cmd, &path, "the top level", &key, value, &argv, &mut extra)
                    .map_err(CliError::Config)?;
            }
        }
        // Insert right after the subcommand name, so explicit flags (later) win.
        let at = argv
            .iter()
            .position(|a| a == sub.as_str())
            .map_or(argv.len(), |i| i + 1);
        argv.splice(at..at, extra);
    }
    let matches = cmd.try_get_matches_from(argv).map_err(CliError::Clap)?;
    let mut cli = Cli::from_arg_matches(&matches).map_err(CliError::Clap)?;
    // A token inherited from the environment never conflicts with one the user gives on the
    // command line (or in the config file): the given one wins.
    if let Some((_, sub)) = matches.subcommand() {
        let (token, file) = match &mut cli.command {
            Command::Serve(a) => (&mut a.token, &mut a.token_file),
            Command::Register(RegisterArgs { client: c, .. })
            | Command::HipacheSync(HipacheArgs { client: c, .. })
            | Command::Status(StatusArgs { client: c, .. })
            | Command::Docker(DockerArgs { client: c, .. }) => (&mut c.token, &mut c.token_file),
            // No token flags: asking clap about them would be an error.
            Command::Check(_) | Command::Completions(_) | Command::Man(_) => return Ok(cli),
        };
        let from_env =
            |id: &str| sub.value_source(id) == Some(clap::parser::ValueSource::EnvVariable);
        let (env_token, env_file) = (from_env("token"), from_env("token_file"));
        if token.is_some() && file.is_some() {
            if env_token && !env_file {
                *token = None;
            } else if env_file && !env_token {
                *file = None;
            }
        }
    }
    Ok(cli)
}

/// An error naming the file, the table and the valid keys when `key` is not a flag of `cmd`.
fn check_key(
    cmd: &clap::Command,
    path: &std::path::Path,
    table: &str,
    key: &str,
) -> Result<(), String> {
    if cmd
        .get_arguments()
        .any(|a| a.get_long() == Some(key) && key != "config" && key != "help")
    {
        return Ok(());
    }
    let valid: Vec<&str> = cmd
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !["help", "version", "config"].contains(l))
        .collect();
    Err(format!(
        "--config {}: unknown key {key:?} in {table}; valid keys: {}",
        path.display(),
        valid.join(", ")
    ))
}

/// Turns one config entry into flags, unless the command line or the environment sets it.
fn config_arg(
    cmd: &clap::Command,
    path: &std::path::Path,
    table: &str,
    key: &str,
    value: &toml::Value,
    argv: &[std::ffi::OsString],
    extra: &mut Vec<std::ffi::OsString>,
) -> Result<(), String> {
    let Some(arg) = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(key) && key != "config" && key != "help")
    else {
        let valid: Vec<&str> = cmd
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !["help", "version", "config"].contains(l))
            .collect();
        return Err(format!(
            "--config {}: unknown key {key:?} in {table}; valid keys: {}",
            path.display(),
            valid.join(", ")
        ));
    };
    let flag = format!("--{key}");
    // Only the user's own flags count: what follows `--` belongs to the child command
    // (`register ... -- app --port 9090` must not drop the file's `port`).
    let on_command_line = argv
        .iter()
        .take_while(|a| a.to_str() != Some("--"))
        .any(|a| {
            a.to_str()
                .is_some_and(|a| a == flag || a.starts_with(&format!("{flag}=")))
        });
    let in_env = arg
        .get_env()
        .and_then(std::env::var_os)
        .is_some_and(|v| !v.is_empty());
    if on_command_line || in_env {
        return Ok(());
    }
    let scalar = |v: &toml::Value| -> Result<String, String> {
        match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(f) => Ok(f.to_string()),
            other => Err(format!(
                "--config {}: {key} in {table} must be a string or a number, not {}",
                path.display(),
                other.type_str()
            )),
        }
    };
    let takes_value = arg.get_num_args().is_some_and(|n| n.takes_values());
    match value {
        toml::Value::Boolean(b) if !takes_value => {
            if *b {
                extra.push(flag.into());
            }
        }
        toml::Value::Array(items) => {
            for item in items {
                extra.push(flag.clone().into());
                extra.push(scalar(item)?.into());
            }
        }
        v => {
            extra.push(flag.into());
            extra.push(scalar(v)?.into());
        }
    }
    Ok(())
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once
pub enum Command {
    /// Run the server: authoritative DNS (UDP and TCP) and the HTTP registration API.
    Serve(ServeArgs),
    /// Register this node under a role and keep it registered (the node agent).
    Register(RegisterArgs),
    /// Mirror a role's live nodes into hipache's redis keys.
    HipacheSync(HipacheArgs),
    /// Print roles and nodes from a running server.
    Status(StatusArgs),
    /// Register the containers of this docker host that carry a `rollcall.role` label, from
    /// the docker engine's events: no agent inside the containers.
    ///
    /// Labels read on each container: rollcall.role (required; containers without it are left
    /// alone), rollcall.port (default: the image's only exposed TCP port, else none),
    /// rollcall.service (default http), rollcall.weight (default 1), rollcall.ttl (default
    /// --ttl), rollcall.node (default: the container's name made a DNS label: my_app.1 ->
    /// my-app-1), rollcall.network (which network's address to register; default --network,
    /// else the container's only network) and rollcall.meta.KEY=VALUE (meta KEY).
    ///
    /// A container is registered while it runs and, when it has a HEALTHCHECK, while it is
    /// healthy. It is deregistered at once (DELETE) when docker stops or kills it, when it
    /// dies, is paused or turns unhealthy, and registered again when it starts, is unpaused or
    /// turns healthy. Registrations are renewed by PUT every ttl/3: if this host dies, its
    /// containers leave DNS within their TTL; if the watcher restarts within the TTL, nothing
    /// changes (an unchanged registration is a renewal). At start and whenever the event
    /// stream is lost (reconnecting with backoff) it lists the containers again, registers the
    /// live ones and deregisters those it registered that are gone (its registrations carry
    /// the meta keys docker-watcher and docker-container).
    ///
    /// Run one per docker host, with the docker socket mounted:
    /// `docker run -v /var/run/docker.sock:/var/run/docker.sock rollcall-server docker --api
    /// http://rollcall:8053`.
    Docker(DockerArgs),
    /// Probe tcp://HOST:PORT or http(s)://HOST:PORT/PATH once: exit 0 if it passes (connects,
    /// or a 2xx), 1 if not. For container healthchecks in images without curl, e.g.
    /// `rollcall check http://127.0.0.1:8053/healthz`.
    Check(CheckArgs),
    /// Print a shell completion script: `rollcall completions bash > /etc/bash_completion.d/rollcall`
    /// (also zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
    /// Print the man page, or with --dir write one page per command (rollcall.1,
    /// rollcall-serve.1, ...): `rollcall man --dir /usr/local/share/man/man1`.
    Man(ManArgs),
}

#[derive(Args, Debug, Clone)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Args, Debug, Clone)]
pub struct ManArgs {
    /// Write every page (rollcall.1 and one per subcommand) into this directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// `rollcall completions SHELL`: generated from these very definitions.
pub fn print_completions(a: &CompletionsArgs) -> Result<u8, (u8, String)> {
    clap_complete::generate(a.shell, &mut command(), "rollcall", &mut std::io::stdout());
    Ok(0)
}

/// `rollcall man [--dir DIR]`: generated from these very definitions.
pub fn print_man(a: &ManArgs) -> Result<u8, (u8, String)> {
    let cmd = command();
    match &a.dir {
        Some(dir) => clap_mangen::generate_to(cmd, dir).map(|()| 0).map_err(|e| {
            (
                1,
                format!("cannot write the man pages to {}: {e}", dir.display()),
            )
        }),
        None => clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .map(|()| 0)
            .map_err(|e| (1, format!("cannot print the man page: {e}"))),
    }
}

#[derive(Args, Debug, Clone)]
pub struct CheckArgs {
    /// What to probe: tcp://HOST:PORT, http://HOST:PORT/PATH or https://HOST:PORT/PATH (as
    /// register's --check).
    pub target: String,

    #[command(flatten)]
    pub tls: TlsArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address for DNS over UDP and TCP; several (comma-separated or repeated) to answer on
    /// each, e.g. 0.0.0.0:53,[::]:53 for IPv4 and IPv6 (IPv6 sockets are IPv6-only).
    #[arg(
        long,
        env = "ROLLCALL_DNS_LISTEN",
        value_delimiter = ',',
        default_value = "127.0.0.1:1053"
    )]
    pub dns_listen: Vec<String>,

    /// Address for the HTTP API.
    #[arg(long, env = "ROLLCALL_HTTP_LISTEN", default_value = "127.0.0.1:8053")]
    pub http_listen: String,

    /// Zone the registered roles live in (`appserver.<zone>`).
    #[arg(long, env = "ROLLCALL_ZONE", default_value = "cluster.")]
    pub zone: String,

    /// Directory of static RFC 1035 zone files (`*.zone`); SIGHUP reloads them. A missing
    /// directory means no static records.
    #[arg(long, env = "ROLLCALL_ZONES", default_value = "zones")]
    pub zones: PathBuf,

    /// Directory where registrations are kept across restarts. Empty: keep nothing (memory only).
    #[arg(long, env = "ROLLCALL_DATA_DIR", default_value = "rollcall-data")]
    pub data_dir: String,

    /// TTL of answers for registered nodes, in seconds (never longer than a node's lease).
    #[arg(long, env = "ROLLCALL_RECORD_TTL", default_value_t = 5)]
    pub record_ttl: u32,

    /// Negative-caching TTL (SOA MINIMUM), in seconds: how long resolvers may remember that a
    /// name does not exist.
    #[arg(long, env = "ROLLCALL_NEGATIVE_TTL", default_value_t = 1)]
    pub negative_ttl: u32,

    /// Name of this name server, for SOA and NS (default: ns.<zone>).
    #[arg(long, env = "ROLLCALL_NS_NAME")]
    pub ns_name: Option<String>,

    /// UDP sockets (and threads) answering DNS. 0: one per CPU core.
    #[arg(long, env = "ROLLCALL_DNS_THREADS", default_value_t = 0)]
    pub dns_threads: usize,

    /// Require `Authorization: Bearer <TOKEN>` on writes (PUT, DELETE, sessions); this token
    /// may write every role.
    #[arg(long, env = "ROLLCALL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Tokens from this file, read again on SIGHUP. A file with a `[[token]]` line is a token
    /// table (TOML: `secret`, `roles` = role globs it may write such as ["appserver",
    /// "front*"], `read`, `name`); any other file's first line is the one token, which may
    /// write every role. A token writing outside its roles gets 403.
    #[arg(long, env = "ROLLCALL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Serve the API over HTTPS with this certificate (PEM, the chain from the server's own
    /// certificate up); needs --tls-key. Read again on SIGHUP: new connections get the new
    /// one, open ones keep theirs; a bad new file keeps the old certificate (logged).
    #[arg(long, env = "ROLLCALL_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, RSA or EC).
    #[arg(long, env = "ROLLCALL_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Writes (PUT, DELETE, sessions) need a client certificate signed by a CA of this PEM
    /// file; reads (GET, the status page, /metrics, /healthz) need none. Needs --tls-cert.
    #[arg(long, env = "ROLLCALL_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,

    /// Require the token on reads too.
    #[arg(long, env = "ROLLCALL_TOKEN_READS")]
    pub token_reads: bool,

    /// Only peers inside these networks may register, and only addresses inside them
    /// (repeatable, e.g. 10.0.0.0/8). Default: anyone, anything.
    #[arg(
        long = "allow-register",
        env = "ROLLCALL_ALLOW_REGISTER",
        value_delimiter = ','
    )]
    pub allow_register: Vec<String>,

    /// Only DNS clients inside these networks get answers; others get REFUSED (repeatable).
    /// Default: everyone.
    #[arg(
        long = "allow-query",
        env = "ROLLCALL_ALLOW_QUERY",
        value_delimiter = ','
    )]
    pub allow_query: Vec<String>,

    /// Longest blocking query (`GET /v1/roles/{role}?index=N&wait=...`): 30s, 500ms, 2m.
    #[arg(long, env = "ROLLCALL_MAX_WAIT", default_value = "10m")]
    pub max_wait: String,

    /// Most nodes registered at once; registrations beyond get HTTP 507.
    #[arg(long, env = "ROLLCALL_MAX_NODES", default_value_t = 200_000)]
    pub max_nodes: usize,

    /// Most nodes in one role.
    #[arg(long, env = "ROLLCALL_MAX_NODES_PER_ROLE", default_value_t = 20_000)]
    pub max_nodes_per_role: usize,

    /// Blocking queries one client address may have in progress; more get HTTP 503.
    #[arg(long, env = "ROLLCALL_MAX_WAITS_PER_CLIENT", default_value_t = crate::api::MAX_WAITERS_PER_CLIENT)]
    pub max_waits_per_client: usize,

    /// Also accept this name in the HTTP `Host` header (repeatable). Always accepted: IP
    /// addresses, single-label names (localhost, a compose service) and names in --zone; any
    /// other name is refused, so that a web page cannot reach the API by DNS rebinding.
    #[arg(
        long = "allow-host",
        env = "ROLLCALL_ALLOW_HOST",
        value_delimiter = ','
    )]
    pub allow_host: Vec<String>,

    /// UDP responses per second to one source prefix (/24, /56) before rate limiting starts;
    /// 0 turns it off. Beyond it, every --rate-limit-slip-th response is sent truncated (the
    /// resolver retries over TCP) and the others are dropped: rollcall is not an amplifier.
    #[arg(long, env = "ROLLCALL_RATE_LIMIT", default_value_t = 200)]
    pub rate_limit: u32,

    /// Of the responses over --rate-limit, send every N-th truncated (0: drop them all).
    #[arg(long, env = "ROLLCALL_RATE_LIMIT_SLIP", default_value_t = 2)]
    pub rate_limit_slip: u32,

    /// Sources never rate limited (repeatable; `none` for no exemption). Default: loopback and
    /// the private networks (10/8, 172.16/12, 192.168/16, fc00::/7) of this host's interfaces
    /// that do not carry the default route: the cluster's own clients. Inside a container,
    /// whose only interface carries the default route, give the stack's network here.
    #[arg(long, env = "ROLLCALL_RATE_LIMIT_EXEMPT", value_delimiter = ',')]
    pub rate_limit_exempt: Vec<String>,

    /// Accept registrations of any address. Without it, unspecified, multicast, broadcast and
    /// link-local addresses (169.254.169.254, the cloud metadata service, is one) are refused,
    /// and loopback addresses are accepted only from a peer on this host.
    #[arg(long, env = "ROLLCALL_ALLOW_ANY_ADDR")]
    pub allow_any_addr: bool,

    /// Share registrations with other rollcall servers through this etcd cluster (client URLs,
    /// comma-separated: http://10.0.0.1:2379,http://10.0.0.2:2379). etcd is then the only truth,
    /// every server answers DNS and the API alike, and --data-dir only keeps a local copy to
    /// answer from when starting while etcd is away. Unset: one server, registrations in
    /// --data-dir.
    #[arg(long, env = "ROLLCALL_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,

    /// Forward names outside the served zones to upstream resolvers, like dnsmasq's `server=`:
    /// `[DOMAIN=]ADDR[:PORT][,ADDR...]` (repeatable; `;` separates rules in the environment).
    /// The most specific DOMAIN wins; no DOMAIN means every name; `DOMAIN=` with no address
    /// means never forward names under DOMAIN. Unset: names outside our zones get REFUSED.
    #[arg(long, env = "ROLLCALL_FORWARD", value_delimiter = ';')]
    pub forward: Vec<String>,

    /// Clients whose queries may be forwarded (repeatable; `none` for nobody); others get
    /// REFUSED for names outside our zones and nothing is sent upstream. Never widened by
    /// --allow-query. Default: loopback and the private networks (10/8, 172.16/12,
    /// 192.168/16, fc00::/7) of this host's interfaces that do not carry the default route;
    /// never link-local, never the network the world comes in through (a neighbour there can
    /// be impersonated). Inside a container, give the stack's network here.
    #[arg(long, env = "ROLLCALL_ALLOW_RECURSION", value_delimiter = ',')]
    pub allow_recursion: Vec<String>,

    /// Longest wait for one upstream before the next one is asked.
    #[arg(long, env = "ROLLCALL_FORWARD_TIMEOUT", default_value = "1s")]
    pub forward_timeout: String,

    /// Longest a forwarded query may take over all upstreams; then SERVFAIL (so that the
    /// client's resolver moves on quickly).
    #[arg(long, env = "ROLLCALL_FORWARD_BUDGET", default_value = "2s")]
    pub forward_budget: String,

    /// Forwarded answers kept in the cache, at most (0: no cache). TTLs are respected and
    /// count down.
    #[arg(long, env = "ROLLCALL_FORWARD_CACHE", default_value_t = 10_000)]
    pub forward_cache: usize,

    /// Memory the forwarding cache may use: 32MiB, 512KiB, 1GiB, or bytes (0: no cache). What
    /// an entry costs is counted (its bytes, key and bookkeeping); answers over 16 KiB are
    /// served but never cached.
    #[arg(long, env = "ROLLCALL_FORWARD_CACHE_SIZE", default_value = "32MiB")]
    pub forward_cache_size: String,

    /// Distinct questions asked upstream at once (identical questions share one); beyond,
    /// SERVFAIL (counted in /metrics).
    #[arg(long, env = "ROLLCALL_FORWARD_MAX_INFLIGHT", default_value_t = 1_000)]
    pub forward_max_inflight: usize,

    /// Forwarded queries one client prefix (/24, /56) may have waiting at once; beyond,
    /// SERVFAIL (counted in /metrics), so that one client cannot take every slot.
    #[arg(long, env = "ROLLCALL_FORWARD_MAX_PER_CLIENT", default_value_t = 100)]
    pub forward_max_per_client: usize,

    /// Key prefix in etcd (several rollcall clusters can share one etcd).
    #[arg(long, env = "ROLLCALL_ETCD_PREFIX", default_value = "/rollcall")]
    pub etcd_prefix: String,

    /// Longest an etcd call may take, moving between members included; then writes answer 503.
    #[arg(long, env = "ROLLCALL_ETCD_TIMEOUT", default_value = "2s")]
    pub etcd_timeout: String,

    /// TCP connect timeout per etcd member.
    #[arg(long, env = "ROLLCALL_ETCD_DIAL_TIMEOUT", default_value = "1s")]
    pub etcd_dial_timeout: String,

    /// How often this server's copy is compared with a full list from etcd (and repaired):
    /// a safety net against lost watch events.
    #[arg(long, env = "ROLLCALL_ETCD_RESYNC", default_value = "5m")]
    pub etcd_resync: String,

    /// CA certificates (PEM) that etcd's certificate must be signed by, for https:// in
    /// --etcd (default: the system's CAs).
    #[arg(long, env = "ROLLCALL_ETCD_CACERT")]
    pub etcd_cacert: Option<PathBuf>,

    /// This server's client certificate (PEM) for etcd's --client-cert-auth; with --etcd-key.
    #[arg(long, env = "ROLLCALL_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,

    /// The private key (PEM) of --etcd-cert.
    #[arg(long, env = "ROLLCALL_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,

    /// etcd user (etcd with auth enabled); its password comes from --etcd-password-file or
    /// the environment variable ROLLCALL_ETCD_PASSWORD, never from the command line.
    #[arg(long, env = "ROLLCALL_ETCD_USER")]
    pub etcd_user: Option<String>,

    /// File holding the password of --etcd-user (one line; a final newline is ignored).
    #[arg(long, env = "ROLLCALL_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,
}

/// How a client subcommand reaches the API: which servers, and with which token. Shared by
/// `register`, `hipache-sync` and `status`, so the three take the same flags the same way.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// URL of the rollcall HTTP API; several (comma-separated or repeated) for servers that
    /// share etcd. register and hipache-sync stick to one and move to the next when it fails
    /// (a connect error, a 2 s timeout, a 5xx, a silent session); status uses the first that
    /// answers /healthz.
    #[arg(
        long,
        env = "ROLLCALL_API",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8053"
    )]
    pub api: Vec<String>,

    /// Bearer token for the API: needed for writes when the server has one, and for reads
    /// too with --token-reads.
    #[arg(long, env = "ROLLCALL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Read the token from this file (first line).
    #[arg(long, env = "ROLLCALL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    #[command(flatten)]
    pub tls: TlsArgs,
}

/// How a client checks an https:// server and proves who it is. Shared by every command that
/// reaches a URL (`register`, `hipache-sync`, `status`, `check`).
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// For https:// URLs: the CA certificate(s) (PEM) the server's certificate must be signed
    /// by. Default: the system's CAs (/etc/ssl/certs).
    #[arg(long, env = "ROLLCALL_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// Client certificate (PEM) shown to https:// servers: needed for writes when the server
    /// has --tls-client-ca. Needs --client-key.
    #[arg(long, env = "ROLLCALL_CLIENT_CERT", value_name = "FILE")]
    pub client_cert: Option<PathBuf>,

    /// The private key of --client-cert (PEM).
    #[arg(long, env = "ROLLCALL_CLIENT_KEY", value_name = "FILE")]
    pub client_key: Option<PathBuf>,
}

impl TlsArgs {
    pub fn files(&self) -> crate::tls::ClientFiles {
        crate::tls::ClientFiles {
            ca_file: self.ca_file.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub client: ApiArgs,

    /// Role to register under (a DNS label, e.g. appserver).
    #[arg(long, env = "ROLLCALL_ROLE")]
    pub role: String,

    /// Node name (a DNS label). Default: this host's name (its first label, lower-cased).
    #[arg(long, env = "ROLLCALL_NODE")]
    pub node: Option<String>,

    /// Address to register. Default: the address the server sees this agent connect from.
    #[arg(long, env = "ROLLCALL_ADDR")]
    pub addr: Option<String>,

    /// Port of the service (published in SRV records).
    #[arg(long, env = "ROLLCALL_PORT")]
    pub port: Option<u16>,

    /// Service name for SRV (`_<service>._tcp.<role>.<zone>`).
    #[arg(long, env = "ROLLCALL_SERVICE", default_value = "http")]
    pub service: String,

    /// Lease in seconds: the node disappears this long after the agent goes silent.
    #[arg(long, env = "ROLLCALL_TTL", default_value_t = 5)]
    pub ttl: u32,

    /// SRV weight.
    #[arg(long, env = "ROLLCALL_WEIGHT", default_value_t = 1)]
    pub weight: u16,

    /// Health check: tcp://HOST:PORT or http(s)://HOST:PORT/PATH (https checked with --ca-file,
    /// as the API). Registered only while it passes.
    #[arg(long, env = "ROLLCALL_CHECK")]
    pub check: Option<String>,

    /// After SIGTERM/SIGINT with a child command: time between deregistering and passing the
    /// signal on, so resolvers stop handing out the address (default: record TTL + 1 s = 6s;
    /// e.g. 2s, 500ms, 0). A second signal cuts it short.
    #[arg(long, env = "ROLLCALL_DRAIN", default_value = "6s")]
    pub drain: String,

    /// Signal the command gets when it is to stop, after the drain (default: the one the agent
    /// received, SIGTERM or SIGINT). nginx stops gracefully on QUIT: `--stop-signal QUIT`.
    /// One of TERM, INT, QUIT, HUP, USR1, USR2, KILL (with or without SIG).
    #[arg(long, env = "ROLLCALL_STOP_SIGNAL")]
    pub stop_signal: Option<String>,

    /// Command to run as a child (in its own process group): registered while it runs, signals
    /// passed on to it, its exit code passed through (128+N when killed by signal N).
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct HipacheArgs {
    #[command(flatten)]
    pub client: ApiArgs,

    /// Role whose nodes are hipache's backends.
    #[arg(long, env = "ROLLCALL_HIPACHE_ROLE", default_value = "frontserver")]
    pub role: String,

    /// Redis URL: redis://[:password@]host[:port][/db][#prefix] (the same URL as hipache's
    /// `driver`; a `#prefix` is put before every key, as hipache does).
    #[arg(long, env = "ROLLCALL_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,

    /// Frontend host name(s) to keep (`frontend:<host>`), e.g. www.example.com, *.example.com
    /// or *; repeatable or comma-separated. Folded to lower case, as hipache looks them up.
    #[arg(
        long = "frontend",
        env = "ROLLCALL_FRONTEND",
        value_delimiter = ',',
        required = true
    )]
    pub frontends: Vec<String>,

    /// Identifier written as element 0 of each list (default: the role name).
    #[arg(long, env = "ROLLCALL_IDENTIFIER")]
    pub identifier: Option<String>,

    /// Scheme of backend URLs.
    #[arg(long, env = "ROLLCALL_SCHEME", default_value = "http")]
    pub scheme: String,

    /// Backend port; default: each node's registered port (when it has none: 80 for http,
    /// 443 for https).
    #[arg(long, env = "ROLLCALL_HIPACHE_PORT")]
    pub port: Option<u16>,

    /// Re-read the role from the API at least this often, as a safety net besides the
    /// blocking query (e.g. 60s, 500ms, 2m; 0: rely on the blocking query alone). The lists in
    /// redis are checked every second whatever this says.
    #[arg(long, env = "ROLLCALL_INTERVAL", default_value = "60s")]
    pub interval: String,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ApiArgs,

    /// Show only this role.
    #[arg(long, env = "ROLLCALL_STATUS_ROLE")]
    pub role: Option<String>,

    /// Print JSON instead of a table.
    #[arg(long, env = "ROLLCALL_STATUS_JSON")]
    pub json: bool,

    /// Redraw whenever the registrations change (blocking queries), until interrupted.
    #[arg(long, env = "ROLLCALL_STATUS_WATCH")]
    pub watch: bool,
}

/// `rollcall docker`: one per docker host.
#[derive(Args, Debug, Clone)]
pub struct DockerArgs {
    #[command(flatten)]
    pub client: ApiArgs,

    /// The docker engine's unix socket (unix:// may be given).
    #[arg(
        long,
        env = "ROLLCALL_DOCKER_SOCKET",
        default_value = "/var/run/docker.sock"
    )]
    pub docker_socket: String,

    /// Network whose address is registered, for containers without a rollcall.network label:
    /// its name (a compose network may be named without its project prefix: cluster for
    /// myproject_cluster). Unset: the container's only network; a container on several
    /// networks is then skipped with a warning.
    #[arg(long, env = "ROLLCALL_DOCKER_NETWORK")]
    pub network: Option<String>,

    /// Lease in seconds for containers without a rollcall.ttl label: a dead host's containers
    /// leave DNS this long after its last renewal, and a restarted watcher must be back
    /// within it for nothing to change.
    #[arg(long, env = "ROLLCALL_DOCKER_TTL", default_value_t = 10)]
    pub ttl: u32,

    /// Name this watcher marks its registrations with (meta docker-watcher), to find the ones
    /// it registered after a restart. Default: the docker engine's ID.
    #[arg(long, env = "ROLLCALL_DOCKER_WATCHER_ID")]
    pub watcher_id: Option<String>,

    /// On SIGTERM/SIGINT, deregister every container it registered. Default: leave them to
    /// their leases, so that a restarted watcher takes them over without a change in DNS.
    #[arg(long, env = "ROLLCALL_DOCKER_DEREGISTER_ON_EXIT")]
    pub deregister_on_exit: bool,
}
