//! The TLS settings of a [`NodeConfig`]: HTTPS of the API and node-to-node TLS.

use super::NodeConfig;

impl NodeConfig {
    /// HTTPS settings of the API, if `http_cert` and `http_key` are set.
    pub fn http_tls(&self) -> anyhow::Result<Option<crate::security::tls::HttpTls>> {
        match (&self.http_cert, &self.http_key) {
            (Some(cert), Some(key)) => Ok(Some(crate::security::tls::HttpTls {
                cert: cert.clone(),
                key: key.clone(),
                ca_cert: self.http_ca_cert.clone(),
                verify_client: self.http_verify_client,
            })),
            (None, None) => {
                anyhow::ensure!(
                    self.http_ca_cert.is_none() && !self.http_verify_client,
                    "http_ca_cert / http_verify_client need http_cert and http_key"
                );
                Ok(None)
            }
            _ => anyhow::bail!("http_cert and http_key go together"),
        }
    }

    /// Node-to-node TLS settings, if `node_cert`, `node_key` and `node_ca_cert` are set.
    pub fn node_tls(&self) -> anyhow::Result<Option<crate::security::tls::NodeTls>> {
        match (&self.node_cert, &self.node_key, &self.node_ca_cert) {
            (Some(cert), Some(key), Some(ca)) => Ok(Some(crate::security::tls::NodeTls {
                cert: cert.clone(),
                key: key.clone(),
                ca_cert: ca.clone(),
                verify_client: self.node_verify_client,
            })),
            (None, None, None) => {
                anyhow::ensure!(
                    !self.node_verify_client,
                    "node_verify_client needs node_cert, node_key and node_ca_cert"
                );
                Ok(None)
            }
            _ => anyhow::bail!("node_cert, node_key and node_ca_cert go together"),
        }
    }
}
