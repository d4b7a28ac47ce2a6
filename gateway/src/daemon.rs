//! The composition root of one gateway: bind the listeners, open storage, start Raft, the
//! proposer, the service layer and the edges, serve, and stop cleanly (leadership handed
//! over first).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use tokio::net::TcpListener;

use crate::cluster::bootstrap;
use crate::cluster::membership::JoinRequest;
use crate::cluster::{Cluster, Parts};
use crate::command::feed::Feed;
use crate::config::NodeConfig;
use crate::ingress::{Ingress, IngressConfig};
use crate::metrics::Metrics;
use crate::raft::incarnation::{self, Guard, Incarnations};
use crate::raft::log_store::LogStore;
use crate::raft::network::{self, HttpClient, Network};
use crate::raft::proposer::Proposer;
use crate::raft::state_machine::StateMachine;
use crate::raft::{Peer, Raft};
use crate::security::tls::{self, SecureListener};
use crate::security::{Authenticator, Credentials};

/// The security settings of one node, built once at start-up (see `security/mod.rs`).
struct Security {
    auth: Arc<Authenticator>,
    /// HTTPS of the API (`--http-cert`), `None` for plain HTTP.
    http_tls: Option<Arc<rustls::ServerConfig>>,
    /// Node mutual TLS on the Raft listener and for this node's calls to its peers.
    raft_server_tls: Option<Arc<rustls::ServerConfig>>,
    raft_client_tls: Option<Arc<rustls::ClientConfig>>,
    /// What a join request sends: the client (trusting `--http-ca-cert`, else the cluster CA,
    /// presenting the node certificate) and the `--join-as` credentials.
    join_client: HttpClient,
    join_as: Option<Credentials>,
}

impl Security {
    fn build(config: &NodeConfig) -> anyhow::Result<Security> {
        let auth = Arc::new(match &config.auth {
            Some(f) => Authenticator::from_file(f)?,
            None => Authenticator::disabled(),
        });
        let http_tls = config
            .http_tls()?
            .map(|t| tls::http_server_config(&t))
            .transpose()?;
        let node_tls = config.node_tls()?;
        let raft_server_tls = node_tls.as_ref().map(tls::node_server_config).transpose()?;
        let raft_client_tls = node_tls.as_ref().map(tls::node_client_config).transpose()?;
        let join_ca = config
            .http_ca_cert
            .as_ref()
            .or(config.node_ca_cert.as_ref());
        let join_tls = match join_ca {
            Some(ca) => {
                let cert = node_tls
                    .as_ref()
                    .map(|t| tls::ReloadingCert::load(&t.cert, &t.key))
                    .transpose()?;
                Some(tls::client_config(ca, cert)?)
            }
            None => None,
        };
        let join_as = match &config.join_as {
            None => None,
            Some(user) => {
                let password = auth.plain_password(user).ok_or_else(|| {
                    anyhow::anyhow!(
                        "--join-as {user}: the --auth file must list {user} with a plain-text \
                         password (a joining node sends it, as rqlite does)"
                    )
                })?;
                Some(Credentials::new(user.clone(), password))
            }
        };
        if config.insecure {
            tracing::warn!(
                "--insecure: this node may listen beyond loopback without --auth or node mutual \
                 TLS; anyone who reaches its ports can read and change everything"
            );
        }
        Ok(Security {
            auth,
            http_tls,
            raft_server_tls,
            raft_client_tls,
            join_client: HttpClient::new(join_tls),
            join_as,
        })
    }
}

/// The addresses a node actually bound, written to `DATA_DIR/addrs.json` at start-up so that
/// scripts and tests can use port 0 and still find the node.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BoundAddrs {
    pub http_addr: String,
    pub raft_addr: String,
    #[serde(default)]
    pub device_addr: String,
}

/// Runs a gateway until `shutdown` resolves (or Raft fails fatally), then stops cleanly.
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let started = start(config).await?;
    let node = started.cluster.clone();
    let reloads = tokio::spawn(reload_on_sighup(node.clone()));
    let mut metrics = node.raft().metrics();
    let fatal = async {
        loop {
            if let Err(e) = &metrics.borrow_watched().running_state {
                return e.to_string();
            }
            if metrics.changed().await.is_err() {
                return "raft stopped".to_string();
            }
        }
    };
    let _stop_reloads = AbortOnDrop(reloads);
    tokio::select! {
        _ = shutdown => {
            tracing::info!(node_id = node.id(), "shutting down");
            started.stop().await;
            Ok(())
        }
        e = fatal => {
            tracing::error!(node_id = node.id(), "FATAL: raft stopped: {e}");
            started.stop().await;
            anyhow::bail!("fatal raft error on node {}: {e}", node.id())
        }
    }
}

/// A started node and its server tasks.
pub struct Started {
    pub cluster: Arc<Cluster>,
    pub ingress: Arc<Ingress>,
    stop_tx: tokio::sync::watch::Sender<bool>,
    servers: Vec<tokio::task::JoinHandle<()>>,
    /// `--raft-cluster-remove-shutdown`: leave the cluster when stopping.
    leave_on_stop: bool,
}

impl Started {
    /// Hands over leadership (and leaves the cluster with `--raft-cluster-remove-shutdown`),
    /// stops Raft, then the listeners.
    pub async fn stop(self) {
        if self.leave_on_stop && self.cluster.running() {
            match self.cluster.leave().await {
                Ok(()) => tracing::info!("left the cluster (raft_cluster_remove_shutdown)"),
                Err(e) => tracing::warn!("leaving the cluster: {e}"),
            }
        }
        self.cluster.step_down().await;
        if let Err(e) = self.cluster.raft().shutdown().await {
            tracing::warn!("raft shutdown: {e}");
        }
        let _ = self.stop_tx.send(true);
        for s in self.servers {
            let _ = tokio::time::timeout(Duration::from_secs(2), s).await;
        }
    }
}

/// Opens storage, starts Raft and the listeners, bootstraps or joins. Returns once serving.
pub async fn start(mut config: NodeConfig) -> anyhow::Result<Started> {
    let sec = Security::build(&config)?;
    let backup = crate::backup::BackupSettings::from_config(&config)?;
    if let Some(b) = backup.as_ref().filter(|_| config.restore_if_empty) {
        config.bootstrap |= crate::backup::restore::if_empty(&config.data_dir, b).await?;
    }
    std::fs::create_dir_all(&config.data_dir)?;
    let http_listener = TcpListener::bind(&config.http_addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding HTTP address {}: {e}", config.http_addr))?;
    let raft_listener = TcpListener::bind(&config.raft_addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding Raft address {}: {e}", config.raft_addr))?;
    let device_listener = TcpListener::bind(&config.device_addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding device address {}: {e}", config.device_addr))?;
    let bound = BoundAddrs {
        http_addr: http_listener.local_addr()?.to_string(),
        raft_addr: raft_listener.local_addr()?.to_string(),
        device_addr: device_listener.local_addr()?.to_string(),
    };
    let peer = Peer {
        http_addr: config
            .http_adv_addr
            .clone()
            .unwrap_or_else(|| bound.http_addr.clone()),
        raft_addr: config
            .raft_adv_addr
            .clone()
            .unwrap_or_else(|| bound.raft_addr.clone()),
        device_addr: config
            .device_adv_addr
            .clone()
            .unwrap_or_else(|| bound.device_addr.clone()),
    };
    write_atomic(
        &config.data_dir.join("addrs.json"),
        &serde_json::to_vec(&bound)?,
    )?;

    crate::backup::restore::check_complete(&config.data_dir)?;
    if crate::backup::restore::is_restored(&config.data_dir) {
        anyhow::ensure!(
            config.bootstrap,
            "{} holds a restored backup: start it with --bootstrap (a one-node cluster others \
             then join)",
            config.data_dir.display()
        );
        crate::backup::restore::adopt(&config.data_dir, config.node_id, &peer)?;
    }
    // rqlite's peers.json: the file form of `cairn recover`, applied once.
    crate::raft::recover::peers_json_at_start(&config.data_dir, config.node_id).await?;
    let log_store =
        LogStore::open_with_cache(&config.data_dir.join("raft.db"), config.log_cache_mib << 20)?;
    let own_incarnation = log_store.incarnation();
    let metrics = Arc::new(Metrics {
        stamp_floor: log_store.stamp_floor(),
        ..Metrics::default()
    });
    let log_stats = log_store.stats();
    let feed = Arc::new(Feed::new(config.feed_capacity));
    let sm =
        StateMachine::open_with_feed(&config.data_dir.join("sm"), metrics.clone(), feed.clone())?;
    let client = HttpClient::new(sec.raft_client_tls.clone());
    let backup_log = log_store.clone();
    let incarnations =
        Incarnations::new(config.node_id, own_incarnation, sm.store(), metrics.clone());
    let raft = Raft::new(
        config.node_id,
        Arc::new(config.raft_config()?),
        Network::new(client.clone())
            .with_metrics(metrics.clone())
            .with_incarnations(incarnations.clone()),
        log_store,
        sm.clone(),
    )
    .await?;
    if config.snapshot_log_mib > 0 {
        tokio::spawn(crate::raft::snapshot_on_log_size(
            raft.clone(),
            config.data_dir.join("raft.db"),
            config.snapshot_log_mib << 20,
        ));
    }
    let proposer = Proposer::start(
        raft.clone(),
        config.write_queue_depth,
        config.write_batch_max,
        metrics.clone(),
    );
    let cluster = Cluster::new(Parts {
        id: config.node_id,
        peer: peer.clone(),
        raft: raft.clone(),
        store: sm.store(),
        proposer,
        client: client.clone(),
        metrics: metrics.clone(),
        log_stats,
        scratch_dir: config.data_dir.clone(),
        read_limits: config.read_limits(),
        max_db_bytes: config.max_db_size_mib << 20,
        feed,
        queue: crate::cluster::queue::Settings {
            capacity: config.write_queue_capacity,
            batch_size: config.write_queue_batch_size,
            timeout: Duration::from_millis(config.write_queue_timeout_ms),
            transaction: config.write_queue_tx,
        },
        incarnations: incarnations.clone(),
    });
    cluster
        .streams()
        .configure(config.config_file.clone(), config.schema());
    let ingress = Ingress::new(
        cluster.clone(),
        IngressConfig {
            accept_protocol_1: config.accept_protocol_1,
            max_connections: config.device_max_connections,
            max_per_address: config.device_max_per_address,
            handshake_timeout: Duration::from_millis(config.device_handshake_timeout_ms),
            idle_timeout: Duration::from_millis(config.device_idle_timeout_ms),
            ..Default::default()
        },
    );
    tokio::spawn(crate::cluster::streams::watch_drift(cluster.clone()));
    tokio::spawn(crate::cluster::version::raise_active_version(
        cluster.clone(),
    ));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    let api = crate::http::router(cluster.clone(), sec.auth.clone(), sec.http_tls.is_some());
    // The Raft listener: node-to-node routes only, plus the API under `/api` for requests a
    // follower forwards to the leader (each carries its client's credentials and passes the
    // same permission checks; see `http::to_leader`).
    let guard = Guard {
        incarnations: incarnations.clone(),
        raft: raft.clone(),
    };
    let internal = network::routes(raft.clone(), sm, config.max_db_size_mib << 20, metrics)
        .layer(axum::middleware::from_fn_with_state(
            guard,
            incarnation::guard,
        ))
        .merge(crate::ingress::forward::routes(ingress.clone()))
        .merge(crate::cluster::streams::routes(cluster.clone()))
        .merge(crate::cluster::forward::routes(cluster.clone()))
        .merge(crate::cluster::names::routes(cluster.clone()))
        .nest(crate::http::FORWARD_PREFIX, api.clone());
    for (listener, server_tls, router) in [
        (raft_listener, sec.raft_server_tls.clone(), internal),
        (http_listener, sec.http_tls.clone(), api),
    ] {
        let mut stop = stop_rx.clone();
        // Handshakes off the accept loop, bounded in time; connections capped per listener
        // and per peer address; TCP_NODELAY set (small Raft answers and acks go out at once).
        let listener = SecureListener::new(listener, server_tls, tls::Limits::default());
        servers.push(tokio::spawn(async move {
            let graceful = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = tls::serve(listener, router, graceful).await {
                tracing::error!("server: {e}");
            }
        }));
    }
    if let Some(b) = backup {
        servers.extend(crate::backup::start(
            cluster.clone(),
            backup_log,
            b,
            stop_rx.clone(),
        )?);
    }
    servers.push(tokio::spawn(crate::export::supervise(
        cluster.clone(),
        crate::export::ExportSettings::from_config(&config)?,
        stop_rx.clone(),
    )));
    let (watching, stop) = (cluster.clone(), stop_rx.clone());
    servers.push(tokio::spawn(async move {
        watching.hand_over_while_held(stop).await;
    }));
    let (recording, stop) = (cluster.clone(), stop_rx.clone());
    servers.push(tokio::spawn(async move {
        recording.record_own_incarnation(stop).await;
    }));
    if let Some(name) = config.node_name.clone() {
        tokio::spawn(cluster.clone().keep_name(name));
    }
    let reap = crate::cluster::reap::Timeouts::from_ms(
        config.raft_reap_node_timeout_ms,
        config.raft_reap_read_only_node_timeout_ms,
    );
    if reap.any() {
        let (reaping, stop) = (cluster.clone(), stop_rx.clone());
        servers.push(tokio::spawn(async move {
            reaping.reap_while_leading(reap, stop).await;
        }));
    }
    let mut stop = stop_rx.clone();
    let serving = ingress.clone();
    servers.push(tokio::spawn(async move {
        tokio::select! {
            () = serving.serve(device_listener) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }));
    tracing::info!(
        node_id = cluster.id(),
        http = %bound.http_addr,
        raft = %bound.raft_addr,
        device = %bound.device_addr,
        "cairn node started"
    );

    let initialized = raft.is_initialized().await?;
    if !initialized && config.bootstrap {
        tracing::info!("bootstrapping a new cluster");
        raft.initialize(BTreeMap::from([(cluster.id(), peer.clone())]))
            .await?;
    } else if let Some(join) = &config.join {
        let req = JoinRequest {
            id: cluster.id(),
            addr: peer.raft_addr.clone(),
            http_addr: peer.http_addr.clone(),
            device_addr: peer.device_addr.clone(),
            voter: !config.non_voter,
            incarnation: Some(incarnations.own()),
            replace: config.replace,
        };
        let targets =
            bootstrap::targets(join, &sec.join_client, &client, crate::http::FORWARD_PREFIX);
        if !initialized && config.bootstrap_expect > 0 {
            tokio::spawn(bootstrap::expect_loop(
                cluster.clone(),
                req,
                targets,
                sec.join_as,
                config.bootstrap_expect,
            ));
        } else if !initialized || (!config.non_voter && !cluster.is_voter()) {
            // A fresh node joins; so does one that crashed after joining as a learner but
            // before its promotion (the leader then only promotes it).
            tokio::spawn(bootstrap::join_loop(
                cluster.clone(),
                req,
                targets,
                sec.join_as,
            ));
        } else {
            // As rqlite: a node with Raft state of its own (a member, or a cluster it
            // bootstrapped) keeps it; --join only ever adds a blank node.
            tracing::warn!(
                join = %join,
                "this node already holds Raft state (it belongs to a cluster): ignoring --join"
            );
        }
    }
    Ok(Started {
        cluster,
        ingress,
        stop_tx,
        servers,
        leave_on_stop: config.raft_cluster_remove_shutdown,
    })
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reloads the `[[stream]]` config on every SIGHUP (see `cluster::streams`).
async fn reload_on_sighup(cluster: Arc<Cluster>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        match cluster.reload_streams().await {
            Ok(s) => tracing::info!(streams = s.streams.len(), "SIGHUP: stream config proposed"),
            Err(e) => tracing::error!(error = %e, "SIGHUP: stream config not reloaded"),
        }
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(tmp, path)
}
