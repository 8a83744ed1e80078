import { cp, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, describe, expect, it } from "vitest";
import type { VmmBinaryInfo } from "./inventory.js";
import { HostInventorySource } from "./sysfs.js";

const testdata = fileURLToPath(new URL("testdata/", import.meta.url));
const KiB = 1024n;
const MiB = 1024n * KiB;
const GiB = 1024n * MiB;

const qemu: VmmBinaryInfo = {
  kind: "qemu",
  path: "/usr/bin/qemu-system-x86_64",
  version: "7.2.22",
  available: true,
  unavailableReason: undefined,
};

function fixture(name: string, discoverVmms = async () => [qemu]) {
  return new HostInventorySource({
    procRoot: join(testdata, name, "proc"),
    sysRoot: join(testdata, name, "sys"),
    architecture: name === "no-numa" ? "arm64" : "x64",
    discoverVmms,
  });
}

const temps: string[] = [];
afterEach(async () => {
  await Promise.all(temps.splice(0).map((d) => rm(d, { recursive: true, force: true })));
});

/** A writable copy of a fixture tree, removed after the test. */
async function copyFixture(name: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "vmenv-host-fixture-"));
  temps.push(dir);
  await cp(join(testdata, name), dir, { recursive: true });
  return dir;
}

describe("HostInventorySource on a two-node NUMA host", () => {
  it("reports CPUs, nodes, memory and both huge page sizes per node and host-wide", async () => {
    const inv = await fixture("two-node").read();
    expect(inv).toMatchObject({
      hostname: "node-a17",
      kernelRelease: "6.1.0-18-amd64",
      architecture: "x64",
      hostUptimeSeconds: 1234567.89,
      vmms: [qemu],
    });
    expect(inv.cpu).toEqual({
      model: "Intel(R) Xeon(R) Gold 6230R CPU @ 2.10GHz",
      vendor: "GenuineIntel",
      sockets: 2,
      cores: 4,
      threads: 8,
      virtualizationFlags: ["vmx", "ept", "vpid", "avx", "avx2", "avx512f", "aes", "x2apic", "pdpe1gb"],
    });
    expect(inv.memory).toEqual({
      totalBytes: 65844004n * KiB,
      availableBytes: 52011224n * KiB,
      freeBytes: 45555556n * KiB,
    });
    expect(inv.hugepages).toEqual([
      { pageSizeBytes: 2n * MiB, totalPages: 1024n, freePages: 1012n },
      { pageSizeBytes: 1n * GiB, totalPages: 4n, freePages: 3n },
    ]);
    expect(inv.numaNodes).toEqual([
      {
        id: 0,
        cpus: [0, 1, 4, 5],
        memoryTotalBytes: 32828312n * KiB,
        memoryFreeBytes: 20123456n * KiB,
        hugepages: [
          { pageSizeBytes: 2n * MiB, totalPages: 512n, freePages: 500n },
          { pageSizeBytes: 1n * GiB, totalPages: 2n, freePages: 1n },
        ],
      },
      {
        id: 1,
        cpus: [2, 3, 6, 7],
        memoryTotalBytes: 33015692n * KiB,
        memoryFreeBytes: 25432100n * KiB,
        hugepages: [
          { pageSizeBytes: 2n * MiB, totalPages: 512n, freePages: 512n },
          { pageSizeBytes: 1n * GiB, totalPages: 2n, freePages: 2n },
        ],
      },
    ]);
    // The nodes add up to the host.
    const sum = (f: (n: (typeof inv.numaNodes)[number]) => bigint) =>
      inv.numaNodes.reduce((a, n) => a + f(n), 0n);
    expect(sum((n) => n.memoryTotalBytes)).toBe(inv.memory.totalBytes);
    expect(sum((n) => n.hugepages[0]?.freePages ?? 0n)).toBe(inv.hugepages[0]?.freePages);
  });

  it("re-reads memory, huge page counts and uptime on every read, and the static facts never", async () => {
    const dir = await copyFixture("two-node");
    let discoveries = 0;
    const source = new HostInventorySource({
      procRoot: join(dir, "proc"),
      sysRoot: join(dir, "sys"),
      discoverVmms: async () => {
        discoveries++;
        return [qemu];
      },
    });
    const before = await source.read();

    const node1 = join(dir, "sys/devices/system/node/node1");
    await writeFile(join(node1, "hugepages/hugepages-1048576kB/free_hugepages"), "0\n");
    await writeFile(join(dir, "sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages"), "1\n");
    await writeFile(join(dir, "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"), "2048\n");
    const nodeMeminfo = await readFile(join(node1, "meminfo"), "utf8");
    await writeFile(join(node1, "meminfo"), nodeMeminfo.replace(/MemFree: +\d+ kB/, "MemFree: 1000 kB"));
    const meminfo = await readFile(join(dir, "proc/meminfo"), "utf8");
    await writeFile(
      join(dir, "proc/meminfo"),
      meminfo.replace(/MemAvailable: +\d+ kB/, "MemAvailable: 2000 kB"),
    );
    await writeFile(join(dir, "proc/uptime"), "1234600.00 9876600.00\n");
    // Static facts: a changed cpulist or cpuinfo is not read again.
    await writeFile(join(node1, "cpulist"), "2-3\n");
    await writeFile(join(dir, "proc/cpuinfo"), "");

    const after = await source.read();
    expect(after.numaNodes[1]?.hugepages[1]?.freePages).toBe(0n);
    expect(after.numaNodes[1]?.memoryFreeBytes).toBe(1000n * KiB);
    expect(after.hugepages).toEqual([
      { pageSizeBytes: 2n * MiB, totalPages: 2048n, freePages: 1012n },
      { pageSizeBytes: 1n * GiB, totalPages: 4n, freePages: 1n },
    ]);
    expect(after.memory.availableBytes).toBe(2000n * KiB);
    expect(after.hostUptimeSeconds).toBe(1234600);
    expect(after.numaNodes[1]?.cpus).toEqual(before.numaNodes[1]?.cpus);
    expect(after.cpu).toEqual(before.cpu);
    expect(discoveries).toBe(1);
  });

  it("caches the static part, and retries it after a failure", async () => {
    const dir = await copyFixture("two-node");
    const hostnameFile = join(dir, "proc/sys/kernel/hostname");
    await rm(hostnameFile);
    let discoveries = 0;
    const source = new HostInventorySource({
      procRoot: join(dir, "proc"),
      sysRoot: join(dir, "sys"),
      discoverVmms: async () => {
        discoveries++;
        return [];
      },
    });
    await expect(source.read()).rejects.toMatchObject({ code: "ENOENT" });
    await writeFile(hostnameFile, "node-a17\n");
    const [a, b] = await Promise.all([source.staticPart(), source.staticPart()]);
    expect(a).toBe(b);
    expect(a.hostname).toBe("node-a17");
    expect(a.numa).toBe(true);
    expect(a.qemuPath).toBeUndefined();
    expect(await source.staticPart()).toBe(a);
    expect(discoveries).toBe(1);
  });
});

describe("HostInventorySource on a host without NUMA", () => {
  it("reports one node 0 with every CPU, all memory and the host's huge pages", async () => {
    const source = fixture("no-numa");
    const inv = await source.read();
    expect(inv.cpu).toEqual({
      model: "",
      vendor: "",
      sockets: 1,
      cores: 4,
      threads: 4,
      virtualizationFlags: [],
    });
    expect(inv.architecture).toBe("arm64");
    expect(inv.hugepages).toEqual([
      { pageSizeBytes: 64n * KiB, totalPages: 0n, freePages: 0n },
      { pageSizeBytes: 2n * MiB, totalPages: 16n, freePages: 8n },
    ]);
    expect(inv.numaNodes).toEqual([
      {
        id: 0,
        cpus: [0, 1, 2, 3],
        memoryTotalBytes: 7995040n * KiB,
        memoryFreeBytes: 7154212n * KiB,
        hugepages: inv.hugepages,
      },
    ]);
    expect((await source.staticPart()).numa).toBe(false);
    expect((await source.staticPart()).qemuPath).toBe(qemu.path);
  });

  it("counts one socket of single-thread cores when sysfs has no topology either", async () => {
    const dir = await copyFixture("no-numa");
    await rm(join(dir, "sys/devices/system/cpu"), { recursive: true });
    const source = new HostInventorySource({
      procRoot: join(dir, "proc"),
      sysRoot: join(dir, "sys"),
      discoverVmms: async () => [],
    });
    expect((await source.read()).cpu).toMatchObject({ sockets: 1, cores: 4, threads: 4 });
  });
});

describe("HostInventorySource on this machine", () => {
  it("reads the real /proc and /sys", async () => {
    const inv = await new HostInventorySource({ discoverVmms: async () => [] }).read();
    expect(inv.cpu.threads).toBe(cpus().length);
    expect(inv.numaNodes.length).toBeGreaterThan(0);
    expect(inv.numaNodes.flatMap((n) => n.cpus).sort((a, b) => a - b)).toHaveLength(inv.cpu.threads);
    expect(inv.memory.totalBytes).toBeGreaterThan(0n);
    expect(inv.memory.availableBytes).toBeLessThanOrEqual(inv.memory.totalBytes);
    expect(inv.hostUptimeSeconds).toBeGreaterThan(0);
  });
});
