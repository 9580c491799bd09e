"""Checks the rendered deploy/ manifests for what issues 4, 9, 11 and 12 ask
of them, beyond the schema: the DaemonSet, its rollout, the node path it
keeps, the Services, the namespace's Pod Security level, the peers (the
headless Service, the shared secret, the peer listener), the prefetch list
(a ConfigMap mounted as a directory), the admin token (a generated Secret,
its file never in git) and the admin commands' variables, and that the
uninstall Job undoes exactly what regproxy writes on a node.

Usage: check_deploy.py BASE.yaml SYSADMIN_DIR REGPROXY_BINARY [COMPONENTS.yaml]
(COMPONENTS.yaml: deploy/ rendered with its optional components.)
With the binary it also checks that every setting and command the manifests
use exists, and runs what serve writes on a node (as `regproxy hosts ...
ensure` with the DaemonSet's name and address) and then the uninstall Job's
commands against a scratch copy of a node's files: they must give the files
back; and runs the probes' commands, which must fail while no `serve`
answers on the probe socket and pass against one that does; and starts
`serve` with the DaemonSet's peer settings and the rendered secret: the peer
port refuses a request without the secret and answers one with it, and a
missing or short secret stops serve at start; and starts `serve` with the
DaemonSet's admin token, prefetch list (and, with COMPONENTS.yaml, upstream
rate and prefetch credential): the admin API refuses a request without the
token, answers one with it and the rate the manifests set, and `regproxy
rate` with the pod's variables reaches it, and a prefetch credential that
is not a docker config.json stops serve at start. Then a
self-test: each check below that guards against a known
mistake is shown to fail on the rendered manifests with that mistake made.
Prints one line per check and closes with "N passed, N failed".
"""

import base64
import copy
import json
import os
import re
import socket
import subprocess
import threading
import sys
import tempfile
from pathlib import Path

import urllib.error
import urllib.request

import yaml

NAME = "knative.registry.svc.cluster.local"
# The node-path defaults of `regproxy serve` (a REGPROXY_* variable
# overrides each), as paths on the node, under --node-root in the container.
NODE_DEFAULTS = {
    "--node-root": "/",
    "--hosts-file": "/etc/hosts",
    "--containerd-certs-dir": "/etc/containerd/certs.d",
    "--containerd-config": "/etc/containerd/config.toml",
}
# Settings `regproxy doctor` must see as serve does (the design: same flags).
DOCTOR_SETTINGS = ["--listen", "--cache-dir", "--registry-name", "--node-root"]
DOCTOR_OPTIONAL = ["--hosts-file", "--containerd-certs-dir", "--containerd-config", "--containerd-server"]
# The least time a start-up may take before kubelet may kill the container.
SLOW_START_SECONDS = 120
# Each probe of the regproxy container: (self-test key, `regproxy probe` endpoint).
PROBES = {
    "startupProbe": ("startup-probe", "healthz"),
    "readinessProbe": ("readinessProbe-exec", "readyz"),
    "livenessProbe": ("livenessProbe-exec", "healthz"),
}

# The headless Service whose A records are the nodes' peer addresses.
PEER_SERVICE = "regproxy-peers"
# regproxy refuses a shorter peer secret (after trimming whitespace).
PEER_SECRET_MIN = 16

# Issue 12: the prefetch list's ConfigMap (a fixed name: an edit updates the
# mounted file in place) and the file in it; the generated Secrets whose
# files are each operator's own, never in git; the CLI's variables, read by
# the admin commands run in the pod, not by serve.
PREFETCH_CONFIGMAP = "regproxy-prefetch"
PREFETCH_KEY = "prefetch.txt"
ADMIN_TOKEN_SECRET = "regproxy-admin-token"
# regproxy refuses a shorter admin token (after trimming whitespace).
ADMIN_TOKEN_MIN = 16
OPERATOR_FILES = ["deploy/base/peer-secret", "deploy/base/admin-token"]
CLI_VARS = ["REGPROXY_ADMIN", "REGPROXY_ADMIN_TOKEN_FILE"]
# The admin commands (each `cache` subcommand the binary lists is one too).
ADMIN_COMMANDS = [["rate"], ["prefetch"], ["pin"], ["unpin"], ["cache", "ls"]]
REPO = Path(__file__).resolve().parent.parent

state = {"results": [], "quiet": False}


def check(what, ok, detail="", key=None):
    """Records one check; `key` names the checks the self-test breaks."""
    state["results"].append((key or what, bool(ok)))
    if not state["quiet"]:
        print(f"{'ok  ' if ok else 'FAIL'} {what}" + (f": {detail}" if detail and not ok else ""))


def flags(container):
    """--key=value arguments as a dict; bare words as keys with value None."""
    out = {}
    for a in container.get("args", []) or []:
        key, _, value = a.partition("=")
        out[key] = value if _ else None
    return out


def env_flag(name):
    """REGPROXY_CACHE_DIR -> --cache-dir."""
    return "--" + name[len("REGPROXY_"):].lower().replace("_", "-")


def settings(container):
    """What `regproxy serve` runs with: REGPROXY_* variables, then the args
    (a flag wins over its variable, as in clap)."""
    out = {}
    for e in container.get("env", []) or []:
        if e["name"].startswith("REGPROXY_") and "value" in e:
            out[env_flag(e["name"])] = e["value"]
    out.update({k: v for k, v in flags(container).items() if k.startswith("--")})
    return out


def by_kind(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found[0] if found else None


def mounted(container, volumes, path):
    """(node path, volume) of a path inside the container, through its
    volume mounts; (None, None) when no hostPath holds it."""
    best = None
    for m in container.get("volumeMounts", []) or []:
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best[0]):
                best = (mp, m)
    if not best:
        return None, None
    mp, m = best
    vol = volumes.get(m["name"], {})
    host = vol.get("hostPath", {}).get("path")
    if host is None:
        return None, vol
    return host.rstrip("/") + path[len(mp):] or "/", vol


def volume_file(docs, pod_spec, container, path):
    """Where a file the container reads at `path` comes from, through the
    deepest volume mount that holds it: a dict with the mount, the
    ConfigMap or Secret volume source, the key of that object the file is
    (None when none), the object in the render (None when not in it), the
    file's mode, and its rendered value (bytes, None when the object has no
    such key). A subPath mount of the file itself counts, with its subPath
    as the key (the checks refuse it by name)."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", []) or []}
    mounts = [
        m for m in container.get("volumeMounts", []) or []
        if path and (path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/"))
    ]
    m = max(mounts, key=lambda m: len(m["mountPath"])) if mounts else {}
    volume = volumes.get(m.get("name")) or {}
    if "secret" in volume:
        kind, source, name = "Secret", volume["secret"], volume["secret"].get("secretName")
    elif "configMap" in volume:
        kind, source, name = "ConfigMap", volume["configMap"], volume["configMap"].get("name")
    else:
        kind, source, name = None, {}, None
    rel = m.get("subPath", "") if path == m.get("mountPath") else path[len(m.get("mountPath", "").rstrip("/")) + 1:]
    items = source.get("items")
    item = [i for i in items if i["path"] == rel] if items else [{"key": rel, "path": rel}]
    key = item[0]["key"] if item and m else None
    mode = (item[0].get("mode") if item and items else None) or source.get("defaultMode", 0o644)
    obj = by_kind(docs, kind, name) if kind else None
    data = (obj or {}).get("data") or {}
    value = None
    if key in data:
        value = base64.b64decode(data[key]) if kind == "Secret" else data[key].encode()
    return {"mount": m, "kind": kind, "source": source, "key": key, "object": obj, "keys": sorted(data),
            "mode": mode, "value": value}


def secret_file_ok(f):
    """A file from a key of a Secret in the render, mounted read-only
    without subPath, readable by its owner only."""
    return (f["kind"] == "Secret" and f["object"] is not None and f["value"] is not None
            and f["mount"].get("readOnly") is True and not f["mount"].get("subPath") and f["mode"] & 0o077 == 0)


def describe(path, f):
    return (f"{path!r} in mount {f['mount'] or None}, {f['kind']} {f['source'] or None}, key {f['key']!r} of "
            f"{f['keys']}, mode {oct(f['mode'])}")


def under_root(root, path):
    """A node path as the container sees it under --node-root."""
    return root.rstrip("/") + path if path.startswith("/") else None


def image_host(ref):
    """The registry host of an image reference, without port; docker.io for
    a reference with no host part."""
    first, slash, _ = ref.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first.rsplit(":", 1)[0].lower() if not first.startswith("[") else first
    return "docker.io"


def surge_count(value):
    """maxSurge as given: an integer or "N%"; > 0 means surge pods."""
    if isinstance(value, str) and value.endswith("%"):
        return int(value[:-1] or 0)
    return int(value or 0)


def probe_seconds(p):
    """How long a probe lets a container fail before it acts."""
    return p.get("initialDelaySeconds", 0) + p.get("periodSeconds", 10) * p.get("failureThreshold", 3)


def check_manifests(docs, job, uninstall_sh, git_files):
    """Every check on the rendered manifests, the uninstall Job and script,
    and the operator's files in git (`git_files`, from git_secret_files).
    Returns what run_commands needs."""
    ns = by_kind(docs, "Namespace", "registry")
    check("the namespace registry is created", ns)
    ns_labels = (ns or {}).get("metadata", {}).get("labels", {}) or {}
    check(
        "the namespace admits privileged pods (pod-security.kubernetes.io/enforce: privileged)",
        ns_labels.get("pod-security.kubernetes.io/enforce") == "privileged",
        str(ns_labels),
        key="psa-privileged",
    )
    namespaced = [d for d in docs if d["kind"] not in ("Namespace", "PriorityClass")]
    check(
        "every object lives in namespace registry",
        all(d["metadata"].get("namespace") == "registry" for d in namespaced),
    )

    reg = by_kind(docs, "Deployment", "registry")
    check("the upstream registry is a Deployment", reg)
    reg_pod = reg["spec"]["template"]
    reg_c = reg_pod["spec"]["containers"][0]
    check("it runs Distribution's registry:2", reg_c["image"].endswith("registry:2"), reg_c["image"])
    cm_vol = [v for v in reg_pod["spec"]["volumes"] if "configMap" in v]
    cm_names = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    check(
        "its config comes from a ConfigMap in the render",
        cm_vol and cm_vol[0]["configMap"]["name"] in cm_names,
    )
    storage = [v for v in reg_pod["spec"]["volumes"] if v["name"] == "storage"]
    check("its storage is an emptyDir by default", storage and "emptyDir" in storage[0])

    labels = reg_pod["metadata"]["labels"]
    for svc_name, port in (("knative", 80), ("registry-upstream", None)):
        svc = by_kind(docs, "Service", svc_name)
        check(f"Service {svc_name} exists", svc)
        sel = svc["spec"]["selector"]
        check(
            f"Service {svc_name} selects the registry pods",
            all(labels.get(k) == v for k, v in sel.items()),
        )
        if port:
            check(
                f"Service {svc_name} listens on port {port}",
                [p["port"] for p in svc["spec"]["ports"]] == [port],
            )

    ds = by_kind(docs, "DaemonSet", "regproxy")
    check("regproxy is a DaemonSet", ds)
    pod = ds["spec"]["template"]
    spec = pod["spec"]
    check("it uses the node's network", spec.get("hostNetwork") is True)
    check(
        "it still resolves cluster names, registry-upstream and regproxy-peers "
        "(dnsPolicy ClusterFirstWithHostNet: cluster DNS in a hostNetwork pod's /etc/resolv.conf)",
        spec.get("dnsPolicy") == "ClusterFirstWithHostNet",
        str(spec.get("dnsPolicy")),
        key="cluster-dns",
    )
    check(
        "it runs on Linux nodes only (nodeSelector kubernetes.io/os: linux)",
        (spec.get("nodeSelector") or {}).get("kubernetes.io/os") == "linux",
        str(spec.get("nodeSelector")),
        key="linux-only",
    )
    check(
        "it tolerates every taint, control plane included",
        any(t.get("operator") == "Exists" and "key" not in t for t in spec.get("tolerations", [])),
    )
    check("it has a high priority class", spec.get("priorityClassName", "").startswith("system-node-critical"))

    # The rollout: the new pod beside the old one, the old one gone only
    # when the new one is Ready.
    strategy = ds["spec"].get("updateStrategy", {})
    rolling = strategy.get("rollingUpdate", {}) or {}
    check("it is updated by rolling update", strategy.get("type") == "RollingUpdate")
    surge = surge_count(rolling.get("maxSurge", 0))
    check(
        "a node is never without a proxy during a rollout (maxUnavailable: 0)",
        rolling.get("maxUnavailable") in (0, "0%"),
        f"maxUnavailable: {rolling.get('maxUnavailable')}",
        key="max-unavailable-0",
    )
    check(
        "the new pod starts beside the old one (maxSurge > 0)",
        surge > 0,
        f"maxSurge: {rolling.get('maxSurge')}",
        key="max-surge",
    )
    check(
        "the old pod stays until the new one has been ready a while (minReadySeconds > 0: "
        "a margin on top of the per-pod probes)",
        ds["spec"].get("minReadySeconds", 0) > 0,
        f"minReadySeconds: {ds['spec'].get('minReadySeconds')}",
        key="min-ready",
    )
    all_containers = spec.get("containers", []) + (spec.get("initContainers") or [])
    declared = [
        f"{c['name']}:{p.get('hostPort', p.get('containerPort'))}"
        for c in all_containers
        for p in c.get("ports", []) or []
    ]
    check(
        "with hostNetwork and surge, no container declares a port "
        "(each would be a host port, and the surge pod would never be scheduled: kubernetes#106417)",
        not (spec.get("hostNetwork") and surge > 0 and declared),
        f"declared: {declared}",
        key="no-host-ports-with-surge",
    )

    main_c = ([c for c in spec["containers"] if c["name"] == "regproxy"] or [{}])[0]
    s = settings(main_c)
    f = flags(main_c)
    check("it serves", (main_c.get("args") or [None])[0] == "serve")
    node_settings = [k for k in DOCTOR_SETTINGS + DOCTOR_OPTIONAL if k in f]
    check(
        "the node-path settings are REGPROXY_* variables, not flags, so `regproxy doctor` in the pod sees them",
        not node_settings,
        f"given as flags: {node_settings}",
        key="settings-in-env",
    )
    listen = s.get("--listen", "")
    host, _, port = listen.rpartition(":")
    check("it listens on a loopback address", host.startswith("127."), listen, key="api-loopback")
    check("it listens on port 80, so image references need no port", port == "80", listen)
    upstream = s.get("--upstream", "")
    check(
        "its upstream is not the name that nodes map to the proxy",
        NAME not in upstream and upstream.startswith("http"),
        upstream,
    )
    check(
        "its upstream is resolved through DNS only, never /etc/hosts",
        s.get("--upstream-resolver") == "dns",
    )

    # The admin endpoints on the node's own address, from the downward API:
    # reachable by kubelet and Prometheus, not on every interface of the node.
    admin_listen = s.get("--admin-listen", "")
    admin_host, _, admin_port = admin_listen.rpartition(":")
    admin_port = int(admin_port) if admin_port.isdigit() else 0
    env_list = main_c.get("env", []) or []
    env, order, var, field, defined_before = host_var(env_list, admin_host, "REGPROXY_ADMIN_LISTEN")
    check(
        "the admin listen address is the node's own, from status.hostIP (defined before it is used)",
        field == "status.hostIP" and (defined_before or "--admin-listen" in f),
        f"admin listen {admin_listen}, env {var}: {env.get(var)}, order {order}",
        key="admin-host-ip",
    )
    # The probes: `regproxy probe` on this pod's own Unix socket. An httpGet
    # or tcpSocket probe reaches the admin address, which the old and the
    # new pod share during a rollout (SO_REUSEPORT): either process may
    # answer it, so the new pod could look Ready before its own process runs.
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    probe_socket = s.get("--probe-socket")
    probes = {p: main_c.get(p) for p in PROBES}
    shared = [f"{n}: {k}" for n, p in probes.items() for k in ("httpGet", "tcpSocket", "grpc") if k in (p or {})]
    check(
        "no probe is httpGet, tcpSocket or grpc: those reach the admin address the old and the new pod "
        "share during a rollout, and whichever process the kernel picks answers",
        not shared,
        str(shared),
        key="probe-not-shared",
    )
    sockets = set()
    for name, (want, endpoint) in PROBES.items():
        cmd = [str(a) for a in ((probes[name] or {}).get("exec") or {}).get("command") or []]
        rest = cmd[3:]
        sock = None
        if rest[:1] == ["--socket"] and len(rest) == 2:
            sock, rest = rest[1], []
        elif len(rest) == 1 and rest[0].startswith("--socket="):
            sock, rest = rest[0].split("=", 1)[1], []
        sockets.add(sock or probe_socket)
        check(
            f"the {name} runs `regproxy probe {endpoint}` (exec), which asks this pod's own process",
            len(cmd) >= 3 and Path(cmd[0]).name == "regproxy" and cmd[1:3] == ["probe", endpoint] and not rest,
            f"{probes[name] or None}",
            key=want,
        )
    socket_node, socket_vol = mounted(main_c, volumes, probe_socket or "")
    socket_mount = [m for m in main_c.get("volumeMounts", []) or [] if m["name"] == (socket_vol or {}).get("name")]
    check(
        "REGPROXY_PROBE_SOCKET is set, the probes ask that socket, and it lies on a writable emptyDir "
        "(this pod's own: a hostPath would be shared with the other pod, the root filesystem is read-only)",
        probe_socket
        and probe_socket.startswith("/")
        and sockets == {probe_socket}
        and socket_vol is not None
        and "emptyDir" in socket_vol
        and not any(m.get("readOnly") for m in socket_mount),
        f"REGPROXY_PROBE_SOCKET {probe_socket!r}, probes ask {sorted(map(str, sockets))}, volume {socket_vol}",
        key="probe-socket",
    )
    startup = probes["startupProbe"] or {}
    live = probes["livenessProbe"]
    budget = probe_seconds(startup) if startup else probe_seconds(live or {})
    check(
        f"a slow start (cache scan, DNS) is not killed: a startupProbe on healthz "
        f"gives it at least {SLOW_START_SECONDS}s before the liveness probe counts",
        live is None or (startup and budget >= SLOW_START_SECONDS),
        f"startupProbe {startup or None}, {budget}s",
        key="startup-budget",
    )
    ann = pod["metadata"].get("annotations", {})
    check(
        "Prometheus scrape annotations point at the admin port",
        ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == str(admin_port),
    )
    res = main_c.get("resources", {})
    check(
        "CPU and memory requests and a memory limit are set",
        {"cpu", "memory"} <= set(res.get("requests", {})) and "memory" in res.get("limits", {}),
    )
    sc = main_c.get("securityContext", {})
    caps = sc.get("capabilities", {})
    check("all capabilities are dropped", caps.get("drop") == ["ALL"])
    check("only NET_BIND_SERVICE is added back", caps.get("add") == ["NET_BIND_SERVICE"])
    check("the root filesystem is read-only", sc.get("readOnlyRootFilesystem") is True)
    check("no privilege escalation", sc.get("allowPrivilegeEscalation") is False)

    grace = s.get("--shutdown-grace", "25s")
    grace_s = int(grace[:-1]) if grace.endswith("s") and grace[:-1].isdigit() else None
    tgps = spec.get("terminationGracePeriodSeconds", 30)
    check(
        "kubelet waits longer than --shutdown-grace before it kills the old pod",
        grace_s is not None and tgps > grace_s,
        f"terminationGracePeriodSeconds {tgps}, shutdown grace {grace}",
        key="grace",
    )

    cache_node, cache_vol = mounted(main_c, volumes, s.get("--cache-dir", "/var/lib/regproxy"))
    check("the cache dir is a hostPath, so it outlives the pod", cache_node, str(cache_vol))

    # The node path serve keeps: the name, and the node's files through the
    # node's /etc mounted as a directory.
    registry_name = s.get("--registry-name")
    check("serve keeps the node path for the registry name", registry_name == NAME, str(registry_name))
    root = s.get("--node-root", NODE_DEFAULTS["--node-root"])
    for flag in ("--hosts-file", "--containerd-certs-dir", "--containerd-config"):
        want = NODE_DEFAULTS[flag]
        path = s.get(flag, want)
        check(f"{flag} is kept ({want} on the node)", path, "empty: the DaemonSet would not manage it")
        node, vol = mounted(main_c, volumes, under_root(root, path or want))
        m = [x for x in main_c.get("volumeMounts", []) if x["name"] == (vol or {}).get("name")]
        check(
            f"the {flag} serve edits is the node's {want}, writable",
            node == want and not (m and m[0].get("readOnly")),
            f"{under_root(root, path or want)} is {node} on the node",
        )
        hp = (vol or {}).get("hostPath", {})
        check(
            f"{want} is reached through a directory mount, not a file bind mount "
            "(one pins the inode that a renamed-over file replaces)",
            hp.get("type") in ("Directory", "DirectoryOrCreate") and hp.get("path") != want,
            str(hp),
            key="etc-dir-mount",
        )

    # The node's sysctl for the handover.
    inits = spec.get("initContainers") or []
    sysctl = [c for c in inits if (c.get("args") or [None])[0] == "sysctl"]
    check(
        "a privileged init container runs `regproxy sysctl` (net.ipv4.tcp_migrate_req=1 for the handover)",
        len(sysctl) == 1 and sysctl[0].get("securityContext", {}).get("privileged") is True,
        str([c.get("name") for c in inits]),
        key="sysctl-init",
    )
    check("the init containers use the proxy's own image", all(c["image"] == main_c.get("image") for c in inits))

    # The image never through the name it serves, nor any in-cluster name:
    # the node resolves those only through the proxy it replaces.
    mapped = {n.lower() for n in [registry_name, NAME] if n}
    mapped |= {v.lower() for c in all_containers for k, v in flags(c).items() if k == "--name" and v}
    for svc in (d for d in docs if d["kind"] == "Service"):
        svc_name, svc_ns = svc["metadata"]["name"], svc["metadata"].get("namespace", "default")
        mapped |= {f"{svc_name}.{svc_ns}", f"{svc_name}.{svc_ns}.svc", f"{svc_name}.{svc_ns}.svc.cluster.local"}
    bad = [c["image"] for c in all_containers if image_host(c.get("image", "")) in mapped]
    check(
        "the DaemonSet's image is not pulled through the registry name it maps (nor any in-cluster name)",
        not bad,
        f"{bad} uses one of {sorted(mapped)}",
        key="image-not-proxied",
    )

    # The uninstall Job: what it removes, where, with which image.
    jspec = job["spec"]["template"]["spec"]
    jvols = {v["name"]: v for v in jspec["volumes"]}
    removes = {tuple(c["args"][:3]): (flags(c), c) for c in jspec["containers"]}
    rh = [v for k, v in removes.items() if k[:2] == ("hosts", "remove")]
    rc = [v for k, v in removes.items() if k == ("hosts", "containerd", "remove")]
    check("the uninstall Job removes the /etc/hosts entry", len(rh) == 1 and rh[0][0].get("--name") == NAME)
    check("the uninstall Job removes containerd's hosts.toml", len(rc) == 1 and rc[0][0].get("--name") == NAME)
    for (fl, c), flag, path in ((rh[0], "--hosts-file", "/etc/hosts"), (rc[0], "--certs-dir", "/etc/containerd/certs.d")):
        node, _ = mounted(c, jvols, fl.get(flag, ""))
        check(f"the uninstall Job edits the node's {path}", node == path, str(node))
    check("the uninstall Job runs on a named node, past taints", jspec.get("nodeName") and jspec.get("tolerations"))
    check(
        "the uninstall Job runs the DaemonSet's own image: a placeholder that "
        "uninstall.sh fills in from `kubectl get daemonset regproxy`",
        all(c["image"] == "REGPROXY_IMAGE" for c in jspec["containers"])
        and "get daemonset regproxy" in uninstall_sh
        and "jsonpath='{.spec.template.spec.containers[?(@.name==\"regproxy\")].image}'" in uninstall_sh
        and "s|image: REGPROXY_IMAGE|image: ${image}|" in uninstall_sh,
        str([c["image"] for c in jspec["containers"]]),
        key="uninstall-image",
    )
    peer = check_peers(docs, ds, main_c, s, env_list, listen, admin_listen)
    admin = check_admin_prefetch(docs, spec, main_c, s, env_list, admin_listen, peer["secret"])
    check_git_files(git_files)
    return {"main": main_c, "settings": s, "inits": inits, "uninstall": [c for _, c in removes.values()], "peer": peer,
            "admin": admin}


def check_admin_prefetch(docs, spec, main_c, s, env_list, admin_listen, peer_secret):
    """Issue 12: the prefetch list from the ConfigMap regproxy-prefetch in a
    directory mount, the admin token from a generated Secret, and the CLI
    in the pod pointed at this node's admin listener. Returns what
    run_admin needs."""
    cm = by_kind(docs, "ConfigMap", PREFETCH_CONFIGMAP)
    check(
        f"the ConfigMap {PREFETCH_CONFIGMAP} with {PREFETCH_KEY} is in the render under that fixed name "
        "(no kustomize hash suffix: an edit updates it in place and rolls no pod)",
        cm is not None and PREFETCH_KEY in (cm.get("data") or {}),
        f"ConfigMaps: {[d['metadata']['name'] for d in docs if d['kind'] == 'ConfigMap']}",
        key="prefetch-configmap",
    )
    bad = prefetch_lines_bad((cm or {}).get("data", {}).get(PREFETCH_KEY) or "")
    check(
        f"every line of {PREFETCH_KEY} is `REF [PLATFORM] [pin]` (a line that is not is skipped by serve, "
        "with a warning in the log only)",
        not bad,
        "; ".join(bad),
        key="prefetch-lines",
    )
    path = s.get("--prefetch-file", "")
    f = volume_file(docs, spec, main_c, path)
    volumes = {v["name"]: v for v in spec.get("volumes", []) or []}
    sub = [
        m for m in main_c.get("volumeMounts", []) or []
        if m.get("subPath")
        and ((volumes.get(m["name"]) or {}).get("configMap") or {}).get("name") == PREFETCH_CONFIGMAP
    ]
    check(
        f"REGPROXY_PREFETCH_FILE is {PREFETCH_KEY} of the ConfigMap {PREFETCH_CONFIGMAP}, in a directory mount of it, "
        "read-only, never subPath (a subPath mount never receives a ConfigMap's updates)",
        path
        and "--prefetch-file" not in flags(main_c)
        and f["kind"] == "ConfigMap"
        and cm is not None
        and f["object"] is cm
        and f["key"] == PREFETCH_KEY
        and f["value"] is not None
        and f["mount"].get("readOnly") is True
        and not f["mount"].get("subPath")
        and not sub,
        describe(path, f) + (f", subPath mounts {sub}" if sub else ""),
        key="prefetch-dir-mount",
    )

    token_path = s.get("--admin-token-file", "")
    t = volume_file(docs, spec, main_c, token_path)
    name = (t["object"] or {}).get("metadata", {}).get("name", "")
    suffix = name[len(ADMIN_TOKEN_SECRET) + 1:] if name.startswith(ADMIN_TOKEN_SECRET + "-") else ""
    check(
        "REGPROXY_ADMIN_TOKEN_FILE is a key of a Secret in the render, mounted read-only (no subPath), "
        "readable by its owner only",
        token_path and secret_file_ok(t) and "--admin-token-file" not in flags(main_c),
        describe(token_path, t),
        key="admin-token-mount",
    )
    check(
        f"the admin token's Secret is made by kustomize's secretGenerator ({ADMIN_TOKEN_SECRET}-<hash>): a new "
        "token is a new name, which rolls the pods (serve reads the token at start)",
        len(suffix) == 10 and suffix.isalnum(),
        f"Secret {name!r}",
        key="admin-token-generated",
    )
    token = (t["value"] or b"").strip()
    check(
        f"the rendered admin token is printable ASCII without spaces, at least {ADMIN_TOKEN_MIN} bytes (regproxy "
        "refuses anything else), and is not the peer secret (whoever holds that gets no admin rights with it)",
        len(token) >= ADMIN_TOKEN_MIN and all(0x21 <= b <= 0x7E for b in token) and token != peer_secret,
        f"{len(token)} bytes, same as the peer secret: {token == peer_secret}",
        key="admin-token-value",
    )

    # The CLI in the pod (`kubectl exec ... -- /regproxy cache ls`) asks
    # REGPROXY_ADMIN with the token REGPROXY_ADMIN_TOKEN_FILE names: this
    # node's admin listener, which is on the node's address, not loopback.
    url = s.get("--admin", "")
    want = f"http://{admin_listen}"
    host = admin_listen.rpartition(":")[0]
    _, order, var, field, before = host_var(env_list, host, "REGPROXY_ADMIN")
    check(
        f"REGPROXY_ADMIN is the admin listener, {want} (HOST_IP defined before it), so that the admin commands "
        "run in the pod reach this node's serve",
        url == want and field == "status.hostIP" and before,
        f"REGPROXY_ADMIN {url!r}, want {want!r}, env order {order}",
        key="admin-cli-url",
    )
    return {
        "prefetch": (cm or {}).get("data", {}).get(PREFETCH_KEY),
        "token": t["value"],
        "rate": s.get("--upstream-rate"),
    }


PREFETCH_REF = re.compile(r"^[a-z0-9][a-z0-9._/:-]*(@sha256:[0-9a-f]{64})?$")
PREFETCH_PLATFORM = re.compile(r"^[a-z0-9._-]+/[a-z0-9._-]+(/[a-z0-9._-]+)?$")


def prefetch_lines_bad(text):
    """The lines of a prefetch list that are not `REF [PLATFORM] [pin]`
    (`#` starts a comment anywhere), each as "line N: why". The shape only:
    serve's parser is the judge of a reference's finer grammar."""
    bad = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if len(words) == 3 and words[2] != "pin":
            why = f"`{words[2]}` is not `pin` (REF [PLATFORM] [pin], in that order)"
        elif len(words) > 3:
            why = "too many words"
        elif words and not PREFETCH_REF.match(words[0]):
            why = f"`{words[0]}` is not a reference ([HOST[:PORT]/]NAME[:TAG|@DIGEST], lower case)"
        elif len(words) >= 2 and words[1] != "pin" and not PREFETCH_PLATFORM.match(words[1]):
            why = f"`{words[1]}` is not a platform (os/arch[/variant]) nor `pin`"
        elif len(words) == 3 and words[1] == "pin":
            why = "`pin` before the platform"
        else:
            continue
        bad.append(f"line {n}: {why}")
    return bad


def git_secret_files(repo):
    """Every file a secretGenerator under deploy/ reads, as (path from the
    repository's root, tracked by git, ignored by git); None outside a git
    work tree (a release tarball)."""
    if subprocess.run(["git", "-C", str(repo), "rev-parse", "--is-inside-work-tree"],
                      capture_output=True).returncode != 0:
        return None
    out = []
    for k in sorted(repo.glob("deploy/**/kustomization.yaml")):
        for g in (yaml.safe_load(k.read_text()) or {}).get("secretGenerator") or []:
            for entry in g.get("files") or []:
                path = os.path.relpath(os.path.normpath(k.parent / entry.split("=", 1)[-1]), repo)
                tracked = subprocess.run(["git", "-C", str(repo), "ls-files", "--", path],
                                         capture_output=True, text=True).stdout.strip() != ""
                ignored = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", path]).returncode == 0
                out.append((path, tracked, ignored))
    return out


def check_git_files(files):
    """The secrets' values are never in git: each file a secretGenerator
    reads (the peer secret, the admin token, the prefetch credential) is
    ignored and untracked."""
    if files is None:
        check("the generated Secrets' files are not in git (no git work tree here: nothing to check)", True)
        return
    paths = [p for p, _, _ in files]
    bad = [(p, "tracked" if tracked else "not ignored") for p, tracked, ignored in files if tracked or not ignored]
    check(
        f"every file a secretGenerator reads is ignored by git and untracked, {', '.join(OPERATOR_FILES)} "
        "among them: no secret's value is ever committed",
        all(p in paths for p in OPERATOR_FILES) and not bad,
        f"files {paths}, wrong: {bad}",
        key="secrets-not-in-git",
    )


def check_components(docs):
    """deploy/ with its optional components (deploy/components): the
    prefetch credential a docker config.json from a Secret of type
    kubernetes.io/dockerconfigjson mounted read-only, the uplink budget set."""
    ds = by_kind(docs, "DaemonSet", "regproxy")
    spec = ds["spec"]["template"]["spec"]
    main_c = [c for c in spec["containers"] if c["name"] == "regproxy"][0]
    s = settings(main_c)
    path = s.get("--prefetch-auth-file", "")
    f = volume_file(docs, spec, main_c, path)
    check(
        "with components/prefetch-auth, REGPROXY_PREFETCH_AUTH_FILE is a key of a Secret in the render of type "
        "kubernetes.io/dockerconfigjson, mounted read-only (no subPath), readable by its owner only",
        path and secret_file_ok(f) and f["object"].get("type") == "kubernetes.io/dockerconfigjson"
        and f["key"] == ".dockerconfigjson",
        describe(path, f) + f", type {(f['object'] or {}).get('type')!r}",
        key="prefetch-auth-mount",
    )
    try:
        auths = json.loads(f["value"] or b"").get("auths")
    except (ValueError, AttributeError):
        auths = None
    check(
        "the rendered prefetch credential is a docker config.json with an `auths` entry",
        isinstance(auths, dict) and auths,
        f"auths: {auths!r}"[:200],
        key="prefetch-auth-json",
    )
    check(
        "with components/upstream-rate, REGPROXY_UPSTREAM_RATE is set",
        s.get("--upstream-rate") and "--upstream-rate" not in flags(main_c),
        str(s.get("--upstream-rate")),
        key="upstream-rate-set",
    )
    return {"main": main_c, "settings": s, "auth": f["value"]}


def port_of(addr):
    """The port of HOST:PORT as an int, or None."""
    port = str(addr).rpartition(":")[2]
    return int(port) if port.isdigit() else None


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_peers(docs, ds, main_c, s, env_list, listen, admin_listen):
    """Issue 11: the headless Service regproxy-peers over the DaemonSet's
    pods, the peer listener on the node's own address, and the shared
    secret mounted as a file. Returns what run_peer needs."""
    pod = ds["spec"]["template"]
    svc = by_kind(docs, "Service", PEER_SERVICE)
    check(f"the Service {PEER_SERVICE} exists", svc, key="peers-service")
    svc = svc or {"metadata": {}, "spec": {}}
    sspec = svc["spec"]
    check(
        f"{PEER_SERVICE} is headless (clusterIP: None): its A records are the pods' own addresses, "
        "with hostNetwork the nodes'",
        sspec.get("clusterIP") == "None",
        f"clusterIP: {sspec.get('clusterIP')}",
        key="peers-headless",
    )
    sel = sspec.get("selector") or {}
    others = [
        d["metadata"]["name"]
        for d in docs
        if d is not ds and d["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job", "Pod")
        and selects(sel, ((d["spec"].get("template") or d).get("metadata") or {}).get("labels") or {})
    ]
    check(
        f"{PEER_SERVICE} selects the DaemonSet's pods and no other workload's",
        selects(sel, pod["metadata"].get("labels") or {}) and not others,
        f"selector {sel}, pod labels {pod['metadata'].get('labels')}, also selects {others}",
        key="peers-selector",
    )
    check(
        f"{PEER_SERVICE} publishes Ready pods only (no publishNotReadyAddresses: a pod starting or "
        "terminating is no owner)",
        not sspec.get("publishNotReadyAddresses"),
        key="peers-ready-only",
    )

    peers = s.get("--peers", "")
    peer_listen = s.get("--peer-listen", "")
    peer_host, _, _ = peer_listen.rpartition(":")
    peer_port = port_of(peer_listen)
    ports = sspec.get("ports") or []
    check(
        f"the one port of {PEER_SERVICE} is REGPROXY_PEER_LISTEN's, TCP, with a numeric targetPort "
        "(the pods declare no port a name could match)",
        len(ports) == 1
        and ports[0].get("protocol", "TCP") == "TCP"
        and ports[0].get("port") == peer_port
        and ports[0].get("targetPort", ports[0].get("port")) == peer_port,
        f"ports {ports}, peer listen {peer_listen!r}",
        key="peers-port",
    )
    want = f"dns:{PEER_SERVICE}.{svc['metadata'].get('namespace', 'default')}.svc.cluster.local:{peer_port}"
    check(
        f"REGPROXY_PEERS is the DNS name of {PEER_SERVICE} in its namespace, with the peer port",
        peers == want,
        f"{peers!r}, want {want!r}",
        key="peers-dns-name",
    )
    env, order, var, field, before = host_var(env_list, peer_host, "REGPROXY_PEER_LISTEN")
    check(
        "the peer listener is on the node's own address, from status.hostIP (defined before it is used): "
        "the address the other nodes resolve, and the one this node finds itself by among them",
        field == "status.hostIP" and before,
        f"peer listen {peer_listen!r}, env {var}: {env.get(var)}, order {order}",
        key="peer-listen-host-ip",
    )
    check(
        "the peer listener is not on loopback (other nodes must reach it); the API is",
        peer_listen
        and not peer_host.startswith("127.")
        and peer_host.strip("[]") not in ("::1", "localhost")
        and listen.rpartition(":")[0].startswith("127."),
        f"peer listen {peer_listen!r}, listen {listen!r}",
        key="peer-not-loopback",
    )
    check(
        "the peer port differs from the API's and the admin port",
        peer_port is not None and peer_port not in (port_of(listen), port_of(admin_listen)),
        f"peer {peer_listen!r}, listen {listen!r}, admin {admin_listen!r}",
        key="peer-port-distinct",
    )

    # The secret: a file from a Secret in the render, read-only, root's only.
    path = s.get("--peer-secret-file", "")
    f = volume_file(docs, pod["spec"], main_c, path)
    check(
        "REGPROXY_PEER_SECRET_FILE is a key of a Secret in the render, mounted read-only (no subPath), "
        "readable by its owner only",
        path and secret_file_ok(f) and "--peer-secret-file" not in flags(main_c),
        describe(path, f),
        key="peer-secret-mount",
    )
    value = (f["value"] or b"").strip()
    check(
        f"the rendered peer secret is printable ASCII without spaces, at least {PEER_SECRET_MIN} bytes "
        "(regproxy refuses anything else)",
        len(value) >= PEER_SECRET_MIN and all(0x21 <= b <= 0x7E for b in value),
        f"{len(value)} bytes",
        key="peer-secret-length",
    )
    check(
        "the peers' name is resolved as the upstream's is, by DNS only, never the node's /etc/hosts "
        "(regproxy resolves a dns: peer name with the --upstream-resolver)",
        not peers.startswith("dns:") or s.get("--upstream-resolver") == "dns",
        f"--upstream-resolver {s.get('--upstream-resolver')!r}",
        key="peers-resolver",
    )
    return {
        "listen": peer_listen,
        "peers": peers,
        "timeout": s.get("--peer-timeout"),
        "resolver": s.get("--upstream-resolver"),
        "secret": value,
    }


def run_commands(binary, ctx, comp=None):
    """The manifests' own settings and commands, run by the real binary."""
    main_c, s = ctx["main"], ctx["settings"]

    def help_of(*cmd):
        r = subprocess.run([binary, *cmd, "--help"], capture_output=True, text=True)
        return r.returncode, r.stdout

    _, serve_help = help_of("serve")
    unknown = [k for k in flags(main_c) if k.startswith("--") and f"{k} " not in serve_help and f"{k}=" not in serve_help]
    check("every flag the DaemonSet passes to `regproxy serve` exists", not unknown, f"unknown: {unknown}")
    env_names = [e["name"] for e in main_c.get("env", []) if e["name"].startswith("REGPROXY_")]
    unread = [n for n in env_names if f"[env: {n}=" not in serve_help and n not in CLI_VARS]
    check(
        "`regproxy serve` reads every REGPROXY_* variable the DaemonSet sets (but REGPROXY_ADMIN, the admin "
        "commands' own)",
        not unread,
        f"not read: {unread}",
    )
    _, cache_help = help_of("cache")
    listed = cache_help.partition("Commands:")[2].partition("\n\n")[0].split("\n")
    cache_cmds = [["cache", line.split()[0]] for line in listed if line.strip() and line.split()[0] != "help"]
    for cmd in ADMIN_COMMANDS + [c for c in cache_cmds if c not in ADMIN_COMMANDS]:
        code, cmd_help = help_of(*cmd)
        unread = [n for n in CLI_VARS if f"[env: {n}=" not in cmd_help]
        check(
            f"`regproxy {' '.join(cmd)}` reads {' and '.join(CLI_VARS)}, which the DaemonSet sets for it",
            code == 0 and not unread,
            f"exit {code}, not read: {unread}",
        )
    code, doctor_help = help_of("doctor")
    want = [env_flag(n) for n in env_names if env_flag(n) in DOCTOR_SETTINGS + DOCTOR_OPTIONAL]
    missing = [k for k in want if f"{k} " not in doctor_help and f"{k}=" not in doctor_help]
    check(
        "`regproxy doctor` takes the node-path settings the DaemonSet gives serve",
        code == 0 and not missing,
        f"doctor --help exit {code}, missing: {missing}",
    )
    for c in ctx["inits"]:
        code, _ = help_of(*c["args"][:1])
        check(f"init container {c['name']}: `regproxy {c['args'][0]}` exists", code == 0, f"exit {code}")
    cmds = sorted({tuple(str(a) for a in ((main_c.get(p) or {}).get("exec") or {}).get("command") or [])[1:2]
                   for p in PROBES} - {()})
    for (sub,) in cmds:
        code, probe_help = help_of(sub)
        check(
            f"the probes' `regproxy {sub}` exists and reads REGPROXY_PROBE_SOCKET",
            code == 0 and "[env: REGPROXY_PROBE_SOCKET=" in probe_help,
            f"`regproxy {sub} --help` exit {code}",
        )

    run_probes(binary, main_c, s.get("--probe-socket"))
    run_peer(binary, ctx["peer"])
    run_admin(binary, ctx["admin"], comp)

    with tempfile.TemporaryDirectory() as tmp:
        node = Path(tmp)
        hosts = node / "hosts"
        original = b"127.0.0.1 localhost\n::1 localhost ip6-localhost\n10.0.0.4 node-1"
        hosts.write_bytes(original)
        certs = node / "certs.d"
        certs.mkdir()
        remap = {"--hosts-file": str(hosts), "--certs-dir": str(certs)}

        def run(args):
            args = [a.split("=", 1)[0] + "=" + remap[a.split("=", 1)[0]] if a.split("=", 1)[0] in remap else a for a in args]
            return subprocess.run([binary, *args], capture_output=True, text=True)

        # What serve keeps on the node, with the DaemonSet's name and
        # address: `regproxy hosts` writes it the same way. The fallback
        # server is the upstream Service's cluster IP, which serve resolves
        # at run time; a stand-in here.
        listen = s.get("--listen", "")
        name = s.get("--registry-name", "")
        server = s.get("--containerd-server") or "http://10.96.0.57:5000"
        setup = [
            ["hosts", "ensure", "--hosts-file=", f"--name={name}", f"--address={listen.rpartition(':')[0]}"],
            ["hosts", "containerd", "ensure", "--certs-dir=", f"--name={name}", f"--endpoint=http://{listen}", f"--server={server}"],
        ]
        for args in setup:
            for attempt in ("first", "second"):
                r = run(args)
                check(f"`regproxy {' '.join(args[:3])}` for the DaemonSet's name succeeds ({attempt} run)", r.returncode == 0, r.stderr.strip())
        check("after set-up the node's hosts file maps the name", NAME.encode() in hosts.read_bytes())
        check("after set-up containerd has a hosts.toml for the name", (certs / NAME / "hosts.toml").is_file())
        for c in ctx["uninstall"]:
            r = run(c["args"])
            check(f"uninstall container {c['name']} succeeds", r.returncode == 0, r.stderr.strip())
        check("after uninstall the hosts file has its exact original bytes", hosts.read_bytes() == original)
        check("after uninstall certs.d is as it was", not any(certs.iterdir()))


def run_probes(binary, main_c, socket):
    """The DaemonSet's probe commands, run by the real binary against a
    `serve` with its probe socket moved into a scratch dir: they must fail
    while no process answers there and pass once one does."""
    if not socket:
        return
    commands = {n: [str(a) for a in ((main_c.get(n) or {}).get("exec") or {}).get("command") or []] for n in PROBES}
    commands = {n: [str(binary), *c[1:]] for n, c in commands.items() if c}
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGPROXY_")}
        env["REGPROXY_PROBE_SOCKET"] = str(Path(tmp) / Path(socket).name)

        def probe(cmd):
            try:
                return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=10)
            except subprocess.TimeoutExpired as e:
                return subprocess.CompletedProcess(cmd, "timeout", "", str(e))

        for name, cmd in commands.items():
            r = probe(cmd)
            check(
                f"the {name}'s command fails while no regproxy answers on the socket",
                r.returncode not in (0, "timeout"),
                f"exit {r.returncode}",
            )
        serve = subprocess.Popen(
            [str(binary), "serve", "--listen=127.0.0.1:0", "--upstream=http://127.0.0.1:9",
             f"--cache-dir={tmp}/cache", "--log-format=text"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        # serve binds the probe socket before it logs "regproxy listening";
        # its log lines are what this waits on (a timer ends a hung start).
        killer = threading.Timer(60, serve.kill)
        killer.start()
        log = []
        try:
            for line in serve.stderr:
                log.append(line.rstrip())
                if "regproxy listening" in line:
                    break
            started = log and "regproxy listening" in log[-1]
            check("`regproxy serve` starts with the DaemonSet's probe socket", started, " | ".join(log[-3:]))
            for name, cmd in commands.items():
                r = probe(cmd) if started else None
                check(
                    f"the {name}'s command `{' '.join(cmd[1:])}` passes against that serve",
                    r is not None and r.returncode == 0,
                    r and f"exit {r.returncode}: " + " | ".join(x for x in (r.stdout + r.stderr).splitlines() if x.strip()),
                )
        finally:
            killer.cancel()
            serve.terminate()
            try:
                serve.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.communicate()


def serve_until_listening(binary, args, env):
    """Starts `regproxy serve`; returns (process, log lines so far, started)
    once it logs "regproxy listening" or ends (a timer ends a hung start)."""
    serve = subprocess.Popen(
        [str(binary), "serve", *args],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    killer = threading.Timer(60, serve.kill)
    killer.start()
    log = []
    for line in serve.stderr:
        log.append(line.rstrip())
        if "regproxy listening" in line:
            break
    killer.cancel()
    return serve, log, bool(log) and "regproxy listening" in log[-1]


def stop(serve):
    serve.terminate()
    try:
        serve.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        serve.kill()
        serve.communicate()


def peer_get(addr, secret):
    """GET /v2/ on the peer listener; (status, WWW-Authenticate)."""
    req = urllib.request.Request(f"http://{addr}/v2/")
    if secret is not None:
        req.add_header("Authorization", "Bearer " + secret.decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("WWW-Authenticate")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("WWW-Authenticate")
    except OSError as e:
        return str(e), None


def host_var(env_list, host, used_by):
    """For a listen host written `$(VAR)`: the container's env by name, the
    names in order, VAR, the field VAR comes from (downward API), and whether
    VAR is defined before `used_by` ($(VAR) in an env value expands only to
    variables defined before it)."""
    env = {e["name"]: e for e in env_list}
    order = [e["name"] for e in env_list]
    var = host[2:-1] if host.startswith("$(") and host.endswith(")") else None
    field = env.get(var, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") if var else None
    before = var in order and (used_by not in order or order.index(var) < order.index(used_by))
    return env, order, var, field, before


def free_peer_listen(peers):
    """A loopback address with the peer port of `peers` (`dns:NAME:PORT`:
    serve wants --peer-listen on that port, so that a node finds itself
    among the name's addresses) that nothing listens on now."""
    port = int(peers.rsplit(":", 1)[1]) if peers.startswith("dns:") else 0
    for last in range(1, 255):
        ip = f"127.0.77.{last}"
        with socket.socket() as s:
            try:
                s.bind((ip, port))
            except OSError:
                continue
            return f"{ip}:{s.getsockname()[1]}"
    raise SystemExit("no free loopback address for the peer listener in 127.0.77.0/24")


def run_peer(binary, peer):
    """`serve` with the DaemonSet's peer settings (REGPROXY_PEERS as it is,
    the peer listener moved to a free loopback address on the peer port) and the rendered secret in a
    0400 file: the peer port answers only with the secret. With the secret
    file missing, or shorter than regproxy accepts, serve exits 2 at start
    with one line (a pod with a broken Secret fails loudly, it does not run
    without peers)."""
    if not peer.get("peers"):
        return
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGPROXY_")}
        env.update({
            "REGPROXY_PEERS": peer["peers"],
            "REGPROXY_PEER_LISTEN": free_peer_listen(peer["peers"]),
            "REGPROXY_PEER_SECRET_FILE": f"{tmp}/secret",
        })
        for var, key in (("REGPROXY_PEER_TIMEOUT", "timeout"), ("REGPROXY_UPSTREAM_RESOLVER", "resolver")):
            if peer.get(key):
                env[var] = peer[key]
        args = ["--listen=127.0.0.1:0", "--upstream=http://127.0.0.1:9", f"--cache-dir={tmp}/cache",
                "--log-format=text"]
        for what, content in (("missing", None), ("shorter than 16 bytes", b" 0123456789abcde\n")):
            Path(f"{tmp}/secret").unlink(missing_ok=True)
            if content is not None:
                Path(f"{tmp}/secret").write_bytes(content)
            try:
                r = subprocess.run([str(binary), "serve", *args], env=env, capture_output=True, text=True,
                                   timeout=20)
                code, err = r.returncode, r.stderr.strip().splitlines()
            except subprocess.TimeoutExpired:
                code, err = "timeout", []
            check(
                f"`regproxy serve` with the peer secret file {what} exits 2 with one line",
                code == 2 and len(err) == 1,
                f"exit {code}: {err}",
            )
        secret_file = Path(f"{tmp}/secret")
        secret_file.write_bytes(peer["secret"] + b"\n")
        secret_file.chmod(0o400)
        serve, log, started = serve_until_listening(binary, args, env)
        try:
            check("`regproxy serve` starts with the DaemonSet's peer settings and the rendered secret", started,
                  " | ".join(log[-3:]))
            # Every listener is bound before serve logs "regproxy listening".
            addr = env["REGPROXY_PEER_LISTEN"] if started else None
            if addr:
                status, challenge = peer_get(addr, None)
                check(
                    "the peer port answers 401 without the secret",
                    status == 401 and "regproxy-peers" in (challenge or ""),
                    f"{status} {challenge}",
                )
                status, _ = peer_get(addr, b"x" * len(peer["secret"]))
                check("the peer port answers 401 with a wrong secret", status == 401, str(status))
                status, _ = peer_get(addr, peer["secret"])
                check("the peer port answers GET /v2/ with the rendered secret", status == 200, str(status))
        finally:
            stop(serve)


RATE_UNITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "Mbit": 1e6 / 8, "Gbit": 1e9 / 8, "B": 1, "kB": 1e3, "KB": 1e3,
              "MB": 1e6, "GB": 1e9, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def rate_bytes(rate):
    """`20Mbit/s` -> 2500000 (bytes per second), for what the manifests
    write; None for anything else."""
    rate = (rate or "off").strip()
    if rate.lower() in ("off", "0", "unlimited"):
        return 0
    if not rate.endswith("/s"):
        return None
    number, unit = rate.removesuffix("/s").strip(), None
    if number.isdigit():
        return int(number)
    for u in sorted(RATE_UNITS, key=len, reverse=True):
        if number.endswith(u):
            number, unit = number[: -len(u)].strip(), u
            break
    try:
        return round(float(number) * RATE_UNITS[unit]) if unit else None
    except ValueError:
        return None


def admin_get(addr, path, token):
    """GET on the admin listener, with `Authorization: Bearer token` unless
    None; (status, body as JSON or None)."""
    req = urllib.request.Request(f"http://{addr}{path}")
    if token is not None:
        req.add_header("Authorization", "Bearer " + token.decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except OSError as e:
        return str(e), None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def run_admin(binary, admin, comp):
    """`serve` with the DaemonSet's admin and prefetch settings as the pod
    has them: the rendered token in a 0400 file, the rendered prefetch.txt
    in a directory, and with the components' render also its upstream rate
    and prefetch credential. The admin API refuses a request without the
    token and answers one with it, the rate in force is the one the
    manifests set, and the CLI with the DaemonSet's variables reaches it. A
    token file missing or too short stops serve at start with one line."""
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            admin_addr = f"127.0.0.1:{probe.getsockname()[1]}"
        token_file = Path(f"{tmp}/admin/token")
        token_file.parent.mkdir()
        prefetch = Path(f"{tmp}/prefetch/{PREFETCH_KEY}")
        prefetch.parent.mkdir()
        prefetch.write_text(admin["prefetch"] or "")
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGPROXY_")}
        env.update({
            "REGPROXY_ADMIN_LISTEN": admin_addr,
            "REGPROXY_ADMIN_TOKEN_FILE": str(token_file),
            "REGPROXY_PREFETCH_FILE": str(prefetch),
        })
        rate = admin["rate"]
        if comp:
            rate = comp["settings"].get("--upstream-rate")
            env["REGPROXY_UPSTREAM_RATE"] = rate
            auth = Path(f"{tmp}/auth/config.json")
            auth.parent.mkdir()
            auth.write_bytes(comp["auth"] or b"")
            auth.chmod(0o400)
            env["REGPROXY_PREFETCH_AUTH_FILE"] = str(auth)
        elif rate:
            env["REGPROXY_UPSTREAM_RATE"] = rate
        args = ["--listen=127.0.0.1:0", "--upstream=http://127.0.0.1:9", f"--cache-dir={tmp}/cache",
                "--log-format=text"]
        for what, content in (("missing", None), ("shorter than 16 characters", b" 0123456789abcde\n")):
            token_file.unlink(missing_ok=True)
            if content is not None:
                token_file.write_bytes(content)
            try:
                r = subprocess.run([str(binary), "serve", *args], env=env, capture_output=True, text=True,
                                   timeout=20)
                code, err = r.returncode, r.stderr.strip().splitlines()
            except subprocess.TimeoutExpired:
                code, err = "timeout", []
            check(
                f"`regproxy serve` with the admin token file {what} exits 2 with one line",
                code == 2 and len(err) == 1,
                f"exit {code}: {err}",
            )
        token_file.unlink(missing_ok=True)
        token_file.write_bytes(admin["token"] or b"")
        token_file.chmod(0o400)
        if comp:
            # A credential serve cannot use stops it before anything is
            # bound: a pod with a broken Secret fails loudly.
            auth.chmod(0o600)
            auth.write_bytes(b"user:password\n")
            try:
                r = subprocess.run([str(binary), "serve", *args], env=env, capture_output=True, text=True,
                                   timeout=20)
                code, err = r.returncode, r.stderr.strip().splitlines()
            except subprocess.TimeoutExpired:
                code, err = "timeout", []
            check(
                "`regproxy serve` with a prefetch credential that is not a docker config.json exits non-zero "
                "with one line naming --prefetch-auth-file",
                code not in (0, "timeout") and len(err) == 1 and "--prefetch-auth-file" in err[0],
                f"exit {code}: {err}",
            )
            auth.write_bytes(comp["auth"] or b"")
            auth.chmod(0o400)
        token = (admin["token"] or b"").strip()
        want = rate_bytes(rate)
        serve, log, started = serve_until_listening(binary, args, env)
        try:
            check(
                "`regproxy serve` starts with the DaemonSet's admin token, prefetch list"
                + (", upstream rate and prefetch credential" if comp else ""),
                started,
                " | ".join(log[-3:]),
            )
            if not started:
                return
            status, body = admin_get(admin_addr, "/admin/rate", None)
            check("the admin API answers 401 without the token", status == 401, f"{status} {body}")
            status, body = admin_get(admin_addr, "/admin/rate", b"x" * len(token))
            check("the admin API answers 401 with a wrong token", status == 401, f"{status} {body}")
            status, body = admin_get(admin_addr, "/admin/rate", token)
            check(
                f"GET /admin/rate with the rendered token answers the rate the manifests set "
                f"({rate or 'none'}: {want} bytes/s)",
                status == 200 and isinstance(body, dict) and body.get("rate") == want,
                f"{status} {body}",
            )
            status, body = admin_get(admin_addr, "/metrics", None)
            check(
                f"/metrics needs no token, and shows regproxy_upstream_rate_bytes {want}",
                status == 200 and f"\nregproxy_upstream_rate_bytes {want}\n" in f"\n{body}",
                f"{status}",
            )
            cli = {**env, "REGPROXY_ADMIN": f"http://{admin_addr}"}
            r = subprocess.run([str(binary), "rate", "--json"], env=cli, capture_output=True, text=True, timeout=30)
            try:
                answer = json.loads(r.stdout)
            except ValueError:
                answer = None
            check(
                "`regproxy rate` with REGPROXY_ADMIN and REGPROXY_ADMIN_TOKEN_FILE (the pod's variables) asks "
                "that serve",
                r.returncode == 0 and isinstance(answer, dict) and answer.get("rate") == want,
                f"exit {r.returncode}: {r.stdout.strip()} {r.stderr.strip()}",
            )
            wrong = Path(f"{tmp}/wrong-token")
            wrong.write_bytes(b"y" * max(len(token), ADMIN_TOKEN_MIN))
            r = subprocess.run([str(binary), "rate"], env={**cli, "REGPROXY_ADMIN_TOKEN_FILE": str(wrong)},
                               capture_output=True, text=True, timeout=30)
            check("`regproxy rate` with another token is refused (exit 1)", r.returncode == 1,
                  f"exit {r.returncode}: {r.stderr.strip()}")
        finally:
            stop(serve)


# --- self-test: each guard fails on the manifests with its mistake made ---

def _ds(docs):
    return by_kind(docs, "DaemonSet", "regproxy")


def _main(docs):
    return [c for c in _ds(docs)["spec"]["template"]["spec"]["containers"] if c["name"] == "regproxy"][0]


def _env(docs, name, value):
    for e in _main(docs)["env"]:
        if e["name"] == name:
            e["value"] = value


def _pod(docs):
    return _ds(docs)["spec"]["template"]["spec"]


def _rolling(docs):
    return _ds(docs)["spec"]["updateStrategy"]["rollingUpdate"]


def _set(obj, key, value):
    obj[key] = value


def _file_mount(docs):
    spec = _pod(docs)
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "host-etc"] + [
        {"name": "host-etc", "hostPath": {"path": "/etc/hosts", "type": "File"}}
    ]
    for m in _main(docs)["volumeMounts"]:
        if m["name"] == "host-etc":
            m["mountPath"] = "/host/etc/hosts"


def _env_to_arg(docs):
    c = _main(docs)
    c["env"] = [e for e in c["env"] if e["name"] != "REGPROXY_REGISTRY_NAME"]
    c["args"] = c["args"] + [f"--registry-name={NAME}"]


def _host_ip_late(docs):
    c = _main(docs)
    c["env"] = [e for e in c["env"] if e["name"] != "HOST_IP"] + [e for e in c["env"] if e["name"] == "HOST_IP"]


def _probe_cmd(docs, probe, command):
    _main(docs)[probe] = {"exec": {"command": command}, "periodSeconds": 5, "failureThreshold": 60}


def _socket_volume(docs):
    """The name of the volume mounted where REGPROXY_PROBE_SOCKET lies."""
    c = _main(docs)
    sock = [e["value"] for e in c["env"] if e["name"] == "REGPROXY_PROBE_SOCKET"][0]
    mounts = [m for m in c["volumeMounts"] if sock.startswith(m["mountPath"].rstrip("/") + "/")]
    return max(mounts, key=lambda m: len(m["mountPath"]))["name"]


def _other_name(docs):
    _env(docs, "REGPROXY_REGISTRY_NAME", "registry.corp.internal")
    _main(docs)["image"] = "registry.corp.internal:80/regproxy@sha256:" + "0" * 64


def _peers_svc(docs):
    return by_kind(docs, "Service", PEER_SERVICE)


def _peer_volume(docs):
    return _volume_of(docs, "regproxy-peer-secret")


def _peer_mount(docs):
    name = _peer_volume(docs)["name"]
    return [m for m in _main(docs)["volumeMounts"] if m["name"] == name][0]


def _secret_value(docs, value, source="regproxy-peer-secret"):
    """Every key of the Secret named `source`-<hash> set to `value`."""
    secret = by_kind(docs, "Secret", _volume_of(docs, source)["secret"]["secretName"])
    for k in secret["data"]:
        secret["data"][k] = base64.b64encode(value).decode()


def _short_secret(docs):
    _secret_value(docs, b"  short-secret\n")


def _host_ip_after(docs, name):
    """HOST_IP moved to just after the variable `name` that uses it."""
    c = _main(docs)
    host_ip = [e for e in c["env"] if e["name"] == "HOST_IP"]
    rest = [e for e in c["env"] if e["name"] != "HOST_IP"]
    at = [e["name"] for e in rest].index(name) + 1
    c["env"] = rest[:at] + host_ip + rest[at:]


def _drop_env(docs, name):
    c = _main(docs)
    c["env"] = [e for e in c["env"] if e["name"] != name]


def _volume_of(docs, source):
    """The pod's volume of a ConfigMap ("configMap": the prefetch list's) or
    of the Secret whose name starts with `source`."""
    for v in _pod(docs)["volumes"]:
        if source == "configMap" and v.get("configMap", {}).get("name", "").startswith(PREFETCH_CONFIGMAP):
            return v
        if v.get("secret", {}).get("secretName", "").startswith(source):
            return v
    raise KeyError(source)


def _mount_of(docs, source):
    name = _volume_of(docs, source)["name"]
    return [m for m in _main(docs)["volumeMounts"] if m["name"] == name][0]


def _rename(docs, kind, old, new):
    """Renames an object and the pod's references to it."""
    by_kind(docs, kind, old)["metadata"]["name"] = new
    for v in _pod(docs)["volumes"]:
        ref = v.get("configMap") if kind == "ConfigMap" else v.get("secret")
        field = "name" if kind == "ConfigMap" else "secretName"
        if ref and ref.get(field) == old:
            ref[field] = new


def _prefetch_line(docs, line):
    """The prefetch ConfigMap with good lines and then `line` added."""
    data = by_kind(docs, "ConfigMap", PREFETCH_CONFIGMAP)["data"]
    data[PREFETCH_KEY] += ("team/app:v2\nteam/base:stable pin  # a comment\n"
                           "knative.registry.svc.cluster.local/team/db@sha256:" + "0" * 64 + " linux/arm64/v8 pin\n"
                           + line + "\n")


def _prefetch_subpath(docs):
    m = _mount_of(docs, "configMap")
    m["mountPath"] = m["mountPath"].rstrip("/") + "/" + PREFETCH_KEY
    m["subPath"] = PREFETCH_KEY


def _git_file(files, path, **change):
    """The git facts with one file's tracked/ignored changed."""
    return [(p, change.get("tracked", t), change.get("ignored", i)) if p == path else (p, t, i) for p, t, i in files]


MUTATIONS = [
    ("the image pulled through the registry name", "image-not-proxied",
     lambda d: _set(_main(d), "image", f"{NAME}/regproxy:0.1.0")),
    ("the image pulled through another mapped name (REGPROXY_REGISTRY_NAME), with a port and digest",
     "image-not-proxied", _other_name),
    ("the init container's image from the in-cluster upstream's name", "image-not-proxied",
     lambda d: _set(_pod(d)["initContainers"][0], "image", "registry-upstream.registry.svc.cluster.local:5000/regproxy:1")),
    ("a named admin port declared, with maxSurge 1", "no-host-ports-with-surge",
     lambda d: _set(_main(d), "ports", [{"name": "admin", "containerPort": 9477}])),
    ("a hostPort on the init container, with maxSurge 25%", "no-host-ports-with-surge",
     lambda d: (_set(_pod(d)["initContainers"][0], "ports", [{"containerPort": 80, "hostPort": 80}]),
                _set(_rolling(d), "maxSurge", "25%"))),
    ("maxUnavailable: 1", "max-unavailable-0", lambda d: _set(_rolling(d), "maxUnavailable", 1)),
    ("maxUnavailable: 10%", "max-unavailable-0", lambda d: _set(_rolling(d), "maxUnavailable", "10%")),
    ("maxSurge: 0", "max-surge", lambda d: _set(_rolling(d), "maxSurge", 0)),
    ("no minReadySeconds", "min-ready", lambda d: _ds(d)["spec"].pop("minReadySeconds")),
    ("no Pod Security label on the namespace", "psa-privileged",
     lambda d: by_kind(d, "Namespace", "registry")["metadata"].pop("labels")),
    ("the namespace enforcing baseline", "psa-privileged",
     lambda d: _set(by_kind(d, "Namespace", "registry")["metadata"]["labels"],
                    "pod-security.kubernetes.io/enforce", "baseline")),
    ("no nodeSelector", "linux-only", lambda d: _pod(d).pop("nodeSelector")),
    ("a nodeSelector for windows", "linux-only",
     lambda d: _set(_pod(d), "nodeSelector", {"kubernetes.io/os": "windows"})),
    ("no startupProbe", "startup-probe", lambda d: _main(d).pop("startupProbe")),
    ("a startupProbe of 30s", "startup-budget",
     lambda d: _set(_main(d)["startupProbe"], "failureThreshold", 6)),
    ("a startupProbe on readyz (a failing node-path check would restart the pod)", "startup-probe",
     lambda d: _probe_cmd(d, "startupProbe", ["/regproxy", "probe", "readyz"])),
    ("the liveness probe on readyz", "livenessProbe-exec",
     lambda d: _probe_cmd(d, "livenessProbe", ["/regproxy", "probe", "readyz"])),
    ("the readiness probe as httpGet /readyz on the shared admin port", "probe-not-shared",
     lambda d: _set(_main(d), "readinessProbe", {"httpGet": {"path": "/readyz", "port": 9477}, "periodSeconds": 5})),
    ("the readiness probe as httpGet /readyz on the shared admin port", "readinessProbe-exec",
     lambda d: _set(_main(d), "readinessProbe", {"httpGet": {"path": "/readyz", "port": 9477}, "periodSeconds": 5})),
    ("the liveness probe as tcpSocket on the admin port", "probe-not-shared",
     lambda d: _set(_main(d), "livenessProbe", {"tcpSocket": {"port": 9477}, "periodSeconds": 10})),
    ("the startup probe as httpGet /healthz", "probe-not-shared",
     lambda d: _set(_main(d), "startupProbe",
                    {"httpGet": {"path": "/healthz", "port": 9477}, "periodSeconds": 5, "failureThreshold": 60})),
    ("the readiness probe exec'ing curl on the admin port", "readinessProbe-exec",
     lambda d: _probe_cmd(d, "readinessProbe", ["curl", "-f", "http://127.0.0.1:9477/readyz"])),
    ("no REGPROXY_PROBE_SOCKET", "probe-socket",
     lambda d: _set(_main(d), "env", [e for e in _main(d)["env"] if e["name"] != "REGPROXY_PROBE_SOCKET"])),
    ("the probe socket in the cache's hostPath (shared by the old and the new pod)", "probe-socket",
     lambda d: _env(d, "REGPROXY_PROBE_SOCKET", "/var/lib/regproxy/admin.sock")),
    ("the probe socket on no volume (read-only root filesystem)", "probe-socket",
     lambda d: _env(d, "REGPROXY_PROBE_SOCKET", "/tmp/admin.sock")),
    ("the probe socket's emptyDir mounted read-only", "probe-socket",
     lambda d: [_set(m, "readOnly", True) for m in _main(d)["volumeMounts"] if m["name"] == _socket_volume(d)]),
    ("the readiness probe asking another socket than serve's", "probe-socket",
     lambda d: _probe_cmd(d, "readinessProbe", ["/regproxy", "probe", "readyz", "--socket", "/run/other.sock"])),
    ("/etc/hosts bind-mounted as a file", "etc-dir-mount", _file_mount),
    ("no sysctl init container", "sysctl-init", lambda d: _pod(d).pop("initContainers")),
    ("the sysctl init container unprivileged", "sysctl-init",
     lambda d: _set(_pod(d)["initContainers"][0], "securityContext", {"runAsUser": 0})),
    ("terminationGracePeriodSeconds below --shutdown-grace", "grace",
     lambda d: _set(_pod(d), "terminationGracePeriodSeconds", 20)),
    ("--registry-name as a flag (doctor would not see it)", "settings-in-env", _env_to_arg),
    ("HOST_IP defined after the value that uses it", "admin-host-ip", _host_ip_late),
    # Peers (issue 11).
    ("dnsPolicy: ClusterFirst (a hostNetwork pod gets the node's resolver: no regproxy-peers)", "cluster-dns",
     lambda d: _set(_pod(d), "dnsPolicy", "ClusterFirst")),
    ("the API on the node's address", "api-loopback", lambda d: _env(d, "REGPROXY_LISTEN", "$(HOST_IP):80")),
    ("no regproxy-peers Service", "peers-service", lambda d: d.remove(_peers_svc(d))),
    ("regproxy-peers with a cluster IP (one virtual address, not the nodes')", "peers-headless",
     lambda d: _peers_svc(d)["spec"].pop("clusterIP")),
    ("regproxy-peers selecting the registry's pods", "peers-selector",
     lambda d: _set(_peers_svc(d)["spec"], "selector", {"app.kubernetes.io/name": "registry"})),
    ("regproxy-peers selecting by the part-of label (the registry's pods too)", "peers-selector",
     lambda d: _set(_peers_svc(d)["spec"], "selector", {"app.kubernetes.io/part-of": "regproxy"})),
    ("regproxy-peers publishing not-ready pods", "peers-ready-only",
     lambda d: _set(_peers_svc(d)["spec"], "publishNotReadyAddresses", True)),
    ("regproxy-peers on another port than the peer listener", "peers-port",
     lambda d: _set(_peers_svc(d)["spec"]["ports"][0], "port", 5002)),
    ("regproxy-peers with a named targetPort (the pods declare none)", "peers-port",
     lambda d: _set(_peers_svc(d)["spec"]["ports"][0], "targetPort", "peer")),
    ("REGPROXY_PEERS in another namespace", "peers-dns-name",
     lambda d: _env(d, "REGPROXY_PEERS", f"dns:{PEER_SERVICE}.default.svc.cluster.local:5001")),
    ("REGPROXY_PEERS as a fixed list", "peers-dns-name",
     lambda d: _env(d, "REGPROXY_PEERS", "10.0.0.4:5001,10.0.0.5:5001")),
    ("the peer listener on loopback", "peer-not-loopback",
     lambda d: _env(d, "REGPROXY_PEER_LISTEN", "127.0.0.2:5001")),
    ("the peer listener on 0.0.0.0 (the node would not find itself among the peers)", "peer-listen-host-ip",
     lambda d: _env(d, "REGPROXY_PEER_LISTEN", "0.0.0.0:5001")),
    ("HOST_IP defined after REGPROXY_PEER_LISTEN", "peer-listen-host-ip",
     lambda d: _host_ip_after(d, "REGPROXY_PEER_LISTEN")),
    ("the peer listener on the admin port", "peer-port-distinct",
     lambda d: _env(d, "REGPROXY_PEER_LISTEN", "$(HOST_IP):9477")),
    ("the peer port declared as a containerPort", "no-host-ports-with-surge",
     lambda d: _set(_main(d), "ports", [{"name": "peer", "containerPort": 5001}])),
    ("the peer secret readable by everyone (mode 0644)", "peer-secret-mount",
     lambda d: _set(_peer_volume(d)["secret"], "defaultMode", 0o644)),
    ("the peer secret mounted writable", "peer-secret-mount", lambda d: _peer_mount(d).pop("readOnly")),
    ("REGPROXY_PEER_SECRET_FILE naming a file the Secret does not hold", "peer-secret-mount",
     lambda d: _env(d, "REGPROXY_PEER_SECRET_FILE", _peer_mount(d)["mountPath"] + "/token")),
    ("the peer secret volume naming a Secret not in the render", "peer-secret-mount",
     lambda d: _set(_peer_volume(d)["secret"], "secretName", "regproxy-peer-secret")),
    ("a peer secret of 12 bytes", "peer-secret-length", _short_secret),
    ("a peer secret with a space in it", "peer-secret-length",
     lambda d: _secret_value(d, b"0123456789 abcdef0123456789")),
    ("the upstream (and so the peers' name) resolved through /etc/hosts first", "peers-resolver",
     lambda d: _env(d, "REGPROXY_UPSTREAM_RESOLVER", "system")),
    # The prefetch list, the admin token, the CLI (issue 12).
    ("the prefetch ConfigMap with a hash suffix (an edit would be a new name and roll the pods)",
     "prefetch-configmap", lambda d: _rename(d, "ConfigMap", PREFETCH_CONFIGMAP, PREFETCH_CONFIGMAP + "-5t8k2f7h9m")),
    ("no prefetch ConfigMap in the render", "prefetch-configmap",
     lambda d: d.remove(by_kind(d, "ConfigMap", PREFETCH_CONFIGMAP))),
    ("a prefetch line with `pin` before the platform", "prefetch-lines",
     lambda d: _prefetch_line(d, "team/app:v1 pin linux/amd64")),
    ("a prefetch line with a bare architecture for a platform", "prefetch-lines",
     lambda d: _prefetch_line(d, "team/app:v1 amd64 pin")),
    ("a prefetch line with four words", "prefetch-lines",
     lambda d: _prefetch_line(d, "team/app:v1 linux/amd64 pin x")),
    ("a prefetch line with an upper-case name", "prefetch-lines", lambda d: _prefetch_line(d, "Team/App:v1")),
    ("prefetch.txt mounted with subPath (never updated)", "prefetch-dir-mount", _prefetch_subpath),
    ("a second mount of the prefetch ConfigMap with subPath", "prefetch-dir-mount",
     lambda d: _main(d)["volumeMounts"].append(
         {"name": _volume_of(d, "configMap")["name"], "mountPath": "/etc/prefetch.txt", "subPath": PREFETCH_KEY})),
    ("REGPROXY_PREFETCH_FILE outside the ConfigMap's mount", "prefetch-dir-mount",
     lambda d: _env(d, "REGPROXY_PREFETCH_FILE", "/var/lib/regproxy/prefetch.txt")),
    ("REGPROXY_PREFETCH_FILE naming a file the ConfigMap does not hold", "prefetch-dir-mount",
     lambda d: _env(d, "REGPROXY_PREFETCH_FILE", _mount_of(d, "configMap")["mountPath"] + "/list.txt")),
    ("no REGPROXY_PREFETCH_FILE", "prefetch-dir-mount", lambda d: _drop_env(d, "REGPROXY_PREFETCH_FILE")),
    ("the prefetch ConfigMap mounted writable", "prefetch-dir-mount",
     lambda d: _mount_of(d, "configMap").pop("readOnly")),
    ("the admin token mounted writable", "admin-token-mount",
     lambda d: _mount_of(d, ADMIN_TOKEN_SECRET).pop("readOnly")),
    ("the admin token readable by everyone (mode 0644)", "admin-token-mount",
     lambda d: _set(_volume_of(d, ADMIN_TOKEN_SECRET)["secret"], "defaultMode", 0o644)),
    ("the admin token mounted with subPath", "admin-token-mount",
     lambda d: _mount_of(d, ADMIN_TOKEN_SECRET).update(mountPath="/etc/regproxy-admin/token", subPath="token")),
    ("REGPROXY_ADMIN_TOKEN_FILE naming a file the Secret does not hold", "admin-token-mount",
     lambda d: _env(d, "REGPROXY_ADMIN_TOKEN_FILE", _mount_of(d, ADMIN_TOKEN_SECRET)["mountPath"] + "/admin-token")),
    ("the admin token volume naming a Secret not in the render", "admin-token-mount",
     lambda d: _set(_volume_of(d, ADMIN_TOKEN_SECRET)["secret"], "secretName", "regproxy-admin")),
    ("no REGPROXY_ADMIN_TOKEN_FILE", "admin-token-mount", lambda d: _drop_env(d, "REGPROXY_ADMIN_TOKEN_FILE")),
    ("the admin token in a Secret of a fixed name (a new token would not restart serve)", "admin-token-generated",
     lambda d: _rename(d, "Secret", _volume_of(d, ADMIN_TOKEN_SECRET)["secret"]["secretName"], ADMIN_TOKEN_SECRET)),
    ("an admin token of whitespace only", "admin-token-value", lambda d: _secret_value(d, b" \n", ADMIN_TOKEN_SECRET)),
    ("an admin token of 15 bytes", "admin-token-value",
     lambda d: _secret_value(d, b" 0123456789abcde\n", ADMIN_TOKEN_SECRET)),
    ("an admin token with a space in it", "admin-token-value",
     lambda d: _secret_value(d, b"0123456789 abcdef0123456789", ADMIN_TOKEN_SECRET)),
    ("the admin token equal to the peer secret", "admin-token-value",
     lambda d: _secret_value(d, base64.b64decode(list(by_kind(
         d, "Secret", _peer_volume(d)["secret"]["secretName"])["data"].values())[0]), ADMIN_TOKEN_SECRET)),
    ("REGPROXY_ADMIN on loopback (the admin listener is on the node's address)", "admin-cli-url",
     lambda d: _env(d, "REGPROXY_ADMIN", "http://127.0.0.1:9477")),
    ("REGPROXY_ADMIN on another port", "admin-cli-url", lambda d: _env(d, "REGPROXY_ADMIN", "http://$(HOST_IP):9478")),
    ("HOST_IP defined after REGPROXY_ADMIN", "admin-cli-url", lambda d: _host_ip_after(d, "REGPROXY_ADMIN")),
    ("no REGPROXY_ADMIN", "admin-cli-url", lambda d: _drop_env(d, "REGPROXY_ADMIN")),
]
GIT_MUTATIONS = [
    ("deploy/base/admin-token tracked by git", "secrets-not-in-git",
     lambda g: _git_file(g, "deploy/base/admin-token", tracked=True)),
    ("deploy/base/admin-token not ignored (its .gitignore line gone)", "secrets-not-in-git",
     lambda g: _git_file(g, "deploy/base/admin-token", ignored=False)),
    ("the prefetch credential tracked by git", "secrets-not-in-git",
     lambda g: _git_file(g, "deploy/components/prefetch-auth/prefetch-auth.json", tracked=True)),
    ("the admin token's generator reading another, tracked file", "secrets-not-in-git",
     lambda g: [x for x in g if x[0] != "deploy/base/admin-token"] + [("deploy/base/token.txt", True, False)]),
]
COMPONENT_MUTATIONS = [
    ("the prefetch credential mounted writable", "prefetch-auth-mount",
     lambda d: _mount_of(d, "regproxy-prefetch-auth").pop("readOnly")),
    ("the prefetch credential readable by everyone (mode 0644)", "prefetch-auth-mount",
     lambda d: _set(_volume_of(d, "regproxy-prefetch-auth")["secret"], "defaultMode", 0o644)),
    ("the prefetch credential in an Opaque Secret", "prefetch-auth-mount",
     lambda d: _set(by_kind(d, "Secret", _volume_of(d, "regproxy-prefetch-auth")["secret"]["secretName"]),
                    "type", "Opaque")),
    ("no REGPROXY_PREFETCH_AUTH_FILE", "prefetch-auth-mount", lambda d: _drop_env(d, "REGPROXY_PREFETCH_AUTH_FILE")),
    ("a prefetch credential that is not JSON", "prefetch-auth-json",
     lambda d: _secret_value(d, b"user:password\n", "regproxy-prefetch-auth")),
    ("a prefetch credential without auths", "prefetch-auth-json", lambda d: _secret_value(d, b'{"credsStore":"desktop"}', "regproxy-prefetch-auth")),
    ("no REGPROXY_UPSTREAM_RATE", "upstream-rate-set", lambda d: _drop_env(d, "REGPROXY_UPSTREAM_RATE")),
]
JOB_MUTATIONS = [
    ("the uninstall Job with a fixed image", "uninstall-image",
     lambda job, sh: (_set_all_images(job, "regproxy:0.1.0"), sh)),
    ("uninstall.sh not reading the DaemonSet's image", "uninstall-image",
     lambda job, sh: (job, sh.replace("get daemonset regproxy", "get pods"))),
]


def _set_all_images(job, image):
    for c in job["spec"]["template"]["spec"]["containers"]:
        c["image"] = image
    return job


def quiet_run(run):
    """The failed check keys of `run()`, printing nothing; or an error when
    a check breaks outright."""
    saved = state["results"], state["quiet"]
    state["results"], state["quiet"] = [], True
    try:
        run()
        return [k for k, ok in state["results"] if not ok], None
    except Exception as e:  # a mutation that breaks a check outright
        return None, f"{type(e).__name__}: {e}"
    finally:
        state["results"], state["quiet"] = saved


def self_test(docs, job, sh, git_files, comp_docs):
    def base(d, j, s, g):
        return lambda: check_manifests(d, j, s, g)

    failed, err = quiet_run(base(copy.deepcopy(docs), copy.deepcopy(job), sh, git_files))
    check("self-test: the unmodified manifests pass every check", failed == [] and not err, err or str(failed))
    cases = [(w, k, lambda d, j, s, g, m=m: base(*(m(d), d, j, s, g)[1:])) for w, k, m in MUTATIONS]
    cases += [(w, k, lambda d, j, s, g, m=m: base(d, *m(j, s), g)) for w, k, m in JOB_MUTATIONS]
    cases += [(w, k, lambda d, j, s, g, m=m: base(d, j, s, m(copy.deepcopy(git_files or [])))) for w, k, m in GIT_MUTATIONS]
    for what, key, mutate in cases:
        failed, err = quiet_run(mutate(copy.deepcopy(docs), copy.deepcopy(job), sh, git_files))
        check(f"self-test: {what} fails the check {key!r}", not err and key in failed, err or f"failed: {failed}")
    if comp_docs is None:
        return
    failed, err = quiet_run(lambda: check_components(copy.deepcopy(comp_docs)))
    check("self-test: the unmodified manifests with components pass every check", failed == [] and not err,
          err or str(failed))
    for what, key, mutate in COMPONENT_MUTATIONS:
        d = copy.deepcopy(comp_docs)
        mutate(d)
        failed, err = quiet_run(lambda: check_components(d))
        check(f"self-test: with components, {what} fails the check {key!r}", not err and key in failed,
              err or f"failed: {failed}")


def main():
    docs = [d for d in yaml.safe_load_all(Path(sys.argv[1]).read_text()) if d]
    sysadmin = Path(sys.argv[2])
    job = yaml.safe_load((sysadmin / "uninstall-job.yaml").read_text())
    sh = (sysadmin / "uninstall.sh").read_text()
    comp_docs = [d for d in yaml.safe_load_all(Path(sys.argv[4]).read_text()) if d] if len(sys.argv) > 4 else None
    git_files = git_secret_files(REPO)

    ctx = check_manifests(docs, job, sh, git_files)
    comp = None
    if comp_docs is not None:
        failed, err = quiet_run(lambda: check_manifests(copy.deepcopy(comp_docs), job, sh, git_files))
        check("deploy/ with its components (deploy/components) passes every check deploy/ passes",
              failed == [] and not err, err or str(failed))
        comp = check_components(comp_docs)
    run_commands(Path(sys.argv[3]), ctx, comp)
    self_test(docs, job, sh, git_files, comp_docs)

    oks = [ok for _, ok in state["results"]]
    passed, failed = oks.count(True), oks.count(False)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
