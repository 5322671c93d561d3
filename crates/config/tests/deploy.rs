//! Checks on the files under `deploy/` that no Docker engine, Helm or systemd is needed
//! for: the Dockerfile runs as a non-root user with a health check and bakes in no
//! secret; the systemd unit has its sandboxing; the Helm chart and the plain manifests
//! carry the securityContext; the broker.toml files shipped there load.
//! (.ci/run adds yamllint, kubernetes-validate and `systemd-analyze verify`.)

use moatmq_config::Config;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
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
    }
}
