//! The stream definitions as a service: this node's configured `[[stream]]` tables, proposing
//! them (when the node leads a new term, see `ingress::leader`, and when it reloads its
//! config file), the drift warning, and dead-letter replays.
//!
//! | call | where it runs |
//! |---|---|
//! | [`Cluster::define_streams`] | the leader: one `StreamsCommand::Define` entry |
//! | [`Cluster::reload_streams`] | any node: reads its config file again and has the leader propose it (a follower sends it to the leader's internal `POST /streams/define`) |
//! | [`Cluster::replay_dead_letters`] | the leader: one `StreamsCommand::Replay` entry |
//!
//! The replicated definitions are the last ones applied (every leader proposes its own when
//! it takes office), so nodes whose files differ disagree only about what the next leader
//! proposes; [`watch_drift`] says so in the log.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::Method;
use axum::routing::post;

use super::Cluster;
use crate::command::dead_letter::Replayed;
use crate::command::streams::{StreamsCommand, StreamsOutcome};
use crate::command::{Command, CommandResponse};
use crate::config::NodeConfig;
use crate::db::schema::Schema;
use crate::error::Error;
use crate::raft::network::{decode, encode};

/// How long a definition forwarded to the leader may take.
const DEFINE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often [`watch_drift`] compares the configured and the replicated definitions.
const DRIFT_EVERY: Duration = Duration::from_secs(5);

/// This node's configured definitions and the file they came from.
#[derive(Default)]
pub struct StreamsConfig {
    inner: Mutex<(Option<PathBuf>, Schema)>,
}

impl StreamsConfig {
    /// Sets the definitions and the file [`Cluster::reload_streams`] reads them from again.
    pub fn configure(&self, file: Option<PathBuf>, schema: Schema) {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = (file, schema);
    }

    /// The configured definitions.
    pub fn schema(&self) -> Schema {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    fn file(&self) -> Option<PathBuf> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }
}

impl Cluster {
    /// This node's configured stream definitions.
    pub fn streams(&self) -> &StreamsConfig {
        &self.streams
    }

    /// Proposes `schema` as the stream definitions and waits until it is applied. The leader
    /// only.
    pub async fn define_streams(&self, schema: Schema) -> Result<(), Error> {
        schema
            .validate()
            .map_err(|e| Error::BadRequest(format!("[[stream]]: {e}")))?;
        let cmd = Command::Streams(StreamsCommand::Define(schema));
        match self.write(cmd).await? {
            CommandResponse::Streams(StreamsOutcome::Defined) => Ok(()),
            CommandResponse::Streams(StreamsOutcome::Failed(e)) => Err(Error::BadRequest(e)),
            other => Err(Error::Storage(format!("unexpected response {other:?}"))),
        }
    }

    /// Reads this node's config file again and, if its `[[stream]]` tables (or
    /// `undeclared_streams`) are valid, makes them this node's and has the leader propose
    /// them. An invalid file changes nothing. Returns the definitions proposed.
    pub async fn reload_streams(&self) -> Result<Schema, Error> {
        let file = self.streams.file().ok_or_else(|| {
            Error::BadRequest("this node was started without --config: nothing to reload".into())
        })?;
        let schema = NodeConfig::from_file(&file)
            .map_err(|e| Error::BadRequest(format!("{e:#}")))?
            .schema();
        schema
            .validate()
            .map_err(|e| Error::BadRequest(format!("{}: [[stream]]: {e}", file.display())))?;
        self.streams.configure(Some(file), schema.clone());
        if self.is_leader() {
            self.define_streams(schema.clone()).await?;
        } else {
            self.call_leader_internal::<Result<(), Error>>(
                Method::POST,
                "/streams/define",
                encode(&schema),
                DEFINE_TIMEOUT,
            )
            .await??;
        }
        tracing::info!(
            streams = schema.streams.len(),
            "stream definitions reloaded"
        );
        Ok(schema)
    }

    /// Moves the dead-letter rows of `stream` (of `device`, or all) that fit the replicated
    /// definitions into their table. The leader only.
    pub async fn replay_dead_letters(
        &self,
        stream: u16,
        device: Option<u64>,
    ) -> Result<Replayed, Error> {
        match self
            .write(Command::Streams(StreamsCommand::Replay { stream, device }))
            .await?
        {
            CommandResponse::Streams(StreamsOutcome::Replayed(r)) => Ok(r),
            other => Err(Error::Storage(format!("unexpected response {other:?}"))),
        }
    }

    /// The replicated definitions, from this node's replica.
    pub async fn replicated_streams(&self) -> Result<Schema, Error> {
        Ok(self.read(Schema::load).await??)
    }
}

/// The node-to-node route a follower's reload uses (served on the Raft listener):
/// `POST /streams/define`, postcard [`Schema`], answered with postcard `Result<(), Error>`.
pub fn routes(cluster: Arc<Cluster>) -> axum::Router {
    axum::Router::new()
        .route("/streams/define", post(define))
        .with_state(cluster)
}

async fn define(State(cluster): State<Arc<Cluster>>, body: Bytes) -> Vec<u8> {
    let r = match decode::<Schema>(&body) {
        Ok(schema) => cluster.define_streams(schema).await,
        Err(_) => Err(Error::BadRequest("undecodable stream definitions".into())),
    };
    encode(&r)
}

/// Warns while this node's configured definitions differ from the replicated ones (once per
/// change of either), and says when they match again. Runs until the node stops.
pub async fn watch_drift(cluster: Arc<Cluster>) {
    let mut warned: Option<(Schema, Schema)> = None;
    while cluster.running() {
        tokio::time::sleep(DRIFT_EVERY).await;
        // Nothing replicated yet (a node still catching up) is not a difference.
        let Ok(replicated) = cluster.replicated_streams().await else {
            continue;
        };
        if replicated == Schema::default() {
            continue;
        }
        let configured = cluster.streams().schema();
        if configured == replicated {
            if warned.take().is_some() {
                tracing::info!("configured stream definitions match the replicated ones again");
            }
            continue;
        }
        let pair = (configured, replicated);
        if warned.as_ref() != Some(&pair) {
            tracing::warn!(
                configured = %serde_json::to_string(&pair.0).unwrap_or_default(),
                replicated = %serde_json::to_string(&pair.1).unwrap_or_default(),
                "this node's [[stream]] config differs from the replicated stream definitions \
                 (the latest leader's or reload's); it is proposed when this node leads or \
                 reloads (SIGHUP, POST /streams/reload)"
            );
            warned = Some(pair);
        }
    }
}
