//! Pod Security "baseline" checks for static pods, pure.
//!
//! Static pods never pass through admission, so the daemon checks each manifest
//! itself against the baseline controls of the Pod Security Standards.

use k8s_openapi::api::core::v1::{
    ContainerPort, Pod, PodSecurityContext, PodSpec, SELinuxOptions, SecurityContext, Sysctl,
    WindowsSecurityContextOptions,
};

/// Capabilities a container may add (names without the `CAP_` prefix).
#[rustfmt::skip]
const ALLOWED_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
];

/// SELinux types a pod or container may request (empty means unset).
#[rustfmt::skip]
const ALLOWED_SELINUX_TYPES: &[&str] = &[
    "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t",
];

/// Sysctls that are namespaced and isolated between pods.
const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

/// AppArmor and seccomp profile types allowed by baseline (besides unset).
const ALLOWED_PROFILE_TYPES: &[&str] = &["RuntimeDefault", "Localhost"];

/// Allowed `/proc` mount type (besides unset).
const DEFAULT_PROC_MOUNT: &str = "Default";

/// Annotation prefix of the legacy per-container AppArmor setting.
const APPARMOR_ANNOTATION_PREFIX: &str = "container.apparmor.security.beta.kubernetes.io/";

/// One refusal: the field path inside the pod (e.g. `spec.containers[0].securityContext.privileged`,
/// `spec.hostNetwork`, `spec.volumes[1].hostPath`) and a short lowercase reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Violation {
    /// Path of the offending field, with JSON (camelCase) names and list indexes.
    pub field: String,
    /// Short lowercase explanation of why the value is refused.
    pub reason: String,
}

/// Checks a pod against the baseline profile; returns every violation found (empty = allowed).
pub fn baseline_violations(pod: &Pod) -> Vec<Violation> {
    let mut f = Findings::default();
    check_apparmor_annotations(&mut f, pod);
    let Some(spec) = pod.spec.as_ref() else {
        return f.0;
    };
    check_host_namespaces(&mut f, spec);
    check_host_path_volumes(&mut f, spec);
    if let Some(sc) = spec.security_context.as_ref() {
        check_pod_context(&mut f, sc);
    }
    for c in containers(spec) {
        check_container(&mut f, &c);
    }
    f.0
}

/// Violations collected while walking one pod.
#[derive(Default)]
struct Findings(Vec<Violation>);

impl Findings {
    fn deny(&mut self, field: String, reason: impl Into<String>) {
        let reason = reason.into();
        self.0.push(Violation { field, reason });
    }
}

/// The parts of any container kind (regular, init, ephemeral) that baseline looks at.
struct ContainerRef<'a> {
    path: String,
    security_context: Option<&'a SecurityContext>,
    ports: &'a [ContainerPort],
}

/// Lists every container of the pod with its field path.
fn containers(spec: &PodSpec) -> Vec<ContainerRef<'_>> {
    let mut refs = Vec::new();
    let init = spec.init_containers.as_deref().unwrap_or(&[]);
    let lists = [
        ("containers", spec.containers.as_slice()),
        ("initContainers", init),
    ];
    for (list, items) in lists {
        for (i, c) in items.iter().enumerate() {
            refs.push(ContainerRef {
                path: format!("spec.{list}[{i}]"),
                security_context: c.security_context.as_ref(),
                ports: c.ports.as_deref().unwrap_or(&[]),
            });
        }
    }
    for (i, c) in spec.ephemeral_containers.iter().flatten().enumerate() {
        refs.push(ContainerRef {
            path: format!("spec.ephemeralContainers[{i}]"),
            security_context: c.security_context.as_ref(),
            ports: c.ports.as_deref().unwrap_or(&[]),
        });
    }
    refs
}

fn check_pod_context(f: &mut Findings, sc: &PodSecurityContext) {
    let path = "spec.securityContext";
    check_host_process(f, path, sc.windows_options.as_ref());
    check_selinux(f, path, sc.se_linux_options.as_ref());
    let app_armor = sc.app_armor_profile.as_ref().map(|p| p.type_.as_str());
    check_profile_type(f, path, "appArmorProfile", app_armor);
    let seccomp = sc.seccomp_profile.as_ref().map(|p| p.type_.as_str());
    check_profile_type(f, path, "seccompProfile", seccomp);
    check_sysctls(f, path, sc.sysctls.as_deref().unwrap_or(&[]));
}

fn check_container(f: &mut Findings, c: &ContainerRef<'_>) {
    check_host_ports(f, &c.path, c.ports);
    let Some(sc) = c.security_context else {
        return;
    };
    let path = format!("{}.securityContext", c.path);
    check_host_process(f, &path, sc.windows_options.as_ref());
    check_selinux(f, &path, sc.se_linux_options.as_ref());
    let app_armor = sc.app_armor_profile.as_ref().map(|p| p.type_.as_str());
    check_profile_type(f, &path, "appArmorProfile", app_armor);
    let seccomp = sc.seccomp_profile.as_ref().map(|p| p.type_.as_str());
    check_profile_type(f, &path, "seccompProfile", seccomp);
    if sc.privileged == Some(true) {
        f.deny(format!("{path}.privileged"), "privileged is not allowed");
    }
    check_proc_mount(f, &path, sc.proc_mount.as_deref());
    let added = sc
        .capabilities
        .as_ref()
        .and_then(|caps| caps.add.as_deref());
    check_capabilities(f, &path, added.unwrap_or(&[]));
}

fn check_host_namespaces(f: &mut Findings, spec: &PodSpec) {
    let namespaces = [
        ("hostNetwork", spec.host_network),
        ("hostPID", spec.host_pid),
        ("hostIPC", spec.host_ipc),
    ];
    for (name, value) in namespaces {
        if value == Some(true) {
            f.deny(format!("spec.{name}"), "host namespaces are not allowed");
        }
    }
}

fn check_host_path_volumes(f: &mut Findings, spec: &PodSpec) {
    for (i, volume) in spec.volumes.iter().flatten().enumerate() {
        if volume.host_path.is_some() {
            let field = format!("spec.volumes[{i}].hostPath");
            f.deny(field, "hostPath volumes are not allowed");
        }
    }
}

fn check_host_ports(f: &mut Findings, path: &str, ports: &[ContainerPort]) {
    for (i, port) in ports.iter().enumerate() {
        if port.host_port.is_some_and(|p| p != 0) {
            f.deny(
                format!("{path}.ports[{i}].hostPort"),
                "host ports are not allowed",
            );
        }
    }
}

fn check_host_process(f: &mut Findings, path: &str, opts: Option<&WindowsSecurityContextOptions>) {
    if opts.and_then(|o| o.host_process) == Some(true) {
        let field = format!("{path}.windowsOptions.hostProcess");
        f.deny(field, "hostProcess is not allowed");
    }
}

/// AppArmor and seccomp profile types: unset, `RuntimeDefault` or `Localhost`.
fn check_profile_type(f: &mut Findings, path: &str, name: &str, type_: Option<&str>) {
    if let Some(t) = type_.filter(|t| !ALLOWED_PROFILE_TYPES.contains(t)) {
        let reason = format!("profile type {t:?} is not allowed");
        f.deny(format!("{path}.{name}.type"), reason);
    }
}

fn check_apparmor_annotations(f: &mut Findings, pod: &Pod) {
    for (key, value) in pod.metadata.annotations.iter().flatten() {
        let allowed = value == "runtime/default" || value.starts_with("localhost/");
        if key.starts_with(APPARMOR_ANNOTATION_PREFIX) && !allowed {
            let reason = format!("apparmor profile {value:?} is not allowed");
            f.deny(format!("metadata.annotations[{key}]"), reason);
        }
    }
}

fn check_selinux(f: &mut Findings, path: &str, opts: Option<&SELinuxOptions>) {
    let Some(o) = opts else {
        return;
    };
    let selinux_type = o.type_.as_deref();
    if let Some(t) = selinux_type.filter(|t| !ALLOWED_SELINUX_TYPES.contains(t)) {
        let reason = format!("selinux type {t:?} is not allowed");
        f.deny(format!("{path}.seLinuxOptions.type"), reason);
    }
    for (name, value) in [("user", &o.user), ("role", &o.role)] {
        if value.as_deref().is_some_and(|v| !v.is_empty()) {
            let reason = format!("selinux {name} must not be set");
            f.deny(format!("{path}.seLinuxOptions.{name}"), reason);
        }
    }
}

fn check_proc_mount(f: &mut Findings, path: &str, proc_mount: Option<&str>) {
    if let Some(m) = proc_mount.filter(|m| *m != DEFAULT_PROC_MOUNT) {
        let reason = format!("proc mount type {m:?} is not allowed");
        f.deny(format!("{path}.procMount"), reason);
    }
}

fn check_capabilities(f: &mut Findings, path: &str, added: &[String]) {
    for (i, cap) in added.iter().enumerate() {
        if !capability_allowed(cap) {
            let reason = format!("capability {cap:?} is not allowed");
            f.deny(format!("{path}.capabilities.add[{i}]"), reason);
        }
    }
}

/// True when `cap` (with or without `CAP_`, any case) is in the allowed list.
fn capability_allowed(cap: &str) -> bool {
    let upper = cap.to_ascii_uppercase();
    let name = upper.strip_prefix("CAP_").unwrap_or(&upper);
    ALLOWED_CAPABILITIES.contains(&name)
}

fn check_sysctls(f: &mut Findings, path: &str, sysctls: &[Sysctl]) {
    for (i, sysctl) in sysctls.iter().enumerate() {
        if !SAFE_SYSCTLS.contains(&sysctl.name.as_str()) {
            let reason = format!("sysctl {:?} is not allowed", sysctl.name);
            f.deny(format!("{path}.sysctls[{i}].name"), reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    type Value = serde_json::Value;

    /// A plain nginx pod fixture; tests patch it before checking.
    fn nginx() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": "web", "namespace": "default" },
            "spec": {
                "containers": [{
                    "name": "nginx",
                    "image": "nginx:1.27",
                    "ports": [{ "containerPort": 80 }]
                }]
            }
        })
    }

    /// Field paths of all violations of a pod fixture.
    fn fields(value: Value) -> Vec<String> {
        let pod: Pod = serde_json::from_value(value).expect("valid pod fixture");
        baseline_violations(&pod)
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    /// Violations of nginx with `value` set at `spec.<key>`.
    fn with_spec(key: &str, value: Value) -> Vec<String> {
        let mut p = nginx();
        p["spec"][key] = value;
        fields(p)
    }

    /// Violations of nginx with `sc` as its only container's security context.
    fn with_container_sc(sc: Value) -> Vec<String> {
        let mut p = nginx();
        p["spec"]["containers"][0]["securityContext"] = sc;
        fields(p)
    }

    const C0: &str = "spec.containers[0]";

    #[test]
    fn plain_nginx_is_allowed() {
        assert!(fields(nginx()).is_empty());
        assert!(fields(json!({ "metadata": { "name": "no-spec" } })).is_empty());
    }

    #[test]
    fn explicit_safe_values_are_allowed() {
        let mut p = nginx();
        p["spec"]["hostNetwork"] = json!(false);
        p["spec"]["containers"][0]["ports"][0]["hostPort"] = json!(0);
        p["spec"]["containers"][0]["securityContext"] = json!({
            "privileged": false,
            "procMount": "Default",
            "capabilities": { "add": ["NET_BIND_SERVICE", "cap_chown"], "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
            "appArmorProfile": { "type": "Localhost", "localhostProfile": "k8s-nginx" },
            "seLinuxOptions": { "type": "container_t", "level": "s0:c1", "user": "", "role": "" },
            "windowsOptions": { "hostProcess": false }
        });
        p["spec"]["securityContext"] = json!({
            "seccompProfile": { "type": "Localhost", "localhostProfile": "p.json" },
            "sysctls": [{ "name": "net.ipv4.tcp_syncookies", "value": "1" }]
        });
        p["metadata"]["annotations"] = json!({
            "container.apparmor.security.beta.kubernetes.io/nginx": "runtime/default",
            "container.apparmor.security.beta.kubernetes.io/side": "localhost/k8s-nginx",
            "example.com/other": "unconfined"
        });
        assert_eq!(fields(p), Vec::<String>::new());
    }

    #[test]
    fn every_allowed_capability_passes() {
        let prefixed: Vec<String> = ALLOWED_CAPABILITIES
            .iter()
            .map(|c| format!("CAP_{c}"))
            .collect();
        let sc = json!({ "capabilities": { "add": ALLOWED_CAPABILITIES } });
        assert!(with_container_sc(sc).is_empty());
        let sc = json!({ "capabilities": { "add": prefixed } });
        assert!(with_container_sc(sc).is_empty());
    }

    /// Builds `{"a": {"b": value}}` from the dotted path `"a.b"`.
    fn nested(path: &str, value: Value) -> Value {
        path.rsplit('.')
            .fold(value, |inner, key| json!({ key: inner }))
    }

    /// Settings refused in both the pod and the container security context.
    fn bad_shared_settings() -> [(&'static str, Value); 4] {
        [
            ("windowsOptions.hostProcess", json!(true)),
            ("appArmorProfile.type", json!("Unconfined")),
            ("seccompProfile.type", json!("Unconfined")),
            ("seLinuxOptions.type", json!("spc_t")),
        ]
    }

    #[test]
    fn container_security_context_controls_are_refused() {
        let only_container = [
            ("privileged", json!(true)),
            ("procMount", json!("Unmasked")),
        ];
        for (path, value) in bad_shared_settings().into_iter().chain(only_container) {
            let want = format!("{C0}.securityContext.{path}");
            assert_eq!(with_container_sc(nested(path, value)), [want]);
        }
    }

    #[test]
    fn pod_security_context_controls_are_refused() {
        for (path, value) in bad_shared_settings() {
            let got = with_spec("securityContext", nested(path, value));
            assert_eq!(got, [format!("spec.securityContext.{path}")]);
        }
    }

    #[test]
    fn host_namespaces_are_refused() {
        for key in ["hostNetwork", "hostPID", "hostIPC"] {
            assert_eq!(with_spec(key, json!(true)), [format!("spec.{key}")]);
        }
    }

    #[test]
    fn privileged_is_refused_with_reason() {
        let mut p = nginx();
        p["spec"]["containers"][0]["securityContext"] = json!({ "privileged": true });
        let pod: Pod = serde_json::from_value(p).expect("valid pod fixture");
        let got: Vec<String> = baseline_violations(&pod)
            .iter()
            .map(|v| v.to_string())
            .collect();
        let want = "spec.containers[0].securityContext.privileged: privileged is not allowed";
        assert_eq!(got, [want]);
    }

    #[test]
    fn extra_capabilities_are_refused_by_index() {
        let sc = json!({ "capabilities": { "add": ["CHOWN", "SYS_ADMIN", "cap_net_raw"] } });
        let path = format!("{C0}.securityContext.capabilities.add");
        let want = [format!("{path}[1]"), format!("{path}[2]")];
        assert_eq!(with_container_sc(sc), want);
    }

    #[test]
    fn unsafe_sysctl_and_host_path_are_refused_by_index() {
        let sc = json!({ "sysctls": [
            { "name": "kernel.shm_rmid_forced", "value": "1" },
            { "name": "kernel.msgmax", "value": "65536" }
        ] });
        let got = with_spec("securityContext", sc);
        assert_eq!(got, ["spec.securityContext.sysctls[1].name"]);
        let volumes = json!([
            { "name": "cache", "emptyDir": {} },
            { "name": "root", "hostPath": { "path": "/" } }
        ]);
        assert_eq!(with_spec("volumes", volumes), ["spec.volumes[1].hostPath"]);
    }

    #[test]
    fn host_port_is_refused() {
        let mut p = nginx();
        p["spec"]["containers"][0]["ports"][0]["hostPort"] = json!(8080);
        assert_eq!(fields(p), [format!("{C0}.ports[0].hostPort")]);
    }

    #[test]
    fn apparmor_annotation_is_refused() {
        let key = "container.apparmor.security.beta.kubernetes.io/nginx";
        let mut p = nginx();
        p["metadata"]["annotations"] = json!({ key: "unconfined" });
        assert_eq!(fields(p), [format!("metadata.annotations[{key}]")]);
    }

    #[test]
    fn selinux_user_and_role_are_refused() {
        let opts = json!({ "user": "system_u", "role": "system_r" });
        let path = format!("{C0}.securityContext.seLinuxOptions");
        let want = [format!("{path}.user"), format!("{path}.role")];
        assert_eq!(with_container_sc(json!({ "seLinuxOptions": opts })), want);
    }

    #[test]
    fn init_and_ephemeral_containers_use_their_list_names() {
        let mut p = nginx();
        p["spec"]["initContainers"] = json!([
            { "name": "ok", "image": "busybox" },
            { "name": "setup", "image": "busybox", "securityContext": { "privileged": true } }
        ]);
        p["spec"]["ephemeralContainers"] = json!([
            { "name": "debug", "image": "busybox", "ports": [{ "containerPort": 1, "hostPort": 9 }] }
        ]);
        let want = [
            "spec.initContainers[1].securityContext.privileged",
            "spec.ephemeralContainers[0].ports[0].hostPort",
        ];
        assert_eq!(fields(p), want);
    }
}
