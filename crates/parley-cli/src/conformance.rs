//! `parley conformance`: the black-box MIMI conformance kit (`parley-conformance`) on the
//! command line.

use anyhow::{bail, Context};
use parley_conformance::KitConfig;
use parley_proto::{Domain, UserId};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct ConformanceArgs {
    /// The provider under test: https://HOST[:PORT][/PATH] of its federation listener. HOST may
    /// be an address (then name the domain with --peer); its certificate is checked against the
    /// peer's domain.
    pub peer_url: String,
    /// The peer's domain, when HOST in the URL is not it.
    #[arg(long = "peer", value_name = "DOMAIN")]
    pub peer: Option<String>,
    /// The provider domain the kit speaks as (its certificate must name it, and the peer must
    /// trust its CA and reach it at --listen).
    #[arg(long = "as", value_name = "DOMAIN")]
    pub as_domain: String,
    /// PEM certificate chain for --as (used as TLS server and client certificate).
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// PEM private key of --cert.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// PEM CA certificate(s) the peer's certificate chains to.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// Where the kit's federation listener accepts the peer's calls (notify, updateConsent...).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// A test user at the peer (user@domain) whose operator follows the WAIT lines: also runs
    /// the cooperative full flow.
    #[arg(long, value_name = "USER")]
    pub peer_user: Option<String>,
    /// Seconds to wait for each step the peer or its operator takes (at most 30 s per request).
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
}

/// The peer's domain: `--peer`, else the URL's host.
fn peer_domain(args: &ConformanceArgs) -> anyhow::Result<Domain> {
    let name = match &args.peer {
        Some(p) => p.clone(),
        None => {
            let url = url::Url::parse(&args.peer_url)
                .with_context(|| format!("{} is not a URL", args.peer_url))?;
            if url.scheme() != "https" {
                bail!("the provider's URL must be https://");
            }
            url.host_str()
                .map(str::to_owned)
                .context("the provider's URL names no host")?
        }
    };
    Domain::parse(&name).with_context(|| {
        format!("{name} is not a domain; name the provider's domain with --peer DOMAIN")
    })
}

pub async fn run(args: ConformanceArgs) -> anyhow::Result<()> {
    let config = KitConfig {
        peer: peer_domain(&args)?,
        peer_url: args.peer_url.clone(),
        as_domain: Domain::parse(&args.as_domain).context("--as")?,
        cert: args.cert,
        key: args.key,
        ca: args.ca,
        listen: args.listen,
        peer_user: args
            .peer_user
            .as_deref()
            .map(UserId::parse)
            .transpose()
            .context("--peer-user")?,
        timeout: Duration::from_secs(args.timeout),
    };
    let summary = parley_conformance::run(config, &mut std::io::stdout())
        .await
        .context("the conformance kit could not run")?;
    if summary.failed > 0 {
        bail!("{} conformance check(s) failed", summary.failed);
    }
    Ok(())
}
