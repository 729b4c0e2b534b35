//! A container's environment, resolved as the kubelet does: `envFrom`, then
//! `env` in order (values may reference earlier variables as `$(NAME)`).

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, anyhow, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::api::Api;
use kube::{Client, ResourceExt};

use super::node;

/// Variables the container sees, in the order the kubelet builds them.
pub async fn resolve(
    client: &Client,
    pod: &Pod,
    container: &Container,
    service_env: &[(String, String)],
) -> anyhow::Result<BTreeMap<String, String>> {
    let namespace = pod.namespace().unwrap_or_default();
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), &namespace);
    let secrets = Api::<Secret>::namespaced(client.clone(), &namespace);
    let mut env: BTreeMap<String, String> = service_env.iter().cloned().collect();

    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        if let Some(reference) = &source.config_map_ref {
            let optional = reference.optional.unwrap_or(false);
            match config_maps.get_opt(&reference.name).await? {
                Some(cm) => {
                    for (k, v) in cm.data.unwrap_or_default() {
                        env.insert(format!("{prefix}{k}"), v);
                    }
                }
                None if optional => {}
                None => bail!("configmap \"{}\" not found", reference.name),
            }
        }
        if let Some(reference) = &source.secret_ref {
            let optional = reference.optional.unwrap_or(false);
            match secrets.get_opt(&reference.name).await? {
                Some(secret) => {
                    for (k, v) in secret_data(&secret) {
                        env.insert(format!("{prefix}{k}"), String::from_utf8_lossy(&v).into_owned());
                    }
                }
                None if optional => {}
                None => bail!("secret \"{}\" not found", reference.name),
            }
        }
    }

    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => expand(var.value.as_deref().unwrap_or_default(), &env),
            Some(source) => {
                if let Some(field) = &source.field_ref {
                    field_value(pod, &field.field_path)?
                } else if let Some(resource) = &source.resource_field_ref {
                    let name = resource.container_name.as_deref().unwrap_or(&container.name);
                    resource_value(
                        pod,
                        name,
                        &resource.resource,
                        resource.divisor.as_ref().map(|d| d.0.as_str()),
                    )?
                } else if let Some(selector) = &source.config_map_key_ref {
                    let optional = selector.optional.unwrap_or(false);
                    let value = config_maps
                        .get_opt(&selector.name)
                        .await?
                        .and_then(|cm| cm.data.unwrap_or_default().remove(&selector.key));
                    match value {
                        Some(value) => value,
                        None if optional => continue,
                        None => bail!(
                            "couldn't find key {} in ConfigMap {namespace}/{}",
                            selector.key,
                            selector.name
                        ),
                    }
                } else if let Some(selector) = &source.secret_key_ref {
                    let optional = selector.optional.unwrap_or(false);
                    let value = secrets
                        .get_opt(&selector.name)
                        .await?
                        .and_then(|s| secret_data(&s).remove(&selector.key));
                    match value {
                        Some(value) => String::from_utf8_lossy(&value).into_owned(),
                        None if optional => continue,
                        None => bail!(
                            "couldn't find key {} in Secret {namespace}/{}",
                            selector.key,
                            selector.name
                        ),
                    }
                } else {
                    bail!("env {}: unsupported valueFrom", var.name)
                }
            }
        };
        env.insert(var.name.clone(), value);
    }
    Ok(env)
}

/// `data` and `stringData`-derived bytes of a secret.
pub fn secret_data(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> =
        secret.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())).collect();
    for (k, v) in secret.string_data.iter().flatten() {
        data.insert(k.clone(), v.clone().into_bytes());
    }
    data
}

/// Kubernetes `$(VAR)` expansion: `$$` escapes, unknown references stay as written.
pub fn expand(input: &str, vars: &BTreeMap<String, String>) -> String {
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut checkpoint = 0;
    let mut cursor = 0;
    while cursor < bytes.len() {
        if bytes[cursor] == b'$' && cursor + 1 < bytes.len() {
            out.push_str(&input[checkpoint..cursor]);
            let rest = &input[cursor + 1..];
            let advance = match rest.as_bytes()[0] {
                b'$' => {
                    out.push('$');
                    1
                }
                b'(' => match rest.find(')') {
                    Some(end) => {
                        let name = &rest[1..end];
                        match vars.get(name) {
                            Some(value) => out.push_str(value),
                            None => out.push_str(&format!("$({name})")),
                        }
                        end + 1
                    }
                    None => {
                        out.push_str("$(");
                        1
                    }
                },
                _ => {
                    // `$` followed by anything else is kept (the next char is copied below).
                    out.push('$');
                    0
                }
            };
            cursor += advance;
            checkpoint = cursor + 1;
        }
        cursor += 1;
    }
    if checkpoint < input.len() {
        out.push_str(&input[checkpoint..]);
    }
    out
}

/// A downward-API `fieldRef`.
pub fn field_value(pod: &Pod, path: &str) -> anyhow::Result<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.clone().unwrap_or_default();
    let map_entry = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref().and_then(|m| m.get(key)).cloned().unwrap_or_default()
    };
    let subscript = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix("['"))
            .and_then(|rest| rest.strip_suffix("']"))
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => format_map(&meta.labels),
        "metadata.annotations" => format_map(&meta.annotations),
        "spec.nodeName" => spec.node_name.unwrap_or_default(),
        "spec.serviceAccountName" => spec.service_account_name.unwrap_or_default(),
        "status.hostIP" | "status.podIP" | "status.hostIPs" | "status.podIPs" => "127.0.0.1".into(),
        _ => {
            if let Some(key) = subscript("metadata.labels") {
                map_entry(&meta.labels, key)
            } else if let Some(key) = subscript("metadata.annotations") {
                map_entry(&meta.annotations, key)
            } else {
                bail!("unsupported fieldRef {path}")
            }
        }
    })
}

fn format_map(map: &Option<BTreeMap<String, String>>) -> String {
    map.iter().flatten().map(|(k, v)| format!("{k}={v:?}")).collect::<Vec<_>>().join("\n")
}

/// A downward-API `resourceFieldRef` (limits default to the node's allocatable).
pub fn resource_value(
    pod: &Pod,
    container_name: &str,
    resource: &str,
    divisor: Option<&str>,
) -> anyhow::Result<String> {
    let spec = pod.spec.clone().unwrap_or_default();
    let container = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == container_name)
        .ok_or_else(|| anyhow!("no container {container_name}"))?;
    let resources = container.resources.clone().unwrap_or_default();
    let (kind, name) =
        resource.split_once('.').ok_or_else(|| anyhow!("unsupported resourceFieldRef {resource}"))?;
    let get = |map: &Option<BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>| {
        map.as_ref().and_then(|m| m.get(name)).map(|q| q.0.clone())
    };
    let allocatable: HashMap<&str, &str> =
        [("cpu", node::CPU), ("memory", node::MEMORY), ("ephemeral-storage", "100Gi")].into();
    let quantity = match kind {
        "limits" => get(&resources.limits).or_else(|| allocatable.get(name).map(|s| s.to_string())),
        "requests" => get(&resources.requests).or_else(|| get(&resources.limits)),
        _ => bail!("unsupported resourceFieldRef {resource}"),
    }
    .unwrap_or_else(|| "0".into());
    let value = parse_quantity(&quantity).with_context(|| format!("quantity {quantity}"))?;
    let divisor = parse_quantity(divisor.unwrap_or("1")).unwrap_or(1.0);
    Ok(((value / divisor).ceil() as i64).to_string())
}

fn parse_quantity(text: &str) -> Option<f64> {
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let text = text.trim();
    for (suffix, factor) in SUFFIXES {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    text.parse::<f64>().ok()
}
