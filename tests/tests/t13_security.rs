//! Security end to end, against real `cairn node` processes with `--auth`, HTTPS and node
//! mutual TLS (certificates from `cairn certs`): every public route refuses anonymous and
//! under-privileged requests and changes nothing; the Raft port refuses plain text and any
//! certificate that is not a node certificate of the cluster CA; a node without one cannot
//! join even with valid join credentials; a join cannot re-point a member; certificates are
//! reloaded without a restart; the secure-by-default refusal and the `--insecure` warning.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cairn_tests::{
    ADMIN, Auth, Client, Cluster, JOINER, Options, Reply, SLOW_ELECTIONS, Security, TIMEOUT,
    cairn_bin, poll,
};
use serde_json::{Value as Json, json};

/// Users of the test clusters besides [`ADMIN`] and [`JOINER`].
const STATUS_ONLY: (&str, &str) = ("watcher", "watcher-pw");
const READY_ONLY: (&str, &str) = ("prober", "prober-pw");
const LEARNER: (&str, &str) = ("learner", "learner-pw");
const LOADER: (&str, &str) = ("loader", "loader-pw");

fn users() -> Json {
    let mut users = Security::full().users;
    let more = json!([
        {"username": STATUS_ONLY.0, "password": STATUS_ONLY.1, "perms": ["status"]},
        {"username": READY_ONLY.0, "password": READY_ONLY.1, "perms": ["ready"]},
        {"username": LEARNER.0, "password": LEARNER.1, "perms": ["join-read-only"]},
        {"username": LOADER.0, "password": LOADER.1, "perms": ["load", "query"]},
    ]);
    users
        .as_array_mut()
        .unwrap()
        .extend(more.as_array().unwrap().iter().cloned());
    users
}

fn secure_cluster(n: usize) -> Cluster {
    secure_cluster_with(n, None)
}

fn secure_cluster_with(n: usize, config: Option<String>) -> Cluster {
    Cluster::start_with(
        n,
        Options {
            security: Some(Security {
                users: users(),
                ..Security::full()
            }),
            config,
            ..Options::default()
        },
    )
}

/// One public route: method, path, body (with its Content-Type) and the permission it needs.
struct Route {
    method: &'static str,
    path: &'static str,
    body: Option<(&'static str, Vec<u8>)>,
    perm: &'static str,
}

fn routes() -> Vec<Route> {
    let j = |v: Json| Some(("application/json", v.to_string().into_bytes()));
    let r = |method, path, body, perm| Route {
        method,
        path,
        body,
        perm,
    };
    let key = "11".repeat(32);
    vec![
        r(
            "POST",
            "/db/execute",
            j(json!(["INSERT INTO t(v) VALUES ('intruder')"])),
            "execute",
        ),
        r("GET", "/db/query?q=SELECT%20*%20FROM%20t", None, "query"),
        r("POST", "/db/query", j(json!(["SELECT * FROM t"])), "query"),
        r(
            "POST",
            "/db/request",
            j(json!(["DELETE FROM t"])),
            "query and execute",
        ),
        r("GET", "/db/backup", None, "backup"),
        r(
            "POST",
            "/db/load",
            Some(("text/plain", b"DROP TABLE t;".to_vec())),
            "load",
        ),
        r("GET", "/status", None, "status"),
        r("GET", "/nodes", None, "status"),
        r("GET", "/metrics", None, "status"),
        r("GET", "/readyz", None, "ready"),
        r("GET", "/leader", None, "status"),
        r("POST", "/leader", j(json!({})), "leader-ops"),
        r("POST", "/snapshot", j(json!({})), "snapshot"),
        r("POST", "/db/sql", j(json!(["SELECT 1"])), "query"),
        r("GET", "/debug/vars", None, "status"),
        r(
            "POST",
            "/boot",
            Some(("application/octet-stream", b"SQLite format 3\0".to_vec())),
            "load",
        ),
        r(
            "POST",
            "/join",
            j(json!({"id": 9, "addr": "127.0.0.1:1", "http_addr": "127.0.0.1:2"})),
            "join or join-read-only",
        ),
        r("DELETE", "/remove", j(json!({"id": 2})), "remove"),
        r(
            "POST",
            "/devices",
            j(json!({"id": 7, "key": key})),
            "devices",
        ),
        r("GET", "/devices", None, "devices"),
        r("DELETE", "/devices/1", None, "devices"),
        r("POST", "/devices/1/revoke", j(json!({})), "devices"),
        r(
            "POST",
            "/devices/1/rekey",
            j(json!({"key": key, "grace_s": 60})),
            "devices",
        ),
        r(
            "POST",
            "/devices/1/protocol",
            j(json!({"version": 1})),
            "devices",
        ),
        r("DELETE", "/export/gone", None, "all"),
    ]
}

fn send(client: &Client, base: &str, r: &Route) -> Reply {
    let url = format!("{base}{}", r.path);
    let agent = client.agent();
    let resp = match (r.method, &r.body) {
        ("GET", _) => client.authorize(agent.get(&url)).call(),
        ("DELETE", None) => client.authorize(agent.delete(&url)).call(),
        (m, Some((ct, body))) => {
            let req = if m == "POST" {
                agent.post(&url)
            } else {
                agent.delete(&url).force_send_body()
            };
            client
                .authorize(req)
                .header("content-type", *ct)
                .send(&body[..])
        }
        (m, None) => panic!("no body for {m}"),
    };
    match resp {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            Reply {
                status,
                location: None,
                body: serde_json::from_str(&text).unwrap_or(Json::String(text)),
            }
        }
        Err(e) => Reply {
            status: 0,
            location: None,
            body: Json::String(e.to_string()),
        },
    }
}

/// What the refused requests could have changed: rows, devices, membership, leader.
fn state(c: &Cluster) -> (Vec<Vec<Json>>, Json, Json, u64) {
    let l = c.leader();
    let n = &c.nodes[l];
    let rows = n.rows("SELECT * FROM t ORDER BY id", "strong");
    let devices = n.client().get(&n.url("/devices")).body;
    let status = n.status().unwrap();
    (rows, devices, status["raft"]["voters"].clone(), n.id)
}

#[test]
fn test_every_public_route_refuses_anonymous_and_underprivileged_and_changes_nothing() {
    // Slow elections: the test asserts that no refused request moved the leadership, and
    // fetches a backup from the leader (a follower answers it with a redirect).
    let c = secure_cluster_with(3, Some(SLOW_ELECTIONS.into()));
    c.execute(&json!([
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)",
        "INSERT INTO t(v) VALUES ('kept')"
    ]));
    let l = c.leader();
    let admin = c.nodes[l].client();
    let r = admin.post(
        &c.nodes[l].url("/devices"),
        &json!({"id": 1, "key": "22".repeat(32)}),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    let before = state(&c);
    let auth = c.auth();
    let anonymous = Client::with_auth(TIMEOUT, None, &auth.anonymous());
    let wrong = Client::with_auth(TIMEOUT, None, &auth.as_user(ADMIN.0, "not-the-password"));
    let status_only = Client::with_auth(TIMEOUT, None, &auth.as_user(STATUS_ONLY.0, STATUS_ONLY.1));
    let ready_only = Client::with_auth(TIMEOUT, None, &auth.as_user(READY_ONLY.0, READY_ONLY.1));
    // The leader and a follower (which must refuse by itself, not forward).
    for i in [l, c.followers()[0]] {
        let base = c.nodes[i].url("");
        for route in routes() {
            let what = format!("{} {} on node {}", route.method, route.path, c.nodes[i].id);
            for (who, client) in [("anonymous", &anonymous), ("wrong password", &wrong)] {
                let r = send(client, &base, &route);
                assert_eq!(r.status, 401, "{what} as {who}: {:?}", r.body);
                let err = r.body["results"][0]["error"].as_str().unwrap_or("");
                assert!(err.starts_with("unauthorized"), "{what}: {:?}", r.body);
            }
            let under = if route.perm == "status" {
                &ready_only
            } else {
                &status_only
            };
            let r = send(under, &base, &route);
            assert_eq!(r.status, 403, "{what} under-privileged: {:?}", r.body);
            let err = r.body["results"][0]["error"].as_str().unwrap_or("");
            assert!(
                err.contains(&format!("lacks permission {}", route.perm)),
                "{what}: {err}"
            );
        }
    }
    assert_eq!(state(&c), before, "a refused request changed something");
    // The device admin API never returns a key, and the key lookup is not on the API port.
    let devices = admin.get(&c.nodes[l].url("/devices")).body;
    assert_eq!(devices["devices"][0]["device_id"], 1, "{devices}");
    assert!(!devices.to_string().contains(&"22".repeat(32)), "{devices}");
    for i in 0..3 {
        let r = admin.get(&c.nodes[i].url("/ingress/key/1"));
        assert_eq!(r.status, 404, "{:?}", r.body);
    }
    // A JSON route refuses a body that is not JSON (a browser form), even from the admin.
    let r = admin.post_bytes(
        &c.nodes[l].url("/db/execute"),
        "text/plain",
        br#"["DELETE FROM t"]"#,
    );
    assert_eq!(r.status, 415, "{:?}", r.body);
    // `load` replaces user tables, but a Cairn backup (it restores the device registry and
    // its keys) needs `all`: refused, and nothing changes.
    let mut backup = Vec::new();
    let mut resp = admin
        .authorize(admin.agent().get(c.nodes[l].url("/db/backup")))
        .call()
        .unwrap();
    std::io::Read::read_to_end(&mut resp.body_mut().as_reader(), &mut backup).unwrap();
    assert!(backup.starts_with(b"SQLite format 3\0"));
    let loader = Client::with_auth(TIMEOUT, None, &auth.as_user(LOADER.0, LOADER.1));
    let r = loader.post_bytes(
        &c.nodes[l].url("/db/load"),
        "application/octet-stream",
        &backup,
    );
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(state(&c), before, "a refused load changed something");
    // The admin (through a follower: forwarded with its credentials) gets everything.
    let f = c.followers()[0];
    let r = c.nodes[f].execute(&json!(["INSERT INTO t(v) VALUES ('admin')"]), "");
    assert!(r.succeeded(), "{:?}", r.body);
    assert_eq!(c.nodes[l].rows("SELECT count(*) FROM t", "strong")[0][0], 2);
    c.assert_identical();
}

/// A ureq agent for `https://` trusting `ca`, presenting `client` (cert, key) if given.
fn tls_agent(ca: &Path, client: Option<(&Path, &Path)>) -> ureq::Agent {
    let pem = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let root = ureq::tls::Certificate::from_pem(&pem(ca)).unwrap();
    let mut tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .root_certs(ureq::tls::RootCerts::new_with_certs(&[root]));
    if let Some((crt, key)) = client {
        let cert = ureq::tls::Certificate::from_pem(&pem(crt)).unwrap();
        let key = ureq::tls::PrivateKey::from_pem(&pem(key)).unwrap();
        tls = tls.client_cert(Some(ureq::tls::ClientCert::new_with_certs(&[cert], key)));
    }
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .tls_config(tls.build())
        .build()
        .into()
}

/// Status of `POST url` with a postcard-looking body (0: no HTTP answer at all).
fn post_status(agent: &ureq::Agent, url: &str) -> u16 {
    match agent
        .post(url)
        .header("content-type", "application/octet-stream")
        .send(&[0u8, 1, 2, 3][..])
    {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

#[test]
fn test_raft_port_refuses_plain_text_and_foreign_certificates() {
    // The test ends checking that nobody was deposed: elections slow enough that a loaded
    // machine alone does not depose anybody.
    let c = secure_cluster_with(3, Some(SLOW_ELECTIONS.into()));
    let l = c.leader();
    let term = c.nodes[l].status().unwrap()["raft"]["term"].clone();
    let raft = c.nodes[l].raft.clone();
    let tls = c.tls_dir();
    let ca = tls.join("ca.crt");
    // Another CA's node certificate, and a client certificate of the cluster CA.
    let other = c.dir().join("other");
    c.certs(&["init", &other.join("ca").display().to_string()]);
    let issue = |ca_dir: &Path, name: &str, out: &Path, client: bool| {
        let mut args = vec![
            "issue".to_string(),
            "--ca".into(),
            ca_dir.display().to_string(),
            "--name".into(),
            name.into(),
            "--ip".into(),
            "127.0.0.1".into(),
            "--out".into(),
            out.display().to_string(),
        ];
        if client {
            args.push("--client".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.certs(&args);
        (
            out.join(format!("{name}.crt")),
            out.join(format!("{name}.key")),
        )
    };
    let foreign = issue(&other.join("ca"), "rogue", &other.join("tls"), false);
    let client_cert = issue(&c.ca_dir(), "operator", &c.dir().join("operator"), true);
    let member = (tls.join("node3.crt"), tls.join("node3.key"));

    let plain: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    for path in [
        "/raft/vote",
        "/raft/append",
        "/raft/snapshot",
        "/ingress/forward",
    ] {
        let https = format!("https://{raft}{path}");
        assert_eq!(
            post_status(&plain, &format!("http://{raft}{path}")),
            0,
            "plain {path}"
        );
        assert_eq!(
            post_status(&tls_agent(&ca, None), &https),
            0,
            "no cert {path}"
        );
        let (crt, key) = &foreign;
        assert_eq!(
            post_status(&tls_agent(&ca, Some((crt, key))), &https),
            0,
            "foreign {path}"
        );
        let (crt, key) = &client_cert;
        assert_eq!(
            post_status(&tls_agent(&ca, Some((crt, key))), &https),
            0,
            "client cert {path}"
        );
    }
    // The control: a node certificate of the cluster CA gets HTTP answers.
    let (crt, key) = &member;
    let ok = tls_agent(&ca, Some((crt, key)));
    let r = ok.get(format!("https://{raft}/raft/ping")).call().unwrap();
    assert_eq!(r.status(), 200);
    assert_ne!(post_status(&ok, &format!("https://{raft}/raft/vote")), 0);
    // Even a member's bodies are bounded: a vote is a few hundred bytes. The node answers 413
    // (or closes the connection before the client is done sending, or refuses it with 409 before
    // reading it: it names no incarnation, see t25); never 200.
    let big = vec![0u8; 100 << 10];
    match ok
        .post(format!("https://{raft}/raft/vote"))
        .header("content-type", "application/octet-stream")
        .send(&big[..])
    {
        Ok(r) => assert!(matches!(r.status().as_u16(), 413 | 409), "{}", r.status()),
        Err(ureq::Error::Io(e)) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        ),
        Err(e) => panic!("{e}"),
    }
    // Nobody was deposed.
    assert_eq!(c.leader(), l);
    assert_eq!(c.nodes[l].status().unwrap()["raft"]["term"], term);
}

/// Starts a `cairn node` outside the harness that joins `c` with `flags`; returns it and its
/// data dir.
fn rogue(c: &Cluster, name: &str, flags: &[String]) -> (std::process::Child, PathBuf) {
    let dir = c.dir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let log = std::fs::File::create(dir.join("node.log")).unwrap();
    let child = Command::new(cairn_bin())
        .args(["node", "--node-id", "9", "--data-dir"])
        .arg(&dir)
        .args(["--http-addr", "127.0.0.1:0", "--raft-addr", "127.0.0.1:0"])
        .args(["--device-addr", "127.0.0.1:0"])
        .args(flags)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    (child, dir)
}

#[test]
fn test_rogue_joins_are_refused() {
    let c = secure_cluster(3);
    let l = c.leader();
    let auth = c.auth();
    let leader = &c.nodes[l];
    let voters = || c.nodes[c.leader()].status().unwrap()["raft"]["voters"].clone();
    let before = voters();
    let as_user = |u: (&str, &str)| Client::with_auth(TIMEOUT, None, &auth.as_user(u.0, u.1));
    // A user allowed to join cannot re-point a member (node 2) to an address of its own.
    let node2 = &c.nodes[1];
    let repoint = json!({"id": 2, "addr": "127.0.0.1:1", "http_addr": node2.http});
    let r = as_user(JOINER).post(&leader.url("/join"), &repoint);
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert!(
        r.body.to_string().contains("lacks permission all"),
        "{:?}",
        r.body
    );
    // `--replace` removes a node too: `join` alone is not enough.
    let replace = json!({"id": 2, "addr": node2.raft, "http_addr": node2.http, "replace": 2});
    let r = as_user(JOINER).post(&leader.url("/join"), &replace);
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert!(
        r.body.to_string().contains("lacks permission remove"),
        "{:?}",
        r.body
    );
    // join-read-only cannot ask for a vote.
    let voter = json!({"id": 9, "addr": "127.0.0.1:1", "http_addr": "127.0.0.1:2"});
    let r = as_user(LEARNER).post(&leader.url("/join"), &voter);
    assert_eq!(r.status, 403, "{:?}", r.body);
    // Valid join credentials but nobody with a cluster certificate at that Raft address.
    let r = as_user(JOINER).post(&leader.url("/join"), &voter);
    assert_eq!(r.status, 400, "{:?}", r.body);

    // Real processes holding the join credentials (the cluster's own auth file): one without
    // node TLS, one with a certificate of another CA. Both keep asking; neither gets in.
    let auth_file = c.dir().join("auth.json").display().to_string();
    let tls = c.tls_dir();
    let mut common = vec![
        "--join".to_string(),
        leader.url(""),
        "--auth".into(),
        auth_file,
        "--join-as".into(),
        JOINER.0.into(),
        "--http-ca-cert".into(),
        tls.join("ca.crt").display().to_string(),
    ];
    // --http-ca-cert needs HTTPS of its own: the rogue serves its API with its cert.
    let other = c.dir().join("other");
    c.certs(&["init", &other.join("ca").display().to_string()]);
    c.certs(&[
        "issue",
        "--ca",
        &other.join("ca").display().to_string(),
        "--name",
        "rogue",
        "--ip",
        "127.0.0.1",
        "--out",
        &other.join("tls").display().to_string(),
    ]);
    let (crt, key) = (other.join("tls/rogue.crt"), other.join("tls/rogue.key"));
    common.extend([
        "--http-cert".into(),
        crt.display().to_string(),
        "--http-key".into(),
        key.display().to_string(),
    ]);
    let mut with_foreign = common.clone();
    with_foreign.extend([
        "--node-cert".into(),
        crt.display().to_string(),
        "--node-key".into(),
        key.display().to_string(),
        "--node-ca-cert".into(),
        other.join("tls/ca.crt").display().to_string(),
        "--node-verify-client".into(),
    ]);
    let mut rogues = vec![
        rogue(&c, "rogue-plain", &common),
        rogue(&c, "rogue-ca", &with_foreign),
    ];
    // Each logs at least two refusals (so it was heard, and kept trying).
    for (child, dir) in &mut rogues {
        poll(TIMEOUT, "the rogue's join to be refused twice", || {
            assert!(child.try_wait().unwrap().is_none(), "rogue exited");
            let log = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
            (log.matches("join refused (400").count() >= 2).then_some(())
        });
    }
    for (mut child, _) in rogues {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_eq!(voters(), before);
    let members = c.nodes[c.leader()].client().get(&leader.url("/nodes")).body;
    assert_eq!(members.as_object().map(|m| m.len()), Some(3), "{members}");
}

#[test]
fn test_certificates_reload_without_restart() {
    let c = secure_cluster(3);
    let l = c.leader();
    let id = c.nodes[l].id;
    let pid = c.nodes[l].pid();
    let tls = c.tls_dir();
    let crt = tls.join(format!("node{id}.crt"));
    let old = std::fs::read_to_string(&crt).unwrap();
    assert_eq!(
        served_cert(&c.nodes[l].http, &tls.join("ca.crt")),
        pem_der(&old)
    );
    // Renew: a new key and certificate from the same CA, written elsewhere and moved in.
    let renew = c.dir().join("renew");
    c.certs(&[
        "issue",
        "--ca",
        &c.ca_dir().display().to_string(),
        "--name",
        &format!("node{id}"),
        "--ip",
        "127.0.0.1",
        "--out",
        &renew.display().to_string(),
    ]);
    for ext in ["key", "crt"] {
        let name = format!("node{id}.{ext}");
        let tmp = tls.join(format!("{name}.new"));
        std::fs::copy(renew.join(&name), &tmp).unwrap();
        std::fs::rename(&tmp, tls.join(&name)).unwrap();
    }
    let new = std::fs::read_to_string(&crt).unwrap();
    assert_ne!(new, old);
    // The next HTTPS handshake presents the new certificate; same process.
    poll(TIMEOUT, "the new certificate to be served", || {
        (served_cert(&c.nodes[l].http, &tls.join("ca.crt")) == pem_der(&new)).then_some(())
    });
    assert_eq!(c.nodes[l].pid(), pid);
    // Node TLS uses it too: the cluster still replicates through fresh connections.
    c.execute(&json!([
        "CREATE TABLE after_reload (x)",
        "INSERT INTO after_reload VALUES (1)"
    ]));
    c.assert_identical();
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// The leaf certificate the TLS server at `addr` presents (trusting `ca`).
fn served_cert(addr: &str, ca: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    conn.peer_certificates().unwrap()[0].to_vec()
}

#[test]
fn test_secure_by_default_refusal_and_insecure_warning() {
    let dir = tempfile::tempdir().unwrap();
    // Beyond loopback without auth or node TLS: refused before anything is bound.
    for (flags, needs) in [
        (&["--http-addr", "0.0.0.0:0"][..], "--auth FILE"),
        (&["--raft-addr", "0.0.0.0:0"][..], "--node-verify-client"),
    ] {
        let out = Command::new(cairn_bin())
            .args(["node", "--node-id", "1", "--bootstrap", "--data-dir"])
            .arg(dir.path())
            .args(flags)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} started");
        assert!(
            err.contains("refusing to start") && err.contains(needs),
            "{err}"
        );
        assert!(err.contains("--insecure"), "{err}");
    }
    assert!(!dir.path().join("addrs.json").exists());
    // --insecure: a warning at every start (loopback here; the flag is what warns).
    let mut c = Cluster::start_with(
        1,
        Options {
            extra: vec!["--insecure".into()],
            ..Options::default()
        },
    );
    c.terminate(0);
    c.restart(0);
    let warnings = c.nodes[0].log().matches("WARN").filter(|_| true).count();
    assert!(warnings >= 2, "{}", c.nodes[0].log());
    assert_eq!(c.nodes[0].log().matches("--insecure: this node").count(), 2);
}

#[test]
fn test_auth_alone_over_plain_http_and_credentials_in_forwarding() {
    // Auth without TLS (a loopback deployment behind a proxy): forwarding keeps the client's
    // identity; a follower cannot lend the leader more rights than the client has.
    let c = Cluster::start_with(
        3,
        Options {
            security: Some(Security {
                users: users(),
                http_tls: false,
                node_tls: false,
            }),
            ..Options::default()
        },
    );
    let f = c.followers()[0];
    let url = c.nodes[f].url("/db/execute");
    let watcher = Client::with_auth(
        TIMEOUT,
        None,
        &Auth::default().as_user(STATUS_ONLY.0, STATUS_ONLY.1),
    );
    let r = watcher.post(&url, &json!(["CREATE TABLE x (y)"]));
    assert_eq!(r.status, 403, "{:?}", r.body);
    let r = c.nodes[f].execute(&json!(["CREATE TABLE x (y)"]), "");
    assert!(r.succeeded(), "{:?}", r.body);
    c.assert_identical();
}

/// rqlite's own Python client (pyrqlite, `cargo xtask setup` installs it) over HTTPS with
/// Basic credentials, through a follower; with a wrong password it gets nothing done.
const PYRQLITE: &str = r#"
import ssl, sys
import pyrqlite.dbapi2 as db
host, port, ca, user, password, table = sys.argv[1:7]
conn = db.connect(scheme="https", host=host, port=int(port), user=user, password=password,
                  ssl_context=ssl.create_default_context(cafile=ca))
cur = conn.cursor()
cur.execute("CREATE TABLE %s (id INTEGER PRIMARY KEY, name TEXT)" % table)
cur.execute("INSERT INTO %s(name) VALUES(?)" % table, ("from pyrqlite",))
cur.execute("SELECT name FROM %s" % table)
print("ROW", cur.fetchone()[0])
"#;

#[test]
fn test_pyrqlite_connects_with_credentials_over_https() {
    let c = secure_cluster(3);
    let f = c.followers()[0];
    let (host, port) = c.nodes[f].http.rsplit_once(':').unwrap();
    let ca = c.tls_dir().join("ca.crt").display().to_string();
    let run = |user: &str, password: &str, table: &str| {
        Command::new("python3")
            .args(["-c", PYRQLITE, host, port, &ca, user, password, table])
            .output()
            .expect("python3 (cargo xtask setup installs it and pyrqlite)")
    };
    let ok = run(ADMIN.0, ADMIN.1, "py");
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success() && out.contains("ROW from pyrqlite"),
        "pyrqlite: {out}\n{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = run(ADMIN.0, "wrong", "py_intruder");
    assert!(
        !String::from_utf8_lossy(&bad.stdout).contains("ROW"),
        "a wrong password got through"
    );
    let l = c.leader();
    let tables = c.nodes[l].rows(
        "SELECT name FROM sqlite_master WHERE name LIKE 'py%' ORDER BY name",
        "strong",
    );
    assert_eq!(tables, vec![vec![json!("py")]]);
}

#[test]
fn test_cli_takes_credentials_and_a_ca() {
    let c = secure_cluster(3);
    let f = c.followers()[0];
    let host = c.nodes[f].url("");
    let cli = |args: &[&str], auth: &Auth| {
        let mut cmd = Command::new(cairn_bin());
        cmd.args(args).args(["--host", &host]);
        cairn_tests::device::authenticate(&mut cmd, auth);
        cmd.output().expect("running cairn")
    };
    let admin = c.auth();
    let key = "33".repeat(32);
    let out = cli(&["device", "add", "--id", "5", "--key", &key], &admin);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["device", "list"], &admin);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && listed.contains("1 device(s)"),
        "{listed}"
    );
    // Without credentials: refused, with the node's reason.
    let out = cli(&["device", "list"], &admin.anonymous());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{out:?}"
    );
    // Without the CA: the HTTPS certificate is not trusted.
    let out = cli(
        &["device", "list"],
        &Auth {
            ca_cert: None,
            ..admin.clone()
        },
    );
    assert!(!out.status.success());
    // A backup through a follower: redirected to the leader, credentials kept.
    let file = c.dir().join("backup.sqlite");
    let out = cli(&["backup", file.to_str().unwrap()], &admin);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes.starts_with(b"SQLite format 3\0"));
    // Credentials in the URL work as well.
    let (scheme, rest) = host.split_once("://").unwrap();
    let out = Command::new(cairn_bin())
        .args(["device", "list", "--host"])
        .arg(format!("{scheme}://{}:{}@{rest}", ADMIN.0, ADMIN.1))
        .arg("--ca-cert")
        .arg(admin.ca_cert.as_ref().unwrap())
        .env_remove("CAIRN_USER")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
