//! Host name resolution for storage engines with hickory-resolver: cached, honouring record TTLs,
//! so an engine behind GeoDNS (or one whose endpoint moved) is followed without a restart.
//! Upstream registries get the same through reqwest's `hickory-dns` feature.

use std::net::IpAddr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};

use hickory_resolver::TokioResolver;
use object_store::client::{DnsFuture, DnsResolver};

/// A [`DnsResolver`] for object_store backed by one shared hickory resolver.
pub struct HickoryDns(AssertUnwindSafe<Arc<TokioResolver>>);

impl Clone for HickoryDns {
    fn clone(&self) -> Self {
        HickoryDns(AssertUnwindSafe(self.0 .0.clone()))
    }
}

impl std::fmt::Debug for HickoryDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HickoryDns")
    }
}

impl DnsResolver for HickoryDns {
    fn resolve(&self, host: &str) -> DnsFuture {
        let resolver = self.0 .0.clone();
        let host = host.to_string();
        Box::pin(async move {
            if let Ok(ip) = host.parse::<IpAddr>() {
                return Ok(vec![ip]);
            }
            let found = resolver.lookup_ip(host.as_str()).await?;
            let ips: Vec<IpAddr> = found.iter().collect();
            if ips.is_empty() {
                return Err(format!("{host} has no addresses").into());
            }
            Ok(ips)
        })
    }
}

/// The process-wide resolver (system configuration: /etc/resolv.conf and /etc/hosts), or `None`
/// when the system configuration cannot be read (object_store then resolves as reqwest does).
pub fn shared() -> Option<Arc<dyn DnsResolver>> {
    static SHARED: OnceLock<Option<HickoryDns>> = OnceLock::new();
    SHARED
        .get_or_init(|| match TokioResolver::builder_tokio().and_then(|b| b.build()) {
            Ok(r) => Some(HickoryDns(AssertUnwindSafe(Arc::new(r)))),
            Err(e) => {
                tracing::warn!(error = %e, "no system DNS configuration for hickory; using the default resolver");
                None
            }
        })
        .clone()
        .map(|d| Arc::new(d) as Arc<dyn DnsResolver>)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn resolves_from_the_hosts_file_and_literals() {
        let dns = super::shared().expect("system DNS configuration (/etc/resolv.conf)");
        let ips = dns.resolve("localhost").await.expect("localhost resolves");
        assert!(ips.iter().any(|ip| ip.is_loopback()), "{ips:?}");
        let ips = dns.resolve("127.0.0.7").await.expect("literal");
        assert_eq!(ips, vec!["127.0.0.7".parse::<std::net::IpAddr>().unwrap()]);
    }
}
