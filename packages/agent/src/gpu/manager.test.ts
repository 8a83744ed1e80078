import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { VmenvError } from "@vmenv/rpc/errors";
import { pino } from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { Operations } from "../diagnostics/operations.js";
import { GpuManager } from "./manager.js";
import { queryNvidiaSmi } from "./nvidia-smi.js";
import { PciNames } from "./pci-ids.js";
import { SysfsPci } from "./sysfs.js";
import { buildFixture, FakeKernel, type FixtureKind } from "./testdata/fixtures.js";

const FAKE_SMI = join(import.meta.dirname, "testdata/nvidia-smi");
const dirs: string[] = [];

afterEach(async () => {
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});

async function host(
  kind: FixtureKind,
  opts: { smi?: string; broken?: string[]; boundBy?: (gpu: string) => string[] } = {},
) {
  const dir = await mkdtemp(join(tmpdir(), "vmenv-gpu-"));
  dirs.push(dir);
  const sys = join(dir, "sys");
  await buildFixture(kind, sys);
  const kernel = FakeKernel.for(kind, sys, opts.broken);
  const operations = new Operations();
  const make = () =>
    new GpuManager({
      pci: new SysfsPci(sys, (p, d) => kernel.react(p, d)),
      names: new PciNames(undefined),
      vendor: () => (opts.smi ? queryNvidiaSmi(opts.smi) : Promise.resolve(undefined)),
      stateDir: join(dir, "state"),
      operations,
      logger: pino({ level: "silent" }),
      bindTimeoutMs: 300,
      ...(opts.boundBy ? { boundBy: opts.boundBy } : {}),
    });
  const m = make();
  await m.init();
  const finish = async (p: Promise<{ id: string }>) => operations.wait((await p).id, 10_000);
  const file = (p: string) => readFile(join(sys, p), "utf8");
  return { m, make, kernel, sys, dir, operations, finish, file };
}

async function refusal(p: Promise<unknown>): Promise<VmenvError> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(VmenvError);
  return e as VmenvError;
}

describe("GPU inventory from sysfs", () => {
  it("an NVIDIA datacenter GPU: ids, names, NUMA node, its own IOMMU group, driver, nvidia-smi facts", async () => {
    const { m } = await host("h100", { smi: FAKE_SMI });
    const gpus = await m.list();
    expect(gpus).toEqual([
      {
        address: "0000:01:00.0",
        vendorId: 0x10de,
        vendorName: "NVIDIA Corporation",
        deviceId: 0x2330,
        deviceName: "GH100 [H100 SXM5 80GB]",
        model: "NVIDIA H100 80GB HBM3",
        numaNode: 1,
        iommuGroup: 17,
        iommuGroupDevices: [],
        driver: "nvidia",
        originalDriver: undefined,
        memoryTotalBytes: 81559n * 1024n * 1024n,
        memoryUsedBytes: 0n,
        migMode: "disabled",
        state: "available",
        stateMessage: "",
        vm: undefined,
      },
    ]);
  });

  it("a consumer GPU lists its audio function as an IOMMU group peer; the iGPU is a GPU too", async () => {
    const { m } = await host("rtx4090");
    const gpus = await m.list();
    expect(
      gpus.map((g) => [g.address, g.deviceName, g.driver, g.iommuGroup, g.iommuGroupDevices, g.state]),
    ).toEqual([
      ["0000:00:02.0", "Raptor Lake-S GT1 [UHD Graphics 770]", "i915", 0, [], "available"],
      ["0000:01:00.0", "AD102 [GeForce RTX 4090]", "nvidia", 12, ["0000:01:00.1"], "available"],
    ]);
    // No nvidia-smi on this host: no model, no memory figures, and no error.
    expect(gpus[1]).toMatchObject({
      model: "",
      memoryTotalBytes: 0n,
      migMode: "not-supported",
      numaNode: undefined,
    });
  });

  it("a host without IOMMU reports its GPU as unavailable and says why", async () => {
    const { m } = await host("no-iommu");
    const [g] = await m.list();
    expect(g).toMatchObject({
      address: "0000:03:00.0",
      vendorName: "Advanced Micro Devices, Inc. [AMD/ATI]",
      driver: "amdgpu",
      iommuGroup: undefined,
      state: "unavailable",
    });
    expect(g?.stateMessage).toMatch(/IOMMU is off.*intel_iommu=on/);
  });

  it("a GPU sharing its IOMMU group with a bridge the host drives is unavailable", async () => {
    const { m } = await host("rtx4090-shared-group");
    const [g] = await m.list();
    expect(g?.state).toBe("unavailable");
    expect(g?.stateMessage).toContain("0000:00:01.0");
    expect(g?.stateMessage).toContain("pcieport");
  });

  it("a host without display controllers has no GPUs, and no error", async () => {
    const { m } = await host("no-gpu", { smi: "/nonexistent/nvidia-smi" });
    expect(await m.list()).toEqual([]);
  });

  it("an unknown GPU is NOT_FOUND naming it", async () => {
    const { m } = await host("h100");
    const e = await refusal(m.get("0000:09:00.0"));
    expect(e.code).toBe("not-found");
    expect(e.message).toContain("gpus/0000:09:00.0");
  });
});

describe("assigning and releasing GPUs", () => {
  it("moves a datacenter GPU to vfio-pci with the writes the kernel expects, and back on release", async () => {
    const { m, kernel, finish, file, dir } = await host("h100", { smi: FAKE_SMI });
    const op = await finish(m.assign("0000:01:00.0", "vms/train-1"));
    expect(op.state).toBe("succeeded");
    expect(kernel.writes).toEqual([
      { path: "bus/pci/drivers/nvidia/unbind", data: "0000:01:00.0" },
      { path: "bus/pci/devices/0000:01:00.0/driver_override", data: "vfio-pci" },
      { path: "bus/pci/drivers_probe", data: "0000:01:00.0" },
    ]);
    expect(await file("bus/pci/devices/0000:01:00.0/driver_override")).toBe("vfio-pci");
    expect(await kernel.driverOf("0000:01:00.0")).toBe("vfio-pci");
    const g = await m.get("0000:01:00.0");
    // nvidia-smi no longer sees it; its memory is the last known figure.
    expect(g).toMatchObject({
      state: "assigned",
      vm: "vms/train-1",
      driver: "vfio-pci",
      originalDriver: "nvidia",
      memoryTotalBytes: 81559n * 1024n * 1024n,
    });
    // The original driver is on disk before anything moved, for a restarted agent.
    const saved = JSON.parse(await readFile(join(dir, "state/gpus/state.json"), "utf8"));
    expect(saved.assignments["0000:01:00.0"]).toMatchObject({
      vm: "vms/train-1",
      original: { "0000:01:00.0": "nvidia" },
    });

    kernel.writes.length = 0;
    expect((await finish(m.release("0000:01:00.0"))).state).toBe("succeeded");
    expect(kernel.writes).toEqual([
      { path: "bus/pci/drivers/vfio-pci/unbind", data: "0000:01:00.0" },
      { path: "bus/pci/devices/0000:01:00.0/driver_override", data: "\n" },
      { path: "bus/pci/drivers_probe", data: "0000:01:00.0" },
    ]);
    expect(await kernel.driverOf("0000:01:00.0")).toBe("nvidia");
    expect(await m.get("0000:01:00.0")).toMatchObject({
      state: "available",
      vm: undefined,
      driver: "nvidia",
    });
  });

  it("takes the consumer GPU's audio function along, and gives both back to their drivers", async () => {
    const { m, kernel, finish } = await host("rtx4090");
    expect((await finish(m.assign("0000:01:00.0", "vms/desk"))).state).toBe("succeeded");
    expect(kernel.writes.map((w) => `${w.path} ← ${JSON.stringify(w.data)}`)).toEqual([
      'bus/pci/drivers/nvidia/unbind ← "0000:01:00.0"',
      'bus/pci/devices/0000:01:00.0/driver_override ← "vfio-pci"',
      'bus/pci/drivers_probe ← "0000:01:00.0"',
      'bus/pci/drivers/snd_hda_intel/unbind ← "0000:01:00.1"',
      'bus/pci/devices/0000:01:00.1/driver_override ← "vfio-pci"',
      'bus/pci/drivers_probe ← "0000:01:00.1"',
    ]);
    expect(await kernel.driverOf("0000:01:00.1")).toBe("vfio-pci");
    // The iGPU and the root port are untouched.
    expect(await kernel.driverOf("0000:00:02.0")).toBe("i915");
    expect(await kernel.driverOf("0000:00:01.0")).toBe("pcieport");

    expect((await finish(m.release("0000:01:00.0"))).state).toBe("succeeded");
    expect(await kernel.driverOf("0000:01:00.0")).toBe("nvidia");
    expect(await kernel.driverOf("0000:01:00.1")).toBe("snd_hda_intel");
  });

  it("a restarted agent knows the assignment and restores the original driver", async () => {
    const { m, make, kernel, finish } = await host("h100", { smi: FAKE_SMI });
    await finish(m.assign("0000:01:00.0", "vms/a"));
    const again = make();
    await again.init();
    expect(await again.get("0000:01:00.0")).toMatchObject({
      state: "assigned",
      vm: "vms/a",
      originalDriver: "nvidia",
    });
    expect((await finish(again.release("0000:01:00.0"))).state).toBe("succeeded");
    expect(await kernel.driverOf("0000:01:00.0")).toBe("nvidia");
  });

  it("assigning again to the same VM changes nothing; to another VM is refused naming both", async () => {
    const { m, kernel, finish } = await host("h100");
    await finish(m.assign("0000:01:00.0", "vms/a"));
    const n = kernel.writes.length;
    expect((await finish(m.assign("0000:01:00.0", "vms/a"))).state).toBe("succeeded");
    expect(kernel.writes.length).toBe(n);
    const e = await refusal(m.assign("0000:01:00.0", "vms/b"));
    expect(e).toMatchObject({ code: "failed-precondition", reason: "GPU_IN_USE" });
    expect(e.metadata).toEqual({ gpu: "gpus/0000:01:00.0", vm: "vms/a" });
  });

  it("refuses without IOMMU, writing nothing", async () => {
    const { m, kernel } = await host("no-iommu");
    const e = await refusal(m.assign("0000:03:00.0", "vms/a"));
    expect(e).toMatchObject({ code: "failed-precondition", reason: "IOMMU_DISABLED" });
    expect(e.metadata).toEqual({ gpu: "gpus/0000:03:00.0" });
    expect(kernel.writes).toEqual([]);
  });

  it("refuses a group that holds a bridge the host drives, naming the bridge, writing nothing", async () => {
    const { m, kernel } = await host("rtx4090-shared-group");
    const e = await refusal(m.assign("0000:01:00.0", "vms/a"));
    expect(e).toMatchObject({ code: "failed-precondition", reason: "IOMMU_GROUP_NOT_VIABLE" });
    expect(e.metadata).toEqual({
      gpu: "gpus/0000:01:00.0",
      device: "0000:00:01.0",
      driver: "pcieport",
      iommu_group: "12",
    });
    expect(kernel.writes).toEqual([]);
  });

  it("refuses an unknown GPU and a non-GPU device", async () => {
    const { m } = await host("no-gpu");
    expect((await refusal(m.assign("0000:00:19.0", "vms/a"))).code).toBe("not-found");
    expect((await refusal(m.assign("0000:42:00.0", "vms/a"))).code).toBe("not-found");
  });

  it("a GPU its VM has bound cannot be released", async () => {
    const { m, finish } = await host("h100", { boundBy: () => ["vms/a"] });
    await finish(m.assign("0000:01:00.0", "vms/a"));
    const e = await refusal(m.release("0000:01:00.0"));
    expect(e).toMatchObject({ code: "failed-precondition", reason: "GPU_IN_USE" });
    expect(e.metadata).toEqual({ gpu: "gpus/0000:01:00.0", vm: "vms/a" });
  });

  it("when vfio-pci does not bind, the assignment fails and everything goes back", async () => {
    const { m, kernel, finish } = await host("rtx4090", { broken: ["vfio-pci"] });
    const op = await finish(m.assign("0000:01:00.0", "vms/a"));
    expect(op.state).toBe("failed");
    expect((op.error as VmenvError).reason).toBe("VFIO_BIND_FAILED");
    expect(await kernel.driverOf("0000:01:00.0")).toBe("nvidia");
    expect(await kernel.driverOf("0000:01:00.1")).toBe("snd_hda_intel");
    expect(await m.get("0000:01:00.0")).toMatchObject({ state: "available", vm: undefined });
  });

  it("passthrough checks: assigned to this VM and on vfio-pci", async () => {
    const { m, finish, kernel } = await host("rtx4090");
    const e = await refusal(m.passthrough("0000:01:00.0", "vms/a"));
    expect(e).toMatchObject({ code: "failed-precondition", reason: "GPU_NOT_ASSIGNED" });
    await finish(m.assign("0000:01:00.0", "vms/a"));
    expect(await m.passthrough("0000:01:00.0", "vms/a")).toEqual({
      address: "0000:01:00.0",
      functions: ["0000:01:00.1"],
    });
    expect((await refusal(m.passthrough("0000:01:00.0", "vms/b"))).reason).toBe("GPU_IN_USE");
    // After a host reboot the override is gone and the GPU is not on vfio-pci: refused, saying so.
    await kernel.react("bus/pci/drivers/vfio-pci/unbind", "0000:01:00.1");
    const e2 = await refusal(m.passthrough("0000:01:00.0", "vms/a"));
    expect(e2).toMatchObject({ code: "failed-precondition", reason: "GPU_NOT_VFIO_BOUND" });
    expect(e2.metadata).toEqual({ gpu: "gpus/0000:01:00.0", vm: "vms/a", device: "0000:01:00.1" });
  });
});
