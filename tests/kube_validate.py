"""Checks the Kubernetes manifests of deploy/kubernetes/ (run by tests/container_deploy.rs).

    kube_validate.py schemas DIR [--keda-crd FILE]
        Every core manifest against the Kubernetes API schemas of
        kubernetes-validate, strictly (an unknown field is an error), for the
        oldest and the newest Kubernetes version checked (KUBERNETES_VERSIONS).
        KEDA resources against the models that cloudcoil-models-keda generates
        from KEDA's CRDs (a field those models do not know is an error too),
        and, with --keda-crd, against the openAPIV3Schema of a KEDA CRD file
        (config/crd/bases/keda.sh_scaledobjects.yaml of a KEDA release).

    kube_validate.py consistency DIR
        What no schema sees: selectors that match their pods, the names and
        keys the pods refer to, the ports of the probes, the grace period
        against the drain timeout, the KEDA triggers against the services
        the workers serve, non-root and read-only containers with resources,
        and kustomization.yaml listing every manifest.

Prints one line per check; exits 1 when any fails.
"""

import argparse
import copy
import os
import re
import sys

import yaml

KUBERNETES_VERSIONS = ["1.29.0", None]  # None: the newest kubernetes-validate knows

failures = []


def ok(what):
    print(f"ok    {what}")


def fail(what):
    print(f"FAIL  {what}")
    failures.append(what)


def check(cond, what):
    if cond:
        ok(what)
    else:
        fail(what)
    return cond


def manifests(directory):
    """(file name, document) for every YAML document of the directory's .yaml files, kustomization.yaml aside."""
    docs = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".yaml") or name == "kustomization.yaml":
            continue
        with open(os.path.join(directory, name)) as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    docs.append((name, doc))
    return docs


def label(name, doc):
    return f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# --- schemas ---------------------------------------------------------------


def unknown_fields(schema, value, path="$"):
    """Paths in value that an OpenAPI v3 structural schema does not declare (Kubernetes would prune them)."""
    found = []
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return found
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            if props is not None and key in props:
                found += unknown_fields(props[key], sub, f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(extra, sub, f"{path}.{key}")
            elif props is not None and extra is not True:
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, sub in enumerate(value):
            found += unknown_fields(schema["items"], sub, f"{path}[{i}]")
    return found


def dropped(original, parsed, path="$"):
    """Paths of original that are missing from parsed (fields a model ignored)."""
    lost = []
    if isinstance(original, dict):
        if not isinstance(parsed, dict):
            return [path]
        for key, sub in original.items():
            if key not in parsed:
                lost.append(f"{path}.{key}")
            else:
                lost += dropped(sub, parsed[key], f"{path}.{key}")
    elif isinstance(original, list):
        if not isinstance(parsed, list) or len(parsed) != len(original):
            return [path]
        for i, (a, b) in enumerate(zip(original, parsed)):
            lost += dropped(a, b, f"{path}[{i}]")
    return lost


def keda_model(doc):
    from cloudcoil.models.keda import v1alpha1

    kinds = {"ScaledObject": v1alpha1.ScaledObject, "TriggerAuthentication": v1alpha1.TriggerAuthentication}
    model = kinds.get(doc.get("kind"))
    if model is None:
        return f"no cloudcoil model for KEDA kind {doc.get('kind')}"
    try:
        parsed = model.model_validate(copy.deepcopy(doc))
    except Exception as e:  # pydantic.ValidationError, with every error listed
        return str(e)
    lost = dropped(doc, parsed.model_dump(mode="json", by_alias=True, exclude_unset=True))
    if lost:
        return "fields the KEDA models do not know: " + ", ".join(lost)
    return None


def keda_crd(doc, crd_file):
    import jsonschema

    with open(crd_file) as f:
        crd = yaml.safe_load(f)
    group, _, version = doc["apiVersion"].partition("/")
    if crd["spec"]["group"] != group or crd["spec"]["names"]["kind"] != doc["kind"]:
        return f"{crd_file} defines {crd['spec']['names']['kind']}.{crd['spec']['group']}, not {doc['kind']}.{group}"
    served = [v for v in crd["spec"]["versions"] if v["name"] == version]
    if not served:
        return f"{crd_file} has no version {version}"
    schema = served[0]["schema"]["openAPIV3Schema"]
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '$'}: {e.message}"
        for e in jsonschema.Draft4Validator(schema).iter_errors(body)
    ]
    errors += [f"{p}: not in the CRD's schema" for p in unknown_fields(schema, body)]
    return "; ".join(errors) or None


def schemas(directory, crd_file):
    import kubernetes_validate

    latest = kubernetes_validate.latest_version()
    versions = [v or latest for v in KUBERNETES_VERSIONS]
    for name, doc in manifests(directory):
        what = label(name, doc)
        if doc.get("apiVersion", "").startswith("keda.sh/"):
            problem = keda_model(doc)
            check(problem is None, f"{what}: KEDA models of cloudcoil-models-keda" + (f": {problem}" if problem else ""))
            if crd_file:
                problem = keda_crd(doc, crd_file)
                check(problem is None, f"{what}: {crd_file}" + (f": {problem}" if problem else ""))
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                ok(f"{what}: Kubernetes {version} (strict)")
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.absolute_path) or "$"
                fail(f"{what}: Kubernetes {version} (strict): {where}: {e.message}")
            except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.VersionNotSupportedError) as e:
                fail(f"{what}: Kubernetes {version}: {e.message}")


# --- consistency -----------------------------------------------------------


def pod_specs(docs):
    """(Deployment document, its pod template) for each Deployment."""
    return [(d, d["spec"]["template"]) for _, d in docs if d.get("kind") == "Deployment"]


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def env_names(container, by_kind):
    """The variables a container gets: its env, and the keys of the ConfigMaps and Secrets of its envFrom."""
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source:
                ref = by_kind.get((kind, source[key]["name"]))
                if ref:
                    names |= set(ref.get("data", {})) | set(ref.get("stringData", {}))
    return names


def config_value(container, by_kind, var):
    for e in container.get("env", []):
        if e["name"] == var and "value" in e:
            return e["value"]
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            ref = by_kind.get(("ConfigMap", source["configMapRef"]["name"]), {})
            if var in ref.get("data", {}):
                return ref["data"][var]
    return None


def consistency(directory):
    docs = manifests(directory)
    by_kind = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}

    with open(os.path.join(directory, "kustomization.yaml")) as f:
        listed = yaml.safe_load(f).get("resources", [])
    files = sorted({name for name, _ in docs})
    check(sorted(listed) == files, f"kustomization.yaml lists every manifest: {sorted(listed)} == {files}")

    deployments = pod_specs(docs)
    check({d["metadata"]["name"] for d, _ in deployments} == {"callq-coordinator", "callq-worker"},
          "a coordinator and a worker Deployment")
    for deployment, template in deployments:
        name = deployment["metadata"]["name"]
        pod = template["spec"]
        labels = template["metadata"]["labels"]
        check(matches(deployment["spec"]["selector"]["matchLabels"], labels), f"{name}: its selector matches its pods")
        sc = pod.get("securityContext", {})
        check(sc.get("runAsNonRoot") is True and sc.get("runAsUser") == 10001,
              f"{name}: runs as non-root, uid 10001 (the image's user)")
        check(pod.get("automountServiceAccountToken") is False, f"{name}: no service account token")
        check(pod.get("enableServiceLinks") is False, f"{name}: no Service links (they would add CALLQ_* variables)")
        for c in pod["containers"]:
            what = f"{name}/{c['name']}"
            csc = c.get("securityContext", {})
            check(csc.get("readOnlyRootFilesystem") is True and csc.get("allowPrivilegeEscalation") is False
                  and csc.get("capabilities", {}).get("drop") == ["ALL"],
                  f"{what}: read-only root, no privilege escalation, no capabilities")
            res = c.get("resources", {})
            check(all(k in res.get(w, {}) for w in ("requests", "limits") for k in ("cpu", "memory")),
                  f"{what}: cpu and memory requests and limits")
            check(c.get("args", [""])[0] in ("coordinator", "worker"), f"{what}: runs `callq {c.get('args', [''])[0]}`")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef") or e.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    kind = "Secret" if "secretKeyRef" in e["valueFrom"] else "ConfigMap"
                    target = by_kind.get((kind, ref["name"]), {})
                    keys = set(target.get("data", {})) | set(target.get("stringData", {}))
                    check(ref["key"] in keys, f"{what}: {e['name']} from {kind} {ref['name']} key {ref['key']}")
            for source in c.get("envFrom", []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key in source:
                        check((kind, source[key]["name"]) in by_kind, f"{what}: envFrom {kind} {source[key]['name']} exists")
            names = env_names(c, by_kind)
            check({"CALLQ_BROKER", "CALLQ_HTTP"} <= names, f"{what}: gets CALLQ_BROKER and CALLQ_HTTP")
            http = config_value(c, by_kind, "CALLQ_HTTP") or ""
            port = re.search(r":(\d+)$", http)
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            check(port is not None and ports.get("http") == int(port.group(1)),
                  f"{what}: the port named http ({ports.get('http')}) is the one CALLQ_HTTP names ({http})")
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                get = c.get(probe, {}).get("httpGet", {})
                check(get.get("path") == path and get.get("port") in ("http", ports.get("http")),
                      f"{what}: {probe} is GET {path} on the http port")
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"] for v in pod.get("volumes", [])}
            check(all(m["name"] in volumes for m in c.get("volumeMounts", [])), f"{what}: its mounts name volumes of the pod")
            if c["args"][0] == "worker":
                drain = int(config_value(c, by_kind, "CALLQ_WORKER__DRAIN_TIMEOUT") or 30000)
                grace = pod.get("terminationGracePeriodSeconds", 30)
                check(grace * 1000 > drain,
                      f"{what}: terminationGracePeriodSeconds {grace} s is above the drain timeout {drain} ms")
                check("/var/lib/callq" in mounts, f"{what}: a writable /var/lib/callq")
            else:
                check("CALLQ_COORDINATOR__POSTGRES" in names, f"{what}: keeps its ledger in PostgreSQL")
                check(deployment["spec"].get("replicas", 1) >= 2, f"{what}: two coordinators or more")

    worker = by_kind.get(("Deployment", "callq-worker"))
    coordinator = by_kind.get(("Deployment", "callq-coordinator"))
    check(worker is not None and "replicas" not in worker["spec"], "callq-worker: no replicas (KEDA owns the count)")

    pdbs = [d for _, d in docs if d.get("kind") == "PodDisruptionBudget"]
    for deployment in (coordinator, worker):
        if deployment is None:
            continue
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [p["metadata"]["name"] for p in pdbs if matches(p["spec"]["selector"]["matchLabels"], labels)]
        check(len(covering) == 1, f"{deployment['metadata']['name']}: exactly one PodDisruptionBudget ({covering})")

    for _, svc in [(n, d) for n, d in docs if d.get("kind") == "Service"]:
        name = svc["metadata"]["name"]
        selected = [t for _, t in deployments if matches(svc["spec"]["selector"], t["metadata"]["labels"])]
        check(len(selected) == len(deployments), f"Service {name}: selects every callq pod")
        for p in svc["spec"]["ports"]:
            check(all(any(cp.get("name") == p["targetPort"] for c in t["spec"]["containers"] for cp in c.get("ports", []))
                      for t in selected), f"Service {name}: targetPort {p['targetPort']} is a port of each pod")

    scaled = [d for _, d in docs if d.get("kind") == "ScaledObject"]
    check(len(scaled) == 1, "one ScaledObject")
    for so in scaled:
        ref = so["spec"]["scaleTargetRef"]
        check(ref.get("kind", "Deployment") == "Deployment" and ref.get("name") == "callq-worker",
              "ScaledObject: scales the Deployment callq-worker")
        check(1 <= so["spec"].get("minReplicaCount", 0) <= so["spec"].get("maxReplicaCount", 100),
              "ScaledObject: 1 <= minReplicaCount <= maxReplicaCount")
        if worker is None:
            continue
        container = worker["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        services = args[args.index("--services") + 1].split(",")
        queues = sorted(t["metadata"].get("queueName") for t in so["spec"]["triggers"] if t["type"] == "rabbitmq")
        check(queues == sorted(f"callq.{band}.{s}" for s in services for band in ("call", "high")),
              f"ScaledObject: a trigger per band of each service the workers serve: {queues}")
        capacity = config_value(container, by_kind, "CALLQ_WORKER__CAPACITY")
        for t in so["spec"]["triggers"]:
            m = t["metadata"]
            env = m.get("hostFromEnv")
            check(env in env_names(container, by_kind), f"ScaledObject: {m.get('queueName')}: hostFromEnv {env} is a variable of the worker")
            check(m.get("mode") == "QueueLength" and m.get("value") == capacity,
                  f"ScaledObject: {m.get('queueName')}: QueueLength target {m.get('value')} is the worker capacity {capacity}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["schemas", "consistency"])
    parser.add_argument("directory")
    parser.add_argument("--keda-crd", help="a KEDA CRD file to validate the KEDA resources against as well")
    args = parser.parse_args()
    if args.what == "schemas":
        schemas(args.directory, args.keda_crd)
    else:
        consistency(args.directory)
    print(f"kube_validate {args.what}: {len(failures)} of the checks failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
