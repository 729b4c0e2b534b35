//! The real node's configuration files: containerd, the CNI network, the kubelet and its
//! kubeconfig. Each setting that a textbook node would not need says why this machine needs it.

use std::path::Path;

use super::Layout;

/// containerd 1.6 (config version 2), everything under the node's folder.
pub fn containerd_toml(layout: &Layout, pause_image: &str) -> String {
    let Layout { containerd_root, containerd_state, socket, cni_conf_dir, .. } = layout;
    let socket = socket.display();
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  # Built here, never pulled (tests/images/build.sh).
  sandbox_image = "{pause_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  tolerate_missing_hugetlb_controller = true
  # Root has no CAP_SYS_RESOURCE on these machines, so runc cannot lower oom_score_adj below
  # containerd's own ("can't get final child's PID from pipe: EOF"): clamp it instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "{state}/runc"
        # No systemd here: the cgroupfs driver, as the kubelet's. (Hybrid cgroups: crun refuses
        # them, runc works.)
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf_dir}"
    max_conf_num = 1
"#,
        root = containerd_root.display(),
        state = containerd_state.display(),
        cni_conf_dir = cni_conf_dir.display(),
    )
}

/// A bridge of the node's own, with no address on the host and no gateway in the pods: pods
/// reach each other and nothing else, and the host's routes and `ip_forward` stay untouched.
pub fn cni_conflist(layout: &Layout) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": layout.network,
        "plugins": [{
            "type": "bridge",
            "bridge": layout.bridge,
            "isGateway": false,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "dataDir": layout.dir.join("cni-ipam"),
                "ranges": [[{"subnet": "10.244.0.0/24"}]]
            }
        }]
    })
    .to_string()
}

pub struct KubeletPorts {
    pub port: u16,
    pub healthz: u16,
}

pub fn kubelet_yaml(
    layout: &Layout,
    ports: &KubeletPorts,
    ca_cert: &Path,
    cert: &Path,
    key: &Path,
) -> String {
    format!(
        "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
tlsCertFile: {cert}
tlsPrivateKeyFile: {key}
# Only the API server (its client certificate is signed by the test CA) may call the kubelet.
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization:
  mode: AlwaysAllow
containerRuntimeEndpoint: unix://{socket}
# No systemd; hybrid cgroups (v1 controllers + a unified hierarchy) that cannot move to v2 only,
# which kubelet 1.35 refuses unless told otherwise.
cgroupDriver: cgroupfs
failCgroupV1: false
# The node's pods live under a cgroup of its own, removed with the node.
cgroupRoot: {cgroup}
failSwapOn: false
# Leave the host's iptables alone (there is no kube-proxy here).
makeIPTablesUtilChains: false
podLogsDir: {pod_logs}
volumePluginDir: {volume_plugins}
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
serializeImagePulls: false
# The images were imported, not pulled, and cannot be pulled back: never collect them.
imageGCHighThresholdPercent: 100
evictionHard: {{memory.available: 100Mi, nodefs.available: 2%, imagefs.available: 2%}}
",
        port = ports.port,
        healthz = ports.healthz,
        cert = cert.display(),
        key = key.display(),
        ca = ca_cert.display(),
        socket = layout.socket.display(),
        cgroup = layout.cgroup,
        pod_logs = layout.dir.join("pod-logs").display(),
        volume_plugins = layout.dir.join("volume-plugins").display(),
    )
}

/// A kubeconfig with a bearer token and the CA as a file.
pub fn kubeconfig(server: &str, ca_cert: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: \"{server}\", certificate-authority: \"{ca}\"}}
users:
- name: node
  user: {{token: \"{token}\"}}
contexts:
- name: test
  context: {{cluster: test, user: node}}
current-context: test
",
        ca = ca_cert.display(),
    )
}
