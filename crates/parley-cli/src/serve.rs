//! `parley serve`: run a provider until Ctrl-C or SIGTERM.

use anyhow::Context;
use clap::Args;
use parley_server::config::ServerConfig;
use parley_server::Server;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A domain this deployment hosts (repeatable). Default: `localhost`.
    #[arg(long = "domain", env = "PARLEY_DOMAINS", value_delimiter = ',')]
    pub domains: Vec<String>,
    /// Address of the client API.
    #[arg(long, env = "PARLEY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the database.
    #[arg(long, env = "PARLEY_DATA")]
    pub data: Option<PathBuf>,
    /// TOML config file with the same settings plus per-domain policy (flags override it).
    #[arg(long, env = "PARLEY_CONFIG")]
    pub config: Option<PathBuf>,
    /// PEM certificate chain for TLS on the client API.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the client API.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Allow plain HTTP on a non-loopback address (never in production).
    #[arg(long)]
    pub insecure_http: bool,
    /// Address of the provider-to-provider (MIMI) listener; always mutual TLS.
    #[arg(long, env = "PARLEY_FEDERATION_LISTEN")]
    pub federation_listen: Option<SocketAddr>,
    /// This provider's certificate (PEM) for federation; repeat per domain, paired with --federation-key.
    #[arg(long)]
    pub federation_cert: Vec<PathBuf>,
    /// Private key (PEM) of the --federation-cert at the same position.
    #[arg(long)]
    pub federation_key: Vec<PathBuf>,
    /// CA certificate (PEM) that peer providers' certificates must chain to.
    #[arg(long)]
    pub peer_ca: Option<PathBuf>,
    /// A peer provider's base URL, DOMAIN=URL (repeatable); other peers are https://DOMAIN.
    #[arg(long = "peer", value_parser = parse_peer)]
    pub peers: Vec<(String, String)>,
    /// Longest wait between retries of deliveries to a peer that is down, in seconds (default 60).
    #[arg(long, value_name = "SECONDS")]
    pub peer_retry_cap: Option<u64>,
}

fn parse_peer(s: &str) -> Result<(String, String), String> {
    let (domain, url) = s
        .split_once('=')
        .ok_or_else(|| format!("expected DOMAIN=URL, got {s:?}"))?;
    Ok((domain.to_owned(), url.to_owned()))
}

impl ServeArgs {
    pub fn into_config(self) -> anyhow::Result<ServerConfig> {
        let mut config = match &self.config {
            Some(path) => ServerConfig::from_file(path)?,
            None => ServerConfig::default(),
        };
        if !self.domains.is_empty() {
            let listed = std::mem::take(&mut config.domains);
            for name in &self.domains {
                match listed.iter().find(|d| &d.name == name) {
                    Some(d) => config.domains.push(d.clone()),
                    None => config.add_domain(name),
                }
            }
        }
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(data) = self.data {
            config.data = data;
        }
        if self.tls_cert.is_some() {
            config.tls_cert = self.tls_cert;
            config.tls_key = self.tls_key;
        }
        config.insecure_http |= self.insecure_http;
        if self.federation_listen.is_some() {
            config.federation_listen = self.federation_listen;
        }
        if !self.federation_cert.is_empty() {
            config.federation_cert = self.federation_cert;
            config.federation_key = self.federation_key;
        }
        if self.peer_ca.is_some() {
            config.peer_ca = self.peer_ca;
        }
        config.peers.extend(self.peers);
        if let Some(cap) = self.peer_retry_cap {
            config.peer_retry_cap_secs = cap;
        }
        config.validate()?;
        Ok(config)
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let server = Server::start(config)
        .await
        .context("cannot start the server")?;
    // Announce where we serve; a closed stdout (a supervisor that stopped reading) must not
    // take the server down, so write errors are ignored.
    let mut out = std::io::stdout();
    let _ = writeln!(out, "parley serving on {}", server.url());
    if let Some(fed) = server.federation_addr() {
        let _ = writeln!(out, "MIMI federation (mutual TLS) on https://{fed}");
    }
    let _ = out.flush();
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
