//! `nats`: JetStream publish of one JSON message per record, with the idempotency key as
//! `Nats-Msg-Id` (JetStream drops a repeat inside the stream's duplicate window), each
//! awaited until the stream acknowledged it. The stream is created (subjects: the first token
//! of the subject templates of records and of changes, followed by `.>`) if it does not exist.

use std::time::Duration;

use async_nats::jetstream;

use super::changes::{Message, Outgoing, Subjects};

pub struct Nats {
    url: String,
    stream: String,
    subjects: Subjects,
    timeout: Duration,
    js: Option<jetstream::Context>,
}

impl Nats {
    pub fn new(url: &str, stream: &str, subjects: Subjects, timeout: Duration) -> Self {
        Nats {
            url: url.to_string(),
            stream: stream.to_string(),
            subjects,
            timeout,
            js: None,
        }
    }

    async fn connect(&mut self) -> Result<jetstream::Context, String> {
        if let Some(js) = &self.js {
            return Ok(js.clone());
        }
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(self.timeout)
            .connect(self.url.as_str())
            .await
            .map_err(|e| format!("nats connect: {e}"))?;
        let mut js = jetstream::new(client);
        js.set_timeout(self.timeout);
        let mut subjects: Vec<String> = [&self.subjects.records, &self.subjects.changes]
            .iter()
            .map(|t| format!("{}.>", t.split('.').next().unwrap_or("cairn")))
            .collect();
        subjects.dedup();
        js.get_or_create_stream(jetstream::stream::Config {
            name: self.stream.clone(),
            subjects,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("nats: stream {}: {e}", self.stream))?;
        self.js = Some(js.clone());
        Ok(js)
    }

    /// Publishes `items` (device records or changes, each with its own subject template).
    pub async fn deliver<T: Outgoing>(&mut self, site: &str, items: &[T]) -> Result<(), String> {
        let msgs = self.subjects.messages(site, items)?;
        self.publish(msgs).await
    }

    async fn publish(&mut self, msgs: Vec<Message>) -> Result<(), String> {
        let r = self.publish_inner(msgs).await;
        if r.is_err() {
            self.js = None;
        }
        r
    }

    async fn publish_inner(&mut self, msgs: Vec<Message>) -> Result<(), String> {
        let js = self.connect().await?;
        let mut acks = Vec::with_capacity(msgs.len());
        for (subject, key, body) in msgs {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", key.as_str());
            let ack = js
                .publish_with_headers(subject, headers, body.into())
                .await
                .map_err(|e| format!("nats publish: {e}"))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| format!("nats ack: {e}"))?;
        }
        Ok(())
    }
}
