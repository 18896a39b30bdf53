//! When the certificates a process serves or trusts stop being valid: the gauge
//! `<prefix>_certificate_expiry_timestamp_seconds{certificate}`, read from the PEM files every
//! minute so a rotation (cert-manager, `gen-certs.sh --apply`) shows up without a restart.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rustls::pki_types::CertificateDer;
use std::path::PathBuf;
use std::time::Duration;

/// Which file a gauge describes (`server`, `client`, `ca`, ...): a fixed set per binary.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    pub certificate: &'static str,
}

/// The gauge family: Unix time of the earliest `notAfter` in each file.
pub type ExpiryGauges = Family<CertificateLabels, Gauge>;

/// The earliest `notAfter` among `certs`, in Unix seconds; `None` when none parses. A file with a
/// chain or a CA bundle is as good as its first certificate to expire.
pub fn earliest_not_after(certs: &[CertificateDer<'_>]) -> Option<i64> {
    certs
        .iter()
        .filter_map(|der| x509_parser::parse_x509_certificate(der.as_ref()).ok())
        .map(|(_, cert)| cert.validity().not_after.timestamp())
        .min()
}

/// Sets each file's gauge now and then every `every`. A file that cannot be read keeps its last
/// value (the TLS reloader keeps serving the previous certificate too) and is logged.
pub async fn watch(gauges: ExpiryGauges, files: Vec<(&'static str, PathBuf)>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        record(&gauges, &files);
    }
}

fn record(gauges: &ExpiryGauges, files: &[(&'static str, PathBuf)]) {
    for (certificate, path) in files {
        match crate::tls::load_certs(path).map(|certs| earliest_not_after(&certs)) {
            Ok(Some(not_after)) => {
                gauges.get_or_create(&CertificateLabels { certificate }).set(not_after);
            }
            Ok(None) => tracing::warn!(path = %path.display(), "no certificate in the file parses as X.509"),
            Err(error) => tracing::warn!(%error, "cannot read a certificate for its expiry metric"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_expiring(year: i32) -> rcgen::Certificate {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["x".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(year, 6, 1);
        params.self_signed(&key).unwrap()
    }

    #[test]
    fn the_first_certificate_to_expire_counts() {
        let certs = [2031, 2029, 2030].map(|year| cert_expiring(year).der().clone());
        // 2029-06-01T00:00:00Z
        assert_eq!(earliest_not_after(&certs), Some(1_874_966_400));
        assert_eq!(earliest_not_after(&[CertificateDer::from(vec![1, 2, 3])]), None);
    }

    #[test]
    fn gauges_follow_the_files_and_keep_their_value_when_a_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tls.crt");
        std::fs::write(&path, cert_expiring(2030).pem()).unwrap();
        let gauges = ExpiryGauges::default();
        let files = vec![("server", path.clone())];
        record(&gauges, &files);
        let value = || gauges.get_or_create(&CertificateLabels { certificate: "server" }).get();
        assert_eq!(value(), 1_906_502_400);
        std::fs::write(&path, cert_expiring(2031).pem()).unwrap();
        record(&gauges, &files);
        assert_eq!(value(), 1_938_038_400);
        std::fs::remove_file(&path).unwrap();
        record(&gauges, &files);
        assert_eq!(value(), 1_938_038_400);
    }
}
