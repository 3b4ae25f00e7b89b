"""The emulated API server's request record: kept whole for tests that read
it, trimmed for long runs (a lab, a benchmark) so requests do not slow down."""

from __future__ import annotations

import time

import pytest

from pcn_lab import merging
from pcn_lab.apiserver import ApiServerError, EmulatedApiServer, apply, get


def _config_map(i: int) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"cm-{i}", "namespace": "default"}, "data": {"i": str(i)}}


def _record(api: EmulatedApiServer) -> int:
    return len(list(api.emulator))


def test_record_is_kept_whole_by_default() -> None:
    with EmulatedApiServer() as api:
        for i in range(30):
            apply(api, _config_map(i))
        assert _record(api) >= 30


def test_record_is_trimmed_and_objects_stay() -> None:
    with EmulatedApiServer(keep_requests=8) as api:
        for i in range(60):
            apply(api, _config_map(i))
        deadline = time.monotonic() + 5
        while _record(api) > 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _record(api) <= 8
        # trimming forgets requests, never objects
        assert get(api, "ConfigMap", "cm-0", "default")["data"] == {"i": "0"}
        assert get(api, "ConfigMap", "cm-59", "default")["data"] == {"i": "59"}


def test_error_answers_are_not_kept_for_ever() -> None:
    """kmock keeps each error it answers (a 404, a 409) for a test to
    re-raise; a long run keeps only the latest, as with requests."""
    with EmulatedApiServer(keep_requests=8) as api:
        for i in range(40):
            with pytest.raises(ApiServerError):
                get(api, "ConfigMap", f"nope-{i}", "default")
        deadline = time.monotonic() + 5
        while len(api.emulator.errors) > 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(api.emulator.errors) <= 8


def test_keep_requests_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EmulatedApiServer(keep_requests=0)


# ----------------------------------------------------------------------------- namespaces
def test_namespaces_are_a_cluster_scoped_resource_and_a_prefix() -> None:
    """/api/v1/namespaces is the Namespace resource (list, watch, create,
    read, patch, delete by name: the agent watches namespaces for
    NetworkPolicy's namespaceSelector), and a prefix of namespaced paths."""
    import json as _json
    import urllib.request

    with EmulatedApiServer() as api:
        watch = urllib.request.urlopen(api.url + "/api/v1/namespaces?watch=true", timeout=10)
        api.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                   "metadata": {"name": "team-a",
                                                                "labels": {"team": "a"}}})
        assert _json.loads(watch.readline())["object"]["metadata"]["name"] == "team-a"
        api.request("PATCH", "/api/v1/namespaces/team-a", {"metadata": {"labels": {"team": "b"}}},
                    "application/merge-patch+json")
        event = _json.loads(watch.readline())
        watch.close()
        assert event["type"] == "MODIFIED" and event["object"]["metadata"]["labels"] == {
            "team": "b"}
        listed = api.request("GET", "/api/v1/namespaces")
        assert [n["metadata"]["name"] for n in listed["items"]] == ["team-a"]
        api.request("POST", "/api/v1/namespaces/team-a/configmaps", _config_map(7) | {
            "metadata": {"name": "cm-7", "namespace": "team-a"}})
        assert get(api, "ConfigMap", "cm-7", "team-a")["metadata"]["namespace"] == "team-a"
        api.request("DELETE", "/api/v1/namespaces/team-a")
        with pytest.raises(ApiServerError) as gone:
            api.request("GET", "/api/v1/namespaces/team-a")
        assert gone.value.status == 404


def test_not_found_is_worded_as_kube_apiserver_words_it() -> None:
    """A missing object is NotFound with `<plural>.<group> "<name>" not
    found`, as kubectl prints it from a real server; kmock's own message told
    the reader to add the object to `kmock.objects[...]` (trial of issue 12)."""
    import json as _json
    import urllib.error
    import urllib.request

    with EmulatedApiServer() as api:
        for method, path, message, details in (
                ("GET", "/apis/pcn.dev/v1alpha1/namespaces/web/networkfunctions/nope",
                 'networkfunctions.pcn.dev "nope" not found',
                 {"name": "nope", "group": "pcn.dev", "kind": "networkfunctions"}),
                ("DELETE", "/api/v1/namespaces/default/configmaps/gone",
                 'configmaps "gone" not found',
                 {"name": "gone", "group": "", "kind": "configmaps"}),
                ("GET", "/apis/pcn.dev/v1alpha1/nosuchthings",
                 "the server could not find the requested resource",
                 {"group": "pcn.dev", "kind": "nosuchthings"})):
            req = urllib.request.Request(api.url + path, method=method)
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=10)
            body = _json.loads(err.value.read())
            assert err.value.code == 404
            assert (body["kind"], body["reason"], body["message"], body["details"]) == (
                "Status", "NotFound", message, details), body
            with pytest.raises(ApiServerError) as wrapped:
                api.request(method, path)
            assert str(wrapped.value) == f"HTTP 404: {message}"


# ----------------------------------------------------------------------------- PUT
def test_put_replaces_the_object_as_the_api_server_does() -> None:
    """PUT (update) replaces the whole object: fields left out are gone. The
    server keeps what it owns (uid, creationTimestamp: set on create, as
    kube-apiserver does, whatever the client sent); an object that does
    not exist is 404, a name that differs from the URL's 400; a watch sees
    MODIFIED."""
    import json as _json
    import urllib.request

    with EmulatedApiServer() as api:
        cm = {**_config_map(1), "data": {"a": "1", "b": "2"}}
        cm["metadata"] = {**cm["metadata"], "labels": {"x": "y"}}
        cm["metadata"]["uid"] = "mine"
        apply(api, cm)
        before = get(api, "ConfigMap", "cm-1", "default")
        assert before["metadata"]["uid"] not in ("", "mine")
        assert before["metadata"]["creationTimestamp"].endswith("Z")
        path = "/api/v1/namespaces/default/configmaps/cm-1"
        watch = urllib.request.urlopen(api.url + "/api/v1/namespaces/default/configmaps"
                                       "?watch=true", timeout=10)
        assert _json.loads(watch.readline())["type"] == "ADDED"
        out = api.request("PUT", path, {"apiVersion": "v1", "kind": "ConfigMap",
                                        "metadata": {"name": "cm-1", "namespace": "default"},
                                        "data": {"b": "3"}})
        now = get(api, "ConfigMap", "cm-1", "default")
        assert out == now
        assert now["data"] == {"b": "3"}
        assert "labels" not in now["metadata"]
        assert now["metadata"]["uid"] == before["metadata"]["uid"]
        assert now["metadata"]["creationTimestamp"] == before["metadata"]["creationTimestamp"]
        event = _json.loads(watch.readline())
        watch.close()
        assert event["type"] == "MODIFIED" and event["object"]["data"] == {"b": "3"}
        with pytest.raises(ApiServerError) as missing:
            api.request("PUT", "/api/v1/namespaces/default/configmaps/nope",
                        {"metadata": {"name": "nope"}, "data": {}})
        assert missing.value.status == 404
        with pytest.raises(ApiServerError) as renamed:
            api.request("PUT", path, {"metadata": {"name": "other"}, "data": {}})
        assert renamed.value.status == 400


def test_a_patch_that_changes_the_spec_raises_the_generation() -> None:
    """As kube-apiserver: metadata.generation goes up when a write changes
    anything but metadata and status (PUT or PATCH), so observedGeneration
    tells whether a controller saw the latest spec (Argo CD's health check
    relies on it); a patch of labels or status leaves it."""
    with EmulatedApiServer() as api:
        nf = {"apiVersion": "pcn.dev/v1alpha1", "kind": "NetworkFunction",
              "metadata": {"name": "fw", "namespace": "default"},
              "spec": {"type": "firewall", "config": {"rules": []}}}
        apply(api, nf)
        path = "/apis/pcn.dev/v1alpha1/namespaces/default/networkfunctions/fw"

        def generation() -> int:
            return int(get(api, "NetworkFunction", "fw", "default")["metadata"]["generation"])

        assert generation() == 1
        out = api.request("PATCH", path, {"spec": {"config": {"defaultAction": "drop"}}})
        assert out["metadata"]["generation"] == 2 == generation()
        api.request("PATCH", path, {"metadata": {"labels": {"a": "b"}}})
        api.request("PATCH", path, {"spec": {"config": {"defaultAction": "drop"}}})  # no change
        assert generation() == 2
        api.request("PATCH", path, {"spec": {"type": "firewall"}, "metadata": {"generation": 9}})
        assert generation() == 2  # the server's, not the client's


def test_put_keeps_the_status_of_a_resource_with_a_status_subresource() -> None:
    """For Pods, Services and pcn's custom resources PUT ignores .status and
    PUT .../status changes only .status (the API server's update strategies)."""
    with EmulatedApiServer() as api:
        apply(api, {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "p", "namespace": "default"},
                    "spec": {"nodeName": "n1"}, "status": {"podIP": "10.244.1.10"}})
        path = "/api/v1/namespaces/default/pods/p"
        api.request("PUT", path, {"apiVersion": "v1", "kind": "Pod",
                                  "metadata": {"name": "p", "namespace": "default"},
                                  "spec": {"nodeName": "n2"}, "status": {"podIP": "1.2.3.4"}})
        pod = get(api, "Pod", "p", "default")
        assert pod["spec"] == {"nodeName": "n2"} and pod["status"] == {"podIP": "10.244.1.10"}
        api.request("PUT", path + "/status", {"metadata": {"name": "p"}, "spec": {"x": 1},
                                              "status": {"phase": "Running"}})
        pod = get(api, "Pod", "p", "default")
        assert pod["spec"] == {"nodeName": "n2"} and pod["status"] == {"phase": "Running"}


# ----------------------------------------------------------------------------- apply
def _web(**extra: object) -> dict:
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "namespace": "demo", "labels": {"app": "web", "tier": "fe"}},
           "spec": {"type": "NodePort", "selector": {"app": "web"}, "sessionAffinity": "ClientIP",
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}
    svc["spec"].update(extra)
    return svc


def test_apply_removes_what_left_the_yaml_and_keeps_what_others_set() -> None:
    """kubectl apply: a label and a field removed from the configuration go;
    what the server or a controller set (cluster IP, a port's nodePort, a
    label of its own) stays; applying the same again changes nothing."""
    with EmulatedApiServer() as api:
        assert apply(api, _web()) == "created"
        api.request("PATCH", "/api/v1/namespaces/demo/services/web", {
            "metadata": {"labels": {"controller": "x"}},
            "spec": {"clusterIP": "10.96.0.10", "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080,
                 "protocol": "TCP"}]}}, "application/merge-patch+json")
        edited = _web()
        del edited["metadata"]["labels"]["tier"]
        del edited["spec"]["sessionAffinity"]
        edited["spec"]["ports"][0]["targetPort"] = 9090
        assert apply(api, edited) == "configured"
        svc = get(api, "Service", "web", "demo")
        assert svc["metadata"]["labels"] == {"app": "web", "controller": "x"}
        assert "sessionAffinity" not in svc["spec"]
        assert svc["spec"]["clusterIP"] == "10.96.0.10"
        assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": 9090,
                                         "nodePort": 30080, "protocol": "TCP"}]
        assert apply(api, edited) == "unchanged"


def test_apply_replaces_the_lists_of_a_custom_resource() -> None:
    """Custom resources have no merge keys: kubectl sends a JSON merge patch,
    so a list is the applied one, whole."""
    nf = {"apiVersion": "pcn.dev/v1alpha1", "kind": "NetworkFunction",
          "metadata": {"name": "fw", "namespace": "demo"},
          "spec": {"type": "firewall", "config": {"defaultAction": "drop", "rules": [
              {"action": "drop", "protocol": "tcp", "destinationPorts": "22"},
              {"action": "drop", "protocol": "tcp", "destinationPorts": "23"}]}}}
    with EmulatedApiServer() as api:
        apply(api, nf)
        nf["spec"]["config"] = {"rules": [nf["spec"]["config"]["rules"][1]]}
        assert apply(api, nf) == "configured"
        assert get(api, "NetworkFunction", "fw", "demo")["spec"]["config"] == {
            "rules": [{"action": "drop", "protocol": "tcp", "destinationPorts": "23"}]}


def test_merge_patch_and_three_way_merge() -> None:
    """RFC 7386: the patch between two objects turns one into the other.
    kubectl's strategic merge of a keyed list: applied elements in the
    applied order, merged with the live ones; an element dropped from the
    configuration goes, one added by someone else stays."""
    cur = {"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": {"f": 1}}
    want = {"a": {"b": 2, "c": [2]}, "e": {}, "g": {"h": [3]}}
    patch = merging.merge_patch(cur, want)
    assert patch == {"a": {"b": 2, "c": [2]}, "d": None, "e": {"f": None}, "g": {"h": [3]}}
    assert merging.apply_merge_patch(cur, patch) == want
    assert merging.merge_patch(want, want) == {}
    original = {"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b"}]}}
    modified = {"spec": {"containers": [{"name": "c"}, {"name": "a", "image": "2"}]}}
    current = {"spec": {"containers": [{"name": "a", "image": "1", "tty": True}, {"name": "b"},
                                       {"name": "sidecar"}]}}
    assert merging.three_way_merge(original, modified, current, strategic=True) == {
        "spec": {"containers": [{"name": "c"}, {"name": "a", "image": "2", "tty": True},
                                {"name": "sidecar"}]}}
    assert merging.three_way_merge(original, modified, current, strategic=False) == modified


def test_strategic_merge_patch() -> None:
    """The directives kubectl sends for built-in kinds: keyed lists merge,
    $setElementOrder orders, $patch delete/replace, $retainKeys,
    $deleteFromPrimitiveList; merged scalar lists (finalizers) gain values."""
    live = {"metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["x", "y"]},
            "spec": {"ports": [{"name": "http", "port": 80, "nodePort": 30080},
                               {"name": "dns", "port": 53, "protocol": "UDP"}],
                     "selector": {"app": "web", "tier": "fe"},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}}
    patch = {"metadata": {"labels": {"b": None}, "finalizers": ["z"],
                          "$deleteFromPrimitiveList/finalizers": ["x"]},
             "spec": {"$setElementOrder/ports": [{"port": 8443}, {"port": 80}],
                      "ports": [{"port": 80, "targetPort": 8080}, {"port": 8443},
                                {"port": 53, "$patch": "delete"}],
                      "selector": {"$patch": "replace", "app": "api"},
                      "strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}
    assert merging.apply_strategic_patch(live, patch) == {
        "metadata": {"labels": {"a": "1"}, "finalizers": ["y", "z"]},
        "spec": {"ports": [{"port": 8443},
                           {"name": "http", "port": 80, "nodePort": 30080, "targetPort": 8080}],
                 "selector": {"app": "api"}, "strategy": {"type": "Recreate"}}}


def test_a_new_service_gets_its_addresses_when_created() -> None:
    """As kube-apiserver allocates on create: the answer to the POST (and
    the ADDED event) already has the cluster IP, the NodePorts and the
    defaults; Services created at once get different addresses. A new Pod
    is Pending."""
    from concurrent.futures import ThreadPoolExecutor

    def svc(name: str) -> dict:
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "demo"},
                "spec": {"type": "NodePort", "ports": [{"port": 80}]}}

    with EmulatedApiServer() as api:
        made = api.request("POST", "/api/v1/namespaces/demo/services", svc("web"))
        spec = made["spec"]
        assert spec["clusterIP"].startswith("10.96.") and spec["clusterIPs"] == [spec["clusterIP"]]
        assert spec["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 80,
                                  "nodePort": spec["ports"][0]["nodePort"]}]
        assert spec["externalTrafficPolicy"] == "Cluster" and spec["sessionAffinity"] == "None"
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: api.request(
                "POST", "/api/v1/namespaces/demo/services", svc(f"s{i}")), range(16)))
        pod = api.request("POST", "/api/v1/namespaces/demo/pods",
                          {"metadata": {"name": "p"}, "spec": {}})
        assert pod["status"] == {"phase": "Pending"}
        ips = {a["spec"]["clusterIP"] for a in [made, *answers]}
        ports = {a["spec"]["ports"][0]["nodePort"] for a in [made, *answers]}
        assert len(ips) == len(ports) == 17
