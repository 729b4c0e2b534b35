//! Certificates for one control plane: a CA, serving certificates for the
//! API server and the kubelet (test or real), the API server's client
//! certificate for kubelets, and the service-account signing key pair.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};

/// A certificate and its private key, DER-encoded (for rustls).
pub struct ServingIdentity {
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

/// Files written by [`generate`], plus what the test kubelet serves with.
pub struct Pki {
    pub ca_cert: PathBuf,
    pub ca_pem: String,
    pub apiserver_cert: PathBuf,
    pub apiserver_key: PathBuf,
    pub service_account_public_key: PathBuf,
    pub service_account_private_key: PathBuf,
    pub kubelet: ServingIdentity,
    /// The kubelet's serving certificate and key as PEM files (the real kubelet reads files).
    pub kubelet_cert: PathBuf,
    pub kubelet_key: PathBuf,
    /// What the API server shows a kubelet that asks for a client certificate (the real one).
    pub apiserver_kubelet_client_cert: PathBuf,
    pub apiserver_kubelet_client_key: PathBuf,
}

const API_SERVER_NAMES: &[&str] = &[
    "127.0.0.1",
    "::1",
    "localhost",
    "10.0.0.1",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

pub fn generate(dir: &Path) -> anyhow::Result<Pki> {
    fs::create_dir_all(dir)?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "notebook-operator test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages =
        vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut ca_params);
    let ca_key = KeyPair::generate()?;
    let ca_pem = ca_params.self_signed(&ca_key)?.pem();
    let ca = Issuer::new(ca_params, ca_key);

    let (apiserver_cert, apiserver_key) = leaf(&ca, "kube-apiserver", API_SERVER_NAMES)?;
    let (kubelet_cert, kubelet_key) = leaf(&ca, "test-kubelet", &["127.0.0.1", "localhost"])?;
    let (client_cert, client_key) = client(&ca, "kube-apiserver-kubelet-client", "system:masters")?;
    let sa_key = KeyPair::generate()?;

    let write = |name: &str, contents: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        fs::write(&path, contents).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    };
    Ok(Pki {
        ca_cert: write("ca.crt", &ca_pem)?,
        apiserver_cert: write("apiserver.crt", &apiserver_cert.pem())?,
        apiserver_key: write("apiserver.key", &apiserver_key.serialize_pem())?,
        service_account_public_key: write("sa.pub", &sa_key.public_key_pem())?,
        service_account_private_key: write("sa.key", &sa_key.serialize_pem())?,
        kubelet_cert: write("kubelet.crt", &kubelet_cert.pem())?,
        kubelet_key: write("kubelet.key", &kubelet_key.serialize_pem())?,
        apiserver_kubelet_client_cert: write("apiserver-kubelet-client.crt", &client_cert.pem())?,
        apiserver_kubelet_client_key: write("apiserver-kubelet-client.key", &client_key.serialize_pem())?,
        kubelet: ServingIdentity {
            cert_der: kubelet_cert.der().to_vec(),
            key_der: kubelet_key.serialize_der(),
        },
        ca_pem,
    })
}

fn leaf(
    ca: &Issuer<'_, KeyPair>,
    common_name: &str,
    names: &[&str],
) -> anyhow::Result<(Certificate, KeyPair)> {
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok((cert, key))
}

/// A client certificate for `common_name` in group `organization`.
fn client(
    ca: &Issuer<'_, KeyPair>,
    common_name: &str,
    organization: &str,
) -> anyhow::Result<(Certificate, KeyPair)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.distinguished_name.push(DnType::OrganizationName, organization);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok((cert, key))
}

fn set_validity(params: &mut CertificateParams) {
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(2100, 1, 1);
}
