/**
 * Allocatable capacity: what a host offers to VMs (its CPUs less reserved ones times the vCPU
 * overcommit ratio, its memory less the host's reserve, huge page pools, GPUs) and what the VMs defined
 * on it take, per host and per NUMA node; and the check that refuses a VM that does not fit. Plain
 * TypeScript, no I/O.
 */
import { VmenvError } from "@vmenv/rpc/errors";

export interface CapacitySettings {
  /** vCPUs offered per logical CPU. */
  cpuOvercommit: number;
  /** Logical CPUs kept for the host: the lowest-numbered ones (where housekeeping usually runs). */
  reservedCpus: number;
  /** Memory kept for the host, in bytes (taken from each node in proportion to its memory). */
  reservedMemoryBytes: bigint;
}

export interface HugepagePoolFacts {
  pageSizeBytes: bigint;
  totalPages: bigint;
}

export interface CapacityHost {
  /** Logical CPU ids online. */
  cpus: number[];
  memoryBytes: bigint;
  numaNodes: { id: number; cpus: number[]; memoryTotalBytes: bigint; hugepages: HugepagePoolFacts[] }[];
  hugepages: HugepagePoolFacts[];
}

/** What one VM takes: its maxima (what it may grow to by hotplug without asking again). */
export interface CapacityVm {
  id: string;
  vcpus: number;
  memoryBytes: bigint;
  /** Host CPUs it is pinned to; empty: anywhere. */
  hostCpus: number[];
  running: boolean;
}

export interface CapacityGpu {
  numaNode: number | undefined;
  memoryTotalBytes: bigint;
  state: "available" | "assigned" | "unavailable";
}

export interface HugepageCapacity {
  pageSizeBytes: bigint;
  pagesAllocatable: bigint;
  pagesAllocated: bigint;
}

export interface GpuCapacity {
  gpusTotal: number;
  gpusFree: number;
  gpuMemoryTotalBytes: bigint;
  gpuMemoryFreeBytes: bigint;
}

export interface NodeCapacity extends GpuCapacity {
  id: number;
  vcpusAllocatable: number;
  vcpusAllocated: number;
  memoryAllocatableBytes: bigint;
  memoryAllocatedBytes: bigint;
  hugepages: HugepageCapacity[];
}

export interface Capacity extends GpuCapacity {
  vcpusAllocatable: number;
  vcpusAllocated: number;
  memoryAllocatableBytes: bigint;
  memoryAllocatedBytes: bigint;
  numaNodes: NodeCapacity[];
  hugepages: HugepageCapacity[];
  vms: number;
  runningVms: number;
  cpuOvercommit: number;
  reservedCpus: number;
  reservedMemoryBytes: bigint;
}

const MIB = 1024n * 1024n;

function gpuSums(gpus: readonly CapacityGpu[]): GpuCapacity {
  const usable = gpus.filter((g) => g.state !== "unavailable");
  const free = usable.filter((g) => g.state === "available");
  const mem = (xs: CapacityGpu[]) => xs.reduce((a, g) => a + g.memoryTotalBytes, 0n);
  return {
    gpusTotal: usable.length,
    gpusFree: free.length,
    gpuMemoryTotalBytes: mem(usable),
    gpuMemoryFreeBytes: mem(free),
  };
}

/** The node all of a VM's pinned CPUs are on; undefined when unpinned or spread over several. */
function nodeOf(vm: CapacityVm, host: CapacityHost): number | undefined {
  if (vm.hostCpus.length === 0) return undefined;
  const nodes = new Set(vm.hostCpus.map((c) => host.numaNodes.find((n) => n.cpus.includes(c))?.id));
  const [only] = nodes;
  return nodes.size === 1 ? only : undefined;
}

/** Capacity of a host with these VMs and GPUs. */
export function computeCapacity(
  host: CapacityHost,
  vms: readonly CapacityVm[],
  gpus: readonly CapacityGpu[],
  s: CapacitySettings,
): Capacity {
  const reserved = new Set([...host.cpus].sort((a, b) => a - b).slice(0, s.reservedCpus));
  const offered = (cpus: number[]) =>
    Math.floor(cpus.filter((c) => !reserved.has(c)).length * s.cpuOvercommit);
  const reserveOf = (bytes: bigint) =>
    host.memoryBytes === 0n ? 0n : ((s.reservedMemoryBytes * bytes) / host.memoryBytes / MIB) * MIB;
  const positive = (n: bigint) => (n > 0n ? n : 0n);
  const pools = (ps: HugepagePoolFacts[]) =>
    ps.map((p) => ({ pageSizeBytes: p.pageSizeBytes, pagesAllocatable: p.totalPages, pagesAllocated: 0n }));
  return {
    vcpusAllocatable: offered(host.cpus),
    vcpusAllocated: vms.reduce((a, v) => a + v.vcpus, 0),
    memoryAllocatableBytes: positive(host.memoryBytes - s.reservedMemoryBytes),
    memoryAllocatedBytes: vms.reduce((a, v) => a + v.memoryBytes, 0n),
    numaNodes: host.numaNodes.map((n) => {
      const pinned = vms.filter((v) => nodeOf(v, host) === n.id);
      return {
        id: n.id,
        vcpusAllocatable: offered(n.cpus),
        vcpusAllocated: pinned.reduce((a, v) => a + v.vcpus, 0),
        memoryAllocatableBytes: positive(n.memoryTotalBytes - reserveOf(n.memoryTotalBytes)),
        // Guest memory is not bound to nodes yet (VmPinning.numa_nodes is not built).
        memoryAllocatedBytes: 0n,
        hugepages: pools(n.hugepages),
        ...gpuSums(gpus.filter((g) => g.numaNode === n.id)),
      };
    }),
    hugepages: pools(host.hugepages),
    vms: vms.length,
    runningVms: vms.filter((v) => v.running).length,
    cpuOvercommit: s.cpuOvercommit,
    reservedCpus: reserved.size,
    reservedMemoryBytes: s.reservedMemoryBytes,
    ...gpuSums(gpus),
  };
}

/**
 * Refuses `vm` (new, or grown) when it does not fit beside the host's other VMs: RESOURCE_EXHAUSTED,
 * reason INSUFFICIENT_CAPACITY, metadata naming the VM and the resource, the figures in the message.
 * `others` must not include `vm` itself.
 */
export function checkFits(
  host: CapacityHost,
  others: readonly CapacityVm[],
  vm: CapacityVm,
  s: CapacitySettings,
): void {
  const c = computeCapacity(host, others, [], s);
  const name = `vms/${vm.id}`;
  const refuse = (resource: string, what: string, requested: string, left: string, detail: string) =>
    new VmenvError(
      "resource-exhausted",
      `${name} does not fit on this host: it needs ${requested} ${what}, and ${left} are left (${detail})`,
      {
        reason: "INSUFFICIENT_CAPACITY",
        metadata: { vm: name, resource, requested, available: left },
      },
    );
  const cpuLeft = c.vcpusAllocatable - c.vcpusAllocated;
  if (vm.vcpus > cpuLeft) {
    throw refuse(
      "vcpus",
      "vCPUs",
      String(vm.vcpus),
      String(Math.max(0, cpuLeft)),
      `${c.vcpusAllocatable} allocatable = ${host.cpus.length - c.reservedCpus} logical CPUs × overcommit ${s.cpuOvercommit}; ${c.vcpusAllocated} allocated to other VMs`,
    );
  }
  const memLeft = c.memoryAllocatableBytes - c.memoryAllocatedBytes;
  if (vm.memoryBytes > memLeft) {
    const mib = (b: bigint) => `${b / MIB} MiB`;
    throw refuse(
      "memory",
      "of memory",
      mib(vm.memoryBytes),
      mib(memLeft > 0n ? memLeft : 0n),
      `${mib(c.memoryAllocatableBytes)} allocatable = ${mib(host.memoryBytes)} less ${mib(s.reservedMemoryBytes)} kept for the host; ${mib(c.memoryAllocatedBytes)} allocated to other VMs`,
    );
  }
  const node = nodeOf(vm, host);
  const n = c.numaNodes.find((x) => x.id === node);
  if (n && vm.vcpus > n.vcpusAllocatable - n.vcpusAllocated) {
    throw refuse(
      `numa_nodes/${n.id}/vcpus`,
      `vCPUs on NUMA node ${n.id} (it is pinned there)`,
      String(vm.vcpus),
      String(Math.max(0, n.vcpusAllocatable - n.vcpusAllocated)),
      `${n.vcpusAllocatable} allocatable on the node; ${n.vcpusAllocated} allocated to other VMs pinned there`,
    );
  }
}
