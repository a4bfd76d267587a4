//! Several providers in one process on loopback, peered with each other over MIMI with mutual
//! TLS from a throwaway `dev-ca`: what `parley demo` and `parley bench --federated` run on.

use crate::dev_ca;
use anyhow::Context;
use parley_server::config::ServerConfig;
use parley_server::Server;
use std::net::SocketAddr;
use std::path::Path;

fn free_loopback_addr() -> anyhow::Result<SocketAddr> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(probe.local_addr()?)
}

/// Starts one provider per domain (data under `dir`), each peering with all the others by
/// their federation addresses. `tweak` adjusts every config before start (limits, for the load
/// tool).
pub async fn start(
    dir: &Path,
    domains: &[&str],
    tweak: impl Fn(&mut ServerConfig),
) -> anyhow::Result<Vec<Server>> {
    let ca = dir.join("dev-ca");
    dev_ca::init(&ca)?;
    let mut federation = Vec::new();
    for domain in domains {
        dev_ca::issue(&ca, &[(*domain).to_owned()])?;
        federation.push(free_loopback_addr()?);
    }
    let mut servers = Vec::new();
    for (i, domain) in domains.iter().enumerate() {
        let mut config = ServerConfig {
            listen: "127.0.0.1:0".parse()?,
            data: dir.join(domain),
            federation_listen: Some(federation[i]),
            federation_cert: vec![ca.join(format!("{domain}.crt"))],
            federation_key: vec![ca.join(format!("{domain}.key"))],
            peer_ca: Some(ca.join("ca.crt")),
            peers: domains
                .iter()
                .zip(&federation)
                .filter(|(d, _)| *d != domain)
                .map(|(d, addr)| (d.to_string(), format!("https://{addr}")))
                .collect(),
            ..Default::default()
        };
        config.add_domain(domain);
        tweak(&mut config);
        let server = Server::start(config)
            .await
            .with_context(|| format!("cannot start provider {domain}"))?;
        servers.push(server);
    }
    Ok(servers)
}
