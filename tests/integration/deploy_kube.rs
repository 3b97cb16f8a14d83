//! An in-process Kubernetes API server for the deploy tests — no real one can run here. It
//! implements what `strata deploy apply` and kubectl's client-side dry run use, the way
//! kube-apiserver answers it:
//!
//! - discovery: `GET /api`, `/apis`, `/api/v1`, `/apis/apps/v1`;
//! - server-side apply: `PATCH …/{resource}/{name}` with `application/apply-patch+yaml`,
//!   storing the object (namespace, uid, generation bumped when the spec changes), and
//!   refusing other patch types (415) and applies without `fieldManager` (422);
//! - `GET` of one object (404 Status when missing) and lists filtered by `labelSelector`;
//! - a controller stand-in: after an apply of a Deployment, its ReplicaSet and pods exist, and
//!   every `GET` of the Deployment moves its status along the [`Scenario`] the test chose.
//!
//! Every request is recorded (method, path, query, content type, authorization, body). It is
//! synchronous (std sockets, a thread per connection, HTTP/1.1 keep-alive), like the registry
//! harness, and stops on Drop.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};

/// How the Deployment's rollout goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Not observed, then 1 of 2 updated, then 1 available, then all available.
    Healthy,
    /// Pods crash: `CrashLoopBackOff`, last termination `Error` exit 1.
    CrashLoop,
    /// The image cannot be pulled: `ImagePullBackOff`.
    ImagePull,
    /// The first pull fails: `ErrImagePull`.
    ErrImagePull,
    /// The controller gives up: `Progressing` = `ProgressDeadlineExceeded`.
    Deadline,
    /// Never becomes available (for the timeout).
    Stuck,
}

/// One recorded request.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

impl Recorded {
    /// A query parameter (not percent-decoded: the tests use plain values).
    pub fn param(&self, key: &str) -> Option<String> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == key).then(|| v.to_string())
        })
    }
}

struct State {
    scenario: Scenario,
    /// Bearer token required on every request, if set.
    token: Option<String>,
    /// `/…/namespaces/NS/RESOURCE` (or `/…/RESOURCE`) → name → object.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    requests: Vec<Recorded>,
    /// GETs of each Deployment so far (the controller's clock).
    ticks: BTreeMap<String, u32>,
    uid: u64,
}

/// The server; stops on Drop.
pub struct FakeKube {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    tls: bool,
}

impl FakeKube {
    pub fn start(scenario: Scenario) -> FakeKube {
        FakeKube::start_with(scenario, None)
    }

    /// A server that answers 401 unless `Authorization: Bearer <token>`.
    pub fn start_with(scenario: Scenario, token: Option<&str>) -> FakeKube {
        FakeKube::start_inner(scenario, token, None)
    }

    /// HTTPS with a server certificate from `pki`, requiring a client certificate it signed
    /// (what a cluster does for `client-certificate-data` users).
    pub fn start_tls(scenario: Scenario, pki: &Pki) -> FakeKube {
        FakeKube::start_inner(scenario, None, Some(pki.server_config()))
    }

    fn start_inner(
        scenario: Scenario,
        token: Option<&str>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> FakeKube {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake API server");
        let addr = listener.local_addr().expect("local addr");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let state = Arc::new(Mutex::new(State {
            scenario,
            token: token.map(str::to_string),
            objects: BTreeMap::new(),
            requests: Vec::new(),
            ticks: BTreeMap::new(),
            uid: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (Arc::clone(&state), Arc::clone(&stop));
        let is_tls = tls.is_some();
        thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let s = Arc::clone(&s);
                        let tls = tls.clone();
                        let _ = conn.set_nonblocking(false);
                        // A client that goes away ends its thread; none waits longer than this.
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                        thread::spawn(move || match tls {
                            None => serve(conn, &s),
                            Some(cfg) => {
                                let Ok(server) = rustls::ServerConnection::new(cfg) else {
                                    return;
                                };
                                serve(rustls::StreamOwned::new(server, conn), &s)
                            }
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeKube {
            addr,
            state,
            stop,
            tls: is_tls,
        }
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The stored object at `collection` (`/apis/apps/v1/namespaces/default/deployments`).
    pub fn object(&self, collection: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .objects
            .get(collection)?
            .get(name)
            .cloned()
    }

    /// A kubeconfig for this server with a token user.
    pub fn kubeconfig_token(&self, token: &str, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: deployer\n    namespace: {namespace}\ncurrent-context: fake\nusers:\n- name: deployer\n  user:\n    token: {token}\n",
            self.url()
        )
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve<S: Read + Write>(conn: S, state: &Mutex<State>) {
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
            return;
        };
        let (method, target) = (method.to_string(), target.to_string());
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), q.to_string()),
            None => (target.clone(), String::new()),
        };
        let req = Recorded {
            method,
            path,
            query,
            content_type: headers.get("content-type").cloned(),
            authorization: headers.get("authorization").cloned(),
            body,
        };
        let (status, reply) = {
            let mut s = state.lock().unwrap();
            s.requests.push(req.clone());
            handle(&mut s, &req)
        };
        let text = serde_json::to_vec(&reply).expect("json");
        let head = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            reason(status),
            text.len()
        );
        let conn = reader.get_mut();
        if conn.write_all(head.as_bytes()).is_err()
            || conn.write_all(&text).is_err()
            || conn.flush().is_err()
        {
            return;
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        401 => "Unauthorized",
        404 => "Not Found",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        _ => "Error",
    }
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn resource(name: &str, kind: &str, namespaced: bool) -> Value {
    json!({"name": name, "singularName": kind.to_lowercase(), "namespaced": namespaced, "kind": kind,
           "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
}

fn handle(s: &mut State, req: &Recorded) -> (u16, Value) {
    if let Some(t) = &s.token
        && req.authorization.as_deref() != Some(&format!("Bearer {t}"))
    {
        return status(401, "Unauthorized", "Unauthorized");
    }
    let path = req.path.trim_end_matches('/');
    match (req.method.as_str(), path) {
        ("GET", "/api") => {
            return (
                200,
                json!({"kind": "APIVersions", "versions": ["v1"],
                       "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
            );
        }
        ("GET", "/apis") => {
            return (
                200,
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{
                    "name": "apps",
                    "versions": [{"groupVersion": "apps/v1", "version": "v1"}],
                    "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"},
                }]}),
            );
        }
        ("GET", "/api/v1") => {
            return (
                200,
                json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": [
                    resource("configmaps", "ConfigMap", true),
                    resource("namespaces", "Namespace", false),
                    resource("pods", "Pod", true),
                    resource("services", "Service", true),
                ]}),
            );
        }
        ("GET", "/apis/apps/v1") => {
            return (
                200,
                json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "apps/v1", "resources": [
                    resource("deployments", "Deployment", true),
                    resource("replicasets", "ReplicaSet", true),
                ]}),
            );
        }
        _ => {}
    }
    // /api/v1/… or /apis/GROUP/VERSION/…, then [namespaces/NS/]RESOURCE[/NAME].
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let base = match segs.first() {
        Some(&"api") if segs.len() >= 2 => 2,
        Some(&"apis") if segs.len() >= 3 => 3,
        _ => {
            return status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
    };
    let rest = &segs[base..];
    let (collection_len, name) = match rest {
        ["namespaces", _, _] | [_] => (rest.len(), None),
        ["namespaces", _, _, n] | [_, n] => (rest.len() - 1, Some(n.to_string())),
        _ => {
            return status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
    };
    let collection = format!("/{}", segs[..base + collection_len].join("/"));
    match (req.method.as_str(), name) {
        ("PATCH", Some(name)) => apply(s, req, &collection, &name),
        ("GET", Some(name)) => {
            if collection.ends_with("/deployments") {
                tick(s, &collection, &name);
            }
            match s.objects.get(&collection).and_then(|c| c.get(&name)) {
                Some(o) => (200, o.clone()),
                None => status(
                    404,
                    "NotFound",
                    &format!("{} \"{name}\" not found", kind_of(&collection)),
                ),
            }
        }
        ("GET", None) => {
            let selector = req
                .param("labelSelector")
                .map(|s| decode(&s))
                .unwrap_or_default();
            let items: Vec<Value> = s
                .objects
                .get(&collection)
                .map(|c| {
                    c.values()
                        .filter(|o| matches(o, &selector))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            (
                200,
                json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}),
            )
        }
        _ => status(405, "MethodNotAllowed", "method not allowed"),
    }
}

fn kind_of(collection: &str) -> String {
    collection
        .rsplit('/')
        .next()
        .unwrap_or("object")
        .trim_end_matches('s')
        .to_string()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8(out).expect("utf-8 selector")
}

/// `a=b,c=d` equality selectors.
fn matches(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').unwrap_or((term, ""));
        obj["metadata"]["labels"][k].as_str() == Some(v.trim_start_matches('='))
    })
}

fn apply(s: &mut State, req: &Recorded, collection: &str, name: &str) -> (u16, Value) {
    if req.content_type.as_deref() != Some("application/apply-patch+yaml") {
        return status(
            415,
            "UnsupportedMediaType",
            "only server-side apply is implemented",
        );
    }
    if req.param("fieldManager").is_none() {
        return status(422, "Invalid", "fieldManager is required for apply patch");
    }
    let mut obj: Value = match serde_saphyr::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => return status(400, "BadRequest", &format!("invalid apply body: {e}")),
    };
    if obj["metadata"]["name"].as_str() != Some(name) {
        return status(
            400,
            "BadRequest",
            "the name of the object does not match the URL",
        );
    }
    let ns = collection
        .split("/namespaces/")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .map(str::to_string);
    let previous = s.objects.get(collection).and_then(|c| c.get(name)).cloned();
    let created = previous.is_none();
    let generation = match &previous {
        Some(p) if p["spec"] == obj["spec"] => p["metadata"]["generation"].as_i64().unwrap_or(1),
        Some(p) => p["metadata"]["generation"].as_i64().unwrap_or(1) + 1,
        None => 1,
    };
    s.uid += 1;
    let uid = previous
        .as_ref()
        .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("uid-{}", s.uid));
    let m = &mut obj["metadata"];
    m["uid"] = json!(uid);
    m["generation"] = json!(generation);
    m["resourceVersion"] = json!(s.uid.to_string());
    if let Some(ns) = &ns {
        m["namespace"] = json!(ns);
    }
    if collection.ends_with("/deployments") {
        let mut annotations = obj["metadata"]["annotations"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        annotations.insert(
            "deployment.kubernetes.io/revision".into(),
            json!(generation.to_string()),
        );
        obj["metadata"]["annotations"] = Value::Object(annotations);
        obj["status"] = json!({"observedGeneration": generation - 1});
        s.ticks.insert(format!("{collection}/{name}"), 0);
        controller(s, collection, &obj);
    }
    s.objects
        .entry(collection.to_string())
        .or_default()
        .insert(name.to_string(), obj.clone());
    (if created { 201 } else { 200 }, obj)
}

/// What the Deployment controller would create: the ReplicaSet of the current revision and
/// its pods, in the scenario's shape.
fn controller(s: &mut State, collection: &str, d: &Value) {
    let ns_prefix = collection.trim_end_matches("/deployments");
    let core = ns_prefix.replace("/apis/apps/v1", "/api/v1");
    let name = d["metadata"]["name"].as_str().unwrap_or("app");
    let revision = d["metadata"]["annotations"]["deployment.kubernetes.io/revision"].clone();
    let hash = format!("rev{}", revision.as_str().unwrap_or("1"));
    let mut labels = d["spec"]["selector"]["matchLabels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    labels.insert("pod-template-hash".into(), json!(hash));
    let rs_name = format!("{name}-{hash}");
    let rs = json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": rs_name, "labels": labels,
            "annotations": {"deployment.kubernetes.io/revision": revision},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                "uid": d["metadata"]["uid"], "controller": true}]},
        "spec": {"selector": {"matchLabels": labels}},
    });
    s.objects
        .entry(format!("{ns_prefix}/replicasets"))
        .or_default()
        .insert(rs_name.clone(), rs);
    let container = d["spec"]["template"]["spec"]["containers"][0]["name"]
        .as_str()
        .unwrap_or("app")
        .to_string();
    let image = d["spec"]["template"]["spec"]["containers"][0]["image"].clone();
    let state = match s.scenario {
        Scenario::CrashLoop => json!({
            "state": {"waiting": {"reason": "CrashLoopBackOff",
                "message": format!("back-off 20s restarting failed container={container}")}},
            "lastState": {"terminated": {"reason": "Error", "exitCode": 1}},
            "restartCount": 3,
        }),
        Scenario::ImagePull => json!({
            "state": {"waiting": {"reason": "ImagePullBackOff",
                "message": format!("Back-off pulling image {image}")}},
            "lastState": {}, "restartCount": 0,
        }),
        Scenario::ErrImagePull => json!({
            "state": {"waiting": {"reason": "ErrImagePull",
                "message": format!("failed to pull and unpack image {image}: not found")}},
            "lastState": {}, "restartCount": 0,
        }),
        _ => {
            json!({"state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}, "lastState": {}, "restartCount": 0})
        }
    };
    let pods = s.objects.entry(format!("{core}/pods")).or_default();
    for i in 0..2 {
        let pod_name = format!("{rs_name}-p{i}");
        let mut cs = json!({"name": container, "image": image, "imageID": "", "ready": false, "started": false});
        for (k, v) in state.as_object().unwrap() {
            cs[k] = v.clone();
        }
        pods.insert(
            pod_name.clone(),
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "labels": labels},
                "status": {"phase": "Pending", "containerStatuses": [cs]}}),
        );
    }
}

/// One controller step for Deployment `collection/name`, per the scenario.
fn tick(s: &mut State, collection: &str, name: &str) {
    let key = format!("{collection}/{name}");
    let Some(n) = s.ticks.get_mut(&key) else {
        return;
    };
    *n += 1;
    let n = *n;
    let scenario = s.scenario;
    let Some(d) = s.objects.get_mut(collection).and_then(|c| c.get_mut(name)) else {
        return;
    };
    let generation = d["metadata"]["generation"].as_i64().unwrap_or(1);
    let want = d["spec"]["replicas"].as_i64().unwrap_or(1);
    d["status"] = match (scenario, n) {
        (_, 1) => json!({"observedGeneration": generation - 1}),
        (Scenario::Healthy, 2) => {
            json!({"observedGeneration": generation, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 0})
        }
        (Scenario::Healthy, 3) => {
            json!({"observedGeneration": generation, "replicas": want, "updatedReplicas": want, "availableReplicas": 1})
        }
        (Scenario::Healthy, _) => {
            json!({"observedGeneration": generation, "replicas": want, "updatedReplicas": want,
            "readyReplicas": want, "availableReplicas": want,
            "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                           {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]})
        }
        (Scenario::Deadline, n) if n >= 3 => {
            json!({"observedGeneration": generation, "replicas": want, "updatedReplicas": want,
            "availableReplicas": 0, "unavailableReplicas": want,
            "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                "message": format!("ReplicaSet \"{name}-rev{generation}\" has timed out progressing.")}]})
        }
        _ => {
            json!({"observedGeneration": generation, "replicas": want, "updatedReplicas": want, "availableReplicas": 0,
            "unavailableReplicas": want})
        }
    };
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate (`CN=admin`, clientAuth),
/// made with rcgen, as PEM.
pub struct Pki {
    pub ca_pem: String,
    ca_der: Vec<u8>,
    server_der: Vec<u8>,
    server_key_der: Vec<u8>,
    pub client_pem: String,
    pub client_key_pem: String,
}

impl Pki {
    pub fn new() -> Pki {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "fake kube CA");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let ca_cert = ca.self_signed(&ca_key).expect("self-sign the CA");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let mut server =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("server params");
        server.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = rcgen::KeyPair::generate().expect("server key");
        let server_cert = server.signed_by(&server_key, &issuer).expect("server cert");
        let mut client =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("client params");
        client
            .distinguished_name
            .push(rcgen::DnType::CommonName, "admin");
        client.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = rcgen::KeyPair::generate().expect("client key");
        let client_cert = client.signed_by(&client_key, &issuer).expect("client cert");
        Pki {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().to_vec(),
            server_der: server_cert.der().to_vec(),
            server_key_der: server_key.serialize_der(),
            client_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
        }
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.ca_der.clone()))
            .expect("trust the CA");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&provider),
        )
        .build()
        .expect("client verifier");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from(self.server_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone())),
            )
            .expect("server certificate");
        Arc::new(config)
    }
}
