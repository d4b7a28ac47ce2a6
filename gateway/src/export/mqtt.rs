//! `mqtt`: one QoS 1 publish per record, JSON body (the record with its key), topic from a
//! template (default `cairn/{site}/{table}/{device_id}`; changes of user tables:
//! `changes_subject`, default `cairn/{site}/changes/{table}`). A delivery succeeds when the
//! broker has acknowledged (PUBACK) every publish of the batch; on any error the session is
//! dropped and the whole batch is sent again on a new one (at least once: subscribers
//! de-duplicate by `key`).

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

use super::changes::{Message, Outgoing, Subjects};

struct Session {
    client: AsyncClient,
    acks: mpsc::UnboundedReceiver<Result<(), String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct Mqtt {
    host: String,
    port: u16,
    client_id: String,
    subjects: Subjects,
    timeout: Duration,
    session: Option<Session>,
}

impl Mqtt {
    /// `url`: `mqtt://host:port` (or `host:port`).
    pub fn new(
        url: &str,
        client_id: String,
        subjects: Subjects,
        timeout: Duration,
    ) -> Result<Self, String> {
        let rest = url.strip_prefix("mqtt://").unwrap_or(url);
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.trim_end_matches('/')
                    .parse()
                    .map_err(|_| format!("mqtt url {url}: bad port"))?,
            ),
            None => (rest.trim_end_matches('/').to_string(), 1883),
        };
        Ok(Mqtt {
            host,
            port,
            client_id,
            subjects,
            timeout,
            session: None,
        })
    }

    fn session(&mut self) -> &mut Session {
        self.session.get_or_insert_with(|| {
            let mut opts = MqttOptions::new(&self.client_id, &self.host, self.port);
            opts.set_keep_alive(Duration::from_secs(5));
            let (client, mut events) = AsyncClient::new(opts, 1024);
            let (tx, acks) = mpsc::unbounded_channel();
            let task = tokio::spawn(async move {
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            if tx.send(Ok(())).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let _ = tx.send(Err(format!("mqtt: {e}")));
                            return;
                        }
                    }
                }
            });
            Session { client, acks, task }
        })
    }

    /// Publishes `items` (device records or changes, each with its own subject template).
    pub async fn deliver<T: Outgoing>(&mut self, site: &str, items: &[T]) -> Result<(), String> {
        let msgs = self.subjects.messages(site, items)?;
        self.publish(msgs).await
    }

    /// Publishes each message (subject as topic; the key is in the body) and waits for every
    /// PUBACK.
    async fn publish(&mut self, msgs: Vec<Message>) -> Result<(), String> {
        let timeout = self.timeout;
        let r = tokio::time::timeout(timeout, self.publish_inner(msgs)).await;
        let r = r.unwrap_or_else(|_| Err("mqtt: delivery timed out".into()));
        if r.is_err() {
            self.session = None;
        }
        r
    }

    async fn publish_inner(&mut self, msgs: Vec<Message>) -> Result<(), String> {
        let s = self.session();
        // Acknowledgements of an earlier, finished batch cannot be pending: each batch waits
        // for all of its own.
        while let Ok(a) = s.acks.try_recv() {
            a?;
        }
        let n = msgs.len();
        for (topic, _key, body) in msgs {
            s.client
                .publish(topic, QoS::AtLeastOnce, false, body)
                .await
                .map_err(|e| format!("mqtt publish: {e}"))?;
        }
        let mut acked = 0;
        while acked < n {
            match s.acks.recv().await {
                Some(Ok(())) => acked += 1,
                Some(Err(e)) => return Err(e),
                None => return Err("mqtt: session ended".into()),
            }
        }
        Ok(())
    }
}
