//! Waiting for a Deployment's rollout, and telling the truth about it (Altinn issues #7538,
//! #10312: failed upgrades and crashing pods reported as success).
//!
//! Done means what `kubectl rollout status` means: the controller observed the current
//! generation, and updated, total and available replicas all equal the desired count. Failed
//! means the `Progressing` condition says `ProgressDeadlineExceeded`, or a pod of the new
//! ReplicaSet has a container waiting in `CrashLoopBackOff`, `ImagePullBackOff`,
//! `ErrImagePull`, `InvalidImageName` or `CreateContainerConfigError` — unlike kubectl, which
//! keeps waiting on those until the deadline: none of them heals by waiting, and the message
//! names the pod, the container and its last termination. The state is polled (`GET` of the
//! Deployment, its ReplicaSets and the new ReplicaSet's pods) rather than watched, which keeps
//! the conversation to plain requests any API server (and proxy) answers.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::api::{Api, ListParams};

use super::{DeployError, Result};

/// Container waiting reasons that end the wait with a failure.
pub const FATAL_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
];

const REVISION: &str = "deployment.kubernetes.io/revision";

/// Where a rollout stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RolloutState {
    /// Still going: replicas ready (available, updated) of desired, and what is awaited.
    Progressing {
        /// Updated replicas that are available.
        ready: i32,
        /// Desired replicas.
        desired: i32,
        /// What the rollout waits for.
        waiting_for: String,
    },
    /// Every desired replica is updated and available.
    Complete {
        /// Desired (= ready) replicas.
        desired: i32,
    },
    /// It will not finish: why.
    Failed(String),
}

/// The state of `deployment`, given the pods of its new ReplicaSet.
pub fn evaluate(deployment: &Deployment, pods: &[Pod]) -> RolloutState {
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let status = deployment.status.clone().unwrap_or_default();
    let generation = deployment.metadata.generation.unwrap_or(0);
    let observed = status.observed_generation.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    let total = status.replicas.unwrap_or(0);
    let ready = available.min(updated);
    if let Some(reason) = pods.iter().find_map(pod_failure) {
        return RolloutState::Failed(reason);
    }
    if observed >= generation
        && let Some(c) = status.conditions.unwrap_or_default().into_iter().find(|c| {
            c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        })
    {
        return RolloutState::Failed(format!(
            "ProgressDeadlineExceeded: {}",
            c.message
                .unwrap_or_else(|| "the deployment exceeded its progress deadline".into())
        ));
    }
    let waiting_for = if observed < generation {
        "the controller to observe the new generation".to_string()
    } else if updated < desired {
        format!("{updated} of {desired} replicas to be updated")
    } else if total > updated {
        format!("{} old replicas to terminate", total - updated)
    } else if available < updated {
        format!("{available} of {updated} updated replicas to be available")
    } else {
        return RolloutState::Complete { desired };
    };
    RolloutState::Progressing {
        ready,
        desired,
        waiting_for,
    }
}

/// Why `pod` will not become ready, if one of its containers waits for a fatal reason.
fn pod_failure(pod: &Pod) -> Option<String> {
    let name = pod.metadata.name.as_deref().unwrap_or("?");
    let status = pod.status.as_ref()?;
    let all = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    all.filter_map(|c| {
        container_failure(c).map(|r| format!("pod {name} container {}: {r}", c.name))
    })
    .next()
}

fn container_failure(c: &ContainerStatus) -> Option<String> {
    let waiting = c.state.as_ref()?.waiting.as_ref()?;
    let reason = waiting.reason.as_deref()?;
    if !FATAL_REASONS.contains(&reason) {
        return None;
    }
    let mut msg = reason.to_string();
    if let Some(t) = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
        msg.push_str(&format!(
            " (last termination: {}, exit code {})",
            t.reason.as_deref().unwrap_or("unknown"),
            t.exit_code
        ));
    }
    if let Some(m) = waiting.message.as_deref().filter(|m| !m.is_empty()) {
        msg.push_str(": ");
        msg.push_str(m);
    }
    Some(msg)
}

/// How long to wait and how often to look.
#[derive(Clone, Copy, Debug)]
pub struct RolloutOptions {
    /// Give up (and fail) after this long.
    pub timeout: Duration,
    /// Time between looks.
    pub poll: Duration,
}

/// Wait until Deployment `namespace/name` is rolled out; fail on a fatal state or the
/// timeout. `progress` hears every state that differs from the last one.
pub async fn wait_for_rollout(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    opts: &RolloutOptions,
    progress: &mut (dyn FnMut(&RolloutState) + Send),
) -> Result<()> {
    let object = format!("{namespace}/deployment/{name}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let start = Instant::now();
    let mut last: Option<RolloutState> = None;
    loop {
        let d = deployments.get(name).await.map_err(|e| DeployError::Kube {
            action: format!("get {object}"),
            source: e,
        })?;
        let pods = new_pods(client, namespace, &d).await?;
        let state = evaluate(&d, &pods);
        if last.as_ref() != Some(&state) {
            progress(&state);
            last = Some(state.clone());
        }
        match state {
            RolloutState::Complete { .. } => return Ok(()),
            RolloutState::Failed(reason) => return Err(DeployError::Rollout { object, reason }),
            RolloutState::Progressing {
                ready,
                desired,
                waiting_for,
            } if start.elapsed() >= opts.timeout => {
                return Err(DeployError::Rollout {
                    object,
                    reason: format!(
                        "timed out after {}s with {ready}/{desired} replicas ready, waiting for {waiting_for}",
                        opts.timeout.as_secs()
                    ),
                });
            }
            RolloutState::Progressing { .. } => tokio::time::sleep(opts.poll).await,
        }
    }
}

/// The pods of `d`'s current ReplicaSet (the one owned by `d` whose revision is `d`'s); none
/// while the controller has not observed `d`'s generation or made the ReplicaSet yet.
async fn new_pods(client: &kube::Client, namespace: &str, d: &Deployment) -> Result<Vec<Pod>> {
    // Until the controller has seen this generation, the revision annotation still names the
    // previous ReplicaSet, whose crashing pods may be the very reason for this rollout.
    let observed = d.status.as_ref().and_then(|s| s.observed_generation);
    if observed < d.metadata.generation {
        return Ok(Vec::new());
    }
    let Some(revision) = d
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
    else {
        return Ok(Vec::new());
    };
    let labels = d
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default();
    let selector = labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let list = |what: &str| {
        let what = what.to_string();
        move |e| DeployError::Kube {
            action: format!("list {what} in {namespace}"),
            source: e,
        }
    };
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
    let rs = sets
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(list("replicasets"))?;
    let uid = d.metadata.uid.as_deref();
    let current =
        rs.items.into_iter().find(|r| {
            let owned =
                r.metadata.owner_references.iter().flatten().any(|o| {
                    Some(o.uid.as_str()) == uid || (uid.is_none() && o.kind == "Deployment")
                });
            owned
                && r.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(REVISION))
                    == Some(revision)
        });
    let Some(hash) = current
        .and_then(|r| r.metadata.labels)
        .and_then(|l| l.get("pod-template-hash").cloned())
    else {
        return Ok(Vec::new());
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = if selector.is_empty() {
        format!("pod-template-hash={hash}")
    } else {
        format!("{selector},pod-template-hash={hash}")
    };
    Ok(pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(list("pods"))?
        .items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(generation: i64, status: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "app", "generation": generation},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "a"}}, "template": {}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn progressing_then_complete() {
        let d = deployment(2, json!({"observedGeneration": 1}));
        assert!(matches!(
            evaluate(&d, &[]),
            RolloutState::Progressing { .. }
        ));
        let d = deployment(
            2,
            json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 2}),
        );
        assert!(
            matches!(evaluate(&d, &[]), RolloutState::Progressing { ref waiting_for, .. } if waiting_for.contains("old replicas"))
        );
        let d = deployment(
            2,
            json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 1}),
        );
        assert_eq!(
            evaluate(&d, &[]),
            RolloutState::Progressing {
                ready: 1,
                desired: 2,
                waiting_for: "1 of 2 updated replicas to be available".into()
            }
        );
        let d = deployment(
            2,
            json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}),
        );
        assert_eq!(evaluate(&d, &[]), RolloutState::Complete { desired: 2 });
    }

    #[test]
    fn deadline_and_crashing_pods_fail() {
        let d = deployment(
            1,
            json!({"observedGeneration": 1, "conditions": [{"type": "Progressing", "status": "False",
                "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet \"app-1\" has timed out progressing."}]}),
        );
        let RolloutState::Failed(r) = evaluate(&d, &[]) else {
            panic!()
        };
        assert!(r.starts_with("ProgressDeadlineExceeded: ReplicaSet"), "{r}");
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "app-1-x"},
            "status": {"containerStatuses": [{
                "name": "app", "image": "i", "imageID": "", "ready": false, "restartCount": 3,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                "lastState": {"terminated": {"reason": "Error", "exitCode": 1}},
            }]},
        }))
        .unwrap();
        let d = deployment(1, json!({"observedGeneration": 1}));
        assert_eq!(
            evaluate(&d, &[pod]),
            RolloutState::Failed(
                "pod app-1-x container app: CrashLoopBackOff (last termination: Error, exit code 1): back-off 40s".into()
            )
        );
    }
}
