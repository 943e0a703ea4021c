//! What a container is to rollcall, from `docker inspect` alone (no IO here): the node to
//! register ([`target`]), whether it may be registered now ([`gate`]), and the node name a
//! container name makes ([`node_name`]).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use bollard::models::{ContainerInspectResponse, HealthStatusEnum};

use crate::agent::Gate;
use crate::registry::{parse_service, Label, MAX_TTL, MIN_TTL};

/// The labels read on a container.
pub const ROLE: &str = "rollcall.role";
pub const NODE: &str = "rollcall.node";
pub const PORT: &str = "rollcall.port";
pub const SERVICE: &str = "rollcall.service";
pub const WEIGHT: &str = "rollcall.weight";
pub const TTL: &str = "rollcall.ttl";
pub const NETWORK: &str = "rollcall.network";
pub const META_PREFIX: &str = "rollcall.meta.";

/// The meta keys every registration of the watcher carries.
pub const META_WATCHER: &str = "docker-watcher";
pub const META_CONTAINER: &str = "docker-container";

/// A container's registration: where, and the PUT body.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub role: Label,
    pub node: Label,
    pub ttl: u32,
    /// `{"addr", "port", "service", "weight", "ttl", "meta"}`.
    pub body: serde_json::Value,
}

/// The container's name (`/my_app.1`) as a DNS label (`my-app-1`): lower case, every run of
/// characters outside `a-z 0-9` one `-`, none at either end, at most 63 characters.
pub fn node_name(container_name: &str) -> Option<Label> {
    let mut out = String::new();
    for c in container_name.trim_start_matches('/').chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.truncate(63);
    Label::parse(out.trim_end_matches('-')).ok()
}

/// The container's short ID (12 characters), as docker prints it.
pub fn short_id(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn labels(info: &ContainerInspectResponse) -> Option<&HashMap<String, String>> {
    info.config.as_ref()?.labels.as_ref()
}

/// The container's name without docker's leading `/`.
pub fn name(info: &ContainerInspectResponse) -> String {
    info.name
        .as_deref()
        .unwrap_or("")
        .trim_start_matches('/')
        .to_string()
}

/// The node to register for a labelled container: `Ok(None)` when it has no `rollcall.role`,
/// `Err(why)` (a sentence saying what to change) when its labels or networks do not make one.
/// `network` is `--network`; `ttl` is `--ttl`.
pub fn target(
    info: &ContainerInspectResponse,
    network: Option<&str>,
    ttl: u32,
    watcher: &str,
) -> Result<Option<Target>, String> {
    let Some(labels) = labels(info) else {
        return Ok(None);
    };
    let Some(role) = labels.get(ROLE) else {
        return Ok(None);
    };
    let label = |key: &str| labels.get(key).map(|v| v.trim()).filter(|v| !v.is_empty());
    let role = Label::parse(role.trim()).map_err(|e| format!("label {ROLE}={role:?} {e}"))?;
    let node = match label(NODE) {
        Some(n) => Label::parse(n).map_err(|e| format!("label {NODE}={n:?} {e}"))?,
        None => node_name(&name(info)).ok_or_else(|| {
            format!(
                "its name {:?} makes no DNS label: give it a {NODE} label",
                name(info)
            )
        })?,
    };
    let ttl = match label(TTL) {
        Some(t) => t
            .parse::<u32>()
            .ok()
            .filter(|t| (MIN_TTL..=MAX_TTL).contains(t))
            .ok_or_else(|| {
                format!("label {TTL}={t:?} is not a TTL: use {MIN_TTL} to {MAX_TTL} seconds")
            })?,
        None => ttl,
    };
    let port = match label(PORT) {
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("label {PORT}={p:?} is not a port: use 1 to 65535"))?,
        ),
        None => exposed_port(info),
    };
    let service = label(SERVICE).unwrap_or("http");
    let service = parse_service(service).map_err(|e| format!("label {SERVICE}={service:?} {e}"))?;
    let weight = match label(WEIGHT) {
        Some(w) => w
            .parse::<u16>()
            .map_err(|_| format!("label {WEIGHT}={w:?} is not a weight: use 0 to 65535"))?,
        None => 1,
    };
    let addr = address(info, label(NETWORK).or(network))?;
    let mut meta: BTreeMap<String, String> = labels
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(META_PREFIX)?.to_string(), v.clone())))
        .filter(|(k, _)| !k.is_empty())
        .collect();
    meta.insert(META_WATCHER.into(), watcher.into());
    meta.insert(
        META_CONTAINER.into(),
        short_id(info.id.as_deref().unwrap_or("")).into(),
    );
    let mut body = serde_json::json!({
        "addr": addr.to_string(),
        "service": service.as_str(),
        "weight": weight,
        "ttl": ttl,
        "meta": meta,
    });
    if let Some(p) = port {
        body["port"] = p.into();
    }
    Ok(Some(Target {
        role,
        node,
        ttl,
        body,
    }))
}

/// The image's only exposed TCP port (`EXPOSE 8080`), if it has exactly one.
fn exposed_port(info: &ContainerInspectResponse) -> Option<u16> {
    let ports = info.config.as_ref()?.exposed_ports.as_ref()?;
    let mut tcp = ports.iter().filter_map(|p| {
        let (port, proto) = p.split_once('/').unwrap_or((p, "tcp"));
        (proto == "tcp").then(|| port.parse::<u16>().ok()).flatten()
    });
    match (tcp.next(), tcp.next()) {
        (Some(p), None) => Some(p),
        _ => None,
    }
}

/// The container's address on `network` (a name, or a compose network's name without its
/// project prefix), or on its only network.
fn address(info: &ContainerInspectResponse, network: Option<&str>) -> Result<IpAddr, String> {
    let networks = info
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .cloned()
        .unwrap_or_default();
    let mut names: Vec<&String> = networks.keys().collect();
    names.sort();
    let chosen = match network {
        Some(want) => {
            let suffix = format!("_{want}");
            let found = networks.get_key_value(want).or_else(|| {
                let mut by_suffix = networks.iter().filter(|(k, _)| k.ends_with(&suffix));
                match (by_suffix.next(), by_suffix.next()) {
                    (Some(one), None) => Some(one),
                    _ => None,
                }
            });
            found.ok_or_else(|| {
                format!(
                    "it is not on the network {want:?} (its networks: {}): attach it, or set \
                     its {NETWORK} label or --network to one of them",
                    list(&names)
                )
            })?
        }
        None => match names.len() {
            1 => networks.get_key_value(names[0]).expect("listed"),
            0 => {
                return Err(
                    "it is on no network (network mode host or none?): rollcall needs an \
                     address to register"
                        .into(),
                )
            }
            _ => {
                return Err(format!(
                    "it is on several networks ({}) and none is named: set its {NETWORK} \
                     label, or --network",
                    list(&names)
                ))
            }
        },
    };
    let (net, ep) = chosen;
    let ip = ep
        .ip_address
        .as_deref()
        .filter(|a| !a.is_empty())
        .or(ep.global_ipv6_address.as_deref().filter(|a| !a.is_empty()));
    ip.and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("it has no address on the network {net:?} (yet)"))
}

fn list(names: &[&String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Whether the container is running (paused ones included): only running containers have a
/// keeper; the others are deregistered and forgotten.
pub fn running(info: &ContainerInspectResponse) -> bool {
    info.state
        .as_ref()
        .is_some_and(|s| s.running == Some(true) && s.restarting != Some(true))
}

/// Whether a running container may be registered now: not paused, and healthy when it has a
/// HEALTHCHECK (`starting`: not yet).
pub fn gate(info: &ContainerInspectResponse) -> Gate {
    let Some(state) = info.state.as_ref() else {
        return Gate::Fail("the container has no state".into());
    };
    if state.paused == Some(true) {
        return Gate::Fail("the container is paused".into());
    }
    match state.health.as_ref().and_then(|h| h.status) {
        None | Some(HealthStatusEnum::NONE) | Some(HealthStatusEnum::EMPTY) => Gate::Pass,
        Some(HealthStatusEnum::HEALTHY) => Gate::Pass,
        Some(HealthStatusEnum::STARTING) => Gate::Pending,
        Some(HealthStatusEnum::UNHEALTHY) => Gate::Fail("the container is unhealthy".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn inspect(v: serde_json::Value) -> ContainerInspectResponse {
        serde_json::from_value(v).expect("docker's JSON")
    }

    fn container(
        labels: serde_json::Value,
        networks: serde_json::Value,
    ) -> ContainerInspectResponse {
        inspect(json!({
            "Id": "0123456789abcdef0123",
            "Name": "/proj_appserver_1",
            "State": {"Status": "running", "Running": true, "Paused": false, "Restarting": false},
            "Config": {"Labels": labels, "ExposedPorts": {"8080/tcp": {}}},
            "NetworkSettings": {"Networks": networks},
        }))
    }

    fn one_net() -> serde_json::Value {
        json!({"proj_cluster": {"IPAddress": "172.30.53.130"}})
    }

    #[test]
    fn node_names_from_container_names() {
        let n = |s: &str| node_name(s).map(|l| l.to_string());
        assert_eq!(n("/proj_appserver_1").as_deref(), Some("proj-appserver-1"));
        assert_eq!(n("/My.App__2-").as_deref(), Some("my-app-2"));
        assert_eq!(n("/_x_").as_deref(), Some("x"));
        assert_eq!(n(&"a".repeat(80)).map(|s| s.len()), Some(63));
        assert_eq!(
            n(&format!("{}_b", "a".repeat(62))).as_deref(),
            Some(&*"a".repeat(62))
        );
        assert_eq!(n("/__"), None);
    }

    #[test]
    fn unlabelled_containers_are_left_alone() {
        let c = container(json!({"com.example": "x"}), one_net());
        assert_eq!(target(&c, None, 10, "w").unwrap(), None);
    }

    #[test]
    fn a_labelled_container_makes_a_registration() {
        let c = container(
            json!({"rollcall.role": "AppServer", "rollcall.meta.version": "1.2", "rollcall.weight": "5"}),
            one_net(),
        );
        let t = target(&c, None, 10, "engine-1").unwrap().unwrap();
        assert_eq!(t.role.as_str(), "appserver");
        assert_eq!(t.node.as_str(), "proj-appserver-1");
        assert_eq!(t.ttl, 10);
        assert_eq!(
            t.body,
            json!({"addr": "172.30.53.130", "port": 8080, "service": "http", "weight": 5, "ttl": 10,
                   "meta": {"version": "1.2", "docker-watcher": "engine-1", "docker-container": "0123456789ab"}})
        );
        // Labels win over the defaults.
        let c = container(
            json!({"rollcall.role": "web", "rollcall.node": "web7", "rollcall.port": "9000",
                   "rollcall.service": "api", "rollcall.ttl": "3"}),
            one_net(),
        );
        let t = target(&c, None, 10, "w").unwrap().unwrap();
        assert_eq!(t.node.as_str(), "web7");
        assert_eq!(
            (t.body["port"].clone(), t.body["service"].clone()),
            (json!(9000), json!("api"))
        );
        assert_eq!((t.ttl, t.body["ttl"].clone()), (3, json!(3)));
    }

    #[test]
    fn bad_labels_say_which_and_what_to_do() {
        for (labels, needle) in [
            (json!({"rollcall.role": "bad_role"}), "rollcall.role"),
            (
                json!({"rollcall.role": "r", "rollcall.port": "0"}),
                "rollcall.port",
            ),
            (
                json!({"rollcall.role": "r", "rollcall.port": "http"}),
                "rollcall.port",
            ),
            (
                json!({"rollcall.role": "r", "rollcall.ttl": "0"}),
                "rollcall.ttl",
            ),
            (
                json!({"rollcall.role": "r", "rollcall.weight": "-1"}),
                "rollcall.weight",
            ),
            (
                json!({"rollcall.role": "r", "rollcall.node": "a.b"}),
                "rollcall.node",
            ),
            (
                json!({"rollcall.role": "r", "rollcall.service": "x_y"}),
                "rollcall.service",
            ),
        ] {
            let e = target(&container(labels.clone(), one_net()), None, 10, "w").unwrap_err();
            assert!(e.contains(needle), "{labels}: {e}");
        }
    }

    #[test]
    fn the_network_is_named_or_the_only_one() {
        let two = json!({"proj_cluster": {"IPAddress": "172.30.53.130"},
                         "proj_backend": {"IPAddress": "10.9.0.4"}});
        let role = json!({"rollcall.role": "r"});
        let e = target(&container(role.clone(), two.clone()), None, 10, "w").unwrap_err();
        assert!(
            e.contains("several networks") && e.contains("proj_backend, proj_cluster"),
            "{e}"
        );
        assert!(
            e.contains("rollcall.network") && e.contains("--network"),
            "{e}"
        );
        let addr = |c: &ContainerInspectResponse, n: Option<&str>| {
            target(c, n, 10, "w").map(|t| t.unwrap().body["addr"].as_str().unwrap().to_string())
        };
        let c = container(role.clone(), two.clone());
        assert_eq!(addr(&c, Some("proj_backend")).unwrap(), "10.9.0.4");
        // A compose network without its project prefix.
        assert_eq!(addr(&c, Some("backend")).unwrap(), "10.9.0.4");
        let e = addr(&c, Some("elsewhere")).unwrap_err();
        assert!(e.contains("not on the network \"elsewhere\""), "{e}");
        // The label wins over --network.
        let c = container(
            json!({"rollcall.role": "r", "rollcall.network": "proj_cluster"}),
            two,
        );
        assert_eq!(addr(&c, Some("backend")).unwrap(), "172.30.53.130");
        let e = addr(&container(role, json!({})), None).unwrap_err();
        assert!(e.contains("no network"), "{e}");
    }

    #[test]
    fn only_one_exposed_tcp_port_is_a_default() {
        let mut c = container(json!({"rollcall.role": "r"}), one_net());
        c.config.as_mut().unwrap().exposed_ports =
            Some(vec!["80/tcp".into(), "443/tcp".into(), "53/udp".into()]);
        assert_eq!(
            target(&c, None, 10, "w").unwrap().unwrap().body.get("port"),
            None
        );
        c.config.as_mut().unwrap().exposed_ports = Some(vec!["53/udp".into(), "80/tcp".into()]);
        assert_eq!(target(&c, None, 10, "w").unwrap().unwrap().body["port"], 80);
    }

    #[test]
    fn the_gate_follows_pause_and_health() {
        let state = |s: serde_json::Value| inspect(json!({"State": s}));
        assert_eq!(gate(&state(json!({"Running": true}))), Gate::Pass);
        assert!(running(&state(json!({"Running": true, "Paused": true}))));
        assert!(!running(&state(
            json!({"Running": false, "Status": "exited"})
        )));
        assert!(!running(&state(
            json!({"Running": true, "Restarting": true})
        )));
        assert_eq!(
            gate(&state(json!({"Running": true, "Paused": true}))),
            Gate::Fail("the container is paused".into())
        );
        let health = |h: &str| gate(&state(json!({"Running": true, "Health": {"Status": h}})));
        assert_eq!(health("healthy"), Gate::Pass);
        assert_eq!(health("starting"), Gate::Pending);
        assert_eq!(
            health("unhealthy"),
            Gate::Fail("the container is unhealthy".into())
        );
    }
}
