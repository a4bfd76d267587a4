//! Why a kit run could not run at all (a check that fails is a `FAIL` line, not an error).

#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("bad TLS material: {0}")]
    Tls(String),
    #[error("bad peer URL {0:?}: expected https://HOST[:PORT][/PATH]")]
    PeerUrl(String),
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, String),
    #[error("cannot listen on {0}: {1}")]
    Listen(std::net::SocketAddr, std::io::Error),
    #[error("cannot write the report: {0}")]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Mls(#[from] crate::mls::MlsError),
}
