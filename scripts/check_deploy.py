"""Checks the rendered deploy/ manifests for what issue 4 asks of them, beyond
the schema: the DaemonSet, its node set-up, the Services, and that the
uninstall Job undoes exactly what the init containers do.

Usage: check_deploy.py BASE.yaml SYSADMIN_DIR REGPROXY_BINARY
With the binary it also checks that every flag the manifests pass exists, and
runs the init containers' and the uninstall Job's commands against a scratch
copy of a node's files: set-up, then uninstall, must give the files back.
Prints one line per check and closes with "N passed, N failed".
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

NAME = "knative.registry.svc.cluster.local"
results = []


def check(what, ok, detail=""):
    results.append(bool(ok))
    print(f"{'ok  ' if ok else 'FAIL'} {what}" + (f": {detail}" if detail and not ok else ""))


def flags(container):
    """--key=value arguments as a dict; bare words as keys with value None."""
    out = {}
    for a in container.get("args", []):
        key, _, value = a.partition("=")
        out[key] = value if _ else None
    return out


def by_kind(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found[0] if found else None


def run_commands(binary, main_c, inits, uninstall):
    """The manifests' own argument lists, run by the real binary."""
    help_text = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    unknown = [k for k in flags(main_c) if k.startswith("--") and f"{k} " not in help_text and f"{k}=" not in help_text]
    check("every flag the DaemonSet passes to `regproxy serve` exists", not unknown, f"unknown: {unknown}")

    with tempfile.TemporaryDirectory() as tmp:
        node = Path(tmp)
        hosts = node / "hosts"
        original = b"127.0.0.1 localhost\n::1 localhost ip6-localhost\n10.0.0.4 node-1"
        hosts.write_bytes(original)
        certs = node / "certs.d"
        certs.mkdir()
        remap = {"--hosts-file": str(hosts), "--certs-dir": str(certs)}

        def run(c):
            args = [a.split("=", 1)[0] + "=" + remap[a.split("=", 1)[0]] if a.split("=", 1)[0] in remap else a for a in c["args"]]
            return subprocess.run([binary, *args], capture_output=True, text=True)

        for c in inits:
            for attempt in ("first", "second"):
                r = run(c)
                check(f"init container {c['name']} succeeds ({attempt} run)", r.returncode == 0, r.stderr.strip())
        check("after set-up the node's hosts file maps the name", NAME.encode() in hosts.read_bytes())
        check("after set-up containerd has a hosts.toml for the name", (certs / NAME / "hosts.toml").is_file())
        for c in uninstall:
            r = run(c)
            check(f"uninstall container {c['name']} succeeds", r.returncode == 0, r.stderr.strip())
        check("after uninstall the hosts file has its exact original bytes", hosts.read_bytes() == original)
        check("after uninstall certs.d is as it was", not any(certs.iterdir()))


def main():
    docs = [d for d in yaml.safe_load_all(Path(sys.argv[1]).read_text()) if d]
    sysadmin = Path(sys.argv[2])

    ns = by_kind(docs, "Namespace", "registry")
    check("the namespace registry is created", ns)
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
    check("it still resolves cluster names", spec.get("dnsPolicy") == "ClusterFirstWithHostNet")
    check(
        "it tolerates every taint, control plane included",
        any(t.get("operator") == "Exists" and "key" not in t for t in spec.get("tolerations", [])),
    )
    check("it has a high priority class", spec.get("priorityClassName", "").startswith("system-node-critical"))
    check("it is updated by rolling update", ds["spec"]["updateStrategy"]["type"] == "RollingUpdate")

    main_c = [c for c in spec["containers"] if c["name"] == "regproxy"][0]
    f = flags(main_c)
    check("it serves", main_c["args"][0] == "serve")
    listen = f.get("--listen", "")
    host, _, port = listen.rpartition(":")
    check("it listens on a loopback address", host.startswith("127."), listen)
    check("it listens on port 80, so image references need no port", port == "80", listen)
    upstream = f.get("--upstream", "")
    check(
        "its upstream is not the name that nodes map to the proxy",
        NAME not in upstream and upstream.startswith("http"),
        upstream,
    )
    check(
        "its upstream is resolved through DNS only, never /etc/hosts",
        f.get("--upstream-resolver") == "dns",
    )
    admin_listen = f.get("--admin-listen", "")
    admin_host, _, admin_port = admin_listen.rpartition(":")
    admin_port = int(admin_port or 0)
    # The admin endpoints on the node's own address, from the downward API:
    # reachable by kubelet and Prometheus, not on every interface of the node.
    env = {e["name"]: e for e in main_c.get("env", [])}
    var = admin_host[2:-1] if admin_host.startswith("$(") and admin_host.endswith(")") else None
    field = env.get(var, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") if var else None
    check(
        "the admin listen address is the node's own, from status.hostIP",
        field == "status.hostIP",
        f"--admin-listen={admin_listen}, env {var}: {env.get(var)}",
    )
    ports = {p["name"]: p["containerPort"] for p in main_c.get("ports", [])}
    check("the admin port is declared", ports.get("admin") == admin_port, str(ports))
    for probe in ("readinessProbe", "livenessProbe"):
        p = main_c.get(probe, {}).get("httpGet", {})
        check(
            f"the {probe} asks the admin port",
            p.get("port") in ("admin", admin_port) and p.get("path") in ("/healthz", "/readyz"),
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

    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in main_c.get("volumeMounts", [])}
    cache_vol = volumes.get(mounts.get(f.get("--cache-dir", "")), {})
    check("the cache dir is a hostPath, so it outlives the pod", "hostPath" in cache_vol, str(cache_vol))

    inits = spec.get("initContainers", [])
    check("the init containers use the proxy's own image", all(c["image"] == main_c["image"] for c in inits))
    hosts_init = [c for c in inits if c["args"][:2] == ["hosts", "ensure"]]
    check("an init container writes the /etc/hosts entry", len(hosts_init) == 1)
    hf = flags(hosts_init[0])
    check("it maps the registry name", hf.get("--name") == NAME)
    check("it maps the name to the address the proxy listens on", hf.get("--address") == host)
    hm = {m["mountPath"]: m["name"] for m in hosts_init[0]["volumeMounts"]}
    hv = volumes.get(hm.get(hf.get("--hosts-file")), {}).get("hostPath", {})
    check(
        "the hosts file it edits is the node's /etc/hosts, mounted as a file",
        hv.get("path") == "/etc/hosts" and hv.get("type") == "File",
        str(hv),
    )
    ctr_init = [c for c in inits if c["args"][:3] == ["hosts", "containerd", "ensure"]]
    check("an init container writes containerd's hosts.toml", len(ctr_init) == 1)
    cf = flags(ctr_init[0])
    check("it points the registry name at the proxy", cf.get("--name") == NAME and cf.get("--endpoint") == f"http://{listen}")
    cm = {m["mountPath"]: m["name"] for m in ctr_init[0]["volumeMounts"]}
    cv = volumes.get(cm.get(cf.get("--certs-dir")), {}).get("hostPath", {})
    check("it writes into the node's /etc/containerd/certs.d", cv.get("path") == "/etc/containerd/certs.d", str(cv))

    job = yaml.safe_load((sysadmin / "uninstall-job.yaml").read_text())
    jspec = job["spec"]["template"]["spec"]
    jvols = {v["name"]: v for v in jspec["volumes"]}
    removes = {tuple(c["args"][:3]): (flags(c), c) for c in jspec["containers"]}
    rh = [v for k, v in removes.items() if k[:2] == ("hosts", "remove")]
    rc = [v for k, v in removes.items() if k == ("hosts", "containerd", "remove")]
    check("the uninstall Job removes the /etc/hosts entry", len(rh) == 1 and rh[0][0].get("--name") == NAME)
    check("the uninstall Job removes containerd's hosts.toml", len(rc) == 1 and rc[0][0].get("--name") == NAME)
    for (fl, c), flag, path in ((rh[0], "--hosts-file", "/etc/hosts"), (rc[0], "--certs-dir", "/etc/containerd/certs.d")):
        m = {x["mountPath"]: x["name"] for x in c["volumeMounts"]}
        check(
            f"the uninstall Job edits the node's {path}",
            jvols.get(m.get(fl.get(flag)), {}).get("hostPath", {}).get("path") == path,
        )
    check("the uninstall Job runs on a named node, past taints", jspec.get("nodeName") and jspec.get("tolerations"))

    run_commands(Path(sys.argv[3]), main_c, inits, [c for _, c in removes.values()])

    passed, failed = results.count(True), results.count(False)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
