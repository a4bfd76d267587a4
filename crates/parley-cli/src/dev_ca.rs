//! `parley dev-ca`: a local certificate authority for development and tests, so providers can
//! authenticate each other with mutual TLS (each certificate names the domains it may speak for).
//! Never for production: the CA key sits unencrypted on disk.

use anyhow::{bail, Context};
use clap::Subcommand;
use parley_proto::Domain;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// The CA's name; issuing rebuilds the issuer from it and the stored key.
const CA_NAME: &str = "Parley development CA";

#[derive(Debug, Subcommand)]
pub enum DevCaCommand {
    /// Create a CA in DIR: DIR/ca.crt and DIR/ca.key.
    Init { dir: PathBuf },
    /// Issue a certificate naming the given domains: DIR/DOMAIN.crt and DIR/DOMAIN.key (first domain).
    Issue {
        dir: PathBuf,
        #[arg(required = true)]
        domains: Vec<String>,
    },
}

pub fn run(cmd: DevCaCommand) -> anyhow::Result<()> {
    match cmd {
        DevCaCommand::Init { dir } => {
            init(&dir)?;
            println!(
                "wrote {} and {}",
                dir.join("ca.crt").display(),
                dir.join("ca.key").display()
            );
        }
        DevCaCommand::Issue { dir, domains } => {
            let (cert, key) = issue(&dir, &domains)?;
            println!("wrote {} and {}", cert.display(), key.display());
        }
    }
    Ok(())
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn write_new(path: &Path, contents: &str) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))
}

/// Creates the CA; refuses to overwrite an existing one.
pub fn init(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
    if cert_path.exists() || key_path.exists() {
        bail!(
            "{} already holds a CA; use another directory",
            dir.display()
        );
    }
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    write_new(&cert_path, &cert.pem())?;
    write_new(&key_path, &key.serialize_pem())?;
    Ok(())
}

/// Issues a certificate for `domains` (server and client authentication, for mutual TLS).
pub fn issue(dir: &Path, domains: &[String]) -> anyhow::Result<(PathBuf, PathBuf)> {
    let Some(first) = domains.first() else {
        bail!("name at least one domain");
    };
    for d in domains {
        Domain::parse(d).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let ca_key_path = dir.join("ca.key");
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).with_context(|| {
        format!(
            "cannot read {} (run `parley dev-ca init` first)",
            ca_key_path.display()
        )
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).context("ca.key is not a private key")?;
    let issuer = Issuer::new(ca_params()?, ca_key);

    let mut params = CertificateParams::new(domains.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, first.as_str());
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = (
        dir.join(format!("{first}.crt")),
        dir.join(format!("{first}.key")),
    );
    write_new(&cert_path, &cert.pem())?;
    write_new(&key_path, &key.serialize_pem())?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use std::sync::Arc;

    fn pem_certs(path: &Path) -> Vec<CertificateDer<'static>> {
        let pem = std::fs::read(path).unwrap();
        rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn issued_certificates_chain_to_the_ca_and_name_their_domains() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        assert!(init(dir.path()).is_err(), "never overwrite a CA");
        let (cert, _key) = issue(dir.path(), &["chirp.test".into(), "wave.test".into()]).unwrap();
        assert!(cert.ends_with("chirp.test.crt"));

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(pem_certs(&dir.path().join("ca.crt")).remove(0))
            .unwrap();
        let roots = Arc::new(roots);
        let server_verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let leaf = pem_certs(&cert).remove(0);
        for (name, ok) in [
            ("chirp.test", true),
            ("wave.test", true),
            ("evil.test", false),
        ] {
            let verdict = server_verifier.verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from(name).unwrap(),
                &[],
                UnixTime::now(),
            );
            assert_eq!(verdict.is_ok(), ok, "{name}: {verdict:?}");
        }
        // The same certificate authenticates the provider as a TLS client (mutual TLS).
        let client_verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .unwrap();
        assert!(client_verifier
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .is_ok());

        // A certificate from another CA does not chain.
        let other = tempfile::tempdir().unwrap();
        init(other.path()).unwrap();
        let (foreign, _) = issue(other.path(), &["chirp.test".into()]).unwrap();
        let foreign = pem_certs(&foreign).remove(0);
        assert!(server_verifier
            .verify_server_cert(
                &foreign,
                &[],
                &ServerName::try_from("chirp.test").unwrap(),
                &[],
                UnixTime::now()
            )
            .is_err());
    }

    #[test]
    fn bad_requests_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = issue(dir.path(), &["chirp.test".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("dev-ca init"), "{err:#}");
        init(dir.path()).unwrap();
        assert!(issue(dir.path(), &["Not A Domain".into()]).is_err());
        assert!(issue(dir.path(), &[]).is_err());
    }
}
