//! Table tests for `status`, with status blocks as real controllers write them.

use serde_json::{Value, json};

use super::*;

fn check(name: &str, obj: Value, status: Status, message: &str) {
    let got = compute_status(&obj);
    assert_eq!(
        got,
        ResourceStatus::new(status, message),
        "case {name:?}: got {got:?}"
    );
}

fn deployment(spec: Value, status: Value) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "nginx", "namespace": "dude", "generation": 2},
        "spec": spec,
        "status": status,
    })
}

fn available_deployment_status(replicas: i64) -> Value {
    json!({
        "observedGeneration": 2,
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": replicas,
        "availableReplicas": replicas,
        "conditions": [
            {"type": "Available", "status": "True", "lastUpdateTime": "2024-05-01T10:00:00Z",
             "lastTransitionTime": "2024-05-01T10:00:00Z", "reason": "MinimumReplicasAvailable",
             "message": "Deployment has minimum availability."},
            {"type": "Progressing", "status": "True", "lastUpdateTime": "2024-05-01T10:00:00Z",
             "lastTransitionTime": "2024-05-01T09:59:50Z", "reason": "NewReplicaSetAvailable",
             "message": "ReplicaSet \"nginx-7c5ddbdf54\" has successfully progressed."}
        ]
    })
}

#[test]
fn display_words() {
    let all = [
        (Status::InProgress, "InProgress"),
        (Status::Current, "Current"),
        (Status::Failed, "Failed"),
        (Status::Terminating, "Terminating"),
        (Status::NotFound, "NotFound"),
        (Status::Unknown, "Unknown"),
    ];
    for (s, word) in all {
        assert_eq!(s.to_string(), word);
        assert_eq!(serde_json::to_value(s).ok(), Some(json!(word)));
    }
    assert_eq!(ResourceStatus::not_found().status, Status::NotFound);
}

#[test]
fn generic_rules() {
    check(
        "deletion timestamp wins over everything",
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "a", "deletionTimestamp": "2024-05-01T10:00:00Z", "generation": 3},
               "status": {"observedGeneration": 1}}),
        Status::Terminating,
        "Resource scheduled for deletion",
    );
    check(
        "generation not observed",
        deployment(json!({"replicas": 1}), {
            let mut s = available_deployment_status(1);
            s["observedGeneration"] = json!(1);
            s
        }),
        Status::InProgress,
        "Deployment generation is 2, but latest observed generation is 1",
    );
    check(
        "reconciling condition",
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
               "status": {"conditions": [{"type": "Reconciling", "status": "True", "reason": "Progressing", "message": "Applying revision 3"}]}}),
        Status::InProgress,
        "Applying revision 3",
    );
    check(
        "stalled condition",
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
               "status": {"conditions": [{"type": "Stalled", "status": "True", "reason": "InvalidSpec", "message": ""}]}}),
        Status::Failed,
        "InvalidSpec",
    );
    check(
        "no status at all",
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}}),
        Status::Current,
        "Resource is current",
    );
    check(
        "ready true",
        json!({"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository", "metadata": {"name": "r", "generation": 1},
               "status": {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded", "message": "stored artifact"}]}}),
        Status::Current,
        "Resource is Ready",
    );
    check(
        "ready false",
        json!({"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "tls"},
               "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "DoesNotExist", "message": "Issuing certificate as Secret does not exist"}]}}),
        Status::InProgress,
        "Issuing certificate as Secret does not exist",
    );
    check(
        "ready unknown",
        json!({"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "tls"},
               "status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}}),
        Status::InProgress,
        "Resource is not Ready",
    );
    check(
        "always ready kinds",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}}),
        Status::Current,
        "Resource is always ready",
    );
    check(
        "cronjob",
        json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c"}, "status": {}}),
        Status::Current,
        "Resource is always ready",
    );
    check(
        "pdb",
        json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "p", "generation": 1},
               "status": {"observedGeneration": 1, "currentHealthy": 1, "desiredHealthy": 1}}),
        Status::Current,
        "AllowedDisruptions has been computed.",
    );
}

#[test]
fn malformed_objects_are_unknown() {
    let cases = [
        (json!("a string"), "object is not a mapping"),
        (
            json!({"kind": "Widget", "status": "ok"}),
            "status is not a mapping",
        ),
        (
            json!({"kind": "Widget", "metadata": []}),
            "metadata is not a mapping",
        ),
        (
            json!({"kind": "Widget", "metadata": {"generation": "2"}, "status": {"observedGeneration": 1}}),
            "metadata.generation is not an integer",
        ),
        (
            json!({"kind": "Widget", "status": {"conditions": {"type": "Ready"}}}),
            "status.conditions is not a list",
        ),
        (
            json!({"kind": "Widget", "status": {"conditions": ["Ready"]}}),
            "status.conditions[0] is not a mapping",
        ),
        (
            json!({"kind": "Widget", "status": {"conditions": [{"type": "Ready", "status": true}]}}),
            "status.conditions[0].status is not a string",
        ),
        (
            deployment(json!({"replicas": "one"}), available_deployment_status(1)),
            "spec.replicas is not an integer",
        ),
        (
            json!({"apiVersion": "v1", "kind": "Pod", "status": {"phase": "Exploded"}}),
            "unknown Pod phase \"Exploded\"",
        ),
        (
            json!({"apiVersion": "v1", "kind": "Service", "spec": {"type": "LoadBalancer"},
                   "status": {"loadBalancer": {"ingress": "1.2.3.4"}}}),
            "status.loadBalancer.ingress is not a list",
        ),
    ];
    for (obj, message) in cases {
        check(message, obj, Status::Unknown, message);
    }
}

#[test]
fn deployment_rules() {
    check(
        "available, exact upstream message",
        deployment(json!({"replicas": 1}), available_deployment_status(1)),
        Status::Current,
        "Deployment is available. Replicas: 1",
    );
    check(
        "spec.replicas defaults to 1",
        deployment(json!({}), available_deployment_status(1)),
        Status::Current,
        "Deployment is available. Replicas: 1",
    );
    check(
        "three replicas",
        deployment(json!({"replicas": 3}), available_deployment_status(3)),
        Status::Current,
        "Deployment is available. Replicas: 3",
    );
    check(
        "just created, no status",
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "nginx", "generation": 1},
               "spec": {"replicas": 1}}),
        Status::InProgress,
        "Replicas: 0/1",
    );
    check(
        "pods not available yet",
        deployment(
            json!({"replicas": 1, "progressDeadlineSeconds": 600}),
            json!({"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1, "unavailableReplicas": 1,
                   "conditions": [
                       {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable", "message": "Deployment does not have minimum availability."},
                       {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated", "message": "ReplicaSet \"nginx-7c5ddbdf54\" is progressing."}]}),
        ),
        Status::InProgress,
        "Available: 0/1",
    );
    check(
        "rolling update half way",
        deployment(
            json!({"replicas": 2}),
            json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 1, "readyReplicas": 3, "availableReplicas": 3}),
        ),
        Status::InProgress,
        "Updated: 1/2",
    );
    check(
        "old pods terminating",
        deployment(
            json!({"replicas": 2}),
            json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}),
        ),
        Status::InProgress,
        "Pending termination: 1",
    );
    check(
        "available but not ready",
        deployment(
            json!({"replicas": 2}),
            json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 1, "availableReplicas": 2}),
        ),
        Status::InProgress,
        "Ready: 1/2",
    );
    check(
        "new replica set not yet reported available",
        deployment(json!({"replicas": 1, "progressDeadlineSeconds": 600}), {
            let mut s = available_deployment_status(1);
            s["conditions"][1]["reason"] = json!("ReplicaSetUpdated");
            s
        }),
        Status::InProgress,
        "ReplicaSet not Available",
    );
    check(
        "no progress deadline: Progressing is not awaited",
        deployment(json!({"replicas": 1}), {
            let mut s = available_deployment_status(1);
            s["conditions"] = json!([{"type": "Available", "status": "True"}]);
            s
        }),
        Status::Current,
        "Deployment is available. Replicas: 1",
    );
    check(
        "available condition missing",
        deployment(json!({"replicas": 1}), {
            let mut s = available_deployment_status(1);
            s["conditions"][0]["status"] = json!("False");
            s
        }),
        Status::InProgress,
        "Deployment not Available",
    );
    check(
        "progress deadline exceeded",
        deployment(
            json!({"replicas": 1, "progressDeadlineSeconds": 600}),
            json!({"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1, "unavailableReplicas": 1,
                   "conditions": [
                       {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"},
                       {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                        "message": "ReplicaSet \"nginx-7c5ddbdf54\" has timed out progressing."}]}),
        ),
        Status::Failed,
        "Progress deadline exceeded: ReplicaSet \"nginx-7c5ddbdf54\" has timed out progressing.",
    );
    check(
        "scaled to zero",
        deployment(
            json!({"replicas": 0}),
            json!({"observedGeneration": 2, "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}),
        ),
        Status::Current,
        "Deployment is available. Replicas: 0",
    );
}

fn sts(spec: Value, status: Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
           "metadata": {"name": "db", "namespace": "dude", "generation": 1},
           "spec": spec, "status": status})
}

#[test]
fn statefulset_rules() {
    let done = json!({"observedGeneration": 1, "replicas": 3, "readyReplicas": 3, "currentReplicas": 3,
                      "updatedReplicas": 3, "availableReplicas": 3,
                      "currentRevision": "db-5d7b9c8f6", "updateRevision": "db-5d7b9c8f6"});
    check(
        "all ready",
        sts(json!({"replicas": 3}), done.clone()),
        Status::Current,
        "All replicas scheduled as expected. Replicas: 3",
    );
    check(
        "too few",
        sts(
            json!({"replicas": 3}),
            json!({"observedGeneration": 1, "replicas": 1}),
        ),
        Status::InProgress,
        "Replicas: 1/3",
    );
    check(
        "not ready",
        sts(
            json!({"replicas": 3}),
            json!({"observedGeneration": 1, "replicas": 3, "readyReplicas": 2}),
        ),
        Status::InProgress,
        "Ready: 2/3",
    );
    check(
        "revision rollout in progress",
        sts(json!({"replicas": 3}), {
            let mut s = done.clone();
            s["updateRevision"] = json!("db-6f8c7d9b5");
            s
        }),
        Status::InProgress,
        "Waiting for updated revision to match current",
    );
    check(
        "current replicas lag",
        sts(json!({"replicas": 3}), {
            let mut s = done.clone();
            s["currentReplicas"] = json!(2);
            s
        }),
        Status::InProgress,
        "current: 2/3",
    );
    check(
        "partition not reached",
        sts(
            json!({"replicas": 3, "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 1}}}),
            {
                let mut s = done.clone();
                s["updatedReplicas"] = json!(1);
                s
            },
        ),
        Status::InProgress,
        "updated: 1/2",
    );
    check(
        "partition reached",
        sts(
            json!({"replicas": 3, "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 1}}}),
            {
                let mut s = done.clone();
                s["updatedReplicas"] = json!(2);
                s
            },
        ),
        Status::Current,
        "Partition rollout complete. updated: 2",
    );
    check(
        "on delete",
        sts(
            json!({"replicas": 3, "updateStrategy": {"type": "OnDelete"}}),
            json!({"observedGeneration": 1}),
        ),
        Status::Current,
        "StatefulSet is using the ondelete update strategy",
    );
}

fn ds(generation: Option<i64>, status: Value) -> Value {
    let mut o = json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
                       "metadata": {"name": "agent", "namespace": "kube-system"}, "status": status});
    if let Some(g) = generation {
        o["metadata"]["generation"] = json!(g);
    }
    o
}

#[test]
fn daemonset_rules() {
    let done = json!({"observedGeneration": 4, "desiredNumberScheduled": 3, "currentNumberScheduled": 3,
                      "updatedNumberScheduled": 3, "numberAvailable": 3, "numberReady": 3, "numberMisscheduled": 0});
    check(
        "done",
        ds(Some(4), done.clone()),
        Status::Current,
        "All replicas scheduled as expected. Replicas: 3",
    );
    check(
        "no generation",
        ds(None, done.clone()),
        Status::InProgress,
        "DaemonSet metadata.generation not found",
    );
    check(
        "not observed",
        ds(Some(1), json!({})),
        Status::InProgress,
        "DaemonSet status.observedGeneration not found",
    );
    check(
        "no desired number",
        ds(Some(1), json!({"observedGeneration": 1})),
        Status::InProgress,
        "Missing .status.desiredNumberScheduled",
    );
    let with = |key: &str, v: i64| {
        let mut s = done.clone();
        s[key] = json!(v);
        ds(Some(4), s)
    };
    check(
        "scheduling",
        with("currentNumberScheduled", 2),
        Status::InProgress,
        "Current: 2/3",
    );
    check(
        "updating",
        with("updatedNumberScheduled", 1),
        Status::InProgress,
        "Updated: 1/3",
    );
    check(
        "available",
        with("numberAvailable", 0),
        Status::InProgress,
        "Available: 0/3",
    );
    check(
        "ready",
        with("numberReady", 2),
        Status::InProgress,
        "Ready: 2/3",
    );
}

#[test]
fn replicaset_rules() {
    let rs = |status: Value| {
        json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "r", "generation": 1},
               "spec": {"replicas": 2}, "status": status})
    };
    check(
        "available",
        rs(
            json!({"observedGeneration": 1, "replicas": 2, "fullyLabeledReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}),
        ),
        Status::Current,
        "ReplicaSet is available. Replicas: 2",
    );
    check(
        "labelled",
        rs(json!({"observedGeneration": 1, "replicas": 2, "fullyLabeledReplicas": 1})),
        Status::InProgress,
        "Labelled: 1/2",
    );
    check(
        "available count",
        rs(
            json!({"observedGeneration": 1, "replicas": 2, "fullyLabeledReplicas": 2, "availableReplicas": 1}),
        ),
        Status::InProgress,
        "Available: 1/2",
    );
    check(
        "replica failure",
        rs(
            json!({"observedGeneration": 1, "replicas": 0, "conditions": [
            {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
             "message": "pods \"r-\" is forbidden: exceeded quota"}]}),
        ),
        Status::InProgress,
        "Replica Failure condition. Check Pods",
    );
}

fn pod(status: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "dude"},
           "spec": {"containers": [{"name": "app", "image": "nginx"}]}, "status": status})
}

#[test]
fn pod_rules() {
    check(
        "running and ready",
        pod(json!({"phase": "Running", "conditions": [
            {"type": "Initialized", "status": "True"}, {"type": "Ready", "status": "True"},
            {"type": "ContainersReady", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "state": {"running": {"startedAt": "2024-05-01T10:00:00Z"}}}]})),
        Status::Current,
        "Pod is Ready",
    );
    check(
        "succeeded",
        pod(json!({"phase": "Succeeded"})),
        Status::Current,
        "Pod has completed successfully",
    );
    check(
        "failed",
        pod(json!({"phase": "Failed", "reason": "Error"})),
        Status::Failed,
        "Pod has completed, but not successfully",
    );
    check(
        "crash loop",
        pod(
            json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
            "containerStatuses": [
                {"name": "app", "ready": false, "restartCount": 5, "state": {"waiting": {"reason": "CrashLoopBackOff",
                 "message": "back-off 2m40s restarting failed container=app pod=p_dude"}}},
                {"name": "sidecar", "ready": true, "state": {"running": {}}}]}),
        ),
        Status::Failed,
        "Containers in CrashLoop state: app",
    );
    check(
        "init container crash loop keeps the pod pending",
        pod(json!({"phase": "Pending",
            "initContainerStatuses": [{"name": "migrate", "ready": false, "restartCount": 4,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}}}],
            "containerStatuses": [{"name": "app", "ready": false, "state": {"waiting": {"reason": "PodInitializing"}}}]})),
        Status::Failed,
        "Containers in CrashLoop state: migrate",
    );
    check(
        "image pull back-off is still in progress, with the reason",
        pod(
            json!({"phase": "Pending", "containerStatuses": [{"name": "app", "ready": false,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"nginx:nope\""}}}]}),
        ),
        Status::InProgress,
        "Pod is in the Pending phase: container app is waiting: ImagePullBackOff: Back-off pulling image \"nginx:nope\"",
    );
    check(
        "container creating",
        pod(
            json!({"phase": "Pending", "containerStatuses": [{"name": "app", "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
        ),
        Status::InProgress,
        "Pod is in the Pending phase",
    );
    check(
        "running not ready",
        pod(
            json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "app", "ready": false, "state": {"running": {}}}]}),
        ),
        Status::InProgress,
        "Pod is running but is not Ready",
    );
    check(
        "unschedulable",
        pod(
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient cpu."}]}),
        ),
        Status::InProgress,
        "Pod could not be scheduled: 0/3 nodes are available: 3 Insufficient cpu.",
    );
    check(
        "not observed",
        pod(json!({})),
        Status::InProgress,
        "Pod phase not available",
    );
}

fn job(spec: Value, status: Value) -> Value {
    json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "migrate", "generation": 1},
           "spec": spec, "status": status})
}

#[test]
fn job_rules() {
    check(
        "complete",
        job(
            json!({"completions": 1, "parallelism": 1}),
            json!({"startTime": "2024-05-01T10:00:00Z", "completionTime": "2024-05-01T10:00:09Z", "succeeded": 1,
                   "conditions": [{"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]}),
        ),
        Status::Current,
        "Job Completed. succeeded: 1/1",
    );
    check(
        "completions default to parallelism",
        job(
            json!({"parallelism": 3}),
            json!({"startTime": "2024-05-01T10:00:00Z", "succeeded": 3, "conditions": [{"type": "Complete", "status": "True"}]}),
        ),
        Status::Current,
        "Job Completed. succeeded: 3/3",
    );
    check(
        "failed",
        job(
            json!({"completions": 1, "backoffLimit": 6}),
            json!({"startTime": "2024-05-01T10:00:00Z", "failed": 7, "conditions": [
                {"type": "FailureTarget", "status": "True"},
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}),
        ),
        Status::Failed,
        "Job Failed. failed: 7/1",
    );
    check(
        "not started",
        job(json!({}), json!({})),
        Status::InProgress,
        "Job not started",
    );
    check(
        "running counts as current (kstatus)",
        job(
            json!({"completions": 5}),
            json!({"startTime": "2024-05-01T10:00:00Z", "active": 2, "succeeded": 1, "failed": 1}),
        ),
        Status::Current,
        "Job in progress. success:1, active: 2, failed: 1",
    );
    check(
        "suspended",
        job(
            json!({"suspend": true}),
            json!({"conditions": [{"type": "Suspended", "status": "True"}]}),
        ),
        Status::Current,
        "Job is suspended",
    );
}

#[test]
fn service_rules() {
    let svc = |spec: Value, status: Value| {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "dude"},
               "spec": spec, "status": status})
    };
    check(
        "cluster ip",
        svc(
            json!({"type": "ClusterIP", "clusterIP": "10.96.12.34", "ports": [{"port": 80}]}),
            json!({"loadBalancer": {}}),
        ),
        Status::Current,
        "Service is ready",
    );
    check(
        "default type",
        svc(json!({"ports": [{"port": 80}]}), json!({})),
        Status::Current,
        "Service is ready",
    );
    check(
        "load balancer pending",
        svc(
            json!({"type": "LoadBalancer", "clusterIP": "10.96.12.34"}),
            json!({"loadBalancer": {}}),
        ),
        Status::InProgress,
        "Service type LoadBalancer: no ingress address assigned yet",
    );
    check(
        "load balancer empty ingress",
        svc(
            json!({"type": "LoadBalancer"}),
            json!({"loadBalancer": {"ingress": []}}),
        ),
        Status::InProgress,
        "Service type LoadBalancer: no ingress address assigned yet",
    );
    check(
        "load balancer ready",
        svc(
            json!({"type": "LoadBalancer", "clusterIP": "10.96.12.34"}),
            json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7", "ipMode": "VIP"}]}}),
        ),
        Status::Current,
        "Service is ready",
    );
}

#[test]
fn pvc_namespace_and_crd_rules() {
    let pvc = |status: Value| json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"}, "status": status});
    check(
        "bound",
        pvc(json!({"phase": "Bound", "capacity": {"storage": "1Gi"}})),
        Status::Current,
        "PVC is Bound",
    );
    check(
        "pending",
        pvc(json!({"phase": "Pending"})),
        Status::InProgress,
        "PVC is not Bound. phase: Pending",
    );
    check(
        "no phase",
        pvc(json!({})),
        Status::InProgress,
        "PVC is not Bound. phase: unknown",
    );

    let ns = |status: Value| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "dude"}, "status": status});
    check(
        "active",
        ns(json!({"phase": "Active"})),
        Status::Current,
        "Namespace is active",
    );
    check(
        "terminating",
        ns(json!({"phase": "Terminating"})),
        Status::Terminating,
        "Namespace is terminating",
    );
    check(
        "unobserved",
        ns(json!({})),
        Status::InProgress,
        "Namespace phase not available",
    );

    let crd = |conditions: Value| {
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
               "metadata": {"name": "widgets.example.com", "generation": 1},
               "status": {"conditions": conditions}})
    };
    check(
        "established",
        crd(json!([
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found"},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"}])),
        Status::Current,
        "CRD is established",
    );
    check(
        "installing",
        crd(
            json!([{"type": "Established", "status": "False", "reason": "Installing", "message": "the initial names have not been accepted"}]),
        ),
        Status::InProgress,
        "Install in progress",
    );
    check(
        "names conflict",
        crd(json!([
            {"type": "NamesAccepted", "status": "False", "reason": "ListKindConflict", "message": "\"WidgetList\" is already in use"},
            {"type": "Established", "status": "False", "reason": "NotAccepted", "message": "not all names are accepted"}])),
        Status::Failed,
        "\"WidgetList\" is already in use",
    );
    check(
        "no conditions yet",
        crd(json!(null)),
        Status::InProgress,
        "Install in progress",
    );
}

/// An aggregated API's APIService as kube-aggregator writes it: Current only while its
/// `Available` condition is True (it used to be Current whatever the condition said).
#[test]
fn an_api_service_is_current_only_while_available() {
    let svc = |conditions: Value| {
        json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
               "metadata": {"name": "v1beta1.metrics.k8s.io"},
               "spec": {"service": {"name": "metrics-server", "namespace": "kube-system"}},
               "status": {"conditions": conditions}})
    };
    check(
        "available",
        svc(
            json!([{"type": "Available", "status": "True", "reason": "Passed", "message": "all checks passed"}]),
        ),
        Status::Current,
        "APIService is available",
    );
    check(
        "discovery check failing",
        svc(
            json!([{"type": "Available", "status": "False", "reason": "FailedDiscoveryCheck",
                    "message": "failing or missing response from https://10.96.0.12:443/apis/metrics.k8s.io/v1beta1"}]),
        ),
        Status::InProgress,
        "APIService is not available (FailedDiscoveryCheck): failing or missing response from https://10.96.0.12:443/apis/metrics.k8s.io/v1beta1",
    );
    check(
        "no endpoints yet, no message",
        svc(json!([{"type": "Available", "status": "False", "reason": "MissingEndpoints"}])),
        Status::InProgress,
        "APIService is not available (MissingEndpoints)",
    );
    check(
        "not checked yet",
        svc(json!(null)),
        Status::InProgress,
        "APIService availability not checked yet",
    );
}

fn r(name: &str) -> ObjRef {
    ObjRef::new("apps", "Deployment", Some("dude"), name)
}

#[test]
fn sync_outcomes() {
    let cur = ResourceStatus::new(Status::Current, "ok");
    let prog = ResourceStatus::new(Status::InProgress, "wait");
    let fail = ResourceStatus::new(Status::Failed, "deployments.apps is forbidden");
    let unknown = ResourceStatus::new(Status::Unknown, "?");

    let o = sync_outcome(&[]);
    assert_eq!((o.state, o.not_current()), (SyncState::Done, 0));

    let o = sync_outcome(&[(r("a"), cur.clone()), (r("b"), cur.clone())]);
    assert_eq!(
        (o.state, o.current, o.not_current()),
        (SyncState::Done, 2, 0)
    );

    let o = sync_outcome(&[(r("a"), cur.clone()), (r("b"), prog.clone())]);
    assert_eq!((o.state, o.pending(), o.failed), (SyncState::Waiting, 1, 0));
    assert_eq!(o.not_current(), 1);

    // Unknown is never healthy.
    let o = sync_outcome(&[(r("a"), cur.clone()), (r("b"), unknown)]);
    assert_eq!(o.state, SyncState::Waiting);

    let o = sync_outcome(&[
        (r("a"), ResourceStatus::not_found()),
        (r("b"), ResourceStatus::new(Status::Terminating, "bye")),
    ]);
    assert_eq!(
        (o.state, o.not_found, o.terminating),
        (SyncState::Waiting, 1, 1)
    );

    // A failure does not stop the wait for the others...
    let o = sync_outcome(&[(r("a"), fail.clone()), (r("b"), prog)]);
    assert_eq!(
        (o.state, o.failed, o.not_current()),
        (SyncState::Waiting, 1, 2)
    );

    // ...but once nothing is pending, the sync failed.
    let o = sync_outcome(&[(r("dude"), cur), (r("naww"), fail)]);
    assert_eq!((o.state, o.failed, o.current), (SyncState::Failed, 1, 1));
}

#[test]
fn a_status_view_gives_what_the_whole_object_gives() {
    let mut with_noise = deployment(json!({"replicas": 3}), available_deployment_status(3));
    with_noise["metadata"]["managedFields"] = json!([{"manager": "agentk", "fieldsV1": {}}]);
    with_noise["metadata"]["annotations"] = json!({"a": "b"});
    let objects = [
        with_noise,
        deployment(json!({"replicas": 3}), json!({"observedGeneration": 1})),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c",
            "resourceVersion": "7"}, "data": {"k": "v"}}),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c",
            "deletionTimestamp": "2024-05-01T10:00:00Z"}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lb"},
            "spec": {"type": "LoadBalancer"}, "status": {"loadBalancer": {}}}),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "status": "x"}),
    ];
    for obj in objects {
        let view: StatusView = serde_json::from_value(obj.clone()).expect("a view of any object");
        assert_eq!(view.clone().status(), compute_status(&obj), "{obj}");
        assert_eq!(
            view.metadata.name.as_deref(),
            obj["metadata"]["name"].as_str()
        );
        assert_eq!(
            view.metadata.resource_version.as_deref(),
            obj["metadata"]["resourceVersion"].as_str()
        );
    }
}

/// A LIST's items of built-in kinds come without a type: a view given its list's type reads a
/// Deployment that cannot run as not Current, where the kindless view read it by the generic
/// rule; a view that has a type keeps it.
#[test]
fn a_listed_view_given_its_lists_type_is_read_by_its_kinds_rule() {
    let mut item = deployment(json!({"replicas": 3}), json!({"observedGeneration": 2}));
    let obj = item.as_object_mut().expect("an object");
    obj.remove("apiVersion");
    obj.remove("kind");
    let kindless: StatusView = serde_json::from_value(item).expect("a view");
    assert_eq!(
        kindless.clone().status().status,
        Status::Current,
        "the generic rule"
    );
    let mut typed = kindless;
    typed.type_as("apps/v1", "Deployment");
    assert_eq!(typed.status().status, Status::InProgress);

    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
    let mut view: StatusView = serde_json::from_value(cm.clone()).expect("a view");
    view.type_as("apps/v1", "Deployment");
    assert_eq!(view.status(), compute_status(&cm), "its own type is kept");
}
