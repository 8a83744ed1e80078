import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import type { VmmCounters } from "../vmm/driver.js";
import { qemuCounters } from "../vmm/qemu/counters.js";
import {
  parseLoadavg,
  parseMeminfo,
  parseProcStat,
  parseRss,
  parseSchedWait,
  parseTaskStat,
  StatsSampler,
} from "./stats.js";

// Lines as a Debian 12 host (kernel 6.1) writes them.
const PROC_STAT = `cpu  4705 356 584 3699176 23 0 76 0 0 0
cpu0 1393 0 457 1845337 16 0 70 0 0 0
intr 114930548 113199788 3 0 5 1722 0
`;
const MEMINFO = `MemTotal:        8131676 kB
MemFree:         6103568 kB
MemAvailable:    7558424 kB
Buffers:           70932 kB
`;
// A QEMU vCPU thread: comm with a space and a slash, utime 250, stime 30, last on CPU 1.
const TASK_STAT =
  "4242 (CPU 0/TCG) R 1 4240 4240 0 -1 4194368 12 0 0 0 250 30 0 0 20 0 5 0 9999 1000000 300 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 -1 1 0 0 0 0 0";

describe("parsers of /proc", () => {
  it("read CPU times, memory, load, a task's CPU time and CPU, RSS and run-queue wait", () => {
    expect(parseProcStat(PROC_STAT)).toEqual({
      user: (4705 + 356) * 1e7,
      system: (584 + 0 + 76) * 1e7,
      idle: 3699176 * 1e7,
      iowait: 23 * 1e7,
      steal: 0,
    });
    expect(parseMeminfo(MEMINFO)).toEqual({
      totalBytes: 8131676 * 1024,
      availableBytes: 7558424 * 1024,
      freeBytes: 6103568 * 1024,
    });
    expect(parseLoadavg("0.52 0.31 0.12 2/345 6789\n")).toEqual([0.52, 0.31, 0.12]);
    expect(parseTaskStat(TASK_STAT)).toEqual({ cpuTimeNs: 280 * 1e7, processor: 1 });
    expect(parseRss("Name:\tqemu\nVmRSS:\t  123456 kB\n")).toBe(123456 * 1024);
    expect(parseSchedWait("2800000000 1500000 42\n")).toBe(1500000);
  });
});

describe("QEMU counters", () => {
  it("map query-blockstats to the disk ids (by qdev path or node name) and vCPUs to their threads", () => {
    const c = qemuCounters(
      [
        { "cpu-index": 1, "thread-id": 11 },
        { "cpu-index": 0, "thread-id": 10 },
      ],
      [
        {
          device: "",
          qdev: "/machine/peripheral/disk-data/virtio-backend",
          stats: { rd_bytes: 512, wr_bytes: 4096, wr_operations: 2 },
        },
        { device: "", "node-name": "d-logs", stats: { flush_operations: 3 } },
        { device: "", "node-name": "f-data", qdev: "", stats: { rd_bytes: 1 } },
      ],
      undefined,
    );
    expect(c.vcpuThreads).toEqual([
      { index: 0, threadId: 10 },
      { index: 1, threadId: 11 },
    ]);
    expect(Object.keys(c.disks).sort()).toEqual(["data", "logs"]);
    expect(c.disks.data).toMatchObject({ readBytes: 512, writeBytes: 4096, writeOps: 2 });
    expect(c.disks.logs?.flushOps).toBe(3);
    expect(c.balloon).toBeUndefined();
    expect(qemuCounters([], [], { actual: 268435456 }).balloon).toEqual({ actualBytes: 268435456 });
  });
});

describe("StatsSampler on a fixture /proc and /sys", () => {
  let root: string;
  beforeEach(async () => {
    root = await mkdtemp(join(tmpdir(), "vmenv-stats-"));
    const proc = join(root, "proc");
    await mkdir(join(proc, "4240/task/4242"), { recursive: true });
    await mkdir(join(proc, "4240/task/4243"), { recursive: true });
    await writeFile(join(proc, "stat"), PROC_STAT);
    await writeFile(join(proc, "meminfo"), MEMINFO);
    await writeFile(join(proc, "loadavg"), "1.00 0.50 0.25 1/100 4242\n");
    await writeFile(
      join(proc, "4240/stat"),
      TASK_STAT.replace("(CPU 0/TCG)", "(vmenv-web)").replace(" 250 30 ", " 400 100 "),
    );
    await writeFile(join(proc, "4240/status"), "VmRSS:\t  2048 kB\n");
    await writeFile(join(proc, "4240/task/4242/stat"), TASK_STAT);
    await writeFile(join(proc, "4240/task/4242/schedstat"), "2800000000 1500000 42\n");
    await writeFile(join(proc, "4240/task/4242/comm"), "vcpu0\n");
    await writeFile(join(proc, "4240/task/4243/comm"), "vmm\n");
    const tap = join(root, "sys/class/net/vmt-abc/statistics");
    await mkdir(tap, { recursive: true });
    for (const [f, v] of Object.entries({
      rx_bytes: 100,
      tx_bytes: 900,
      rx_packets: 1,
      tx_packets: 9,
      rx_errors: 1,
      tx_errors: 2,
    }))
      await writeFile(join(tap, f), `${v}\n`);
  });
  afterEach(async () => {
    await rm(root, { recursive: true, force: true });
  });

  const vm = (counters: () => Promise<VmmCounters>, pid = 4240) => ({
    id: "web",
    pid,
    memoryBytes: 256n << 20n,
    disks: [{ id: "data", volume: "volumes/data" }],
    nics: [{ id: "eth0", tap: "vmt-abc" }],
    counters,
  });

  it("samples the host and a VM: process and vCPU time, RSS, disks, and NICs from the guest's side", async () => {
    const counters = async (): Promise<VmmCounters> =>
      qemuCounters(
        [{ "cpu-index": 0, "thread-id": 4242 }],
        [{ qdev: "/machine/peripheral/disk-data/virtio-backend", stats: { wr_bytes: 8192 } }],
        undefined,
      );
    const s = new StatsSampler({
      vms: () => [vm(counters)],
      procRoot: join(root, "proc"),
      sysRoot: join(root, "sys"),
      now: () => 1234,
    });
    const x = await s.sample();
    expect(x.timeMs).toBe(1234);
    expect(x.host.runningVms).toBe(1);
    expect(x.host.load).toEqual([1, 0.5, 0.25]);
    const v = x.vms[0];
    expect(v?.cpuTimeNs).toBe(500 * 1e7);
    expect(v?.rssBytes).toBe(2048 * 1024);
    expect(v?.vcpus).toEqual([{ index: 0, cpuTimeNs: 280 * 1e7, waitTimeNs: 1500000, hostCpu: 1 }]);
    expect(v?.disks[0]).toMatchObject({
      deviceId: "data",
      volume: "volumes/data",
      writeBytes: 8192,
      readBytes: 0,
    });
    // The tap's tx is what the guest received.
    expect(v?.nics[0]).toMatchObject({
      tap: "vmt-abc",
      rxBytes: 900,
      txBytes: 100,
      rxPackets: 9,
      txPackets: 1,
      errors: 3,
    });
  });

  it("finds vcpuN threads when the VMM names none, and leaves out a VM whose VMM went away", async () => {
    const s = new StatsSampler({
      vms: () => [
        vm(async () => ({ vcpuThreads: [], balloon: undefined, disks: {} })),
        {
          ...vm(async () => {
            throw new Error("gone");
          }),
          id: "gone",
        },
      ],
      procRoot: join(root, "proc"),
      sysRoot: join(root, "sys"),
    });
    const x = await s.sample();
    expect(x.vms.map((v) => v.id)).toEqual(["web"]);
    expect(x.vms[0]?.vcpus.map((c) => c.index)).toEqual([0]);
    expect((await s.sample(["gone"])).vms).toEqual([]);
  });
});
