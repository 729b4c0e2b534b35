//! Pod volumes materialised as host folders, and the bind mounts of a container.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount,
};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::env::{self, expand};

const DEFAULT_MODE: i32 = 0o644;
const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";

/// Host folder (or file, for a `hostPath` file) of each volume, by name.
pub struct Volumes {
    paths: HashMap<String, PathBuf>,
}

/// A bind mount into the container's private mount namespace.
pub struct Mount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// Writes every volume of `pod` under `dir`; returns the warnings (unsupported kinds).
pub async fn prepare(client: &Client, pod: &Pod, dir: &Path) -> anyhow::Result<(Volumes, Vec<String>)> {
    let namespace = pod.namespace().unwrap_or_default();
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), &namespace);
    let secrets = Api::<Secret>::namespaced(client.clone(), &namespace);
    let spec = pod.spec.clone().unwrap_or_default();
    let mut paths = HashMap::new();
    let mut warnings = Vec::new();

    for volume in spec.volumes.iter().flatten() {
        if let Some(host) = &volume.host_path {
            let path = PathBuf::from(&host.path);
            match host.type_.as_deref() {
                Some("DirectoryOrCreate") => fs::create_dir_all(&path)?,
                Some("FileOrCreate") => {
                    if let Some(parent) = path.parent() {
                        fs::create_dir_all(parent)?;
                    }
                    fs::OpenOptions::new().create(true).append(true).open(&path)?;
                }
                _ => {}
            }
            paths.insert(volume.name.clone(), path);
            continue;
        }
        let target = dir.join(&volume.name);
        if target.exists() {
            fs::remove_dir_all(&target)?;
        }
        fs::create_dir_all(&target)?;
        if volume.empty_dir.is_some() {
        } else if let Some(source) = &volume.config_map {
            let name = source.name.as_str();
            match config_maps.get_opt(name).await? {
                Some(cm) => write_keys(
                    &target,
                    &config_map_data(&cm),
                    source.items.as_deref(),
                    source.default_mode.unwrap_or(DEFAULT_MODE),
                )
                .with_context(|| format!("configmap {name}"))?,
                None if source.optional.unwrap_or(false) => {}
                None => bail!("configmap \"{name}\" not found"),
            }
        } else if let Some(source) = &volume.secret {
            let name = source.secret_name.as_deref().unwrap_or_default();
            match secrets.get_opt(name).await? {
                Some(secret) => write_keys(
                    &target,
                    &env::secret_data(&secret),
                    source.items.as_deref(),
                    source.default_mode.unwrap_or(DEFAULT_MODE),
                )
                .with_context(|| format!("secret {name}"))?,
                None if source.optional.unwrap_or(false) => {}
                None => bail!("secret \"{name}\" not found"),
            }
        } else if let Some(source) = &volume.downward_api {
            write_downward_api(
                &target,
                pod,
                source.items.as_deref().unwrap_or_default(),
                source.default_mode.unwrap_or(DEFAULT_MODE),
            )?;
        } else if let Some(projected) = &volume.projected {
            let mode = projected.default_mode.unwrap_or(DEFAULT_MODE);
            for source in projected.sources.iter().flatten() {
                if let Some(cm_source) = &source.config_map {
                    let name = cm_source.name.as_str();
                    match config_maps.get_opt(name).await? {
                        Some(cm) => {
                            write_keys(&target, &config_map_data(&cm), cm_source.items.as_deref(), mode)?
                        }
                        None if cm_source.optional.unwrap_or(false) => {}
                        None => bail!("configmap \"{name}\" not found"),
                    }
                }
                if let Some(secret_source) = &source.secret {
                    let name = secret_source.name.as_str();
                    match secrets.get_opt(name).await? {
                        Some(secret) => write_keys(
                            &target,
                            &env::secret_data(&secret),
                            secret_source.items.as_deref(),
                            mode,
                        )?,
                        None if secret_source.optional.unwrap_or(false) => {}
                        None => bail!("secret \"{name}\" not found"),
                    }
                }
                if let Some(downward) = &source.downward_api {
                    write_downward_api(&target, pod, downward.items.as_deref().unwrap_or_default(), mode)?;
                }
                if let Some(token) = &source.service_account_token {
                    let value =
                        request_token(client, pod, token.audience.as_deref(), token.expiration_seconds)
                            .await?;
                    write_file(&target, &token.path, value.as_bytes(), mode)?;
                }
            }
        } else {
            warnings.push(format!("volume {}: unsupported kind, using an empty folder", volume.name));
        }
        paths.insert(volume.name.clone(), target);
    }
    Ok((Volumes { paths }, warnings))
}

fn config_map_data(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> =
        cm.data.iter().flatten().map(|(k, v)| (k.clone(), v.clone().into_bytes())).collect();
    for (k, v) in cm.binary_data.iter().flatten() {
        data.insert(k.clone(), v.0.clone());
    }
    data
}

fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: i32,
) -> anyhow::Result<()> {
    match items {
        Some(items) => {
            for item in items {
                let value =
                    data.get(&item.key).ok_or_else(|| anyhow!("configured key {} not found", item.key))?;
                write_file(dir, &item.path, value, item.mode.unwrap_or(default_mode))?;
            }
        }
        None => {
            for (key, value) in data {
                write_file(dir, key, value, default_mode)?;
            }
        }
    }
    Ok(())
}

fn write_downward_api(
    dir: &Path,
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: i32,
) -> anyhow::Result<()> {
    for item in items {
        let value = if let Some(field) = &item.field_ref {
            env::field_value(pod, &field.field_path)?
        } else if let Some(resource) = &item.resource_field_ref {
            let container = resource
                .container_name
                .clone()
                .or_else(|| pod.spec.as_ref().and_then(|s| s.containers.first()).map(|c| c.name.clone()))
                .unwrap_or_default();
            env::resource_value(
                pod,
                &container,
                &resource.resource,
                resource.divisor.as_ref().map(|d| d.0.as_str()),
            )?
        } else {
            bail!("downwardAPI item {} has no source", item.path)
        };
        write_file(dir, &item.path, value.as_bytes(), item.mode.unwrap_or(default_mode))?;
    }
    Ok(())
}

async fn request_token(
    client: &Client,
    pod: &Pod,
    audience: Option<&str>,
    expiration_seconds: Option<i64>,
) -> anyhow::Result<String> {
    let namespace = pod.namespace().unwrap_or_default();
    let account =
        pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
    let request = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": audience.filter(|a| !a.is_empty()).map(|a| vec![a]).unwrap_or_default(),
            "expirationSeconds": expiration_seconds.unwrap_or(3600),
            "boundObjectRef": { "apiVersion": "v1", "kind": "Pod", "name": pod.name_any(), "uid": pod.uid() },
        },
    });
    let response: serde_json::Value = Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
        .create_subresource("token", &account, &PostParams::default(), &request)
        .await
        .with_context(|| format!("token for service account {namespace}/{account}"))?;
    response["status"]["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("TokenRequest returned no token"))
}

/// Writes `relative` under `dir`, refusing paths that leave `dir`.
fn write_file(dir: &Path, relative: &str, contents: &[u8], mode: i32) -> anyhow::Result<()> {
    let relative = Path::new(relative);
    if !relative.components().all(|c| matches!(c, Component::Normal(_))) {
        bail!("invalid path {}", relative.display());
    }
    let path = dir.join(relative);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&path, contents)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode as u32 & 0o7777))?;
    Ok(())
}

impl Volumes {
    /// The container's bind mounts, parents before children, including its
    /// termination-message file. Creates missing mount points on the host.
    pub fn mounts(
        &self,
        container: &Container,
        env: &BTreeMap<String, String>,
        termination_file: &Path,
    ) -> anyhow::Result<Vec<Mount>> {
        let mut mounts = Vec::new();
        for volume_mount in container.volume_mounts.iter().flatten() {
            let base = self
                .paths
                .get(&volume_mount.name)
                .ok_or_else(|| anyhow!("volume {} not found", volume_mount.name))?;
            let sub_path = match (&volume_mount.sub_path, &volume_mount.sub_path_expr) {
                (Some(sub), _) if !sub.is_empty() => sub.clone(),
                (_, Some(expr)) if !expr.is_empty() => expand(expr, env),
                _ => String::new(),
            };
            let source = if sub_path.is_empty() {
                base.clone()
            } else {
                let source = base.join(&sub_path);
                if !source.exists() {
                    fs::create_dir_all(&source)?;
                }
                source
            };
            mounts.push(Mount {
                source,
                target: PathBuf::from(&volume_mount.mount_path),
                read_only: volume_mount.read_only.unwrap_or(false),
            });
        }
        let message_path = container
            .termination_message_path
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| DEFAULT_TERMINATION_MESSAGE_PATH.into());
        mounts.push(Mount {
            source: termination_file.to_path_buf(),
            target: PathBuf::from(message_path),
            read_only: false,
        });
        mounts.sort_by_key(|m| m.target.components().count());
        for (i, mount) in mounts.iter().enumerate() {
            create_mount_point(&mount.source, &mount.target)?;
            // A mount inside an earlier one needs its mount point in that volume.
            for outer in &mounts[..i] {
                if let Ok(rest) = mount.target.strip_prefix(&outer.target)
                    && outer.source.is_dir()
                    && !rest.as_os_str().is_empty()
                {
                    create_mount_point(&mount.source, &outer.source.join(rest))?;
                }
            }
        }
        Ok(mounts)
    }
}

fn create_mount_point(source: &Path, target: &Path) -> anyhow::Result<()> {
    if !target.is_absolute() {
        bail!("mount path {} is not absolute", target.display());
    }
    if target.exists() {
        return Ok(());
    }
    if source.is_dir() {
        fs::create_dir_all(target)
    } else {
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::File::create(target).map(|_| ())
    }
    .with_context(|| format!("create mount point {}", target.display()))
}
