/**
 * Host inventory source (adapter): reads the machine from /proc and /sys (roots configurable, so tests
 * point it at a fixture tree) and assembles a {@link HostSnapshot}: the {@link HostInventory} less the
 * accelerators, which `probeAccelerators` (accel-probe.ts) measures separately because it takes seconds.
 *
 * Static facts — host name, kernel, CPUs and topology, NUMA nodes and their CPUs, which huge page sizes
 * exist, VMM binaries — are read once and cached. Dynamic figures — /proc/meminfo, each node's meminfo,
 * huge page counts, /proc/uptime — are read on every `read()`: a handful of small file reads, no process
 * started.
 */
import { readdir, readFile } from "node:fs/promises";
import { arch } from "node:os";
import { join } from "node:path";
import {
  type CpuSummary,
  type CpuTopologyEntry,
  type HostInventory,
  type HugepagePoolInfo,
  memorySummary,
  type NumaNodeInfo,
  nodeMemory,
  parseCount,
  parseCpuinfo,
  parseCpuList,
  parseHugepageDirName,
  parseMeminfo,
  parseUptime,
  summarizeCpu,
  type VmmBinaryInfo,
} from "./inventory.js";
import { discoverVmms } from "./qemu.js";

export interface HostInventorySourceOptions {
  /** Root of sysfs. Default "/sys". */
  sysRoot?: string;
  /** Root of procfs. Default "/proc". */
  procRoot?: string;
  /** Architecture as Node.js names it. Default: os.arch(). */
  architecture?: string;
  /** QEMU binary: a path, or a name looked up on PATH. Default: qemu-system-<arch> on PATH. */
  qemuBinary?: string | undefined;
  /** cloud-hypervisor binary, the same way. Default: cloud-hypervisor on PATH. */
  cloudHypervisorBinary?: string | undefined;
  /** Replaces the VMM discovery (run once). Default: `discoverVmms` of qemu.ts with the binaries above. */
  discoverVmms?: () => Promise<VmmBinaryInfo[]>;
}

/** The inventory less the accelerators (see the module comment). */
export type HostSnapshot = Omit<HostInventory, "accelerators">;

/** A NUMA node as far as it does not change while the host runs. */
export interface StaticNumaNode {
  id: number;
  cpus: number[];
  /** Huge page sizes this node has pools for, ascending. */
  hugepageSizes: bigint[];
}

/** What is read once. */
export interface StaticHostFacts {
  hostname: string;
  kernelRelease: string;
  architecture: string;
  cpu: CpuSummary;
  /**
   * False when the kernel exposes no /sys/devices/system/node: then `nodes` is one node 0 with every
   * CPU, and its memory and huge pages are the whole host's.
   */
  numa: boolean;
  nodes: StaticNumaNode[];
  /** Host-wide huge page sizes, ascending. */
  hugepageSizes: bigint[];
  vmms: VmmBinaryInfo[];
  /** Path of the QEMU binary found and answering, for the accelerator probes; undefined if none. */
  qemuPath: string | undefined;
}

export class HostInventorySource {
  readonly #sys: string;
  readonly #proc: string;
  readonly #options: HostInventorySourceOptions;
  #static: Promise<StaticHostFacts> | undefined;

  constructor(options: HostInventorySourceOptions = {}) {
    this.#options = options;
    this.#sys = options.sysRoot ?? "/sys";
    this.#proc = options.procRoot ?? "/proc";
  }

  /** The static facts, read on the first call and cached (a failed read is retried on the next call). */
  staticPart(): Promise<StaticHostFacts> {
    if (this.#static === undefined) {
      const pending = this.#readStatic();
      this.#static = pending;
      pending.catch(() => {
        if (this.#static === pending) this.#static = undefined;
      });
    }
    return this.#static;
  }

  /** The cached static facts plus freshly read memory, huge pages and uptime. */
  async read(): Promise<HostSnapshot> {
    const facts = await this.staticPart();
    const [meminfo, uptime, globalPools, nodes] = await Promise.all([
      this.#text(this.#proc, "meminfo").then(parseMeminfo),
      this.#text(this.#proc, "uptime").then(parseUptime),
      this.#pools(join(this.#sys, "kernel/mm/hugepages"), facts.hugepageSizes),
      facts.numa ? Promise.all(facts.nodes.map((n) => this.#readNode(n))) : undefined,
    ]);
    const memory = memorySummary(meminfo);
    const numaNodes: NumaNodeInfo[] = nodes ?? [
      {
        id: 0,
        cpus: facts.nodes[0]?.cpus ?? [],
        memoryTotalBytes: memory.totalBytes,
        memoryFreeBytes: memory.freeBytes,
        hugepages: globalPools,
      },
    ];
    return {
      hostname: facts.hostname,
      kernelRelease: facts.kernelRelease,
      architecture: facts.architecture,
      cpu: facts.cpu,
      numaNodes,
      memory,
      hugepages: globalPools,
      vmms: facts.vmms,
      hostUptimeSeconds: uptime,
    };
  }

  async #readStatic(): Promise<StaticHostFacts> {
    const [hostname, kernelRelease, cpuinfo, nodeIds, hugepageSizes] = await Promise.all([
      this.#text(this.#proc, "sys/kernel/hostname").then((t) => t.trim()),
      this.#text(this.#proc, "sys/kernel/osrelease").then((t) => t.trim()),
      this.#text(this.#proc, "cpuinfo").then(parseCpuinfo),
      this.#nodeIds(),
      this.#hugepageSizes(join(this.#sys, "kernel/mm/hugepages")),
    ]);
    const needTopology = cpuinfo.some((p) => p.physicalId === undefined || p.coreId === undefined);
    const topology = needTopology ? await this.#topology(cpuinfo.map((p) => p.processor)) : [];
    const cpu = summarizeCpu(cpuinfo, topology);
    const nodes: StaticNumaNode[] =
      nodeIds.length > 0
        ? await Promise.all(nodeIds.map((id) => this.#staticNode(id)))
        : [{ id: 0, cpus: cpuinfo.map((p) => p.processor).sort((a, b) => a - b), hugepageSizes }];
    const opts = this.#options;
    const vmms = await (opts.discoverVmms
      ? opts.discoverVmms()
      : discoverVmms({
          ...(opts.qemuBinary !== undefined ? { qemuPath: opts.qemuBinary } : {}),
          ...(opts.cloudHypervisorBinary !== undefined
            ? { cloudHypervisorPath: opts.cloudHypervisorBinary }
            : {}),
          ...(opts.architecture !== undefined ? { architecture: opts.architecture } : {}),
        }));
    const qemu = vmms.find((v) => v.kind === "qemu" && v.available);
    return {
      hostname,
      kernelRelease,
      architecture: this.#options.architecture ?? arch(),
      cpu,
      numa: nodeIds.length > 0,
      nodes,
      hugepageSizes,
      vmms,
      qemuPath: qemu?.path,
    };
  }

  /** Ids of /sys/devices/system/node/nodeN, ascending; [] when the folder does not exist. */
  async #nodeIds(): Promise<number[]> {
    const names = await listOrEmpty(join(this.#sys, "devices/system/node"));
    return names
      .map((name) => /^node(\d+)$/.exec(name)?.[1])
      .filter((id): id is string => id !== undefined)
      .map(Number)
      .sort((a, b) => a - b);
  }

  async #staticNode(id: number): Promise<StaticNumaNode> {
    const dir = this.#nodeDir(id);
    const [cpus, hugepageSizes] = await Promise.all([
      this.#text(dir, "cpulist").then(parseCpuList),
      this.#hugepageSizes(join(dir, "hugepages")),
    ]);
    return { id, cpus, hugepageSizes };
  }

  async #readNode(node: StaticNumaNode): Promise<NumaNodeInfo> {
    const dir = this.#nodeDir(node.id);
    const [mem, hugepages] = await Promise.all([
      this.#text(dir, "meminfo").then((t) => nodeMemory(parseMeminfo(t))),
      this.#pools(join(dir, "hugepages"), node.hugepageSizes),
    ]);
    return {
      id: node.id,
      cpus: node.cpus,
      memoryTotalBytes: mem.totalBytes,
      memoryFreeBytes: mem.freeBytes,
      hugepages,
    };
  }

  /** Package and core id of each CPU from sysfs; CPUs whose topology files are missing are left out. */
  async #topology(cpus: readonly number[]): Promise<CpuTopologyEntry[]> {
    const entries = await Promise.all(
      cpus.map(async (cpu): Promise<CpuTopologyEntry | undefined> => {
        const dir = join(this.#sys, `devices/system/cpu/cpu${cpu}/topology`);
        try {
          const [pkg, core] = await Promise.all([
            this.#text(dir, "physical_package_id"),
            this.#text(dir, "core_id"),
          ]);
          // Some arm64 kernels write -1 for an unknown package: such a CPU has no usable topology.
          if (!/^\d+$/.test(pkg.trim()) || !/^\d+$/.test(core.trim())) return undefined;
          return { cpu, packageId: Number(pkg.trim()), coreId: Number(core.trim()) };
        } catch (err) {
          if (isNotFound(err)) return undefined;
          throw err;
        }
      }),
    );
    return entries.filter((e): e is CpuTopologyEntry => e !== undefined);
  }

  /** Page sizes of the `hugepages-<N>kB` folders under `dir`, ascending; [] when `dir` does not exist. */
  async #hugepageSizes(dir: string): Promise<bigint[]> {
    const sizes = (await listOrEmpty(dir))
      .map(parseHugepageDirName)
      .filter((s): s is bigint => s !== undefined);
    return sizes.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  }

  /** nr_hugepages and free_hugepages of each pool of `sizes` under `dir`. */
  #pools(dir: string, sizes: readonly bigint[]): Promise<HugepagePoolInfo[]> {
    return Promise.all(
      sizes.map(async (size) => {
        const pool = join(dir, `hugepages-${size / 1024n}kB`);
        const [total, free] = await Promise.all([
          this.#text(pool, "nr_hugepages").then((t) => parseCount(t, join(pool, "nr_hugepages"))),
          this.#text(pool, "free_hugepages").then((t) => parseCount(t, join(pool, "free_hugepages"))),
        ]);
        return { pageSizeBytes: size, totalPages: total, freePages: free };
      }),
    );
  }

  #nodeDir(id: number): string {
    return join(this.#sys, `devices/system/node/node${id}`);
  }

  #text(dir: string, file: string): Promise<string> {
    return readFile(join(dir, file), "utf8");
  }
}

async function listOrEmpty(dir: string): Promise<string[]> {
  try {
    return await readdir(dir);
  } catch (err) {
    if (isNotFound(err)) return [];
    throw err;
  }
}

function isNotFound(err: unknown): boolean {
  return err instanceof Error && "code" in err && (err.code === "ENOENT" || err.code === "ENOTDIR");
}
