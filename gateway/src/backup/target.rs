//! Where backups go: a directory (`file:///DIR`) or an S3-compatible bucket
//! (`s3://BUCKET/PREFIX`), behind the four operations the backup needs.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::s3::{S3, S3Options};

/// One backup destination.
#[derive(Clone)]
pub enum Target {
    Dir(PathBuf),
    S3(Box<S3>),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Dir(d) => write!(f, "file://{}", d.display()),
            Target::S3(_) => f.write_str("s3"),
        }
    }
}

impl Target {
    /// Opens `url`: `file:///DIR` (or a plain path) or `s3://BUCKET[/PREFIX]`.
    pub fn open(url: &str, s3: &S3Options) -> anyhow::Result<Self> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            anyhow::ensure!(!bucket.is_empty(), "backup URL {url}: no bucket");
            anyhow::ensure!(
                !s3.access_key_id.is_empty() && !s3.secret_access_key.is_empty(),
                "backup URL {url}: S3 credentials needed (--backup-s3-access-key-id and \
                 --backup-s3-secret-access-key, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            );
            return Ok(Target::S3(Box::new(S3::new(bucket, prefix, s3.clone())?)));
        }
        let path = url.strip_prefix("file://").unwrap_or(url);
        anyhow::ensure!(
            !path.is_empty() && !url.contains("://") || url.starts_with("file://"),
            "backup URL {url}: use file:///DIR or s3://BUCKET/PREFIX"
        );
        Ok(Target::Dir(PathBuf::from(path)))
    }

    /// Stores `data` as `key`, atomically (a reader sees the whole object or none).
    pub async fn put(&self, key: &str, data: Bytes) -> std::io::Result<()> {
        match self {
            Target::S3(s) => s.put(key, data).await,
            Target::Dir(d) => {
                let path = d.join(key);
                tokio::task::spawn_blocking(move || write_durable(&path, &data))
                    .await
                    .map_err(std::io::Error::other)?
            }
        }
    }

    pub async fn get(&self, key: &str) -> std::io::Result<Bytes> {
        match self {
            Target::S3(s) => s.get(key).await,
            Target::Dir(d) => tokio::fs::read(d.join(key))
                .await
                .map(Bytes::from)
                .map_err(|e| {
                    std::io::Error::new(e.kind(), format!("{}: {e}", d.join(key).display()))
                }),
        }
    }

    pub async fn delete(&self, key: &str) -> std::io::Result<()> {
        match self {
            Target::S3(s) => s.delete(key).await,
            Target::Dir(d) => match tokio::fs::remove_file(d.join(key)).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }

    /// Every object under `dir` (`snapshots/` or `segments/`): key and size.
    pub async fn list(&self, dir: &str) -> std::io::Result<Vec<(String, u64)>> {
        match self {
            Target::S3(s) => s.list(dir).await,
            Target::Dir(d) => {
                let (root, dir) = (d.clone(), dir.to_string());
                tokio::task::spawn_blocking(move || {
                    let mut out = Vec::new();
                    walk(&root, &root.join(&dir), &mut out)?;
                    out.sort();
                    Ok(out)
                })
                .await
                .map_err(std::io::Error::other)?
            }
        }
    }
}

/// Files below `dir` (keys relative to `root`, `/`-separated), skipping writes in progress.
fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) -> std::io::Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let path = e.path();
        let meta = e.metadata()?;
        if meta.is_dir() {
            walk(root, &path, out)?;
        } else if !e.file_name().to_string_lossy().starts_with('.') {
            let rel = path.strip_prefix(root).map_err(std::io::Error::other)?;
            let key: Vec<_> = rel.iter().map(|c| c.to_string_lossy()).collect();
            out.push((key.join("/"), meta.len()));
        }
    }
    Ok(())
}

/// Writes a file through a temporary name, fsyncs it and its directory.
fn write_durable(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("object path has a directory");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().expect("file name").to_string_lossy()
    ));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
