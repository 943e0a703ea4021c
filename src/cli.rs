//! Command-line flags, exactly as typed: every flag has an environment twin (`ROLLCALL_` + the
//! flag in upper snake case) and a default shown in `--help`. Validation happens in `config.rs`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "rollcall",
    version,
    about = "Service discovery for elastic container stacks: authoritative DNS + HTTP registration API",
    long_about = "rollcall keeps a live set of nodes per role (registered over HTTP with a TTL) and \
                  answers DNS for them: `dig appserver.cluster` returns every live appserver.\n\n\
                  Every flag also reads an environment variable: ROLLCALL_ + the flag in upper snake \
                  case (--dns-listen -> ROLLCALL_DNS_LISTEN)."
)]
pub struct Cli {
    /// Log format: text for people, json for log collectors. Filter with RUST_LOG (default info).
    #[arg(long, global = true, env = "ROLLCALL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server: authoritative DNS (UDP and TCP) and the HTTP registration API.
    Serve(ServeArgs),
    /// Register this node under a role and keep it registered (the node agent).
    Register(RegisterArgs),
    /// Mirror a role's live nodes into hipache's redis keys.
    HipacheSync(HipacheArgs),
    /// Print roles and nodes from a running server.
    Status(StatusArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address for DNS over UDP and TCP.
    #[arg(long, env = "ROLLCALL_DNS_LISTEN", default_value = "127.0.0.1:1053")]
    pub dns_listen: String,

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

    /// Require `Authorization: Bearer <TOKEN>` on writes (PUT, DELETE, sessions).
    #[arg(long, env = "ROLLCALL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Read the token from this file (first line).
    #[arg(long, env = "ROLLCALL_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,

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

    /// Most nodes registered at once; registrations beyond get HTTP 507.
    #[arg(long, env = "ROLLCALL_MAX_NODES", default_value_t = 200_000)]
    pub max_nodes: usize,

    /// Most nodes in one role.
    #[arg(long, env = "ROLLCALL_MAX_NODES_PER_ROLE", default_value_t = 20_000)]
    pub max_nodes_per_role: usize,
}

#[derive(Args, Debug, Clone)]
pub struct RegisterArgs {
    /// URL of the rollcall HTTP API.
    #[arg(long, env = "ROLLCALL_API", default_value = "http://127.0.0.1:8053")]
    pub api: String,

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

    /// Health check: tcp://HOST:PORT or http://HOST:PORT/PATH. Registered only while it passes.
    #[arg(long, env = "ROLLCALL_CHECK")]
    pub check: Option<String>,

    /// After SIGTERM/SIGINT with a child command: time between deregistering and passing the
    /// signal on, so resolvers stop handing out the address (default: record TTL + 1 s = 6s;
    /// e.g. 2s, 500ms, 0). A second signal cuts it short.
    #[arg(long, env = "ROLLCALL_DRAIN", default_value = "6s")]
    pub drain: String,

    /// Bearer token for the API.
    #[arg(long, env = "ROLLCALL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Read the token from this file.
    #[arg(long, env = "ROLLCALL_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,

    /// Command to run as a child (in its own process group): registered while it runs, signals
    /// passed on to it, its exit code passed through (128+N when killed by signal N).
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct HipacheArgs {
    /// URL of the rollcall HTTP API.
    #[arg(long, env = "ROLLCALL_API", default_value = "http://127.0.0.1:8053")]
    pub api: String,

    /// Role whose nodes are hipache's backends.
    #[arg(long, env = "ROLLCALL_ROLE", default_value = "frontserver")]
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
    #[arg(long, env = "ROLLCALL_PORT")]
    pub port: Option<u16>,

    /// Re-read the role from the API at least this often, as a safety net besides the
    /// blocking query (e.g. 60s, 500ms, 2m; 0: rely on the blocking query alone). The lists in
    /// redis are checked every second whatever this says.
    #[arg(long, env = "ROLLCALL_INTERVAL", default_value = "60s")]
    pub interval: String,

    /// Bearer token for the API.
    #[arg(long, env = "ROLLCALL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Read the token from this file.
    #[arg(long, env = "ROLLCALL_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// URL of the rollcall HTTP API.
    #[arg(long, env = "ROLLCALL_API", default_value = "http://127.0.0.1:8053")]
    pub api: String,

    /// Show only this role.
    #[arg(long, env = "ROLLCALL_ROLE")]
    pub role: Option<String>,

    /// Print JSON instead of a table.
    #[arg(long, env = "ROLLCALL_JSON")]
    pub json: bool,

    /// Redraw whenever the registrations change (blocking queries), until interrupted.
    #[arg(long, env = "ROLLCALL_WATCH")]
    pub watch: bool,

    /// Bearer token for the API (needed with --token-reads).
    #[arg(long, env = "ROLLCALL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}
