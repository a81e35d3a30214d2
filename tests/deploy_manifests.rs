#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The contract between the Kubernetes manifests in `deploy/` and between them and the binary.
//!
//! Every kustomize target (`deploy/base` and each `deploy/overlays/*`) is rendered with
//! `kubectl kustomize` (in a copy of `deploy/` with throwaway credentials, since the real ones are
//! git-ignored) and turned into JSON with PyYAML. The tests then prove what a typo in one file would
//! silently break in a cluster:
//!
//! - Service, PodDisruptionBudget and workload selectors match the pods they are meant for, and every
//!   Service and Ingress port resolves to a container port;
//! - the gateway's probes ask `/healthz` and `/readyz` on the port it listens on (`K3SENSE_LISTEN`), the
//!   broker listens where `K3SENSE_BROKER=broker:1883` points;
//! - every `K3SENSE_*` variable a container sets is one that its subcommand's `--help` lists, and the
//!   image tag is the crate's version;
//! - the publisher schedules only on a node labelled `k3sense.io/sensor` (except in `dev`);
//! - the gpio-device-plugin overlay requests both device files rppal opens (gpiomem and gpiochip0;
//!   on a Pi 5, one uncommented line away, gpiomem0 and gpiochip0) and the gpio group id;
//! - the NetworkPolicies admit exactly publisher→broker:1883, gateway→broker:1883,
//!   Traefik (kube-system)→gateway:8080 and DNS, and nothing else to, from or within the namespace;
//! - every pod is hardened, and every checkov skip carries a reason;
//! - broker and gateway leave a dead node within 30 s of its taint, and the gateway's budget lets a
//!   drain through even when a gateway is not ready;
//! - every single-sensor overlay runs its publisher as Deployment `publisher`, and the command
//!   deploy/README.md gives for switching overlays deletes exactly the publisher workloads;
//! - each sensor node's publisher logs in with its own account, `publisher-<node>`, bound to its
//!   node's sensor id (no `publisher:*`), with the password the Secret holds under its node's name;
//!   the rendered publisher, run against a real broker with the rendered users file, stays within
//!   that account; `deploy/gen-secrets.sh` finds the labelled nodes and never changes a password.
//!
//! The credentials are made by `deploy/gen-secrets.sh` itself, for nodes `pi-1` and `pi-3.lan`.
//!
//! Needs `kubectl` and `python3` with PyYAML. Without them the tests print a notice and pass, unless
//! the environment variable `CI` is set, where they fail.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use k3sense_broker::{Role, Sensors, Users};
use k3sense_protocol::SensorId;
use serde_json::Value;

mod support;

const NAMESPACE: &str = "k3sense";
const IMAGE: &str = "ghcr.io/k3sense/k3sense";
const SENSOR_LABEL: &str = "k3sense.io/sensor";

/// Every rendered target, by name (`base`, `overlays/iio`, …), as a list of objects.
type Renders = BTreeMap<String, Vec<Value>>;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Returns false (after a notice) when a tool is missing outside CI; panics in CI.
fn tools_present() -> bool {
    let kubectl = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    let pyyaml = Command::new("python3")
        .args(["-c", "import yaml"])
        .output()
        .is_ok_and(|o| o.status.success());
    if kubectl && pyyaml {
        return true;
    }
    let missing = [(kubectl, "kubectl"), (pyyaml, "python3 with PyYAML")]
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(", ");
    if std::env::var_os("CI").is_some() {
        panic!("deploy_manifests needs {missing} (pip install kubernetes-validate brings PyYAML)");
    }
    // Written to stderr directly, not with eprintln!, so that the test harness does not swallow it.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED deploy_manifests: {missing} not found (these tests fail when CI is set)"
    );
    false
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The sensor nodes the test credentials are generated for: a plain name and one with a dot, whose
/// sensor id differs from the node name (`pi-3.lan` → `pi-3-lan`).
const SENSOR_NODES: [&str; 2] = ["pi-1", "pi-3.lan"];

/// The files `deploy/gen-secrets.sh` writes, and the one earlier versions wrote (removed from copies).
const CREDENTIAL_FILES: [&str; 4] = [
    "users.txt",
    "gateway.password",
    "publisher-passwords.env",
    "publisher.password",
];

fn gen_secrets() -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(deploy_dir().join("gen-secrets.sh"));
    cmd
}

/// Credentials as a user makes them: `deploy/gen-secrets.sh` itself, for [`SENSOR_NODES`].
fn write_test_credentials(secrets: &Path) {
    let out = gen_secrets()
        .arg("--dir")
        .arg(secrets)
        .args(SENSOR_NODES)
        .output()
        .expect("run deploy/gen-secrets.sh");
    assert!(
        out.status.success(),
        "deploy/gen-secrets.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn kustomize(dir: &Path) -> std::process::Output {
    Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("run kubectl kustomize")
}

fn yaml_to_json(yaml: &[u8]) -> Vec<Value> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python3");
    child.stdin.take().unwrap().write_all(yaml).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "PyYAML could not read the render");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A scratch copy of `deploy/` without any real credentials.
fn scratch_copy(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("deploy-manifests-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_tree(&deploy_dir(), &dir);
    let secrets = dir.join("base/secrets");
    for file in CREDENTIAL_FILES {
        let _ = std::fs::remove_file(secrets.join(file));
    }
    dir
}

fn targets() -> Vec<String> {
    let mut targets = vec!["base".to_owned()];
    let mut overlays: Vec<String> = std::fs::read_dir(deploy_dir().join("overlays"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| format!("overlays/{}", e.file_name().to_string_lossy()))
        .collect();
    overlays.sort();
    targets.extend(overlays);
    targets
}

fn renders() -> Option<&'static Renders> {
    static RENDERS: OnceLock<Option<Renders>> = OnceLock::new();
    RENDERS
        .get_or_init(|| {
            if !tools_present() {
                return None;
            }
            let copy = scratch_copy("render");
            write_test_credentials(&copy.join("base/secrets"));
            let mut renders = Renders::new();
            for target in targets() {
                let out = kustomize(&copy.join(&target));
                assert!(
                    out.status.success(),
                    "kubectl kustomize deploy/{target} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                renders.insert(target, yaml_to_json(&out.stdout));
            }
            let _ = std::fs::remove_dir_all(&copy);
            Some(renders)
        })
        .as_ref()
}

// ---------------------------------------------------------------------------------------------
// Reading objects

fn kind(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or_default()
}

fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or_default()
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn of_kind<'a>(objects: &'a [Value], k: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    objects.iter().filter(move |o| kind(o) == k)
}

/// A workload's pod template, seen as the pods it creates.
struct Pod<'a> {
    workload: &'a Value,
    labels: BTreeMap<String, String>,
    spec: &'a Value,
}

impl Pod<'_> {
    fn id(&self) -> String {
        format!("{}/{}", kind(self.workload), name(self.workload))
    }

    fn component(&self) -> &str {
        self.labels
            .get("app.kubernetes.io/component")
            .map(String::as_str)
            .unwrap_or_default()
    }

    fn containers(&self) -> impl Iterator<Item = &Value> {
        self.spec["containers"].as_array().into_iter().flatten()
    }

    /// `(name, protocol, port)` of every container port.
    fn ports(&self) -> Vec<(String, String, u64)> {
        self.containers()
            .flat_map(|c| c["ports"].as_array().into_iter().flatten())
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or_default().to_owned(),
                    p["protocol"].as_str().unwrap_or("TCP").to_owned(),
                    p["containerPort"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    /// Resolves a Service targetPort or probe port (number or name) to a container port number.
    fn resolve_port(&self, port: &Value) -> Option<u64> {
        match port {
            Value::Number(n) => {
                let n = n.as_u64()?;
                self.ports().iter().any(|(_, _, p)| *p == n).then_some(n)
            }
            Value::String(s) => self
                .ports()
                .iter()
                .find(|(name, _, _)| name == s)
                .map(|(_, _, p)| *p),
            _ => None,
        }
    }
}

fn env_value<'a>(container: &'a Value, var: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == var)?["value"]
        .as_str()
}

/// `$(VAR)` in `text` as the kubelet expands it (third_party/forked/golang/expansion): a variable
/// defined earlier in `env` is replaced, `$$` is a `$`, anything else stays as written.
fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest
            .strip_prefix("$(")
            .and_then(|r| r.split_once(')'))
            .filter(|(name, _)| env.contains_key(*name))
        {
            out.push_str(&env[name]);
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment as the kubelet builds it in a pod on `node`: values in order, each
/// expanded with the variables before it; `fieldRef: spec.nodeName` is `node`. Other `valueFrom`
/// sources are left out (none of k3sense's containers uses them).
fn pod_env(container: &Value, node: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let var = e["name"].as_str().unwrap().to_owned();
        if let Some(value) = e["value"].as_str() {
            let value = expand(value, &env);
            env.insert(var, value);
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
            env.insert(var, node.to_owned());
        }
    }
    env
}

fn pods(objects: &[Value]) -> Vec<Pod<'_>> {
    objects
        .iter()
        .filter(|o| matches!(kind(o), "Deployment" | "DaemonSet" | "StatefulSet" | "Job"))
        .map(|o| Pod {
            workload: o,
            labels: string_map(&o["spec"]["template"]["metadata"]["labels"]),
            spec: &o["spec"]["template"]["spec"],
        })
        .collect()
}

fn pods_of<'a>(objects: &'a [Value], component: &str) -> Vec<Pod<'a>> {
    pods(objects)
        .into_iter()
        .filter(|p| p.component() == component)
        .collect()
}

fn the_pod<'a>(objects: &'a [Value], component: &str) -> Pod<'a> {
    let mut found = pods_of(objects, component);
    assert_eq!(found.len(), 1, "expected one {component} workload");
    found.remove(0)
}

/// Kubernetes label selector semantics: matchLabels and matchExpressions, all must hold.
/// An empty selector matches everything; `None` (absent) is for the caller to interpret.
fn selector_matches(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let match_labels = string_map(&selector["matchLabels"]);
    let labels_ok = match_labels.iter().all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e["key"].as_str().unwrap();
            let values: Vec<&str> = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let value = labels.get(key).map(String::as_str);
            match e["operator"].as_str().unwrap() {
                "In" => value.is_some_and(|v| values.contains(&v)),
                "NotIn" => value.is_none_or(|v| !values.contains(&v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                op => panic!("unknown selector operator {op}"),
            }
        });
    labels_ok && expressions_ok
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn every_target_renders_into_the_namespace_with_common_labels() {
    let Some(renders) = renders() else { return };
    for (target, objects) in renders {
        assert!(!objects.is_empty(), "{target}: empty render");
        let namespaces: Vec<&Value> = of_kind(objects, "Namespace").collect();
        assert_eq!(namespaces.len(), 1, "{target}: one Namespace");
        assert_eq!(name(namespaces[0]), NAMESPACE, "{target}");
        for o in objects {
            let id = format!("{target}: {} {}", kind(o), name(o));
            if kind(o) != "Namespace" {
                assert_eq!(o["metadata"]["namespace"], NAMESPACE, "{id}: namespace");
            }
            let labels = string_map(&o["metadata"]["labels"]);
            assert_eq!(
                labels.get("app.kubernetes.io/name").map(String::as_str),
                Some("k3sense"),
                "{id}: label app.kubernetes.io/name"
            );
        }
        for p in pods(objects) {
            assert_eq!(
                p.labels.get("app.kubernetes.io/name").map(String::as_str),
                Some("k3sense"),
                "{target}: {} pod label app.kubernetes.io/name",
                p.id()
            );
            assert!(
                ["broker", "publisher", "gateway"].contains(&p.component()),
                "{target}: {} has component label {:?}",
                p.id(),
                p.component()
            );
        }
        for component in ["broker", "publisher", "gateway"] {
            assert!(
                !pods_of(objects, component).is_empty(),
                "{target}: no {component} workload"
            );
        }
    }
}

#[test]
fn workload_service_and_budget_selectors_match_their_pods() {
    let Some(renders) = renders() else { return };
    for (target, objects) in renders {
        let pods = pods(objects);
        for p in &pods {
            let selector = &p.workload["spec"]["selector"];
            assert!(
                selector_matches(selector, &p.labels),
                "{target}: {} selector does not match its own template",
                p.id()
            );
            for other in pods.iter().filter(|o| o.id() != p.id()) {
                assert!(
                    !selector_matches(selector, &other.labels),
                    "{target}: {} selector also selects the pods of {}",
                    p.id(),
                    other.id()
                );
            }
        }
        for svc in of_kind(objects, "Service") {
            let selector = &svc["spec"]["selector"];
            assert!(
                selector.as_object().is_some_and(|m| !m.is_empty()),
                "{target}: Service {} has no selector",
                name(svc)
            );
            // A Service selector is a plain map; reuse the matchLabels logic.
            let as_label_selector = serde_json::json!({ "matchLabels": selector });
            let backends: Vec<&Pod> = pods
                .iter()
                .filter(|p| selector_matches(&as_label_selector, &p.labels))
                .collect();
            assert!(
                !backends.is_empty(),
                "{target}: Service {} selects no pod",
                name(svc)
            );
            let svc_component = svc["metadata"]["labels"]["app.kubernetes.io/component"]
                .as_str()
                .unwrap();
            for b in &backends {
                assert_eq!(
                    b.component(),
                    svc_component,
                    "{target}: Service {} selects {}",
                    name(svc),
                    b.id()
                );
                for port in svc["spec"]["ports"].as_array().unwrap() {
                    assert!(
                        b.resolve_port(&port["targetPort"]).is_some(),
                        "{target}: Service {} targetPort {} is no container port of {}",
                        name(svc),
                        port["targetPort"],
                        b.id()
                    );
                }
            }
        }
        for pdb in of_kind(objects, "PodDisruptionBudget") {
            let selected: Vec<&Pod> = pods
                .iter()
                .filter(|p| selector_matches(&pdb["spec"]["selector"], &p.labels))
                .collect();
            assert_eq!(selected.len(), 1, "{target}: PDB {}", name(pdb));
            let replicas = selected[0].workload["spec"]["replicas"].as_u64().unwrap();
            let min = pdb["spec"]["minAvailable"].as_u64().unwrap();
            assert!(
                min < replicas,
                "{target}: PDB {} would block every node drain",
                name(pdb)
            );
        }
    }
}

#[test]
fn gateway_probes_ports_ingress_and_drain_agree() {
    let Some(renders) = renders() else { return };
    for (target, objects) in renders {
        let gw = the_pod(objects, "gateway");
        let container = gw.containers().next().unwrap();
        let listen = env_value(container, "K3SENSE_LISTEN").expect("gateway sets K3SENSE_LISTEN");
        let listen_port: u64 = listen.rsplit_once(':').unwrap().1.parse().unwrap();
        assert_eq!(listen_port, 8080, "{target}: gateway listens on 8080");
        assert!(
            gw.ports().iter().any(|(_, _, p)| *p == listen_port),
            "{target}: K3SENSE_LISTEN port {listen_port} is not a containerPort"
        );
        for (probe, path) in [
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
            ("startupProbe", "/healthz"),
        ] {
            let get = &container[probe]["httpGet"];
            assert_eq!(get["path"], path, "{target}: gateway {probe} path");
            assert_eq!(
                gw.resolve_port(&get["port"]),
                Some(listen_port),
                "{target}: gateway {probe} port"
            );
        }
        // Rollout: two replicas, never fewer than two ready.
        let spec = &gw.workload["spec"];
        assert_eq!(spec["replicas"], 2, "{target}");
        assert_eq!(spec["strategy"]["type"], "RollingUpdate", "{target}");
        assert_eq!(
            spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0,
            "{target}"
        );
        // Drain: preStop sleep + the gateway's ~10 s shutdown fit in the grace period.
        let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .unwrap_or(0);
        let grace = gw.spec["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            grace >= pre_stop + 10 + 5,
            "{target}: grace {grace}s < preStop {pre_stop}s + 10s drain + margin"
        );
        // The Ingress reaches the gateway Service, whose port reaches the gateway's listen port.
        let svc = of_kind(objects, "Service")
            .find(|s| name(s) == "gateway")
            .unwrap();
        let ingress: Vec<&Value> = of_kind(objects, "Ingress").collect();
        assert_eq!(ingress.len(), 1, "{target}: one Ingress");
        assert_eq!(ingress[0]["spec"]["ingressClassName"], "traefik");
        let backend = &ingress[0]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"];
        assert_eq!(backend["name"], "gateway", "{target}");
        let svc_port = svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| {
                p["name"] == backend["port"]["name"] || p["port"] == backend["port"]["number"]
            })
            .expect("the Ingress backend port is a port of Service gateway");
        assert_eq!(
            gw.resolve_port(&svc_port["targetPort"]),
            Some(listen_port),
            "{target}: Service gateway targets the listen port"
        );
    }
}

#[test]
fn broker_service_is_where_clients_dial() {
    let Some(renders) = renders() else { return };
    for (target, objects) in renders {
        let broker = the_pod(objects, "broker");
        let container = broker.containers().next().unwrap();
        let listen = env_value(container, "K3SENSE_LISTEN").expect("broker sets K3SENSE_LISTEN");
        let listen_port: u64 = listen.rsplit_once(':').unwrap().1.parse().unwrap();
        let svc = of_kind(objects, "Service")
            .find(|s| name(s) == "broker")
            .expect("Service broker");
        let svc_port = &svc["spec"]["ports"][0];
        assert_eq!(svc_port["port"], 1883, "{target}: Service broker port");
        assert_eq!(
            broker.resolve_port(&svc_port["targetPort"]),
            Some(listen_port),
            "{target}: Service broker targets the broker's K3SENSE_LISTEN port"
        );
        assert_eq!(
            broker.workload["spec"]["replicas"], 1,
            "{target}: one broker"
        );
        for client in pods(objects).iter().filter(|p| p.component() != "broker") {
            for c in client.containers() {
                assert_eq!(
                    env_value(c, "K3SENSE_BROKER"),
                    Some("broker:1883"),
                    "{target}: {} K3SENSE_BROKER",
                    client.id()
                );
                assert!(
                    env_value(c, "K3SENSE_USERNAME").is_some(),
                    "{target}: {} has a username",
                    client.id()
                );
            }
        }
        let users_file = env_value(container, "K3SENSE_USERS_FILE").expect("broker users file");
        assert_mounted_from_secret(target, &broker, users_file);
        for client in pods(objects).iter().filter(|p| p.component() != "broker") {
            let c = client.containers().next().unwrap();
            // On every sensor node the credentials were generated for (a publisher's file is its node's).
            for node in SENSOR_NODES {
                let file = pod_env(c, node)
                    .remove("K3SENSE_PASSWORD_FILE")
                    .expect("password file");
                assert_mounted_from_secret(target, client, &file);
            }
            assert!(
                env_value(c, "K3SENSE_PASSWORD").is_none(),
                "{target}: {} password must come from a file, not an env value",
                client.id()
            );
        }
    }
}

/// `path` lies in a volume mounted from a Secret that the render generates, and that Secret has the
/// key the file is named after (all keys are mounted: no `items`).
fn assert_mounted_from_secret(target: &str, pod: &Pod, path: &str) {
    let (secret, key) = mounted_secret_key(target, pod, path);
    let renders = renders().unwrap();
    let generated = renders[target]
        .iter()
        .find(|o| kind(o) == "Secret" && name(o) == secret)
        .unwrap_or_else(|| panic!("{target}: Secret {secret} is not in the render"));
    assert!(
        generated["data"].get(&key).is_some(),
        "{target}: Secret {secret} has no key {key}"
    );
}

/// The Secret and key whose content a container reads at `path`.
fn mounted_secret_key(target: &str, pod: &Pod, path: &str) -> (String, String) {
    let container = pod.containers().next().unwrap();
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| path.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
        .unwrap_or_else(|| panic!("{target}: {} mounts nothing at {path}", pod.id()));
    let volume = pod.spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let secret = volume["secret"]["secretName"]
        .as_str()
        .unwrap_or_else(|| panic!("{target}: {} volume for {path} is not a Secret", pod.id()));
    assert!(
        volume["secret"]["items"].is_null(),
        "{target}: {} mounts only some keys of {secret}; the file names are the keys here",
        pod.id()
    );
    let key = path.rsplit_once('/').unwrap().1;
    (secret.to_owned(), key.to_owned())
}

/// A generated Secret's value for `key`, decoded.
fn secret_value(objects: &[Value], secret: &str, key: &str) -> String {
    let data = of_kind(objects, "Secret")
        .find(|o| name(o) == secret)
        .unwrap_or_else(|| panic!("Secret {secret} is not in the render"))["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("Secret {secret} has no key {key}"));
    String::from_utf8(base64_decode(data)).unwrap()
}

/// Standard base64 (RFC 4648 section 4, with padding), as Secret `data` holds it (line breaks
/// skipped: a long value comes wrapped).
fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut bits, mut count) = (0u32, 0);
    for c in text
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
    {
        let value = ALPHABET
            .iter()
            .position(|&a| a == c)
            .unwrap_or_else(|| panic!("{c:?} is not base64")) as u32;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    out
}

#[test]
fn credentials_have_no_default_and_are_required() {
    if renders().is_none() {
        return;
    }
    let copy = scratch_copy("no-secrets");
    let out = kustomize(&copy.join("base"));
    let _ = std::fs::remove_dir_all(&copy);
    assert!(
        !out.status.success(),
        "deploy/base renders without the user's credential files: a default password would be deployed"
    );
    let gitignore = std::fs::read_to_string(deploy_dir().join("base/secrets/.gitignore")).unwrap();
    assert!(
        gitignore.lines().any(|l| l.trim() == "*"),
        "secrets are git-ignored"
    );
}

/// The sensor id a publisher uses for `given` (K3SENSE_SENSOR_ID): as it is when it is a DNS label,
/// else mapped like a node name (publisher/src/config.rs, `effective_id`).
fn effective_sensor_id(given: &str) -> SensorId {
    SensorId::new(given).unwrap_or_else(|_| SensorId::from_node_name(given).unwrap())
}

/// The broker's users file as the render generates it.
fn rendered_users(target: &str, objects: &[Value]) -> String {
    let broker = the_pod(objects, "broker");
    let container = broker.containers().next().unwrap();
    let path = env_value(container, "K3SENSE_USERS_FILE").expect("broker users file");
    let (secret, key) = mounted_secret_key(target, &broker, path);
    secret_value(objects, &secret, &key)
}

/// Issue 14: one MQTT account per sensor node, bound to that node's sensor id, never `publisher:*`.
/// On each node the credentials were generated for, every publisher pod (the base's Deployment, the
/// multi-sensor DaemonSets, every overlay's) logs in as `publisher-<node>` with the Secret key named
/// after its node, and that account may publish the sensor id the pod uses there and no other.
#[test]
fn each_sensor_node_publishes_with_its_own_account_bound_to_its_sensor_id() {
    let Some(renders) = renders() else { return };
    for (target, objects) in renders {
        let users_txt = rendered_users(target, objects);
        let users = Users::parse(&users_txt)
            .unwrap_or_else(|(line, why)| panic!("{target}: users.txt line {line}: {why}"));
        assert!(
            !users_txt
                .lines()
                .any(|l| !l.starts_with('#') && l.trim_end().ends_with(":publisher:*")),
            "{target}: an account that may publish for every sensor:\n{users_txt}"
        );
        let publishers = pods_of(objects, "publisher");
        assert!(!publishers.is_empty(), "{target}: no publisher");
        for pod in &publishers {
            let c = pod.containers().next().unwrap();
            for node in SENSOR_NODES {
                let env = pod_env(c, node);
                let id = effective_sensor_id(&env["K3SENSE_SENSOR_ID"]);
                let username = &env["K3SENSE_USERNAME"];
                assert_eq!(
                    username,
                    &format!("publisher-{node}"),
                    "{target}: {}",
                    pod.id()
                );
                let (secret, key) = mounted_secret_key(target, pod, &env["K3SENSE_PASSWORD_FILE"]);
                assert_eq!(key, node, "{target}: {} reads its node's key", pod.id());
                let password = secret_value(objects, &secret, &key);
                let role = users.authenticate(username, &password).unwrap_or_else(|| {
                    panic!(
                        "{target}: {} on {node} cannot log in as {username}",
                        pod.id()
                    )
                });
                assert_eq!(
                    role,
                    &Role::Publisher(Sensors::Only(vec![id.clone()])),
                    "{target}: {username} may publish {id} only"
                );
                for other in SENSOR_NODES.iter().filter(|n| **n != node) {
                    let other_id = SensorId::from_node_name(other).unwrap();
                    let Role::Publisher(sensors) = role else {
                        unreachable!()
                    };
                    assert!(
                        !sensors.includes(other_id.as_str()),
                        "{target}: {username} may publish {other}'s sensor"
                    );
                    let other_password = secret_value(objects, &secret, other);
                    assert!(
                        users.authenticate(username, &other_password).is_none(),
                        "{target}: {username} logs in with {other}'s password"
                    );
                }
            }
        }
    }
}

/// The rendered base publisher, run as the kubelet would run it on node `pi-3.lan` (its env
/// expanded, its password the Secret's `pi-3.lan` key), but with the simulated sensor, against a
/// real broker holding the rendered users file: its readings, availability and Home Assistant
/// discovery reach a reader under sensor id `pi-3-lan`, and the broker forbade none of its
/// publishes or subscriptions — the per-node account covers everything the publisher does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_nodes_publisher_runs_with_its_rendered_account_and_stays_within_it() {
    let Some(renders) = renders() else { return };
    let objects = &renders["base"];
    let node = "pi-3.lan";
    let dir = scratch_dir("live-account");
    let users_file = dir.join("users.txt");
    let users_txt = rendered_users("base", objects) + "viewer:viewer-pw:reader\n";
    std::fs::write(&users_file, users_txt).unwrap();
    let mut config = k3sense_broker::Config::new(support::free_addr());
    config.options.users_file = Some(users_file);
    let started = k3sense_broker::start(&config).await.unwrap();
    let addr = started.local_addr();
    let metrics = started.metrics();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(started.serve(shutdown.clone()));

    let pod = the_pod(objects, "publisher");
    let c = pod.containers().next().unwrap();
    let mut env = pod_env(c, node);
    let (secret, key) = mounted_secret_key("base", &pod, &env["K3SENSE_PASSWORD_FILE"]);
    let password_file = dir.join(&key);
    std::fs::write(&password_file, secret_value(objects, &secret, &key)).unwrap();
    let metrics_addr = support::free_addr().to_string();
    for (var, value) in [
        ("K3SENSE_BROKER", addr.to_string()),
        ("K3SENSE_PASSWORD_FILE", password_file.display().to_string()),
        ("K3SENSE_SENSOR", "sim".to_owned()),
        ("K3SENSE_INTERVAL", "200ms".to_owned()),
        ("K3SENSE_METRICS_LISTEN", metrics_addr),
    ] {
        env.insert(var.to_owned(), value);
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // Subscribed before the publisher starts, so every message it sends is seen live.
    let mut rx = support::mqtt_subscriber_as(
        addr,
        &["k3sense/#", "homeassistant/#"],
        ("viewer", "viewer-pw"),
    )
    .await;
    let mut publisher = support::Proc::start_with_env(support::K3SENSE, &args, "info", &env);

    let within = Duration::from_secs(20);
    let deadline = tokio::time::Instant::now() + within;
    let (mut online, mut discovery, mut state) = (false, false, false);
    let mut seen = std::collections::BTreeSet::new();
    while !(online && discovery && state) {
        let Ok(Some((topic, payload, _))) = tokio::time::timeout_at(deadline, rx.recv()).await
        else {
            panic!(
                "no `online`, reading and discovery config of pi-3-lan; seen {seen:?}, broker {:?}; publisher log:\n{}",
                metrics.snapshot(),
                publisher.log()
            );
        };
        online |= topic == "k3sense/pi-3-lan/availability" && payload == b"online";
        discovery |= topic.starts_with("homeassistant/") && topic.contains("/k3sense_pi-3-lan/");
        if topic == "k3sense/pi-3-lan/state" {
            let reading: Value = serde_json::from_slice(&payload).unwrap();
            assert_eq!(reading["sensor_id"], "pi-3-lan");
            state = true;
        }
        seen.insert(topic);
    }
    let snapshot = metrics.snapshot();
    assert_eq!(
        (
            snapshot.publishes_forbidden,
            snapshot.subscriptions_forbidden
        ),
        (0, 0),
        "the broker forbade part of what publisher-{node} did: {}",
        publisher.log()
    );
    assert!(publisher.running());
    shutdown.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An empty scratch directory under the target dir.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("deploy-manifests-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `deploy/gen-secrets.sh` without node names asks the cluster for the labelled nodes. kubectl is
/// replaced by a script that answers as `kubectl get nodes -o name` does (one `node/<name>` line
/// per node: kubectl's `name` output format, `<resource>/<name>`) and records its arguments.
/// Run again after another node was labelled, it adds that node's account and keeps every
/// password; it refuses a users.txt that still holds the `publisher:*` account of earlier versions,
/// naming the deploy/README.md section that explains the upgrade.
#[test]
fn gen_secrets_asks_the_cluster_for_sensor_nodes_and_never_changes_a_password() {
    if renders().is_none() {
        return;
    }
    let dir = scratch_dir("gen-secrets");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let kubectl = bin.join("kubectl");
    std::fs::write(
        &kubectl,
        format!(
            "#!/bin/sh\necho \"$*\" >> {calls}\ncat {nodes}\n",
            calls = dir.join("calls").display(),
            nodes = dir.join("nodes").display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&kubectl)
        .status()
        .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let secrets = dir.join("secrets");
    let run = |args: &[&str]| {
        gen_secrets()
            .arg("--dir")
            .arg(&secrets)
            .args(args)
            .env("PATH", &path)
            .output()
            .unwrap()
    };
    let read = |file: &str| std::fs::read_to_string(secrets.join(file)).unwrap();

    std::fs::write(dir.join("nodes"), "node/pi-1\nnode/pi-3.lan\n").unwrap();
    let out = run(&[]);
    assert!(out.status.success(), "{out:?}");
    let calls = std::fs::read_to_string(dir.join("calls")).unwrap();
    assert_eq!(calls.trim(), "get nodes -l k3sense.io/sensor -o name");
    let users = Users::parse(&read("users.txt")).unwrap();
    let passwords = read("publisher-passwords.env");
    let password_of = |passwords: &str, node: &str| -> String {
        passwords
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{node}=")))
            .unwrap_or_else(|| panic!("no password for {node} in {passwords}"))
            .to_owned()
    };
    for (node, id) in [("pi-1", "pi-1"), ("pi-3.lan", "pi-3-lan")] {
        let role = users.authenticate(&format!("publisher-{node}"), &password_of(&passwords, node));
        let want = Role::Publisher(Sensors::Only(vec![SensorId::new(id).unwrap()]));
        assert_eq!(role, Some(&want), "{node}");
    }
    let gateway = read("gateway.password");
    assert_eq!(
        users.authenticate("gateway", &gateway),
        Some(&Role::Gateway)
    );

    // Another node labelled: its account is added, every password stays.
    std::fs::write(dir.join("nodes"), "node/pi-1\nnode/pi-3.lan\nnode/pi-4\n").unwrap();
    let out = run(&[]);
    assert!(out.status.success(), "{out:?}");
    let again = read("publisher-passwords.env");
    assert!(again.starts_with(&passwords), "{passwords} became {again}");
    assert_eq!(again.lines().count(), 3);
    assert_eq!(read("gateway.password"), gateway);
    let users = Users::parse(&read("users.txt")).unwrap();
    assert!(
        users
            .authenticate("publisher-pi-4", &password_of(&again, "pi-4"))
            .is_some()
    );
    assert_eq!(users.len(), 4);

    // No labelled node: an error that says what to do, and nothing written.
    std::fs::write(dir.join("nodes"), "").unwrap();
    let empty = dir.join("empty");
    let out = gen_secrets()
        .arg("--dir")
        .arg(&empty)
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("kubectl label node"),
        "{out:?}"
    );
    assert!(!empty.join("users.txt").exists());

    // A users.txt from before: refused, pointing at the upgrade steps.
    std::fs::write(
        secrets.join("users.txt"),
        read("users.txt") + "publisher:old-pw:publisher:*\n",
    )
    .unwrap();
    let out = run(&["pi-5"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let section = "Upgrading from one shared publisher account";
    assert!(stderr.contains(section), "{stderr}");
    let readme = std::fs::read_to_string(deploy_dir().join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("### {section}")),
        "deploy/README.md has no section {section:?}"
    );
    assert!(!read("users.txt").contains("publisher-pi-5"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether `help` names `var` as a whole word (`K3SENSE_MAX_CLIENT` is not in `K3SENSE_MAX_CLIENTS`).
fn lists_var(help: &str, var: &str) -> bool {
    help.match_indices(var).any(|(at, _)| {
        let before = help[..at].chars().next_back();
        let after = help[at + var.len()..].chars().next();
        let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        !word(before) && !word(after)
    })
}

/// The `[default: …]` that clap's long help shows for the option reading `var`, if any.
fn help_default(help: &str, var: &str) -> Option<String> {
    let at = help.find(&format!("[env: {var}="))?;
    let block = &help[at..];
    let block = &block[..block.find("\n  -").unwrap_or(block.len())];
    let start = block.find("[default: ")? + "[default: ".len();
    let end = block[start..].find(']')? + start;
    Some(block[start..end].to_owned())
}

fn port_of(address: &str) -> u16 {
    address
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("{address:?} is not host:port"))
}

/// Whether a value after `var`'s entry in the container's env refers to it as `$(var)`.
fn expanded_later(container: &Value, var: &str) -> bool {
    let env = container["env"].as_array().unwrap();
    let at = env.iter().position(|e| e["name"] == var).unwrap();
    env[at + 1..].iter().any(|e| {
        e["value"]
            .as_str()
            .is_some_and(|v| v.contains(&format!("$({var})")))
    })
}

#[test]
fn environment_variables_are_ones_the_binary_reads() {
    let Some(renders) = renders() else { return };
    let help = |args: &[&str]| -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_k3sense"))
            .args(args)
            .output()
            .expect("run k3sense");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let top = help(&["--help"]);
    let mut checked = BTreeSet::new();
    let mut defaults_compared = 0;
    for (target, objects) in renders {
        for p in pods(objects) {
            for c in p.containers() {
                let args: Vec<&str> = c["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(Value::as_str)
                    .collect();
                let sub = args[0];
                assert_eq!(
                    sub,
                    p.component(),
                    "{target}: {} runs `k3sense {sub}`",
                    p.id()
                );
                let sub_help = help(&[sub, "--help"]);
                assert!(
                    sub_help.contains("K3SENSE_"),
                    "`k3sense {sub} --help` lists no K3SENSE_ variable (has the CLI landed?):\n{sub_help}"
                );
                for env in c["env"].as_array().into_iter().flatten() {
                    let var = env["name"].as_str().unwrap();
                    if var == "RUST_LOG" {
                        continue;
                    }
                    // A variable k3sense does not read is allowed only as the kubelet's input:
                    // a later value of the same container says `$(VAR)` (NODE_NAME, step 5).
                    if !var.starts_with("K3SENSE_") && expanded_later(c, var) {
                        continue;
                    }
                    assert!(
                        var.starts_with("K3SENSE_"),
                        "{target}: {} sets {var}, which k3sense does not read",
                        p.id()
                    );
                    // Global options (e.g. K3SENSE_LOG_FORMAT) may be listed by the top-level help only.
                    assert!(
                        lists_var(&sub_help, var) || lists_var(&top, var),
                        "{target}: {} sets {var}, but `k3sense {sub} --help` does not list it",
                        p.id()
                    );
                    // Addresses: the manifests may pick the host, but the port is the binary's default,
                    // so `k3sense <sub>` without the variable would serve the same Service.
                    if let (Some(default), Some(value), "K3SENSE_LISTEN" | "K3SENSE_BROKER") =
                        (help_default(&sub_help, var), env["value"].as_str(), var)
                    {
                        assert_eq!(
                            port_of(value),
                            port_of(&default),
                            "{target}: {} {var}={value} but the binary's default is {default}",
                            p.id()
                        );
                        defaults_compared += 1;
                    }
                    checked.insert(var.to_owned());
                }
            }
        }
    }
    assert!(checked.contains("K3SENSE_SENSOR_ID"), "{checked:?}");
    assert!(
        defaults_compared > 0,
        "no `[default: host:port]` found in --help for K3SENSE_LISTEN or K3SENSE_BROKER"
    );
}

#[test]
fn images_carry_the_crate_version_and_pods_are_hardened() {
    let Some(renders) = renders() else { return };
    let version = env!("CARGO_PKG_VERSION");
    for (target, objects) in renders {
        let ns = of_kind(objects, "Namespace").next().unwrap();
        let enforce = ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
            .as_str()
            .unwrap();
        let privileged_overlay = target == "overlays/gpio-privileged";
        assert_eq!(
            enforce,
            if privileged_overlay {
                "privileged"
            } else {
                "restricted"
            },
            "{target}: Pod Security level"
        );
        for p in pods(objects) {
            let id = format!("{target}: {}", p.id());
            assert_eq!(p.spec["automountServiceAccountToken"], false, "{id}");
            assert_eq!(p.spec["securityContext"]["runAsNonRoot"], true, "{id}");
            assert_eq!(
                p.spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
                "{id}"
            );
            for field in ["hostNetwork", "hostPID", "hostIPC"] {
                assert_ne!(p.spec[field], true, "{id}: {field}");
            }
            assert!(
                p.spec["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .all(|v| v.get("hostPath").is_none()),
                "{id}: hostPath volume"
            );
            for c in p.containers() {
                assert_eq!(
                    c["image"].as_str().unwrap(),
                    format!("{IMAGE}:{version}"),
                    "{id}: image tag is the crate version"
                );
                let sc = &c["securityContext"];
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{id}");
                assert_eq!(
                    sc["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{id}"
                );
                assert!(
                    sc["capabilities"].get("add").is_none(),
                    "{id}: adds capabilities"
                );
                let is_last_resort = privileged_overlay && p.component() == "publisher";
                assert_eq!(sc["privileged"], is_last_resort, "{id}: privileged");
                assert_eq!(sc["allowPrivilegeEscalation"], is_last_resort, "{id}");
                let res = &c["resources"];
                assert!(res["requests"]["cpu"].is_string(), "{id}: cpu request");
                assert!(
                    res["requests"]["memory"].is_string(),
                    "{id}: memory request"
                );
                assert!(res["limits"]["memory"].is_string(), "{id}: memory limit");
                if p.component() == "publisher" {
                    assert!(
                        res["limits"].get("cpu").is_none(),
                        "{id}: a CPU limit throttles the publisher mid-frame"
                    );
                }
            }
        }
        for o in objects {
            let labels = string_map(&o["metadata"]["labels"]);
            if let Some(v) = labels.get("app.kubernetes.io/version") {
                assert_eq!(
                    v,
                    version,
                    "{target}: {} {} version label",
                    kind(o),
                    name(o)
                );
            }
        }
    }
}

#[test]
fn every_checkov_skip_carries_a_reason() {
    let Some(renders) = renders() else { return };
    for (target, objects) in renders {
        for o in objects {
            for (key, value) in string_map(&o["metadata"]["annotations"]) {
                if !key.starts_with("checkov.io/skip") {
                    continue;
                }
                let (check, reason) = value
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{target}: {key} has no `=reason`"));
                assert!(
                    check.starts_with("CKV_K8S_") || check.starts_with("CKV2_K8S_"),
                    "{target}: {key}: {check}"
                );
                assert!(
                    reason.split_whitespace().count() >= 5,
                    "{target}: {} {}: {key} needs a real reason, got {reason:?}",
                    kind(o),
                    name(o)
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scheduling

/// Whether a pod template may be placed on a node with these labels (nodeSelector and required
/// node affinity; nothing in k3sense uses taints).
fn schedulable_on(spec: &Value, node: &BTreeMap<String, String>) -> bool {
    let selector_ok = string_map(&spec["nodeSelector"])
        .iter()
        .all(|(k, v)| node.get(k) == Some(v));
    let terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"]
        .as_array();
    let affinity_ok = terms.is_none_or(|terms| {
        terms.iter().any(|t| {
            t.get("matchFields").is_none()
                && selector_matches(
                    &serde_json::json!({ "matchExpressions": t["matchExpressions"] }),
                    node,
                )
        })
    });
    selector_ok && affinity_ok
}

fn node(labels: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut node: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    node.insert("kubernetes.io/hostname".into(), "pi-1".into());
    node.insert("kubernetes.io/arch".into(), "arm64".into());
    node
}

#[test]
fn publisher_runs_only_on_a_labelled_sensor_node() {
    let Some(renders) = renders() else { return };
    let bare = node(&[]);
    let dht11 = node(&[(SENSOR_LABEL, "dht11")]);
    let dht22 = node(&[(SENSOR_LABEL, "dht22")]);
    for (target, objects) in renders {
        let publishers = pods_of(objects, "publisher");
        for p in &publishers {
            let id = format!("{target}: {}", p.id());
            let c = p.containers().next().unwrap();
            let from_node = c["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == "K3SENSE_SENSOR_ID")
                .map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"]);
            assert_eq!(
                from_node,
                Some(&Value::from("spec.nodeName")),
                "{id}: sensor id from the node name"
            );
            match kind(p.workload) {
                "Deployment" => {
                    assert_eq!(p.workload["spec"]["replicas"], 1, "{id}");
                    assert_eq!(p.workload["spec"]["strategy"]["type"], "Recreate", "{id}");
                }
                "DaemonSet" => {
                    let rolling = &p.workload["spec"]["updateStrategy"]["rollingUpdate"];
                    assert!(
                        rolling["maxSurge"].as_u64().unwrap_or(0) == 0,
                        "{id}: two publishers on one sensor"
                    );
                }
                other => panic!("{id}: publisher as a {other}"),
            }
            if target == "overlays/dev" {
                assert_eq!(env_value(c, "K3SENSE_SENSOR"), Some("sim"), "{id}");
                assert!(schedulable_on(p.spec, &bare), "{id}: dev runs anywhere");
            } else {
                assert_ne!(env_value(c, "K3SENSE_SENSOR"), Some("sim"), "{id}");
                assert!(
                    !schedulable_on(p.spec, &bare),
                    "{id}: schedules on a node without the {SENSOR_LABEL} label"
                );
                // The model a publisher reads is the one its node's label names.
                let model = env_value(c, "K3SENSE_MODEL").unwrap();
                let labelled = node(&[(SENSOR_LABEL, model)]);
                assert!(
                    schedulable_on(p.spec, &labelled),
                    "{id}: not on a {model} node"
                );
            }
        }
        if target != "overlays/dev" {
            let on = |n: &BTreeMap<String, String>| {
                publishers
                    .iter()
                    .filter(|p| schedulable_on(p.spec, n))
                    .count()
            };
            assert_eq!(on(&dht11), 1, "{target}: one publisher per dht11 node");
            let expected_dht22 = usize::from(target == "overlays/multi-sensor");
            assert_eq!(
                on(&dht22),
                expected_dht22,
                "{target}: publishers on a dht22 node"
            );
        }
    }
}

/// The `smarter-devices/*` extended resources the publisher container requests and its limits.
fn device_resources(pod: &Pod) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let c = pod.containers().next().unwrap();
    let devices = |v: &Value| {
        string_map(v)
            .into_iter()
            .filter(|(k, _)| k.starts_with("smarter-devices/"))
            .collect::<BTreeMap<_, _>>()
    };
    (
        devices(&c["resources"]["requests"]),
        devices(&c["resources"]["limits"]),
    )
}

fn devices_of(names: &[&str]) -> BTreeMap<String, String> {
    names
        .iter()
        .map(|n| (format!("smarter-devices/{n}"), "1".to_owned()))
        .collect()
}

/// rppal's `Gpio::new()` opens the GPIO registers (/dev/gpiomem; Pi 5: /dev/gpiomem0) *and* the
/// GPIO character device /dev/gpiochip0: the overlay must request both from the device plugin,
/// and give the pod the group that owns them (the gpio group id, set in gpio-group.yaml).
#[test]
fn gpio_device_plugin_requests_gpiomem_and_gpiochip_and_the_gpio_group() {
    let Some(renders) = renders() else { return };
    let objects = &renders["overlays/gpio-device-plugin"];
    let pod = the_pod(objects, "publisher");
    let c = pod.containers().next().unwrap();
    assert_eq!(env_value(c, "K3SENSE_SENSOR"), Some("dht11"));
    let (requests, limits) = device_resources(&pod);
    assert_eq!(requests, devices_of(&["gpiochip0", "gpiomem"]), "requests");
    assert_eq!(
        limits, requests,
        "extended resources need limits equal to requests"
    );
    assert_eq!(
        pod.spec["securityContext"]["supplementalGroups"],
        serde_json::json!([997]),
        "the gpio group id (Raspberry Pi OS's 997 by default)"
    );
    assert!(
        !pod.spec["containers"][0]["securityContext"]["privileged"]
            .as_bool()
            .unwrap_or(false)
    );

    // A Pi 5 is one uncommented line away: gpiomem0 instead of gpiomem, gpiochip0 as before.
    let copy = scratch_copy("pi5");
    write_test_credentials(&copy.join("base/secrets"));
    let kustomization = copy.join("overlays/gpio-device-plugin/kustomization.yaml");
    let text = std::fs::read_to_string(&kustomization).unwrap();
    let switched = text.replace("  # - path: pi5.yaml", "  - path: pi5.yaml");
    assert_ne!(
        switched, text,
        "the Pi 5 line is no longer in the kustomization"
    );
    std::fs::write(&kustomization, switched).unwrap();
    let out = kustomize(&copy.join("overlays/gpio-device-plugin"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pi5 = yaml_to_json(&out.stdout);
    let _ = std::fs::remove_dir_all(&copy);
    let (requests, limits) = device_resources(&the_pod(&pi5, "publisher"));
    assert_eq!(
        requests,
        devices_of(&["gpiochip0", "gpiomem0"]),
        "Pi 5 requests"
    );
    assert_eq!(limits, requests, "Pi 5 limits");
}

/// The command deploy/README.md gives to run before switching overlays: kubectl apply never removes
/// what the old overlay created, and two publishers of one sensor (same client id) would keep
/// kicking each other off the broker.
const DELETE_PUBLISHERS: &str =
    "kubectl -n k3sense delete deployment,daemonset -l app.kubernetes.io/component=publisher";

#[test]
fn broker_and_gateway_leave_a_dead_node_soon_and_drains_are_not_blocked() {
    let Some(renders) = renders() else { return };
    for (target, objects) in renders {
        for component in ["broker", "gateway"] {
            let pod = the_pod(objects, component);
            let tolerations = pod.spec["tolerations"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for taint in [
                "node.kubernetes.io/not-ready",
                "node.kubernetes.io/unreachable",
            ] {
                let t = tolerations
                    .iter()
                    .find(|t| t["key"] == taint)
                    .unwrap_or_else(|| panic!("{target}: {component} sets no toleration for {taint}, so it keeps the default 300 s"));
                assert_eq!(t["operator"], "Exists", "{target}: {component} {taint}");
                assert_eq!(t["effect"], "NoExecute", "{target}: {component} {taint}");
                let seconds = t["tolerationSeconds"].as_u64().unwrap_or(u64::MAX);
                assert!(
                    (1..=30).contains(&seconds),
                    "{target}: {component} stays {seconds} s on a dead node"
                );
            }
            assert!(
                tolerations.iter().all(|t| t["key"].is_string()),
                "{target}: {component} has a toleration without a key (it would tolerate every taint)"
            );
        }
        let budget = of_kind(objects, "PodDisruptionBudget")
            .find(|b| name(b) == "gateway")
            .unwrap_or_else(|| panic!("{target}: no gateway PodDisruptionBudget"));
        assert_eq!(
            budget["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow",
            "{target}: a gateway that is not ready must not block a drain"
        );
    }
}

#[test]
fn switching_overlays_keeps_one_publisher_per_sensor() {
    let Some(renders) = renders() else { return };
    let readme = std::fs::read_to_string(deploy_dir().join("README.md")).unwrap();
    assert!(
        readme.contains(DELETE_PUBLISHERS),
        "deploy/README.md must say how to switch overlays: {DELETE_PUBLISHERS}"
    );
    for (target, objects) in renders {
        let runs_publisher = |o: &Value| {
            o["spec"]["template"]["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["args"][0] == "publisher")
        };
        let workloads: Vec<&Value> = objects
            .iter()
            .filter(|o| matches!(kind(o), "Deployment" | "DaemonSet"))
            .collect();
        // The delete selects by this label: it must catch every publisher and nothing else.
        for w in &workloads {
            let labelled = w["metadata"]["labels"]["app.kubernetes.io/component"] == "publisher";
            assert_eq!(
                labelled,
                runs_publisher(w),
                "{target}: {}/{} and the label {DELETE_PUBLISHERS:?} selects by",
                kind(w),
                name(w)
            );
        }
        let publishers: Vec<String> = workloads
            .iter()
            .filter(|w| runs_publisher(w))
            .map(|w| format!("{}/{}", kind(w), name(w)))
            .collect();
        if target == "overlays/multi-sensor" {
            // A DaemonSet per model: names that no single-sensor overlay uses, hence the delete.
            assert_eq!(
                publishers,
                ["DaemonSet/publisher-dht11", "DaemonSet/publisher-dht22"],
                "{target}"
            );
        } else {
            // Switching among these is a plain `kubectl apply -k`: the same Deployment, Recreate.
            assert_eq!(publishers, ["Deployment/publisher"], "{target}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NetworkPolicy evaluation

/// A pod that may send or receive traffic: k3sense's own, or one elsewhere in the cluster.
struct Endpoint {
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    /// `(port name, protocol, port)` it listens on.
    ports: Vec<(String, String, u64)>,
}

fn namespace_labels(ns: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), ns.to_owned())])
}

/// Whether `peer` (a NetworkPolicy from/to entry of a policy in NAMESPACE) matches `ep`.
fn peer_matches(peer: &Value, ep: &Endpoint) -> bool {
    assert!(
        peer.get("ipBlock").is_none(),
        "ipBlock peers are not evaluated here"
    );
    let ns_ok = match peer.get("namespaceSelector") {
        Some(sel) => selector_matches(sel, &namespace_labels(&ep.namespace)),
        None => ep.namespace == NAMESPACE,
    };
    let pod_ok = peer
        .get("podSelector")
        .is_none_or(|sel| selector_matches(sel, &ep.labels));
    ns_ok && pod_ok
}

fn port_matches(rule_ports: &Value, dst: &Endpoint, proto: &str, port: u64) -> bool {
    let Some(ports) = rule_ports.as_array() else {
        return true;
    };
    ports.iter().any(|p| {
        let p_proto = p["protocol"].as_str().unwrap_or("TCP");
        let number = match &p["port"] {
            Value::Null => return p_proto == proto,
            Value::Number(n) => n.as_u64(),
            Value::String(s) => dst
                .ports
                .iter()
                .find(|(name, pr, _)| name == s && pr == proto)
                .map(|(_, _, n)| *n),
            _ => None,
        };
        let end = p["endPort"].as_u64().or(number);
        p_proto == proto && number.is_some_and(|n| (n..=end.unwrap_or(n)).contains(&port))
    })
}

/// Whether `ep`'s NetworkPolicies for `direction` ("Ingress" or "Egress") let it talk to `peer` on
/// `proto`/`port` of `dst` (an endpoint no policy selects is not isolated in that direction).
fn direction_allows(
    policies: &[&Value],
    direction: &str,
    ep: &Endpoint,
    peer: &Endpoint,
    dst: &Endpoint,
    proto: &str,
    port: u64,
) -> bool {
    let (rules_key, peers_key) = match direction {
        "Ingress" => ("ingress", "from"),
        _ => ("egress", "to"),
    };
    let selecting: Vec<&&Value> = policies
        .iter()
        .filter(|p| {
            ep.namespace == NAMESPACE
                && selector_matches(&p["spec"]["podSelector"], &ep.labels)
                && p["spec"]["policyTypes"]
                    .as_array()
                    .expect("policyTypes is explicit")
                    .iter()
                    .any(|t| t == direction)
        })
        .collect();
    selecting.is_empty()
        || selecting.iter().any(|p| {
            p["spec"][rules_key]
                .as_array()
                .into_iter()
                .flatten()
                .any(|rule| {
                    let peer_ok = rule[peers_key]
                        .as_array()
                        .is_none_or(|peers| peers.iter().any(|sel| peer_matches(sel, peer)));
                    peer_ok && port_matches(&rule["ports"], dst, proto, port)
                })
        })
}

/// Whether NetworkPolicies let `src` open `proto`/`port` on `dst`: both directions must allow it.
fn allowed(policies: &[&Value], src: &Endpoint, dst: &Endpoint, proto: &str, port: u64) -> bool {
    direction_allows(policies, "Egress", src, dst, dst, proto, port)
        && direction_allows(policies, "Ingress", dst, src, dst, proto, port)
}

#[test]
fn network_policies_admit_exactly_the_intended_flows() {
    let Some(renders) = renders() else { return };
    // Every endpoint also "listens" on 9999/TCP, so a rule that forgot its ports shows up; Traefik and
    // the stranger also on 53, so a DNS rule that forgot its pod selector shows up.
    let probe = ("probe".to_owned(), "TCP".to_owned(), 9999);
    let external = |name: &str, ns: &str, labels: &[(&str, &str)], ports: &[(&str, u64)]| {
        let mut ports: Vec<(String, String, u64)> = ports
            .iter()
            .map(|(proto, p)| (String::new(), (*proto).to_owned(), *p))
            .collect();
        ports.push(probe.clone());
        Endpoint {
            name: name.to_owned(),
            namespace: ns.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ports,
        }
    };
    for (target, objects) in renders {
        let policies: Vec<&Value> = of_kind(objects, "NetworkPolicy").collect();
        let mut endpoints: Vec<Endpoint> = pods(objects)
            .iter()
            .map(|p| {
                let mut ports = p.ports();
                ports.push(probe.clone());
                Endpoint {
                    name: p.component().to_owned(),
                    namespace: NAMESPACE.to_owned(),
                    labels: p.labels.clone(),
                    ports,
                }
            })
            .collect();
        endpoints.extend([
            external(
                "traefik",
                "kube-system",
                &[
                    ("app.kubernetes.io/name", "traefik"),
                    ("app.kubernetes.io/instance", "traefik-kube-system"),
                ],
                &[("TCP", 8000), ("UDP", 53), ("TCP", 53)],
            ),
            external(
                "dns",
                "kube-system",
                &[("k8s-app", "kube-dns")],
                &[("UDP", 53), ("TCP", 53)],
            ),
            // Someone else's pod, and a pod someone runs in our namespace by hand.
            external(
                "stranger",
                "default",
                &[("app", "curl")],
                &[("TCP", 80), ("UDP", 53)],
            ),
            external(
                "intruder",
                NAMESPACE,
                &[("app.kubernetes.io/name", "k3sense"), ("run", "debug")],
                &[("TCP", 80)],
            ),
        ]);
        let mut admitted = BTreeSet::new();
        // Ingress alone, as if every source could send anything: each side must hold on its own.
        let mut ingress_admitted = BTreeSet::new();
        for src in &endpoints {
            for dst in &endpoints {
                // Only flows that touch our namespace are ours to govern.
                if src.namespace != NAMESPACE && dst.namespace != NAMESPACE {
                    continue;
                }
                for (_, proto, port) in &dst.ports {
                    let flow = format!("{}->{}:{proto}/{port}", src.name, dst.name);
                    if allowed(&policies, src, dst, proto, *port) {
                        admitted.insert(flow.clone());
                    }
                    if dst.namespace == NAMESPACE
                        && direction_allows(&policies, "Ingress", dst, src, dst, proto, *port)
                    {
                        ingress_admitted.insert(flow);
                    }
                }
            }
        }
        let into_namespace: BTreeSet<String> = [
            "publisher->broker:TCP/1883",
            "gateway->broker:TCP/1883",
            "traefik->gateway:TCP/8080",
        ]
        .map(str::to_owned)
        .into();
        assert_eq!(
            ingress_admitted, into_namespace,
            "{target}: NetworkPolicy ingress into the namespace"
        );
        let mut expected: BTreeSet<String> = [
            "publisher->broker:TCP/1883",
            "gateway->broker:TCP/1883",
            "traefik->gateway:TCP/8080",
        ]
        .map(str::to_owned)
        .into();
        // DNS is allowed namespace-wide, so also for a pod we did not write (the "intruder"),
        // which the default-deny otherwise isolates.
        for ep in endpoints.iter().filter(|e| e.namespace == NAMESPACE) {
            expected.insert(format!("{}->dns:UDP/53", ep.name));
            expected.insert(format!("{}->dns:TCP/53", ep.name));
        }
        assert_eq!(admitted, expected, "{target}: NetworkPolicy flows");
    }
}
