import type { VmRecord, VmSpec } from "../vmm/domain.js";
import {
  type Capacity,
  type CapacityGpu,
  type CapacityHost,
  type CapacitySettings,
  type CapacityVm,
  checkFits,
  computeCapacity,
} from "./capacity.js";
import type { HostInventory } from "./inventory.js";

export interface CapacitySourceDeps {
  inventory: () => Promise<Pick<HostInventory, "cpu" | "numaNodes" | "memory" | "hugepages">>;
  /** The agent's VMs (all of them, running or not). */
  vms: () => readonly VmRecord[];
  /** The host's GPUs. */
  gpus: () => Promise<CapacityGpu[]>;
  settings: CapacitySettings;
}

/** What a VM takes: its maxima (it may grow to them by hotplug). */
export function vmDemand(id: string, spec: VmSpec, running: boolean): CapacityVm {
  return {
    id,
    vcpus: Math.max(spec.vcpus, spec.maxVcpus),
    // biome-ignore lint/complexity/useMathMinMax: bigints; Math.max takes numbers only
    memoryBytes: spec.maxMemoryBytes > spec.memoryBytes ? spec.maxMemoryBytes : spec.memoryBytes,
    hostCpus: [...spec.hostCpus],
    running,
  };
}

const demand = (r: VmRecord) => vmDemand(r.id, r.spec, r.pid !== undefined);

/** The host's capacity from the inventory, the VM records and the GPUs, at the time of the call. */
export class CapacitySource {
  constructor(private readonly d: CapacitySourceDeps) {}

  async #host(): Promise<CapacityHost> {
    const inv = await this.d.inventory();
    const cpus = [...new Set(inv.numaNodes.flatMap((n) => n.cpus))].sort((a, b) => a - b);
    return {
      cpus: cpus.length > 0 ? cpus : Array.from({ length: inv.cpu.threads }, (_, i) => i),
      memoryBytes: inv.memory.totalBytes,
      numaNodes: inv.numaNodes.map((n) => ({
        id: n.id,
        cpus: n.cpus,
        memoryTotalBytes: n.memoryTotalBytes,
        hugepages: n.hugepages,
      })),
      hugepages: inv.hugepages,
    };
  }

  async snapshot(): Promise<Capacity> {
    const [host, gpus] = await Promise.all([this.#host(), this.d.gpus()]);
    return computeCapacity(host, this.d.vms().map(demand), gpus, this.d.settings);
  }

  /**
   * Reads the host's facts, then gives a synchronous check of one VM's spec against the VMs defined
   * then (so a caller can check and record a VM with no await in between).
   */
  async checker(): Promise<(id: string, spec: VmSpec) => void> {
    const host = await this.#host();
    return (id, spec) => {
      const others = this.d.vms().filter((r) => r.id !== id);
      checkFits(host, others.map(demand), vmDemand(id, spec, false), this.d.settings);
    };
  }
}
