//! What a TLS failure an agent meets most likely means, for its operator.

/// What a TLS failure in `why` (an error chain) most likely means, for the operator: which
/// side's certificate, and which setting; empty when it is none.
pub(crate) fn tls_hint(why: &str) -> &'static str {
    let theirs = [
        "invalid peer certificate",
        "UnknownIssuer",
        "NotValidForName",
    ];
    let ours = [
        "CertificateRequired",
        "UnsupportedCertificate",
        "BadCertificate",
        "CertificateUnknown",
        "UnknownCA",
        "AccessDenied",
    ];
    if theirs.iter().any(|t| why.contains(t)) {
        " (the coordinator's certificate is not one this agent trusts: tls_ca_file names the CA that signed it, and the coordinator URL a name it holds)"
    } else if why.contains("fatal alert") && ours.iter().any(|t| why.contains(t)) {
        " (the coordinator refused this agent's client certificate: tls_cert_file must be signed by the coordinator's [tls] client_ca_file, and not revoked)"
    } else {
        ""
    }
}
