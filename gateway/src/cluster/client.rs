//! The one client a node uses to reach the leader: the HTTP API's forwarded requests and the
//! device path's node-to-node calls (on the leader's Raft listener) both go through
//! [`Cluster::leader_addr`] and [`Cluster::call_leader`], so they find the leader the same
//! way and fail the same way.

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{HeaderMap, Method, StatusCode};

use super::Cluster;
use crate::error::Error;
use crate::raft::NodeId;
use crate::raft::network::{Body, full};

/// How long a call that needs the leader waits for one to be known (or for leadership to
/// settle after it moved under a write that was therefore not proposed).
pub const LEADER_WAIT: Duration = Duration::from_secs(3);

/// Header on a request one node forwarded to another: never forwarded a second time.
pub const FORWARDED: &str = "x-cairn-forwarded";

/// Which of the leader's listeners a call goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// The public HTTP API (`--http-addr`).
    Api,
    /// The node-to-node listener (`--raft-addr`).
    Internal,
}

/// A request for the leader.
pub struct LeaderRequest<'a> {
    pub method: Method,
    /// Path and query string, starting with `/`.
    pub path: &'a str,
    pub content_type: Option<&'a str>,
    /// The client's `Authorization` header, for a forwarded API request (the leader checks it
    /// again).
    pub authorization: Option<hyper::header::HeaderValue>,
    pub body: Bytes,
}

/// The leader's answer, relayed as it came.
pub struct LeaderResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Cluster {
    /// Runs `here` if this node leads, else `there` (which takes the call to the leader). A
    /// `here` refused with `NotLeader` proposed nothing (leadership moved between the check and
    /// the proposal): it goes `there` to the new leader, or is tried again here while
    /// leadership settles, for up to [`LEADER_WAIT`].
    pub async fn on_leader<T, Here, There>(
        &self,
        here: impl Fn() -> Here,
        there: impl FnOnce() -> There,
    ) -> Result<T, Error>
    where
        Here: Future<Output = Result<T, Error>>,
        There: Future<Output = Result<T, Error>>,
    {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            if self.is_leader() {
                match here().await {
                    Err(e) if e.is_not_leader() && Instant::now() < deadline => {}
                    r => return r,
                }
            } else if self.leader().is_some() || Instant::now() >= deadline {
                return there().await;
            }
            // No leader known yet (an election is on), or it is still this node: shortly again.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The leader's id and its address on `port`, waiting up to `wait` for one to be known.
    /// [`Error::NoLeader`] if none is; [`Error::Unavailable`] if it is this node (leadership
    /// is changing under the caller).
    pub async fn leader_addr(&self, port: Port, wait: Duration) -> Result<(NodeId, String), Error> {
        let (id, peer) = match self.leader() {
            Some(l) => l,
            None => self.wait_leader(wait).await.ok_or(Error::NoLeader)?,
        };
        if id == self.id {
            return Err(Error::Unavailable("leadership changing, retry".into()));
        }
        let addr = match port {
            Port::Api => peer.http_addr,
            Port::Internal => peer.raft_addr,
        };
        Ok((id, addr))
    }

    /// Sends `req` to the leader's `port` and returns its answer, whatever the status.
    /// Waits up to `wait` for a leader to be known; the whole call is bounded by `timeout`.
    pub async fn call_leader(
        &self,
        port: Port,
        req: LeaderRequest<'_>,
        wait: Duration,
        timeout: Duration,
    ) -> Result<LeaderResponse, Error> {
        let body = full(req.body.clone());
        self.call_leader_with(port, req, body, wait, timeout).await
    }

    /// [`Cluster::call_leader`] with `body` (streamed, e.g. a file) in place of `req.body`.
    pub async fn call_leader_with(
        &self,
        port: Port,
        req: LeaderRequest<'_>,
        body: Body,
        wait: Duration,
        timeout: Duration,
    ) -> Result<LeaderResponse, Error> {
        let (id, addr) = self.leader_addr(port, wait).await?;
        let mut builder = hyper::Request::builder()
            .method(req.method)
            .uri(self.client.url(&addr, req.path))
            .header(FORWARDED, self.id.to_string());
        if let Some(ct) = req.content_type {
            builder = builder.header(hyper::header::CONTENT_TYPE, ct);
        }
        if let Some(a) = req.authorization {
            builder = builder.header(hyper::header::AUTHORIZATION, a);
        }
        let request = builder
            .body(body)
            .map_err(|e| Error::Storage(e.to_string()))?;
        match self.client.send(request, timeout).await {
            Ok((status, headers, body)) => Ok(LeaderResponse {
                status,
                headers,
                body,
            }),
            Err(e) => Err(Error::Unavailable(format!(
                "forwarding to leader {id} at {addr}: {e}"
            ))),
        }
    }

    /// POSTs a postcard body to the leader's internal listener and decodes the postcard
    /// answer (the device path's forwarded groups and linearizable lookups).
    pub async fn call_leader_internal<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<T, Error> {
        let req = LeaderRequest {
            method,
            path,
            content_type: Some("application/octet-stream"),
            authorization: None,
            body: body.into(),
        };
        let resp = self
            .call_leader(Port::Internal, req, Duration::ZERO, timeout)
            .await?;
        if !resp.status.is_success() {
            return Err(Error::Unavailable(format!(
                "{path} answered {}: {}",
                resp.status,
                String::from_utf8_lossy(&resp.body)
            )));
        }
        postcard::from_bytes(&resp.body)
            .map_err(|e| Error::Unavailable(format!("undecodable answer from the leader: {e}")))
    }
}
