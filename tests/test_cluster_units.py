"""The real-cluster lab's pure parts (pcn_lab.cluster): certificates,
kubeconfigs, component flags, containerd and kubelet configuration, the
node mount plan, the cleanup plan. No Kubernetes binary needed."""

from __future__ import annotations

import base64
import json
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from pcn_lab.cluster import (
    cleanup,
    connectivity,
    containerd,
    controlplane,
    install,
    kubeconfig,
    kubeletconf,
    node,
    pki,
    runner,
)
from pcn_lab.cluster.layout import NODE_BINDS, Layout
from pcn_lab.cluster.state import ClusterState

MOUNTINFO = """\
23 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
50 1 0:40 / /var/lib/pcn-lab/pcnt-abc/x rw - overlay overlay rw
51 1 0:41 / /var/lib/pcn-lab/pcnt-abc/x/y rw - overlay overlay rw
52 1 0:42 / /var/lib/pcn-lab/pcnt-abcd rw - tmpfs tmpfs rw
"""


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout("abc123", workers=2, data_root=tmp_path)


def test_layout_names(layout: Layout) -> None:
    assert layout.nodes == ["pcnt-abc123-n1", "pcnt-abc123-n2", "pcnt-abc123-n3"]
    assert layout.control_plane == "pcnt-abc123-n1"
    assert layout.api_ip == "192.168.250.1"
    assert layout.node_ip("pcnt-abc123-n3") == "192.168.250.3"
    assert layout.cgroup_root("pcnt-abc123-n2") == "/pcnt-abc123-n2"
    assert layout.containerd_socket("pcnt-abc123-n2") == (
        layout.data / "nodes" / "pcnt-abc123-n2" / "run-containerd" / "containerd.sock")
    assert layout.service_cidr_first() == "10.96.0.1"


def test_certificate_subjects_and_sans(layout: Layout) -> None:
    specs = {s.name: s for s in pki.cluster_certs(layout)}
    assert next(iter(specs)) == "ca"
    kubelet = specs["kubelet-pcnt-abc123-n2"]
    assert (kubelet.cn, kubelet.orgs, kubelet.client) == (
        "system:node:pcnt-abc123-n2", ("system:nodes",), True)
    api = specs["apiserver"]
    assert {"127.0.0.1", "192.168.250.1", "10.96.0.1"} <= set(api.ips)
    assert "kubernetes.default.svc.cluster.local" in api.dns
    cfg = pki.openssl_config(api)
    assert "extendedKeyUsage = serverAuth" in cfg
    assert "IP:127.0.0.1" in cfg and "DNS:kubernetes.default" in cfg
    assert "0.O = system:masters" in pki.openssl_config(specs["admin"])
    assert "CA:TRUE" in pki.openssl_config(specs["ca"])


def test_generate_makes_a_verifiable_pki(layout: Layout) -> None:
    lay = Layout("abc123", workers=0, data_root=layout.data_root)
    made = pki.generate(lay)
    assert "ca" in made and "sa" in made and "kubelet-pcnt-abc123-n1" in made
    assert pki.generate(lay) == []  # idempotent
    ca = lay.pki / "ca.crt"
    for name in ("apiserver", "kubelet-pcnt-abc123-n1", "etcd"):
        r = subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(lay.pki / f"{name}.crt")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-subject", "-ext", "subjectAltName",
                           "-in", str(lay.pki / "kubelet-pcnt-abc123-n1.crt")],
                          capture_output=True, text=True, check=True).stdout
    assert "O = system:nodes" in text and "CN = system:node:pcnt-abc123-n1" in text


def test_kubeconfig_embeds_credentials() -> None:
    cfg = kubeconfig.kubeconfig("https://127.0.0.1:1234", b"CA", b"CERT", b"KEY", "admin",
                                namespace="demo")
    cluster = cfg["clusters"][0]["cluster"]
    assert cluster["server"] == "https://127.0.0.1:1234"
    assert base64.b64decode(cluster["certificate-authority-data"]) == b"CA"
    assert base64.b64decode(cfg["users"][0]["user"]["client-key-data"]) == b"KEY"
    assert cfg["contexts"][0]["context"]["namespace"] == "demo"


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def test_control_plane_flags(layout: Layout, tmp_path: Path) -> None:
    api = _flags(controlplane.apiserver_argv(layout, tmp_path))
    assert api["authorization-mode"] == "Node,RBAC"
    assert "NodeRestriction" in api["enable-admission-plugins"]
    assert api["service-cluster-ip-range"] == "10.96.0.0/12"
    assert api["advertise-address"] == "192.168.250.1"
    assert api["service-account-signing-key-file"].endswith("sa.key")
    cm = _flags(controlplane.controller_manager_argv(layout, tmp_path))
    assert (cm["allocate-node-cidrs"], cm["cluster-cidr"], cm["node-cidr-mask-size"]) == (
        "true", "10.244.0.0/16", "24")
    etcd = controlplane.etcd_argv(layout, tmp_path)
    assert "--client-cert-auth" in etcd and "--peer-client-cert-auth" in etcd


def test_ranges_agree_with_pcn_config(layout: Layout, tmp_path: Path) -> None:
    """manifests/configmap.yaml must say what the API server and the
    controller manager are told."""
    data = yaml.safe_load(Path("manifests/configmap.yaml").read_text())["data"]
    api = _flags(controlplane.apiserver_argv(layout, tmp_path))
    cm = _flags(controlplane.controller_manager_argv(layout, tmp_path))
    assert data["serviceClusterIPRange"] == api["service-cluster-ip-range"]
    assert data["serviceNodePortRange"] == api["service-node-port-range"]
    assert data["podCIDR"] == cm["cluster-cidr"]


def test_containerd_config_is_valid_toml(layout: Layout) -> None:
    node_name = layout.nodes[1]
    text = containerd.to_toml(containerd.config(layout, node_name, "registry.k8s.io/pause:3.10",
                                                Path("/bin/runc")))
    cfg = tomllib.loads(text)
    assert cfg["version"] == 3
    assert cfg["grpc"]["address"] == "/run/containerd/containerd.sock"
    assert "io.containerd.nri.v1.nri" in cfg["disabled_plugins"]
    images = cfg["plugins"]["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == "registry.k8s.io/pause:3.10"
    assert images["snapshotter"] == "overlayfs"
    rt = cfg["plugins"]["io.containerd.cri.v1.runtime"]
    assert rt["cni"] == {"bin_dirs": ["/opt/cni/bin"], "conf_dir": "/etc/cni/net.d"}
    assert rt["restrict_oom_score_adj"] is False
    assert containerd.config(layout, node_name, "p", Path("/r"), restrict_oom_score_adj=True)[
        "plugins"]["io.containerd.cri.v1.runtime"]["restrict_oom_score_adj"] is True
    assert rt["containerd"]["runtimes"]["runc"]["options"] == {"BinaryName": "/bin/runc",
                                                               "SystemdCgroup": False}


def test_kubelet_config(layout: Layout, tmp_path: Path) -> None:
    cp, worker = layout.nodes[0], layout.nodes[1]
    cfg = kubeletconf.config(layout, worker)
    assert (cfg["cgroupDriver"], cfg["cgroupRoot"], cfg["failCgroupV1"]) == (
        "cgroupfs", f"/{worker}", False)
    assert cfg["clusterDNS"] == ["10.96.0.10"]
    assert "registerWithTaints" not in cfg
    assert kubeletconf.config(layout, cp)["registerWithTaints"] == [
        kubeletconf.CONTROL_PLANE_TAINT]
    flags = _flags(kubeletconf.argv(layout, worker, tmp_path, tmp_path / "k.yaml"))
    assert flags["hostname-override"] == worker and flags["node-ip"] == "192.168.250.2"


def test_cgroup_mounts_from_mountinfo() -> None:
    found = node.cgroup_mounts(MOUNTINFO)
    assert [(c.path, c.fstype, c.options) for c in found] == [
        ("/sys/fs/cgroup/cpu", "cgroup", "cpu"),
        ("/sys/fs/cgroup/cpu,cpuacct", "cgroup", "cpu,cpuacct"),
        ("/sys/fs/cgroup/systemd", "cgroup", "none,name=systemd"),
        ("/sys/fs/cgroup/unified", "cgroup2", "nsdelegate")]


def test_mount_plan(layout: Layout) -> None:
    n = layout.nodes[1]
    plan = node.mount_plan(layout, n, node.cgroup_mounts(MOUNTINFO))
    binds = [c for c in plan if c[:2] == ["mount", "--bind"]]
    assert len(binds) == len(NODE_BINDS)
    assert ["mount", "--bind", str(layout.node_path(n, "/run/netns")), "/run/netns"] in binds
    for shared in ("/var/lib/kubelet", "/run/netns"):  # reach the agent's container too
        assert plan.index(["mount", "--make-rshared", shared]) == \
            plan.index(["mount", "--bind", str(layout.node_path(n, shared)), shared]) + 1
    assert ["mount", "-t", "bpf", "bpffs", "/sys/fs/bpf"] in plan
    assert ["mount", "--make-shared", "/sys/fs/bpf"] in plan
    assert ["mount", "-t", "cgroup", "-o", "none,name=systemd", "cgroup",
            "/sys/fs/cgroup/systemd"] in plan
    # the tmpfs for the hierarchies comes before them
    tmpfs = next(i for i, c in enumerate(plan) if c[:3] == ["mount", "-t", "tmpfs"])
    assert all(i > tmpfs for i, c in enumerate(plan) if "cgroup" in c[2:4])
    assert [str(d) for d in node.cgroup_dirs(layout, n, node.cgroup_mounts(MOUNTINFO))] == [
        f"/sys/fs/cgroup/cpu/{n}", f"/sys/fs/cgroup/cpu,cpuacct/{n}",
        f"/sys/fs/cgroup/systemd/{n}"]


def test_cgroup_tree_removal(tmp_path: Path) -> None:
    d = tmp_path / "root"
    (d / "a" / "b").mkdir(parents=True)
    (d / "c").mkdir()
    assert node.remove_cgroup_tree(d) == []
    assert not d.exists()


def test_cleanup_mounts_under_deepest_first() -> None:
    assert cleanup.mounts_under(MOUNTINFO, Path("/var/lib/pcn-lab/pcnt-abc")) == [
        "/var/lib/pcn-lab/pcnt-abc/x/y", "/var/lib/pcn-lab/pcnt-abc/x"]


def test_marked_processes(tmp_path: Path) -> None:
    for pid, env in ((10, b"A=1\0PCN_LAB_CLUSTER=pcnt-abc\0"),
                     (11, b"PCN_LAB_CLUSTER=pcnt-abcd\0"), (12, b"")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "environ").write_bytes(env)
    (tmp_path / "self").mkdir()
    assert runner.marked("pcnt-abc", tmp_path) == [10]


def _fake_gomodcache(tmp_path: Path) -> Path:
    """A Go module cache holding only network-policy-api's CRD folders."""
    from pcn_lab.cluster import policyapi

    module, version = policyapi.pin()
    for channel in ("standard", "experimental"):
        crds = tmp_path / "gomod" / f"{module}@{version}" / "config" / "crd" / channel
        crds.mkdir(parents=True)
        (crds / "kustomization.yaml").write_text("resources: [crd.yaml]\n")
    return tmp_path / "gomod"


def test_install_overlay_sets_the_api_address(layout: Layout, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "install"
    gomod = _fake_gomodcache(tmp_path)
    k = install.overlay(layout, root / "manifests", out, gomodcache=gomod)
    assert k["resources"] == ["base"]
    base = yaml.safe_load((root / "manifests" / "kustomization.yaml").read_text())
    offline = yaml.safe_load((out / "base" / "kustomization.yaml").read_text())
    # the manifests' own resources and images: files copied (kustomize's load
    # restrictor), folders by path
    assert len(offline["resources"]) == len(base["resources"])
    assert offline["images"] == base["images"]
    for mine, theirs in zip(offline["resources"], base["resources"], strict=True):
        if "://" in theirs:  # network-policy-api's CRD folder from the module cache, of
            # the channel netpol.toml has the lab install (the manifests name the standard)
            assert theirs.split("?")[0].endswith("/config/crd/standard")
            assert (out / "base" / mine).resolve() == next(gomod.glob(
                "sigs.k8s.io/network-policy-api@*/config/crd/experimental")).resolve()
        elif (root / "manifests" / theirs).is_dir():
            assert (out / "base" / mine).resolve() == (root / "manifests" / theirs).resolve()
        else:
            assert (out / "base" / mine).read_text() == (root / "manifests" / theirs).read_text()
    patch = yaml.safe_load(k["patches"][0]["patch"])
    spec = patch["spec"]["template"]["spec"]
    for c in spec["containers"] + spec["initContainers"]:
        assert {"name": "KUBERNETES_SERVICE_HOST", "value": "192.168.250.1"} in c["env"]
    ds = yaml.safe_load(Path(root / "manifests/daemonset.yaml").read_text())
    names = {c["name"] for c in ds["spec"]["template"]["spec"]["containers"]
             + ds["spec"]["template"]["spec"]["initContainers"]}
    assert names == set(install.AGENT_CONTAINERS)
    # socket load balancing off: the lab's nodes share the machine's cgroups
    config = yaml.safe_load(k["patches"][1]["patch"])
    assert (config["kind"], config["metadata"]["name"]) == ("ConfigMap", "pcn-config")
    assert config["data"] == {"socketLB": "false"}


def test_images_index_and_pause(tmp_path: Path) -> None:
    entries = [{"ref": "registry.k8s.io/pause:3.10.1", "file": "pause.tar"},
               {"ref": "docker.io/library/busybox:1.36", "file": "busybox.tar"}]
    (tmp_path / "images.json").write_text(json.dumps(entries))
    with pytest.raises(FileNotFoundError, match="make k8s"):
        install.images(tmp_path)
    for e in entries:
        (tmp_path / e["file"]).write_bytes(b"")
    assert install.pause_ref(install.images(tmp_path)) == "registry.k8s.io/pause:3.10.1"
    with pytest.raises(LookupError):
        install.pause_ref(entries[1:])


def test_coredns_manifest_is_kube_dns() -> None:
    docs = list(yaml.safe_load_all(install.COREDNS.read_text()))
    svc = next(d for d in docs if d["kind"] == "Service")
    assert (svc["metadata"]["name"], svc["spec"]["clusterIP"]) == ("kube-dns", "10.96.0.10")
    corefile = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["Corefile"]
    assert "kubernetes cluster.local" in corefile
    assert "forward" not in corefile and "loop" not in corefile


def test_pod_pid_from_cgroups(tmp_path: Path) -> None:
    d = tmp_path / "pcnt-x-n2" / "kubepods" / "besteffort" / "poduid-1" / "c1"
    d.mkdir(parents=True)
    (d / "cgroup.procs").write_text("4242\n")
    assert connectivity.pod_pid("/pcnt-x-n2", "uid-1", tmp_path) == 4242
    assert connectivity.pod_pid("/pcnt-x-n2", "uid-2", tmp_path) is None


def test_state_round_trip(tmp_path: Path) -> None:
    st = ClusterState(tmp_path, run_id="abc123", workers=2, holders={"n1": 5},
                      data_root=str(tmp_path / "data"))
    st.save()
    back = ClusterState.load(tmp_path)
    assert back is not None and back.holders == {"n1": 5} and back.layout.workers == 2


def test_offline_kustomization_refuses_what_it_cannot_carry(tmp_path: Path) -> None:
    gomod = _fake_gomodcache(tmp_path)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    for text, match in (
            ("resources: [a.yaml]\nnamespace: x\n", "namespace"),
            ("resources:\n- https://example.com/x?ref=v1\n", "no copy"),
            ("resources:\n- https://github.com/kubernetes-sigs/network-policy-api/config/crd/"
             "standard?ref=v0.0.1\n", "not netpol.toml")):
        (manifests / "kustomization.yaml").write_text(text)
        with pytest.raises(ValueError, match=match):
            install.offline_kustomization(manifests, tmp_path / "base", gomod)
    (manifests / "kustomization.yaml").write_text(
        "resources:\n- https://github.com/kubernetes-sigs/network-policy-api/config/crd/"
        "nochannel?ref=v0.3.0\n")
    with pytest.raises(FileNotFoundError, match="kustomization.yaml is missing"):
        install.offline_kustomization(manifests, tmp_path / "base", gomod)
    with pytest.raises(FileNotFoundError, match="make k8s"):
        install.offline_kustomization(manifests, tmp_path / "base", tmp_path / "empty")


def test_overlay_agent_source_mounts_the_checkout(layout: Layout, tmp_path: Path) -> None:
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "kustomization.yaml").write_text("resources: [a.yaml]\n")
    (tmp_path / "manifests" / "a.yaml").write_text("kind: ConfigMap\n")
    k = install.overlay(layout, tmp_path / "manifests", tmp_path / "out", Path("/src"))
    spec = yaml.safe_load(k["patches"][0]["patch"])["spec"]["template"]["spec"]
    paths = {v["hostPath"]["path"] for v in spec["volumes"]}
    assert paths == {"/src/operator/pcn_agent", "/src/bpf", "/src/crds"}
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert f"{install.IMAGE_SITE_PACKAGES}/pcn_agent" in mounts
    assert "volumeMounts" not in spec["initContainers"][0]


def test_state_copy_in_the_data_folder_finds_orphans(tmp_path: Path) -> None:
    from pcn_lab.cluster.state import orphans

    st = ClusterState(tmp_path / "lab", run_id="abc123", workers=1,
                      data_root=str(tmp_path / "data"), sysctls={"kernel/panic": "1"})
    st.save()
    (tmp_path / "lab" / "cluster.json").unlink()  # the lab folder lost (a reboot)
    (found,) = orphans(tmp_path / "data")
    assert (found.run_id, found.dir, found.sysctls) == ("abc123", tmp_path / "lab",
                                                       {"kernel/panic": "1"})


def test_a_cluster_runs_the_agent_of_the_checkout_it_is_brought_up_from(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes import the pcn-agent image only after it was checked (and, when
    this checkout's code differs from the image's, rebuilt): `make k8s`
    built it from the code of its day, and a stale image ran a policy-less
    agent under `make netpol`."""
    from pcn_lab.cluster import bringup, images, install

    calls: list[str] = []
    monkeypatch.setattr(images, "build_images",
                        lambda wait=0.0, only=None: calls.append(f"build {only}"))

    def stop_at_images(image_dir: Path) -> list[dict[str, str]]:
        calls.append("images")
        raise RuntimeError("stop here")

    monkeypatch.setattr(install, "images", stop_at_images)
    b = bringup.Bringup.__new__(bringup.Bringup)
    b.layout = None  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="stop here"):
        b.node_daemons()
    assert calls == ["build ['pcn-agent']", "images"]


def test_a_cluster_going_down_leaves_the_hosts_shared_things_to_one_still_up(
        tmp_path: Path) -> None:
    """Two clusters at once (a test's and `make netpol`'s): the first down
    must not remove the mount points it made in the root file system (the
    other's nodes mount over them: removing one detaches their binds) nor
    restore the sysctls under the other's kubelets; the one still up gets
    them and removes them when it goes. A cluster started while another is
    up records the host's original sysctls, not the kubelets' values."""
    from pcn_lab.cluster import cleanup
    from pcn_lab.cluster.state import orphans

    data_root = tmp_path / "data"
    point = tmp_path / "root-fs" / "var-lib-kubelet"
    point.mkdir(parents=True)
    first = ClusterState(tmp_path / "lab-a", run_id="aaaaaa", workers=1,
                         data_root=str(data_root), created_mountpoints=[str(point)],
                         sysctls={"kernel/panic": "0"})
    second = ClusterState(tmp_path / "lab-b", run_id="bbbbbb", workers=1,
                          data_root=str(data_root), sysctls={"kernel/panic": "0"})
    first.save()
    second.save()
    assert cleanup.host_sysctls([second]) == {"kernel/panic": "0"}  # not what runs now
    others = [o for o in orphans(data_root) if o.run_id != first.run_id]
    assert [o.run_id for o in others] == ["bbbbbb"]
    removed = cleanup.remove(cleanup.Teardown(first.layout, first.created_mountpoints,
                                              {"kernel/panic": "not-written"}), others)
    assert point.is_dir()  # still there for the other cluster's nodes
    assert any("still up" in r for r in removed), removed
    heir = ClusterState.load(second.dir)
    assert heir is not None and heir.created_mountpoints == [str(point)]
    # the last one down removes it
    cleanup.remove(cleanup.Teardown(heir.layout, heir.created_mountpoints, {}), [])
    assert not point.exists()


def test_a_dead_clusters_leftover_state_is_no_heir(tmp_path: Path) -> None:
    """A cluster whose node holders are all gone (a killed test run left its
    state file) is not alive: `down` must not hand the host's mount points
    to it (a new user's teardown re-wrote such a ghost's state); one with a
    live holder is, and so is one in its first steps (no holders yet, its
    state just written)."""
    import os
    import subprocess

    data_root = tmp_path / "data"
    dead = subprocess.Popen(["true"])
    dead.wait()
    ghost = ClusterState(tmp_path / "lab-g", run_id="gggggg", workers=1,
                         data_root=str(data_root), holders={"n1": dead.pid})
    live = ClusterState(tmp_path / "lab-l", run_id="llllll", workers=1,
                        data_root=str(data_root), holders={"n1": os.getpid(), "n2": dead.pid})
    starting = ClusterState(tmp_path / "lab-s", run_id="ssssss", workers=1,
                            data_root=str(data_root))
    for s in (ghost, live, starting):
        s.save()
    assert not ghost.alive()
    assert live.alive()
    assert starting.alive()
    assert not starting.alive(fresh_s=0)
