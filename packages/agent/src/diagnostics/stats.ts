import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import type { VmmCounters } from "../vmm/driver.js";

/** Clock ticks per second of /proc's CPU times (USER_HZ: 100 on every Linux architecture vmenv runs on). */
export const USER_HZ = 100;
const TICK_NS = 1e9 / USER_HZ;

/** CPU time by kind, in nanoseconds, summed over CPUs. */
export interface CpuTimesNs {
  user: number;
  system: number;
  idle: number;
  iowait: number;
  steal: number;
}

export interface HostSample {
  cpu: CpuTimesNs;
  load: [number, number, number];
  memory: { totalBytes: number; availableBytes: number; freeBytes: number };
  runningVms: number;
}

export interface VcpuSample {
  index: number;
  cpuTimeNs: number;
  waitTimeNs: number;
  hostCpu: number;
}

export interface DiskSample {
  deviceId: string;
  volume: string;
  readBytes: number;
  writeBytes: number;
  readOps: number;
  writeOps: number;
  flushOps: number;
  readTimeNs: number;
  writeTimeNs: number;
}

/** As the guest sees it: rx = sent to the guest (the tap's tx). */
export interface NicSample {
  deviceId: string;
  tap: string;
  rxBytes: number;
  txBytes: number;
  rxPackets: number;
  txPackets: number;
  rxDropped: number;
  txDropped: number;
  errors: number;
}

export interface VmSample {
  id: string;
  cpuTimeNs: number;
  vcpus: VcpuSample[];
  memoryBytes: bigint;
  rssBytes: number;
  balloon: VmmCounters["balloon"];
  disks: DiskSample[];
  nics: NicSample[];
}

export interface StatsSample {
  timeMs: number;
  host: HostSample;
  vms: VmSample[];
}

/** A VM statistics can be taken of: one with a VMM process. */
export interface StatsVm {
  id: string;
  pid: number;
  memoryBytes: bigint;
  disks: { id: string; volume: string }[];
  nics: { id: string; tap: string }[];
  counters: () => Promise<VmmCounters>;
}

// ---- parsers (pure) ------------------------------------------------------------------------------

/** The first line of /proc/stat ("cpu  user nice system idle iowait irq softirq steal …"). */
export function parseProcStat(text: string): CpuTimesNs {
  const line = text.split("\n").find((l) => l.startsWith("cpu "));
  if (!line) throw new Error("/proc/stat has no cpu line");
  const [user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0] = line
    .trim()
    .split(/\s+/)
    .slice(1)
    .map(Number);
  return {
    user: (user + nice) * TICK_NS,
    system: (system + irq + softirq) * TICK_NS,
    idle: idle * TICK_NS,
    iowait: iowait * TICK_NS,
    steal: steal * TICK_NS,
  };
}

/** /proc/meminfo → bytes. */
export function parseMeminfo(text: string): HostSample["memory"] {
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+)`, "m").exec(text)?.[1] ?? 0) * 1024;
  return { totalBytes: kb("MemTotal"), availableBytes: kb("MemAvailable"), freeBytes: kb("MemFree") };
}

export function parseLoadavg(text: string): [number, number, number] {
  const [a = 0, b = 0, c = 0] = text.trim().split(/\s+/).map(Number);
  return [a, b, c];
}

/** /proc/<pid>[/task/<tid>]/stat: CPU time (utime + stime) and the CPU it last ran on. */
export function parseTaskStat(text: string): { cpuTimeNs: number; processor: number } {
  // "pid (comm) S …": comm may hold spaces and parentheses; fields are counted after its closing one.
  const rest = text.slice(text.lastIndexOf(")") + 2).split(" ");
  const field = (n: number) => Number(rest[n - 3] ?? 0);
  return { cpuTimeNs: (field(14) + field(15)) * TICK_NS, processor: field(39) };
}

/** /proc/<pid>/status VmRSS, in bytes. */
export function parseRss(text: string): number {
  return Number(/^VmRSS:\s+(\d+)\s+kB/m.exec(text)?.[1] ?? 0) * 1024;
}

/** /proc/<pid>/task/<tid>/schedstat: "run_ns wait_ns slices" → time spent runnable, waiting for a CPU. */
export function parseSchedWait(text: string): number {
  return Number(text.trim().split(/\s+/)[1] ?? 0);
}

// ---- sampling --------------------------------------------------------------------------------------

export interface StatsSamplerOptions {
  /** The running VMs, by id (in id order). */
  vms: () => StatsVm[];
  procRoot?: string;
  sysRoot?: string;
  now?: () => number;
}

/** Host and VM statistics, read from /proc, /sys and the VMMs when asked for (nothing runs in between). */
export class StatsSampler {
  readonly #proc: string;
  readonly #sys: string;
  readonly #now: () => number;

  constructor(private readonly o: StatsSamplerOptions) {
    this.#proc = o.procRoot ?? "/proc";
    this.#sys = o.sysRoot ?? "/sys";
    this.#now = o.now ?? Date.now;
  }

  /** The running VMs' ids. */
  runningIds(): string[] {
    return this.o.vms().map((v) => v.id);
  }

  async host(): Promise<HostSample> {
    const [stat, mem, load] = await Promise.all(
      ["stat", "meminfo", "loadavg"].map((f) => readFile(join(this.#proc, f), "utf8")),
    );
    return {
      cpu: parseProcStat(stat ?? ""),
      memory: parseMeminfo(mem ?? ""),
      load: parseLoadavg(load ?? ""),
      runningVms: this.o.vms().length,
    };
  }

  /** One sample: the host, and the running VMs among `ids` (every running VM when undefined). */
  async sample(ids?: readonly string[]): Promise<StatsSample> {
    const want = ids ? new Set(ids) : undefined;
    const vms = this.o.vms().filter((v) => !want || want.has(v.id));
    const [host, ...samples] = await Promise.all([this.host(), ...vms.map((v) => this.vm(v))]);
    return {
      timeMs: this.#now(),
      host: host as HostSample,
      // A VM that stopped while it was being sampled is left out.
      vms: (samples as (VmSample | undefined)[]).filter((s): s is VmSample => s !== undefined),
    };
  }

  /** One VM's sample; undefined when its VMM went away meanwhile. */
  async vm(v: StatsVm): Promise<VmSample | undefined> {
    const pidDir = join(this.#proc, String(v.pid));
    let counters: VmmCounters;
    let proc: { cpuTimeNs: number };
    let rss: number;
    try {
      [counters, proc, rss] = await Promise.all([
        v.counters(),
        readFile(join(pidDir, "stat"), "latin1").then(parseTaskStat),
        readFile(join(pidDir, "status"), "utf8").then(parseRss),
      ]);
    } catch {
      return undefined;
    }
    const threads = counters.vcpuThreads.length > 0 ? counters.vcpuThreads : await this.#vcpuThreads(pidDir);
    const vcpus = await Promise.all(
      threads.map(async (t): Promise<VcpuSample> => {
        const dir = join(pidDir, "task", String(t.threadId));
        const [st, wait] = await Promise.all([
          readFile(join(dir, "stat"), "latin1").then(parseTaskStat, () => ({ cpuTimeNs: 0, processor: 0 })),
          readFile(join(dir, "schedstat"), "utf8").then(parseSchedWait, () => 0),
        ]);
        return { index: t.index, cpuTimeNs: st.cpuTimeNs, waitTimeNs: wait, hostCpu: st.processor };
      }),
    );
    const disks = v.disks.map((d): DiskSample => {
      const c = counters.disks[d.id];
      return {
        deviceId: d.id,
        volume: d.volume,
        readBytes: c?.readBytes ?? 0,
        writeBytes: c?.writeBytes ?? 0,
        readOps: c?.readOps ?? 0,
        writeOps: c?.writeOps ?? 0,
        flushOps: c?.flushOps ?? 0,
        readTimeNs: c?.readTimeNs ?? 0,
        writeTimeNs: c?.writeTimeNs ?? 0,
      };
    });
    const nics = await Promise.all(v.nics.map((n) => this.#nic(n.id, n.tap)));
    return {
      id: v.id,
      cpuTimeNs: proc.cpuTimeNs,
      vcpus,
      memoryBytes: v.memoryBytes,
      rssBytes: rss,
      balloon: counters.balloon,
      disks,
      nics,
    };
  }

  /** A VMM that names no vCPU threads (cloud-hypervisor): its threads called `vcpu<N>`. */
  async #vcpuThreads(pidDir: string): Promise<VmmCounters["vcpuThreads"]> {
    const tids = await readdir(join(pidDir, "task")).catch(() => [] as string[]);
    const out: VmmCounters["vcpuThreads"] = [];
    for (const tid of tids) {
      const comm = await readFile(join(pidDir, "task", tid, "comm"), "utf8").catch(() => "");
      const m = /^vcpu(\d+)$/.exec(comm.trim());
      if (m) out.push({ index: Number(m[1]), threadId: Number(tid) });
    }
    return out.sort((a, b) => a.index - b.index);
  }

  /** The tap's counters, turned round to the guest's view (the tap's tx is what the guest received). */
  async #nic(deviceId: string, tap: string): Promise<NicSample> {
    const dir = join(this.#sys, "class/net", tap, "statistics");
    const read = (f: string) =>
      readFile(join(dir, f), "utf8").then(
        (s) => Number(s.trim()) || 0,
        () => 0,
      );
    const [rxB, txB, rxP, txP, rxD, txD, rxE, txE] = await Promise.all(
      [
        "rx_bytes",
        "tx_bytes",
        "rx_packets",
        "tx_packets",
        "rx_dropped",
        "tx_dropped",
        "rx_errors",
        "tx_errors",
      ].map(read),
    );
    return {
      deviceId,
      tap,
      rxBytes: txB ?? 0,
      txBytes: rxB ?? 0,
      rxPackets: txP ?? 0,
      txPackets: rxP ?? 0,
      rxDropped: txD ?? 0,
      txDropped: rxD ?? 0,
      errors: (rxE ?? 0) + (txE ?? 0),
    };
  }
}
