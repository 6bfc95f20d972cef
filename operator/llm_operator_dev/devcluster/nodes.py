"""The fake nodes kwok plays: GPU nodes as the NVIDIA GPU operator labels them, and one CPU node.

GPU nodes carry what the scheduler and the operator look at on a real GPU cluster:

- ``nvidia.com/gpu`` capacity (the device plugin's extended resource), 8 per node;
- the labels GPU feature discovery sets (``nvidia.com/gpu.product``, ``.memory`` in MiB,
  ``.count``, ``.family``, ``.present``);
- the taint ``nvidia.com/gpu=present:NoSchedule`` (GKE puts exactly this on GPU node pools;
  other platforms use the same key), so that only pods that tolerate ``nvidia.com/gpu``
  (``operator: Exists``) land there, and tolerations are tested for real.

The CPU node has no taint, so pods without tolerations (the operator, the gateway, system
pods) have somewhere to run. kwok manages only nodes annotated ``kwok.x-k8s.io/node: fake``.
"""

from __future__ import annotations

from typing import Any

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_MEMORY_MIB = "81559"  # what GFD reports for an H100 80GB HBM3
GPUS_PER_NODE = 8
GPU_NODE_COUNT = 3
GPU_TAINT: dict[str, str] = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
KWOK_ANNOTATION = ("kwok.x-k8s.io/node", "fake")


def _node(
    name: str,
    k8s_version: str,
    labels: dict[str, str],
    capacity: dict[str, str],
    taints: list[dict[str, str]],
    pod_cidr: str,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {
                KWOK_ANNOTATION[0]: KWOK_ANNOTATION[1],
                "node.alpha.kubernetes.io/ttl": "0",
            },
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                **labels,
            },
        },
        # The pod runner gives pods addresses from here; loopback, so that they are this
        # machine's without any network set-up.
        "spec": {
            "podCIDR": pod_cidr,
            "podCIDRs": [pod_cidr],
            **({"taints": taints} if taints else {}),
        },
        # Status is accepted on create (a kubelet registers its node this way); kwok keeps
        # capacity and fills in conditions, addresses and heartbeats.
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": k8s_version,
                "kubeProxyVersion": k8s_version,
                "containerRuntimeVersion": "kwok",
                "kernelVersion": "kwok",
                "osImage": "kwok fake node",
                "bootID": "",
                "machineID": "",
                "systemUUID": "",
            },
        },
    }


def desired_nodes(k8s_version: str) -> list[dict[str, Any]]:
    """GPU nodes ``gpu-0``..``gpu-2`` (8 H100 each) and the untainted ``cpu-0``."""
    gpu_labels = {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": GPU_PRODUCT,
        "nvidia.com/gpu.memory": GPU_MEMORY_MIB,
        "nvidia.com/gpu.count": str(GPUS_PER_NODE),
        "nvidia.com/gpu.family": "hopper",
        "node.kubernetes.io/instance-type": "kwok-8xh100",
    }
    # An 8-GPU H100 server (p5.48xlarge/ND H100 v5 class): 192 vCPUs, 2 TiB of memory.
    gpu_capacity = {
        "cpu": "192",
        "memory": "2Ti",
        "ephemeral-storage": "4Ti",
        "pods": "110",
        GPU_RESOURCE: str(GPUS_PER_NODE),
    }
    nodes = [
        _node(f"gpu-{i}", k8s_version, gpu_labels, gpu_capacity, [GPU_TAINT], pod_cidr(i + 1))
        for i in range(GPU_NODE_COUNT)
    ]
    cpu_capacity = {"cpu": "32", "memory": "128Gi", "ephemeral-storage": "1Ti", "pods": "110"}
    cpu_labels = {"node.kubernetes.io/instance-type": "kwok-cpu"}
    nodes.append(_node("cpu-0", k8s_version, cpu_labels, cpu_capacity, [], pod_cidr(0)))
    return nodes


def pod_cidr(index: int) -> str:
    """Node ``index``'s pod addresses: 127.1.<index>.0/24 (cpu-0 is 0, gpu-N is N + 1)."""
    return f"127.1.{index}.0/24"


def is_ready(node: dict[str, Any]) -> bool:
    conditions = node.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
