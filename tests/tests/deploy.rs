//! Checks on the files under `deploy/` that no Docker engine, Helm or systemd is needed
//! for: the Dockerfile runs as a non-root user with a health check (run here against a
//! stand-in HTTP server) and bakes in no secret; the systemd unit has its sandboxing; the
//! Helm chart and the plain manifests carry the securityContext and probe /healthz and
//! /readyz on the metrics port; the broker.toml files shipped there load and enable it.
//! (.ci/run adds yamllint, kubernetes-validate and `systemd-analyze verify`.)

use moatmq_config::Config;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    moatmq_e2e::repo_root().to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Dockerfile instructions, continuation lines joined, comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                let (op, args) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((&current, ""));
                out.push((op.to_ascii_uppercase(), args.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

#[test]
fn dockerfile_runs_as_non_root_with_a_healthcheck() {
    let ins = dockerfile_instructions(&read("deploy/docker/Dockerfile"));
    let froms = ins.iter().filter(|(op, _)| op == "FROM").count();
    assert!(froms >= 2, "multi-stage build expected");
    let build = ins
        .iter()
        .find(|(op, a)| op == "RUN" && a.contains("cargo build"))
        .unwrap();
    assert!(build.1.contains("-p moatmq") && build.1.contains("--release"));

    // The last USER of the final stage decides who runs the broker.
    let last_from = ins.iter().rposition(|(op, _)| op == "FROM").unwrap();
    let user = ins[last_from..]
        .iter()
        .rev()
        .find(|(op, _)| op == "USER")
        .map(|(_, a)| a.clone())
        .expect("the runtime stage needs a USER");
    let name = user.split(':').next().unwrap();
    assert!(!["root", "0", ""].contains(&name), "USER {user}");

    let hc = ins
        .iter()
        .find(|(op, _)| op == "HEALTHCHECK")
        .expect("HEALTHCHECK");
    assert!(hc.1.contains("CMD") && !hc.1.trim().eq_ignore_ascii_case("none"));
    assert!(ins
        .iter()
        .any(|(op, a)| op == "VOLUME" && a.contains("/var/lib/moatmq")));
    assert!(ins
        .iter()
        .any(|(op, a)| op == "CMD" && a.contains("/etc/moatmq/broker.toml")));
}

/// The strings of a JSON exec-form array such as `["bash", "-c", "..."]`
/// (only the escapes a Dockerfile needs: `\\` and `\"`).
fn exec_form(args: &str) -> Vec<String> {
    let inner = args
        .trim()
        .strip_prefix('[')
        .and_then(|a| a.strip_suffix(']'))
        .expect("exec form");
    let mut out = Vec::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut s = String::new();
        loop {
            match chars.next().expect("closed string") {
                '"' => break,
                '\\' => s.push(chars.next().expect("escaped char")),
                c => s.push(c),
            }
        }
        out.push(s);
    }
    out
}

/// Runs the image's HEALTHCHECK command against a one-shot HTTP server answering with
/// `status` (None: nothing listens). Returns whether it passed and the request line.
fn run_healthcheck(status: Option<&str>) -> (bool, String) {
    let ins = dockerfile_instructions(&read("deploy/docker/Dockerfile"));
    let hc = &ins.iter().find(|(op, _)| op == "HEALTHCHECK").unwrap().1;
    let cmd = exec_form(&hc[hc.find("CMD").unwrap() + 3..]);
    assert_eq!(&cmd[..2], ["bash", "-c"], "exec form, no curl needed");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut port = listener.local_addr().unwrap().port();
    // Without a status, a socket that is bound but not listening holds a port instead:
    // connections to it are refused, and nothing else can take the port while the check
    // runs (as it could a port let go of, making "nothing listening" pass for another
    // reason).
    let _not_listening = status.is_none().then(|| {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        port = socket.local_addr().unwrap().port();
        socket
    });
    let server = status.map(|status| {
        let status = status.to_string();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 512];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n"
            );
            String::from_utf8_lossy(&req)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
    });
    let ok = Command::new(&cmd[0])
        .args(&cmd[1..])
        .env("MOATMQ_METRICS_PORT", port.to_string())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("bash runs")
        .success();
    let request = server.map(|t| t.join().unwrap()).unwrap_or_default();
    (ok, request)
}

#[test]
fn dockerfile_healthcheck_gets_healthz() {
    let text = read("deploy/docker/Dockerfile");
    assert!(text.contains("ENV MOATMQ_METRICS_PORT=9100"));
    let (ok, request) = run_healthcheck(Some("200 OK"));
    assert!(ok, "200 is healthy");
    assert_eq!(request, "GET /healthz HTTP/1.1");
    assert!(!run_healthcheck(Some("503 Service Unavailable")).0);
    assert!(!run_healthcheck(Some("404 Not Found")).0);
    assert!(!run_healthcheck(None).0, "nothing listening is unhealthy");
}

#[test]
fn dockerfile_bakes_in_no_secret() {
    let ins = dockerfile_instructions(&read("deploy/docker/Dockerfile"));
    for (op, args) in &ins {
        if op == "ENV" || op == "ARG" {
            let upper = args.to_ascii_uppercase();
            for word in ["KEY", "PASSWORD", "PASSWD", "SECRET", "TOKEN"] {
                assert!(
                    !upper.contains(word),
                    "{op} {args}: secrets are mounted, not baked in"
                );
            }
        }
        if op == "COPY" || op == "ADD" {
            for word in [".key", ".pem", "passwd", "secret"] {
                assert!(
                    !args.contains(word),
                    "{op} {args}: secrets are mounted, not copied"
                );
            }
        }
    }
    let ignore = read("deploy/docker/Dockerfile.dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "**/*.key"));
}

#[test]
fn systemd_unit_is_sandboxed() {
    let unit = read("deploy/systemd/moatmq.service");
    let directives: Vec<(&str, &str)> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .collect();
    let get = |key: &str| directives.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    for (key, value) in [
        ("User", "moatmq"),
        ("NoNewPrivileges", "true"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/var/lib/moatmq"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("ProtectHome", "true"),
        ("PrivateTmp", "true"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(get(key), Some(value), "{key}");
    }
    let families = get("RestrictAddressFamilies").expect("RestrictAddressFamilies");
    assert!(families.contains("AF_INET") && !families.contains("AF_NETLINK"));
    let nofile: u64 = get("LimitNOFILE").expect("LimitNOFILE").parse().unwrap();
    assert!(nofile >= 10_000, "room for the default max_connections");
    assert!(get("ExecStart")
        .unwrap()
        .contains("serve -c /etc/moatmq/broker.toml"));
}

/// The securityContext settings every pod spec must carry, as YAML lines.
const SECURITY_LINES: &[&str] = &[
    "runAsNonRoot: true",
    "readOnlyRootFilesystem: true",
    "allowPrivilegeEscalation: false",
    "drop: [ALL]",
];

#[test]
fn helm_chart_sets_the_security_context() {
    let values = read("deploy/helm/moatmq/values.yaml");
    for line in SECURITY_LINES {
        assert!(
            values.lines().any(|l| l.trim() == *line),
            "values.yaml: {line}"
        );
    }
    assert!(values.contains("runAsUser: 10001"));
    let sts = read("deploy/helm/moatmq/templates/statefulset.yaml");
    for needle in [
        "kind: StatefulSet",
        "toYaml .Values.podSecurityContext",
        "toYaml .Values.securityContext",
        "toYaml .Values.resources",
        "livenessProbe:",
        "readinessProbe:",
        "volumeClaimTemplates:",
        "secretName:",
        "automountServiceAccountToken: false",
    ] {
        assert!(sts.contains(needle), "statefulset template: {needle}");
    }
    assert!(read("deploy/helm/moatmq/templates/configmap.yaml").contains("broker.toml"));
    assert!(read("deploy/helm/moatmq/templates/service.yaml").contains("kind: Service"));
    assert_http_probes(&sts, "helm statefulset template");
    // The named container port (and Service port) comes from service.ports.
    assert!(values.lines().any(|l| l.trim() == "metrics: 9100"));
    assert!(!values.contains("probePort"), "TCP probes are gone");
}

/// Liveness is GET /healthz and readiness GET /readyz, on the port named `metrics`.
fn assert_http_probes(sts: &str, what: &str) {
    assert!(!sts.contains("tcpSocket"), "{what}: HTTP probes, not TCP");
    for (probe, path) in [
        ("livenessProbe:", "/healthz"),
        ("readinessProbe:", "/readyz"),
    ] {
        let block: Vec<&str> = sts
            .lines()
            .skip_while(|l| l.trim() != probe)
            .skip(1)
            .take(4)
            .map(str::trim)
            .collect();
        assert_eq!(
            &block[..3],
            ["httpGet:", &format!("path: {path}"), "port: metrics"],
            "{what}: {probe}"
        );
    }
}

#[test]
fn kubernetes_manifests_set_the_security_context() {
    let sts = read("deploy/kubernetes/statefulset.yaml");
    for line in SECURITY_LINES {
        assert!(
            sts.lines().any(|l| l.trim() == *line),
            "statefulset.yaml: {line}"
        );
    }
    for needle in [
        "runAsUser: 10001",
        "livenessProbe:",
        "readinessProbe:",
        "limits:",
    ] {
        assert!(sts.contains(needle), "statefulset.yaml: {needle}");
    }
    assert_http_probes(&sts, "statefulset.yaml");
    assert!(
        sts.contains("- name: metrics\n              containerPort: 9100"),
        "statefulset.yaml: a container port named metrics"
    );
    let svc = read("deploy/kubernetes/service.yaml");
    assert_eq!(
        svc.matches("- name: metrics\n      port: 9100\n      targetPort: 9100")
            .count(),
        2,
        "service.yaml: metrics port on the Service and the headless Service"
    );
}

/// The `broker.toml: |` block of a ConfigMap or values file, de-indented.
fn embedded_toml(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let header = lines.next().expect("block");
    let outer = header.len() - header.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > outer)
        .collect();
    let indent = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    body.iter()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn shipped_broker_tomls_load() {
    let helm = embedded_toml(&read("deploy/helm/moatmq/values.yaml"), "config");
    let k8s = embedded_toml(&read("deploy/kubernetes/configmap.yaml"), "broker.toml");
    assert_eq!(
        helm.trim_end(),
        k8s.trim_end(),
        "the plain manifests mirror the chart's default config"
    );
    let compose = read("deploy/compose/config/broker.toml");
    for (name, text) in [("helm", &helm), ("compose", &compose)] {
        let c = Config::parse(Path::new("/etc/moatmq/broker.toml"), text)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!c.auth.allow_anonymous, "{name}");
        assert!(c.auth.password_file.is_some(), "{name}");
        let r = c.retained.as_ref().expect("encrypted store");
        assert!(
            r.path.starts_with("/var/lib/moatmq"),
            "{name}: store on the data volume"
        );
        // The health check and the probes need the metrics endpoint, reachable from
        // outside the container (kubelet) on the port they use.
        let m = c.metrics.as_ref().expect("[metrics] for the health checks");
        assert_eq!(m.bind, "0.0.0.0:9100", "{name}");
    }
}

/// A YAML file parsed with yaml-rust2 (one document).
fn yaml(rel: &str) -> yaml_rust2::Yaml {
    let mut docs =
        yaml_rust2::YamlLoader::load_from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert_eq!(docs.len(), 1, "{rel}: one document");
    docs.remove(0)
}

/// The retained-store key reaches the broker as `MOATMQ_RETAINED_KEY` from the Secret,
/// never as a mounted file: the kubelet makes Secret files group-readable under
/// `fsGroup` (and `defaultMode: 0440` did the same), and moatmq refuses such a key file,
/// so the default install crash-looped.
#[test]
fn kubernetes_key_reaches_the_broker_from_the_secret() {
    let sts = yaml("deploy/kubernetes/statefulset.yaml");
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["fsGroup"].as_i64(), Some(10001));
    let container = &pod["containers"][0];
    let env = container["env"].as_vec().expect("env");
    let key_env = env
        .iter()
        .find(|e| e["name"].as_str() == Some(moatmq_broker::retained::KEY_ENV))
        .expect("MOATMQ_RETAINED_KEY in env");
    let secret = &key_env["valueFrom"]["secretKeyRef"];
    assert_eq!(secret["name"].as_str(), Some("moatmq-retained-key"));
    assert_eq!(secret["key"].as_str(), Some("retained.key"));
    // The README makes the Secret with that name and key.
    let readme = read("deploy/kubernetes/README.md");
    assert!(readme
        .contains("kubectl create secret generic moatmq-retained-key --from-file=retained.key"));
    // No Secret or ConfigMap volume carries the key file any more.
    for v in pod["volumes"].as_vec().unwrap() {
        assert_ne!(
            v["secret"]["secretName"].as_str(),
            Some("moatmq-retained-key"),
            "the key is not mounted as a file"
        );
    }
    // The config names no key file, so the environment is the only source.
    let k8s = embedded_toml(&read("deploy/kubernetes/configmap.yaml"), "broker.toml");
    let config = Config::parse(Path::new("/etc/moatmq/config/broker.toml"), &k8s).unwrap();
    let retained = config.retained.clone().expect("[retained]");
    assert_eq!(retained.key_file, None);

    // What the process gets: the Secret's bytes, i.e. the file `moatmq keygen` wrote
    // (hex and a newline). The broker accepts that form and reads the same key.
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("retained.key");
    let written = moatmq_store::RetainedKey::write_new(&key_path).unwrap();
    let secret_value = std::fs::read_to_string(&key_path).unwrap();
    std::env::set_var(moatmq_broker::retained::KEY_ENV, &secret_value);
    let loaded = moatmq_broker::retained::load_key(&config, &retained);
    std::env::remove_var(moatmq_broker::retained::KEY_ENV);
    assert_eq!(
        loaded
            .expect("the key from the Secret loads")
            .expose_secret(),
        written.expose_secret()
    );
}

/// The chart renders the same env entry from `secrets.retainedKey` (a template, so
/// read as text; the values are YAML).
#[test]
fn helm_key_reaches_the_broker_from_the_secret() {
    let values = yaml("deploy/helm/moatmq/values.yaml");
    assert_eq!(
        values["secrets"]["retainedKey"].as_str(),
        Some("moatmq-retained-key")
    );
    let sts = read("deploy/helm/moatmq/templates/statefulset.yaml");
    let env: Vec<&str> = sts
        .lines()
        .skip_while(|l| l.trim() != "env:")
        .skip(1)
        .take(5)
        .map(str::trim)
        .collect();
    assert_eq!(
        env,
        [
            "- name: MOATMQ_RETAINED_KEY",
            "valueFrom:",
            "secretKeyRef:",
            "name: {{ required \"secrets.retainedKey is required\" .Values.secrets.retainedKey }}",
            "key: retained.key",
        ]
    );
    assert!(!sts.contains("retained-key"), "no key volume or mount");
    let helm = embedded_toml(&read("deploy/helm/moatmq/values.yaml"), "config");
    let config = Config::parse(Path::new("/etc/moatmq/config/broker.toml"), &helm).unwrap();
    assert_eq!(config.retained.expect("[retained]").key_file, None);
}

/// Compose mounts: none lies inside a read-only bind mount (Docker cannot create the
/// mount point there), and every file broker.toml names is on a mount.
#[test]
fn compose_mounts_do_not_nest_and_cover_the_config() {
    let compose = yaml("deploy/compose/compose.yaml");
    let svc = &compose["services"]["moatmq"];
    let mounts: Vec<(String, String, bool)> = svc["volumes"]
        .as_vec()
        .expect("volumes")
        .iter()
        .map(|v| {
            let spec = v.as_str().expect("short syntax");
            let parts: Vec<&str> = spec.split(':').collect();
            let ro = parts
                .get(2)
                .is_some_and(|o| o.split(',').any(|o| o == "ro"));
            (parts[0].to_string(), parts[1].to_string(), ro)
        })
        .collect();
    for (_, inner, _) in &mounts {
        for (_, outer, ro) in &mounts {
            let nested = Path::new(inner).starts_with(outer) && inner != outer;
            assert!(
                !(nested && *ro),
                "{inner} is inside the read-only mount {outer}"
            );
        }
    }
    // The container path of a file, mapped back to the host folder it comes from.
    let host_of = |target: &Path| {
        mounts.iter().find_map(|(src, dst, _)| {
            target
                .strip_prefix(dst)
                .ok()
                .map(|rest| (src.clone(), rest.to_path_buf()))
        })
    };
    let command: Vec<&str> = svc["command"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let config_path = Path::new(command[command.iter().position(|c| *c == "-c").unwrap() + 1]);
    let (src, rest) = host_of(config_path).expect("broker.toml is on a mount");
    let host_config = repo().join("deploy/compose").join(&src).join(&rest);
    let text = std::fs::read_to_string(&host_config)
        .unwrap_or_else(|e| panic!("{}: {e}", host_config.display()));
    let config = Config::parse(config_path, &text).unwrap();
    let retained = config.retained.as_ref().unwrap();
    for (what, path) in [
        ("password file", config.auth.password_file.clone().unwrap()),
        ("acl file", config.acl.file.clone().unwrap()),
        ("key file", retained.key_file.clone().unwrap()),
        ("retained store", retained.path.clone()),
    ] {
        let (src, rest) = host_of(&config.resolve(&path))
            .unwrap_or_else(|| panic!("{what} {} is on no mount", path.display()));
        if src.starts_with("./config") {
            // Committed files must exist; secrets are made by the README's steps.
            let host = repo().join("deploy/compose").join(&src).join(&rest);
            assert!(host.exists(), "{what}: {}", host.display());
        }
    }
    // The secrets folder the README makes is the one mounted.
    assert!(mounts
        .iter()
        .any(|(src, dst, _)| src == "./secrets" && dst == "/etc/moatmq/secrets"));
}

/// The release binary (what the Dockerfile and `cargo install` build) is stripped.
#[test]
fn release_profile_strips_the_binary() {
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    let release = &manifest["profile"]["release"];
    assert_eq!(release.get("strip"), Some(&toml::Value::Boolean(true)));
    assert_eq!(release.get("debug"), None);
}

#[test]
fn compose_believes_the_client_address_only_from_cloudflared() {
    let c = Config::parse(
        Path::new("/etc/moatmq/broker.toml"),
        &read("deploy/compose/config/broker.toml"),
    )
    .expect("compose config");
    let f = c.listener[0]
        .forwarded
        .as_ref()
        .expect("[listener.forwarded]");
    assert_eq!(f.header, "CF-Connecting-IP");
    assert_eq!(f.trusted_proxies, ["172.30.53.10/32"]);
    let compose = read("deploy/compose/compose.yaml");
    assert!(
        compose.contains("ipv4_address: 172.30.53.10"),
        "cloudflared's address"
    );
    assert!(
        compose.contains("subnet: 172.30.53.0/24"),
        "the tunnel network"
    );
}

/// Three pods joined through NATS (issue 16): the overlay's broker.toml is the plain one
/// plus a `[cluster]` section and loads once MOATMQ_NODE_NAME names the pod, which the
/// StatefulSet sets from the pod's own name, in the overlay as in the chart.
#[test]
fn cluster_deployments_name_each_pod_and_keep_one_config() {
    let base = embedded_toml(&read("deploy/kubernetes/configmap.yaml"), "broker.toml");
    let cluster = embedded_toml(
        &read("deploy/kubernetes-cluster/configmap.yaml"),
        "broker.toml",
    );
    assert!(
        cluster.starts_with(base.trim_end()),
        "the overlay's broker.toml extends the plain one"
    );
    let file = Path::new("/etc/moatmq/config/broker.toml");
    let c = Config::parse_with(file, &cluster, Some("moatmq-1".into())).unwrap();
    let section = c.cluster.expect("[cluster]");
    assert_eq!(section.node_name, "moatmq-1");
    assert!(!section.servers.is_empty());
    assert!(c.retained.is_some(), "every node seals with the shared key");
    // Without the pod's name the config is refused rather than run unnamed.
    assert!(Config::parse_with(file, &cluster, None).is_err());

    let patch = yaml("deploy/kubernetes-cluster/statefulset-patch.yaml");
    let spec = &patch["spec"];
    assert_eq!(spec["replicas"].as_i64(), Some(3));
    let env = &spec["template"]["spec"]["containers"][0]["env"][0];
    assert_eq!(env["name"].as_str(), Some("MOATMQ_NODE_NAME"));
    assert_eq!(
        env["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.name")
    );
    let kustomization = read("deploy/kubernetes-cluster/kustomization.yaml");
    for part in [
        "../kubernetes",
        "poddisruptionbudget.yaml",
        "statefulset-patch.yaml",
    ] {
        assert!(kustomization.contains(part), "kustomization.yaml: {part}");
    }

    let sts = read("deploy/helm/moatmq/templates/statefulset.yaml");
    assert!(sts.contains("MOATMQ_NODE_NAME") && sts.contains("fieldPath: metadata.name"));
    assert!(
        sts.contains("replicaCount > 1 needs cluster.enabled"),
        "more than one unjoined pod is refused"
    );
    let cm = read("deploy/helm/moatmq/templates/configmap.yaml");
    assert!(cm.contains("[cluster]") && cm.contains(".Values.cluster.servers"));
    let pdb = read("deploy/helm/moatmq/templates/poddisruptionbudget.yaml");
    assert!(pdb.contains("kind: PodDisruptionBudget") && pdb.contains("maxUnavailable"));
    // Compose: three nodes, one config, each named by its service.
    let compose = yaml("deploy/compose/cluster.yaml");
    let toml = read("deploy/compose/config/cluster.toml");
    for n in 1..=3 {
        let node = &compose["services"][format!("moatmq-{n}").as_str()];
        let name = node["environment"]["MOATMQ_NODE_NAME"]
            .as_str()
            .expect("node name");
        assert_eq!(name, format!("moatmq-{n}"));
        let c = Config::parse_with(file, &toml, Some(name.into())).unwrap();
        assert_eq!(c.cluster.expect("[cluster]").servers, ["nats://nats:4222"]);
    }
    assert!(compose["services"]["nats"]["command"]
        .as_vec()
        .is_some_and(|c| c.iter().any(|a| a.as_str() == Some("-js"))));
    let values = yaml("deploy/helm/moatmq/values.yaml");
    assert_eq!(values["replicaCount"].as_i64(), Some(1));
    assert_eq!(values["cluster"]["enabled"].as_bool(), Some(false));
}
