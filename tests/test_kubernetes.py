"""deploy/kubernetes/: the manifests, checked without a cluster (there is none on
the project's machines; this is all that is tested of them): every hiocluster
container's arguments parse with the CLI's own parser (Kubernetes' $(VAR)
expanded from the variables the container defines), names, labels and ports
agree across objects, the keys come from a Secret mounted read-only and are
never in the files, the supervisor's plan is valid (``hiocluster check`` with
those hosts), and the service's topology loads and listens on the port the
probes and the Service use."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from hiocluster.cli import build_parser
from hiocluster.topology import loads, resolve_services

from conftest import REPO
from test_compose import check_plan

DEPLOY = REPO / "deploy" / "kubernetes"
IMAGE = "hiocluster:local"
#: what Kubernetes would put in $(VAR) for a pod: examples of the right shape
FIELDS = {"metadata.name": "hiocluster-agent-0", "status.podIP": "198.18.0.2"}


def objects(name: str) -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for document in yaml.safe_load_all((DEPLOY / name).read_text()):
        found[document["kind"], document["metadata"]["name"]] = document
    return found


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def expanded(container: dict[str, Any]) -> list[str]:
    """The container's args with $(VAR) expanded as Kubernetes does, from its env."""
    values = {}
    for variable in container.get("env", []):
        field = variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        values[variable["name"]] = FIELDS[field] if field else variable["value"]

    def one(found: re.Match[str]) -> str:
        assert found[1] in values, f"$({found[1]}) is not defined in {container['name']}"
        return values[found[1]]

    return [re.sub(r"\$\((\w+)\)", one, arg) for arg in container["args"]]


def hiocluster_containers(objs: dict[tuple[str, str], dict[str, Any]]) -> list[tuple[Any, ...]]:
    """(object, container, parsed args) of every container running hiocluster."""
    parser = build_parser()
    found = []
    for obj in objs.values():
        if "template" not in obj.get("spec", {}):
            continue
        spec = pod_spec(obj)
        for container in spec["containers"] + spec.get("initContainers", []):
            if container["image"] == IMAGE and "args" in container:
                try:
                    args = parser.parse_args(expanded(container))
                except SystemExit as exc:
                    raise AssertionError(f"{obj['metadata']['name']}/{container['name']}: "
                                         f"{container['args']} is not a valid hiocluster "
                                         "command line") from exc
                found.append((obj, container, args))
    return found


@pytest.mark.parametrize("name", ["lockstep.yaml", "service.yaml"])
def test_every_container_runs_a_valid_hiocluster_command(name: str) -> None:
    objs = objects(name)
    found = hiocluster_containers(objs)
    assert found
    for obj, container, _ in found:
        # no secret is ever in the files; every Secret volume is mounted read-only
        spec = pod_spec(obj)
        secrets = {volume["name"] for volume in spec.get("volumes", []) if "secret" in volume}
        for mount in container.get("volumeMounts", []):
            if mount["name"] in secrets:
                assert mount.get("readOnly") is True, (container["name"], mount)
        assert "resources" in container and "limits" in container["resources"]
        # the pod template's labels are what its controller selects
        selector = obj["spec"].get("selector", {}).get("matchLabels")
        if selector is not None:
            assert selector.items() <= obj["spec"]["template"]["metadata"]["labels"].items()
    assert not [kind for kind, _ in objs if kind == "Secret"]


def test_the_lockstep_hosts_keys_and_plan_agree(cli_env, tmp_path: Path) -> None:
    objs = objects("lockstep.yaml")
    found = hiocluster_containers(objs)
    agents = [(obj, container, args) for obj, container, args in found
              if args.command == "agent"]
    [(agent_set, agent, agent_args)] = agents
    [(job, _, run)] = [item for item in found if item[2].command == "run"]
    headless = objs["Service", agent_set["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == agent_set["spec"]["template"]["metadata"]["labels"]
    port = int(agent_args.listen.rpartition(":")[2])
    assert [p["targetPort"] for p in headless["spec"]["ports"]] == [port]
    assert [p["containerPort"] for p in agent["ports"]] == [port]
    assert agent["readinessProbe"]["tcpSocket"]["port"] == port
    # each pod is the host named after it: --name is the pod's name, its key the same
    assert agent["args"][agent["args"].index("--name") + 1] == "$(POD_NAME)"
    pods = [f"{agent_set['metadata']['name']}-{n}" for n in range(agent_set["spec"]["replicas"])]
    service = headless["metadata"]["name"]
    assert dict(run.host) == {pod: f"tcp://{pod}.{service}:{port}" for pod in pods}
    assert agent_args.trust == ["supervisor.key"] and run.keys == agent_args.keys
    # both mount the one keys Secret where --keys points
    for obj, container in ((agent_set, agent), (job, pod_spec(job)["containers"][0])):
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == run.keys]
        [volume] = [v for v in pod_spec(obj)["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == "hiocluster-keys"
    # the comment's keygen line makes exactly the keys they use
    keygen = next(line for line in (DEPLOY / "lockstep.yaml").read_text().splitlines()
                  if "hiocluster keygen keys" in line).split()[4:]
    assert keygen == ["supervisor", *pods]
    assert pod_spec(job)["restartPolicy"] == "Never"
    check_plan(run, keygen, cli_env, tmp_path)


def test_the_service_listens_where_its_probes_and_service_look() -> None:
    objs = objects("service.yaml")
    [(deployment, container, args)] = hiocluster_containers(objs)
    assert args.command == "run"
    [mount] = container["volumeMounts"]
    assert mount["readOnly"] is True and args.topology.startswith(mount["mountPath"] + "/")
    [volume] = [v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"]]
    config = objs["ConfigMap", volume["configMap"]["name"]]
    topology = loads(config["data"][args.topology[len(mount["mountPath"]) + 1:]])
    resolve_services(topology, str(REPO))  # its classes are the image's /app ones
    [spec] = topology.services
    port = int(spec.address.rpartition(":")[2])
    assert spec.address.startswith("0.0.0.0:")  # a pod's every address, not loopback
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert container["readinessProbe"]["httpGet"]["port"] == port
    service = objs["Service", deployment["metadata"]["name"]]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [port]
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
