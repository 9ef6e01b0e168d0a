//! deploy/: every manifest parses into its k8s-openapi type; the ClusterRole grants exactly
//! what the agent watches (read-only); the DaemonSet asks for exactly the capabilities the netns
//! tests prove necessary, and mounts what the agent needs.
use std::{collections::BTreeSet, fs, path::PathBuf};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use lb_userspace::source::api::WATCHES;

fn deploy(file: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn parse<T: serde::de::DeserializeOwned>(file: &str) -> T {
    serde_yaml::from_str(&deploy(file)).unwrap_or_else(|e| {
        panic!(
            "deploy/{file} is not a valid {}: {e}",
            std::any::type_name::<T>()
        )
    })
}

#[test]
fn kustomization_lists_every_manifest() {
    let k: serde_yaml::Value =
        serde_yaml::from_str(&deploy("kustomization.yaml")).expect("kustomization");
    let listed: BTreeSet<String> = k["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let on_disk: BTreeSet<String> =
        fs::read_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy"))
            .expect("deploy dir")
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .filter(|n| {
                std::path::Path::new(n)
                    .extension()
                    .is_some_and(|e| e == "yaml")
                    && n != "kustomization.yaml"
            })
            .collect();
    assert_eq!(listed, on_disk);
}

#[test]
fn rbac_grants_exactly_the_agents_watches() {
    let role: ClusterRole = parse("clusterrole.yaml");
    let mut granted = BTreeSet::new();
    for rule in role.rules.expect("rules") {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert_eq!(
            verbs,
            BTreeSet::from(["get", "list", "watch"]),
            "read-only verbs only: {rule:?}"
        );
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for g in rule.api_groups.expect("apiGroups") {
            for r in rule.resources.clone().expect("resources") {
                granted.insert((g.clone(), r));
            }
        }
    }
    let watched: BTreeSet<(String, String)> = WATCHES
        .iter()
        .map(|(g, r)| ((*g).to_owned(), (*r).to_owned()))
        .collect();
    assert_eq!(granted, watched, "ClusterRole ≠ what the agent watches");

    let binding: ClusterRoleBinding = parse("clusterrolebinding.yaml");
    let sa: ServiceAccount = parse("serviceaccount.yaml");
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap());
    let subject = &binding.subjects.expect("subjects")[0];
    assert_eq!(
        (subject.kind.as_str(), Some(&subject.name)),
        ("ServiceAccount", sa.metadata.name.as_ref())
    );
    assert_eq!(subject.namespace, sa.metadata.namespace);
}

#[test]
fn daemonset_runs_with_the_proven_capabilities_only() {
    let ds: DaemonSet = parse("daemonset.yaml");
    let sa: ServiceAccount = parse("serviceaccount.yaml");
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_eq!(pod.host_network, Some(true));
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let add: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(add, BTreeSet::from(["BPF", "NET_ADMIN"]));
    // The host's bpffs (pins survive the pod) and cgroup2 root are mounted where the args say.
    let args = c.args.clone().expect("args").join(" ");
    let mounts: Vec<(String, String)> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.clone(), m.mount_path.clone()))
        .collect();
    let host = |name: &str| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    assert!(
        mounts.contains(&("bpffs".into(), "/sys/fs/bpf".into()))
            && host("bpffs").as_deref() == Some("/sys/fs/bpf")
    );
    assert!(args.contains("--bpffs=/sys/fs/bpf/"));
    let cg = mounts
        .iter()
        .find(|(n, _)| n == "cgroup2")
        .expect("cgroup2 mount");
    assert!(args.contains(&format!("--cgroup={}", cg.1)), "{args}");
    assert!(host("cgroup2").is_some_and(|p| p.starts_with("/sys/fs/cgroup")));
    assert!(args.contains("--healthz-addr=0.0.0.0:10256"));
    let probe = c
        .liveness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("liveness probe");
    assert_eq!(probe.path.as_deref(), Some("/livez"));
    let env: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert!(env.contains(&"NODE_NAME"));
}
