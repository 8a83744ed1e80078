/**
 * Host inventory: what the machine an agent runs on offers (processors, NUMA layout, memory, huge pages,
 * VMM binaries, accelerators), as plain domain types, and the pure parsers that turn the kernel's text
 * files (/proc/cpuinfo, /proc/meminfo, sysfs cpulists …) and VMM version banners into them.
 *
 * No I/O here: `sysfs.ts`, `qemu.ts` and `accel-probe.ts` read the machine and call these parsers.
 * Byte and page counts are `bigint` (the wire type is uint64).
 */

/** The inventory of one host. Mirrors `vmenv.agent.v1.HostInfo` (less the agent's own fields). */
export interface HostInventory {
  /** Host name as the kernel reports it (uname -n). */
  hostname: string;
  /** Kernel release (uname -r), e.g. "6.1.0-18-amd64". */
  kernelRelease: string;
  /** CPU architecture as Node.js names it ("x64", "arm64"). */
  architecture: string;
  cpu: CpuSummary;
  /** NUMA nodes in id order. A machine without NUMA reports one node 0 with all CPUs and all memory. */
  numaNodes: NumaNodeInfo[];
  /** Memory of the whole host, from /proc/meminfo at the time of the read. */
  memory: MemorySummary;
  /** Huge page pools of the whole host, one per page size, ascending. */
  hugepages: HugepagePoolInfo[];
  /** VMM binaries looked for, found or not. */
  vmms: VmmBinaryInfo[];
  /** Accelerators and whether a probe guest ran on them. */
  accelerators: AcceleratorInfo[];
  /** Seconds since the host booted (/proc/uptime). */
  hostUptimeSeconds: number;
}

export interface CpuSummary {
  /** "model name" of /proc/cpuinfo, e.g. "AMD EPYC 7B13"; "" when the kernel does not say. */
  model: string;
  /** "vendor_id", e.g. "GenuineIntel", "AuthenticAMD"; "" when the kernel does not say. */
  vendor: string;
  /** Physical packages. */
  sockets: number;
  /** Physical cores over all sockets. */
  cores: number;
  /** Logical CPUs online. */
  threads: number;
  /** The flags of {@link VIRTUALIZATION_FLAGS} the CPUs have (all of them), in that list's order. */
  virtualizationFlags: string[];
}

export interface NumaNodeInfo {
  id: number;
  /** Logical CPU ids, ascending. Empty for a memory-only node. */
  cpus: number[];
  memoryTotalBytes: bigint;
  memoryFreeBytes: bigint;
  /** This node's share of each huge page pool, ascending by page size. */
  hugepages: HugepagePoolInfo[];
}

export interface MemorySummary {
  /** MemTotal. */
  totalBytes: bigint;
  /** MemAvailable (what can be allocated without swapping). */
  availableBytes: bigint;
  /** MemFree. */
  freeBytes: bigint;
}

export interface HugepagePoolInfo {
  pageSizeBytes: bigint;
  /** nr_hugepages. */
  totalPages: bigint;
  /** free_hugepages. */
  freePages: bigint;
}

export type VmmKind = "qemu" | "cloud-hypervisor";

export interface VmmBinaryInfo {
  kind: VmmKind;
  /** Absolute path of the binary; undefined when none was found. */
  path: string | undefined;
  /** Version the binary reported, e.g. "7.2.22"; undefined when it was not asked or did not answer. */
  version: string | undefined;
  /** Found and answered its version query. */
  available: boolean;
  /** Why it is not available; undefined when it is. */
  unavailableReason: string | undefined;
}

export type AcceleratorKind = "kvm" | "tcg";

export interface AcceleratorInfo {
  kind: AcceleratorKind;
  /** KVM: /dev/kvm exists. TCG: a QEMU binary exists (TCG is built into it). Presence is not usability. */
  present: boolean;
  /** A probe guest ran on it to completion within the probe's time limit. */
  usable: boolean;
  /** What the probe saw, e.g. "probe guest exited through isa-debug-exit in 41 ms". */
  detail: string;
  /** How long the probe took (0 when none ran). */
  probeDurationMs: number;
}

/**
 * CPU flags worth reporting for virtualisation: hardware virtualisation and its nested paging (vmx/ept,
 * svm/npt), vector and crypto extensions guests are often built for, x2APIC, 1 GiB pages, and
 * `hypervisor` (this host is itself a guest, so KVM here is nested).
 */
export const VIRTUALIZATION_FLAGS: readonly string[] = [
  "vmx",
  "svm",
  "ept",
  "npt",
  "vpid",
  "avx",
  "avx2",
  "avx512f",
  "aes",
  "x2apic",
  "pdpe1gb",
  "hypervisor",
];

/** A kernel or VMM text that does not have the shape its parser expects. */
export class HostInventoryParseError extends Error {
  override readonly name = "HostInventoryParseError";
  /** What was being parsed, e.g. "cpulist", "/proc/meminfo". */
  readonly source: string;

  constructor(source: string, message: string) {
    super(`${source}: ${message}`);
    this.source = source;
  }
}

// ---------------------------------------------------------------------------------------------------
// /proc/cpuinfo

/** One processor block of /proc/cpuinfo, reduced to the fields the inventory uses. */
export interface CpuinfoProcessor {
  /** "processor": the logical CPU id. */
  processor: number;
  vendor: string | undefined;
  model: string | undefined;
  /** "physical id": the package (socket). Absent in some guests and on non-x86. */
  physicalId: number | undefined;
  /** "core id": the core within its package. */
  coreId: number | undefined;
  flags: string[];
}

/**
 * Parses /proc/cpuinfo (x86 layout: blocks of `key\t: value` lines separated by blank lines, one block
 * per online logical CPU). Blocks without a `processor` line (the trailer some architectures print) are
 * skipped.
 */
export function parseCpuinfo(text: string): CpuinfoProcessor[] {
  const out: CpuinfoProcessor[] = [];
  for (const block of text.split(/\n\s*\n/)) {
    const fields = new Map<string, string>();
    for (const line of block.split("\n")) {
      const colon = line.indexOf(":");
      if (colon < 0) continue;
      const key = line.slice(0, colon).trim();
      if (!fields.has(key)) fields.set(key, line.slice(colon + 1).trim());
    }
    const processor = fields.get("processor");
    if (processor === undefined || !/^\d+$/.test(processor)) continue;
    out.push({
      processor: Number(processor),
      vendor: fields.get("vendor_id"),
      model: fields.get("model name"),
      physicalId: optionalInt(fields.get("physical id")),
      coreId: optionalInt(fields.get("core id")),
      // Newer x86 kernels list VMX sub-features (ept, vpid …) on a line of their own; arm64 says Features.
      flags: [
        ...new Set(
          ["flags", "vmx flags", "Features"]
            .flatMap((key) => (fields.get(key) ?? "").split(/\s+/))
            .filter((f) => f !== ""),
        ),
      ],
    });
  }
  return out;
}

/** Package and core id of one logical CPU, from /sys/devices/system/cpu/cpuN/topology. */
export interface CpuTopologyEntry {
  cpu: number;
  packageId: number;
  coreId: number;
}

/**
 * Summarises the processors. Sockets and cores come from cpuinfo's "physical id"/"core id" when every
 * processor has them, else from `topology` (sysfs) when it covers every processor, else the CPUs are
 * counted as one socket of single-thread cores.
 */
export function summarizeCpu(
  processors: readonly CpuinfoProcessor[],
  topology: readonly CpuTopologyEntry[] = [],
): CpuSummary {
  const first = processors[0];
  const threads = processors.length;
  let pairs: Array<[number, number]> | undefined;
  if (threads > 0 && processors.every((p) => p.physicalId !== undefined && p.coreId !== undefined)) {
    pairs = processors.map((p) => [p.physicalId ?? 0, p.coreId ?? 0]);
  } else {
    const byCpu = new Map(topology.map((t) => [t.cpu, t]));
    if (threads > 0 && processors.every((p) => byCpu.has(p.processor))) {
      pairs = processors.map((p) => {
        const t = byCpu.get(p.processor);
        return [t?.packageId ?? 0, t?.coreId ?? 0];
      });
    }
  }
  const sockets = pairs ? new Set(pairs.map(([pkg]) => pkg)).size : Math.min(threads, 1);
  const cores = pairs ? new Set(pairs.map(([pkg, core]) => `${pkg}:${core}`)).size : threads;
  // A flag counts only when every CPU has it (a mixed set would mislead placement).
  const flagSets = processors.map((p) => new Set(p.flags));
  const everyCpuHas = (flag: string) => flagSets.length > 0 && flagSets.every((set) => set.has(flag));
  return {
    model: first?.model ?? "",
    vendor: first?.vendor ?? "",
    sockets,
    cores,
    threads,
    virtualizationFlags: VIRTUALIZATION_FLAGS.filter(everyCpuHas),
  };
}

// ---------------------------------------------------------------------------------------------------
// meminfo

/**
 * Parses /proc/meminfo, or a node's meminfo (`Node 0 MemTotal:  123 kB`: the `Node N ` prefix is dropped).
 * Values with a `kB` unit become bytes; unit-less values (HugePages_Total …) stay counts.
 */
export function parseMeminfo(text: string): Map<string, bigint> {
  const out = new Map<string, bigint>();
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (line === "") continue;
    const m = /^(?:Node\s+\d+\s+)?([^:\s]+):\s*(\d+)(?:\s*(kB))?$/.exec(line);
    if (!m?.[1] || m[2] === undefined)
      throw new HostInventoryParseError("meminfo", `unexpected line "${line}"`);
    const value = BigInt(m[2]);
    out.set(m[1], m[3] ? value * 1024n : value);
  }
  return out;
}

/** Total, available and free memory of /proc/meminfo fields (as {@link parseMeminfo} returns them). */
export function memorySummary(fields: ReadonlyMap<string, bigint>): MemorySummary {
  const total = required(fields, "MemTotal", "/proc/meminfo");
  const free = required(fields, "MemFree", "/proc/meminfo");
  // MemAvailable exists since Linux 3.14; before, free + page cache is the usual estimate.
  const available =
    fields.get("MemAvailable") ?? free + (fields.get("Buffers") ?? 0n) + (fields.get("Cached") ?? 0n);
  return { totalBytes: total, availableBytes: available, freeBytes: free };
}

/** MemTotal and MemFree of a node's meminfo. */
export function nodeMemory(fields: ReadonlyMap<string, bigint>): { totalBytes: bigint; freeBytes: bigint } {
  return {
    totalBytes: required(fields, "MemTotal", "node meminfo"),
    freeBytes: required(fields, "MemFree", "node meminfo"),
  };
}

// ---------------------------------------------------------------------------------------------------
// sysfs small values

/**
 * Parses a kernel CPU list ("0-3,8-11", "5", "" for none; trailing newline allowed) into ascending,
 * de-duplicated CPU ids.
 */
export function parseCpuList(text: string): number[] {
  const trimmed = text.trim();
  if (trimmed === "") return [];
  const cpus = new Set<number>();
  for (const part of trimmed.split(",")) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part.trim());
    if (!m?.[1]) throw new HostInventoryParseError("cpulist", `bad element "${part}" in "${trimmed}"`);
    const from = Number(m[1]);
    const to = m[2] === undefined ? from : Number(m[2]);
    if (to < from) throw new HostInventoryParseError("cpulist", `descending range "${part}"`);
    for (let cpu = from; cpu <= to; cpu++) cpus.add(cpu);
  }
  return [...cpus].sort((a, b) => a - b);
}

/** Page size in bytes of a huge page pool directory name, e.g. "hugepages-2048kB" → 2097152n. */
export function parseHugepageDirName(name: string): bigint | undefined {
  const m = /^hugepages-(\d+)kB$/.exec(name);
  return m?.[1] === undefined ? undefined : BigInt(m[1]) * 1024n;
}

/** A non-negative integer file (nr_hugepages, free_hugepages, core_id …). */
export function parseCount(text: string, source: string): bigint {
  const trimmed = text.trim();
  if (!/^\d+$/.test(trimmed)) throw new HostInventoryParseError(source, `not a count: "${trimmed}"`);
  return BigInt(trimmed);
}

/** Seconds since boot, the first field of /proc/uptime ("241.23 382.82"). */
export function parseUptime(text: string): number {
  const first = text.trim().split(/\s+/)[0] ?? "";
  const seconds = Number(first);
  if (first === "" || !Number.isFinite(seconds)) {
    throw new HostInventoryParseError("/proc/uptime", `unexpected content "${text.trim()}"`);
  }
  return seconds;
}

// ---------------------------------------------------------------------------------------------------
// VMM version banners

/** Version of a QEMU binary's `--version` output, e.g. "QEMU emulator version 7.2.22 (Debian …)". */
export interface QemuVersion {
  /** "7.2.22". */
  version: string;
  /** The packager's suffix in parentheses, e.g. "Debian 1:7.2+dfsg-7+deb12u18+b3"; undefined if none. */
  package: string | undefined;
}

export function parseQemuVersion(output: string): QemuVersion {
  const m = /QEMU emulator version (\d+\.\d+(?:\.\d+)?)(?:\s*\(([^)]*)\))?/.exec(output);
  if (!m?.[1]) {
    throw new HostInventoryParseError("qemu --version", `no version in "${firstLine(output)}"`);
  }
  return { version: m[1], package: m[2] === undefined || m[2] === "" ? undefined : m[2] };
}

/** Version of `cloud-hypervisor --version` output, e.g. "cloud-hypervisor v38.0.0" → "38.0.0". */
export function parseCloudHypervisorVersion(output: string): string {
  const m = /cloud-hypervisor\s+v?(\d+(?:\.\d+)*(?:[-+][\w.-]+)?)/.exec(output);
  if (!m?.[1]) {
    throw new HostInventoryParseError("cloud-hypervisor --version", `no version in "${firstLine(output)}"`);
  }
  return m[1];
}

// ---------------------------------------------------------------------------------------------------

function optionalInt(value: string | undefined): number | undefined {
  return value !== undefined && /^\d+$/.test(value) ? Number(value) : undefined;
}

function required(fields: ReadonlyMap<string, bigint>, key: string, source: string): bigint {
  const value = fields.get(key);
  if (value === undefined) throw new HostInventoryParseError(source, `no ${key} line`);
  return value;
}

function firstLine(text: string): string {
  return text.trim().split("\n")[0] ?? "";
}
