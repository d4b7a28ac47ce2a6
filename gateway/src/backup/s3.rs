//! A small S3 client: PUT, GET, DELETE and ListObjectsV2 on one bucket, signed with AWS
//! Signature Version 4, over the hyper client the gateway already has.
//!
//! Why not `object_store` (or the AWS SDK): four operations on one bucket are about 250
//! lines here, and everything they need (hyper, hyper-rustls with ring, ring's SHA-256 and
//! HMAC) is already in the binary. `object_store` 0.14 with `aws` brings reqwest, quick-xml,
//! chrono, its own retry and credential machinery and a second HTTP stack: dozens of crates
//! more to build on a 2-core machine, and a second TLS setup to keep on ring. Any
//! S3-compatible service works: path-style URLs when an endpoint is given (MinIO, Garage,
//! moto, Ceph), virtual-hosted AWS URLs otherwise.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use ring::{digest, hmac};

use crate::security::tls::NodeConnector;

/// Where a bucket lives and how to sign for it.
#[derive(Clone, Debug, Default)]
pub struct S3Options {
    /// `http(s)://host:port` of an S3-compatible service (path-style); AWS when `None`.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// A session token (temporary credentials), if any.
    pub session_token: Option<String>,
    /// PEM file of CAs to trust for https (default: the system bundle).
    pub ca_cert: Option<std::path::PathBuf>,
}

/// One bucket and prefix.
#[derive(Clone)]
pub struct S3 {
    client: Client<NodeConnector, Full<Bytes>>,
    opts: S3Options,
    bucket: String,
    /// Prefix with a trailing `/` (or empty).
    prefix: String,
}

const TIMEOUT: Duration = Duration::from_secs(60);
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// RFC 3986 encoding as SigV4 wants it: unreserved characters kept, `/` kept in paths.
fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl S3 {
    /// A client for `bucket`, objects under `prefix`.
    pub fn new(bucket: &str, prefix: &str, opts: S3Options) -> std::io::Result<Self> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let wants_tls = opts
            .endpoint
            .as_deref()
            .is_none_or(|e| e.starts_with("https://"));
        let tls = match (&opts.ca_cert, wants_tls) {
            (Some(ca), _) => Some(crate::security::tls::client_config(ca, None)?),
            (None, true) => {
                let system = std::env::var_os("SSL_CERT_FILE")
                    .map(std::path::PathBuf::from)
                    .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
                Some(crate::security::tls::client_config(&system, None)?)
            }
            (None, false) => None,
        };
        let connector = crate::security::tls::node_connector(http, tls);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let prefix = prefix.trim_matches('/');
        Ok(S3 {
            client,
            opts,
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        })
    }

    /// `(scheme://host[:port], path of the object key)`.
    fn locate(&self, key: Option<&str>) -> (String, String) {
        let full = key.map(|k| format!("{}{k}", self.prefix));
        match &self.opts.endpoint {
            Some(e) => {
                let mut path = format!("/{}", self.bucket);
                if let Some(k) = full {
                    path.push('/');
                    path.push_str(&k);
                }
                (e.trim_end_matches('/').to_string(), path)
            }
            None => (
                format!(
                    "https://{}.s3.{}.amazonaws.com",
                    self.bucket, self.opts.region
                ),
                format!("/{}", full.unwrap_or_default()),
            ),
        }
    }

    async fn call(
        &self,
        method: &str,
        key: Option<&str>,
        query: &[(&str, String)],
        body: Bytes,
    ) -> std::io::Result<(hyper::StatusCode, Bytes)> {
        let (base, path) = self.locate(key);
        let host = base
            .split_once("://")
            .map_or(base.as_str(), |(_, h)| h)
            .to_string();
        let now = crate::db::schema::utc_text(crate::backup::now_ms());
        // 2026-12-03T11:40:00.123Z -> 20261203T114000Z
        let amz_date: String = now[..19]
            .chars()
            .filter(|c| c.is_ascii_digit() || *c == 'T')
            .collect::<String>()
            + "Z";
        let date = &amz_date[..8];
        let payload_hash = if body.is_empty() {
            EMPTY_SHA256.to_string()
        } else {
            hex(digest::digest(&digest::SHA256, &body).as_ref())
        };
        let mut q: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
            .collect();
        q.sort();
        let canonical_query = q
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let canonical_path = uri_encode(&path, true);
        let mut headers = vec![
            ("host", host.clone()),
            ("x-amz-content-sha256", payload_hash.clone()),
            ("x-amz-date", amz_date.clone()),
        ];
        if let Some(t) = &self.opts.session_token {
            headers.push(("x-amz-security-token", t.clone()));
        }
        let signed = headers.iter().map(|h| h.0).collect::<Vec<_>>().join(";");
        let canonical = format!(
            "{method}\n{canonical_path}\n{canonical_query}\n{}\n{signed}\n{payload_hash}",
            headers
                .iter()
                .map(|(k, v)| format!("{k}:{}\n", v.trim()))
                .collect::<String>()
        );
        let scope = format!("{date}/{}/s3/aws4_request", self.opts.region);
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex(digest::digest(&digest::SHA256, canonical.as_bytes()).as_ref())
        );
        let mac = |k: &[u8], m: &str| {
            hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, k), m.as_bytes())
                .as_ref()
                .to_vec()
        };
        let k = mac(
            format!("AWS4{}", self.opts.secret_access_key).as_bytes(),
            date,
        );
        let k = mac(&k, &self.opts.region);
        let k = mac(&k, "s3");
        let k = mac(&k, "aws4_request");
        let signature = hex(&mac(&k, &to_sign));
        let url = if canonical_query.is_empty() {
            format!("{base}{canonical_path}")
        } else {
            format!("{base}{canonical_path}?{canonical_query}")
        };
        let mut req = hyper::Request::builder().method(method).uri(url);
        for (k, v) in &headers {
            req = req.header(*k, v);
        }
        let req = req
            .header(
                "authorization",
                format!(
                    "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, \
                     Signature={signature}",
                    self.opts.access_key_id
                ),
            )
            .body(Full::new(body))
            .map_err(std::io::Error::other)?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(std::io::Error::other)?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(std::io::Error::other)?
                .to_bytes();
            Ok::<_, std::io::Error>((status, bytes))
        };
        tokio::time::timeout(TIMEOUT, fut).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "S3 request timed out")
        })?
    }

    fn failed(
        &self,
        what: &str,
        key: &str,
        status: hyper::StatusCode,
        body: &[u8],
    ) -> std::io::Error {
        std::io::Error::other(format!(
            "S3 {what} s3://{}/{}{key}: {status}: {}",
            self.bucket,
            self.prefix,
            xml_text(&String::from_utf8_lossy(body), "Message")
                .into_iter()
                .next()
                .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect())
        ))
    }

    pub async fn put(&self, key: &str, data: Bytes) -> std::io::Result<()> {
        let (s, b) = self.call("PUT", Some(key), &[], data).await?;
        if !s.is_success() {
            return Err(self.failed("PUT", key, s, &b));
        }
        Ok(())
    }

    pub async fn get(&self, key: &str) -> std::io::Result<Bytes> {
        let (s, b) = self.call("GET", Some(key), &[], Bytes::new()).await?;
        if !s.is_success() {
            return Err(self.failed("GET", key, s, &b));
        }
        Ok(b)
    }

    pub async fn delete(&self, key: &str) -> std::io::Result<()> {
        let (s, b) = self.call("DELETE", Some(key), &[], Bytes::new()).await?;
        if !s.is_success() && s != hyper::StatusCode::NOT_FOUND {
            return Err(self.failed("DELETE", key, s, &b));
        }
        Ok(())
    }

    /// Keys (below the prefix) and sizes of every object under `dir`.
    pub async fn list(&self, dir: &str) -> std::io::Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = vec![
                ("list-type", "2".to_string()),
                ("prefix", format!("{}{dir}", self.prefix)),
            ];
            if let Some(t) = &token {
                q.push(("continuation-token", t.clone()));
            }
            let (s, b) = self.call("GET", None, &q, Bytes::new()).await?;
            if !s.is_success() {
                return Err(self.failed("LIST", dir, s, &b));
            }
            let text = String::from_utf8_lossy(&b);
            for c in xml_text(&text, "Contents") {
                let key = xml_text(&c, "Key").into_iter().next().unwrap_or_default();
                let size = xml_text(&c, "Size")
                    .into_iter()
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                if let Some(k) = key.strip_prefix(&self.prefix) {
                    out.push((xml_unescape(k), size));
                }
            }
            let truncated =
                xml_text(&text, "IsTruncated").first().map(String::as_str) == Some("true");
            token = xml_text(&text, "NextContinuationToken")
                .into_iter()
                .next()
                .map(|t| xml_unescape(&t));
            if !truncated || token.is_none() {
                return Ok(out);
            }
        }
    }
}

/// The text of every `<tag>...</tag>` in `xml` (ListObjectsV2 answers are flat enough that
/// no XML parser is needed).
fn xml_text(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(after[..j].to_string());
        rest = &after[j + close.len()..];
    }
    out
}

fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_uri_encode() {
        assert_eq!(uri_encode("a b/c~d", true), "a%20b/c~d");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
    }

    #[test]
    fn test_xml_listing() {
        let x = "<ListBucketResult><IsTruncated>true</IsTruncated><Contents><Key>p/a&amp;b</Key>\
                 <Size>12</Size></Contents><Contents><Key>p/c</Key><Size>3</Size></Contents>\
                 <NextContinuationToken>tok</NextContinuationToken></ListBucketResult>";
        let c = xml_text(x, "Contents");
        assert_eq!(c.len(), 2);
        assert_eq!(xml_unescape(&xml_text(&c[0], "Key")[0]), "p/a&b");
        assert_eq!(xml_text(x, "IsTruncated"), ["true"]);
    }
}
