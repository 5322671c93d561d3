//! `certs`: a throwaway CA, a server certificate for localhost/127.0.0.1 and client
//! certificates (one per CN), as PEM files, for the mTLS login benchmark. ECDSA P-256
//! (rcgen's default), so moatmq (rustls) and Mosquitto (OpenSSL) use the same files.

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    /// Folder to write ca.crt, server.crt/.key and <cn>.crt/.key into (created).
    #[arg(long)]
    out: PathBuf,
    /// Client certificate CNs, comma separated.
    #[arg(long, default_value = "storm,probe", value_delimiter = ',')]
    clients: Vec<String>,
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}", args.out.display()))?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name = dn("moatmq-bench CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca = params.self_signed(&ca_key)?;
    write(&args.out, "ca.crt", &ca.pem())?;

    let issue = |params: CertificateParams, name: &str| -> anyhow::Result<()> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        write(&args.out, &format!("{name}.crt"), &cert.pem())?;
        write(&args.out, &format!("{name}.key"), &key.serialize_pem())
    };
    let mut server = CertificateParams::new(vec!["localhost".to_string()])?;
    server
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    server.distinguished_name = dn("localhost");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    issue(server, "server")?;
    for cn in &args.clients {
        let mut client = CertificateParams::default();
        client.distinguished_name = dn(cn);
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        issue(client, cn)?;
    }
    Ok(())
}

fn write(dir: &Path, name: &str, pem: &str) -> anyhow::Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, pem).with_context(|| format!("{}", path.display()))
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}
