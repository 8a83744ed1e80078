/**
 * GPUs and capacity through a real agent process. No GPU machine is at hand, so the agent reads a copy
 * of fixture host (a) — an H100 SXM alone in its IOMMU group, on the nvidia driver — through
 * `--sysfs-root`, asks a stand-in nvidia-smi that prints the documented CSV, and a fake "kernel" in this
 * test moves the fixture's driver links when the agent writes unbind / driver_override / drivers_probe,
 * as the PCI core would. What is checked: the API and the CLI, the writes landing in the tree, and VM
 * creates that name a GPU or do not fit.
 */
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  DeviceChangeOutcome,
  GpuSchema,
  GpuService,
  GpuState,
  HostService,
  MigMode,
  type Operation,
  VmDeviceKind,
} from "@vmenv/api/agent/v1";
import { ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { createDaemonClient } from "@vmenv/rpc";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { buildFixture, FakeKernel } from "../packages/agent/src/gpu/testdata/fixtures.js";
import { cliMain, type RunningAgent, repoRoot, run, startAgent } from "./support/agent.js";
import { clients, done, MIB } from "./support/vm.js";

const GPU = "gpus/0000:01:00.0";
const GIB = 1024n * MIB;
const FAKE_SMI = join(repoRoot, "packages/agent/src/gpu/testdata/nvidia-smi");

/** The code and ErrorInfo of a failed call. */
async function failure(p: Promise<unknown>) {
  try {
    await p;
  } catch (e) {
    const ce = ConnectError.from(e);
    const ei = ce.findDetails(ErrorInfoSchema)[0];
    return { code: ce.code, message: ce.rawMessage, reason: ei?.reason ?? "", meta: { ...ei?.metadata } };
  }
  throw new Error("expected the call to fail");
}

describe("GPUs and capacity through a real agent on a fixture sysfs", () => {
  let dir: string;
  let sys: string;
  let kernelFile: string;
  let kernel: FakeKernel;
  let agent: RunningAgent | undefined;
  let gpus: ReturnType<typeof createDaemonClient<typeof GpuService>>;
  let host: ReturnType<typeof createDaemonClient<typeof HostService>>;
  let c: ReturnType<typeof clients>;
  const vmenv = (...args: string[]) =>
    run(process.execPath, [cliMain, "--socket", agent?.socket ?? "", ...args], { timeoutMs: 30_000 });
  const link = (bdf: string) => kernel.driverOf(bdf);
  const file = (p: string) => readFile(join(sys, p), "utf8");
  const stoppedVm = (id: string, o: { vcpus?: number; memory?: bigint; gpu?: boolean } = {}) => ({
    vmId: id,
    start: false,
    vm: {
      spec: {
        vcpus: o.vcpus ?? 1,
        memoryBytes: o.memory ?? 128n * MIB,
        boot: { method: { case: "directKernel" as const, value: { kernelPath: kernelFile, cmdline: "" } } },
        gpus: o.gpu ? [{ id: "gpu0", gpu: GPU }] : [],
      },
    },
  });
  const gpuOf = (op: Operation) => (op.result ? anyUnpack(op.result, GpuSchema) : undefined);

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "vmenv-gpu-test-"));
    sys = join(dir, "sys");
    await buildFixture("h100", sys);
    kernel = FakeKernel.for("h100", sys);
    kernel.watch();
    // Stopped VMs need a kernel file that exists, nothing more: no QEMU runs in this test.
    kernelFile = join(dir, "vmlinuz");
    await writeFile(kernelFile, "not a kernel");
    agent = await startAgent(["--sysfs-root", sys, "--nvidia-smi", FAKE_SMI]);
    gpus = createDaemonClient(GpuService, { socket: agent.socket, timeoutMs: 30_000 });
    host = createDaemonClient(HostService, { socket: agent.socket, timeoutMs: 30_000 });
    c = clients(agent.socket);
  });

  afterAll(async () => {
    kernel?.close();
    await agent?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it("lists the GPU with what sysfs and nvidia-smi say", async () => {
    const { gpus: list } = await gpus.listGpus({});
    expect(list).toHaveLength(1);
    expect(list[0]).toMatchObject({
      name: GPU,
      pciAddress: "0000:01:00.0",
      vendorId: 0x10de,
      vendorName: "NVIDIA Corporation",
      deviceId: 0x2330,
      deviceName: "GH100 [H100 SXM5 80GB]",
      model: "NVIDIA H100 80GB HBM3",
      numaNode: 1,
      iommuGroup: 17,
      driver: "nvidia",
      memoryTotalBytes: 81559n * MIB,
      migMode: MigMode.DISABLED,
      state: GpuState.AVAILABLE,
      vm: "",
    });
    const cap = (await host.getHostInfo({})).capacity;
    expect(cap).toMatchObject({ gpusTotal: 1, gpusFree: 1, gpuMemoryTotalBytes: 81559n * MIB });
  });

  it("names an unknown GPU and a malformed name in its refusals, touching nothing", async () => {
    const unknown = await failure(gpus.getGpu({ name: "gpus/0000:09:00.0" }));
    expect(unknown).toMatchObject({
      code: Code.NotFound,
      reason: "GPU_NOT_FOUND",
      meta: { gpu: "gpus/0000:09:00.0" },
    });
    const bad = await failure(gpus.assignGpu({ name: "gpus/../../../etc", vm: "vms/x" }));
    expect(bad).toMatchObject({ code: Code.InvalidArgument, reason: "INVALID_GPU_NAME" });
    const noVm = await failure(gpus.assignGpu({ name: GPU, vm: "" }));
    expect(noVm).toMatchObject({ code: Code.InvalidArgument });
    expect(await link("0000:01:00.0")).toBe("nvidia");
  });

  it("refuses a VM naming a GPU not assigned to it, and leaves no VM", async () => {
    const f = await failure(c.vms.createVm(stoppedVm("early", { gpu: true })));
    expect(f).toMatchObject({
      code: Code.FailedPrecondition,
      reason: "GPU_NOT_ASSIGNED",
      meta: { gpu: GPU, vm: "vms/early" },
    });
    expect((await c.vms.listVms({})).vms).toEqual([]);

    // The same through a change set on an existing VM: the element fails, the VM is unchanged.
    await done(c, await c.vms.createVm(stoppedVm("plain")));
    const r = await c.vms.commitVmDeviceChanges({
      name: "vms/plain",
      changes: [{ action: 2, device: { case: "gpu", value: { id: "gpu0", gpu: GPU } } }],
    });
    expect(r.results[0]?.outcome).toBe(DeviceChangeOutcome.ERROR);
    expect(r.results[0]?.error?.message).toContain("is not assigned to vms/plain");
    expect((await c.vms.getVm({ name: "vms/plain" })).devices).toEqual([]);
    await done(c, await c.vms.deleteVm({ name: "vms/plain" }));
  });

  it("assigns through the API (vfio-pci in the tree), attaches to a VM, refuses release while bound, releases", async () => {
    const op = await done(c, await gpus.assignGpu({ name: GPU, vm: "vms/train" }));
    expect(op.kind).toBe("gpu.assign");
    expect(gpuOf(op)).toMatchObject({ state: GpuState.ASSIGNED, vm: "vms/train", driver: "vfio-pci" });
    expect(await file("bus/pci/devices/0000:01:00.0/driver_override")).toBe("vfio-pci");
    expect(await link("0000:01:00.0")).toBe("vfio-pci");
    // nvidia-smi cannot see it now; its memory is still known, and accounted to the VM.
    expect(await gpus.getGpu({ name: GPU })).toMatchObject({
      memoryTotalBytes: 81559n * MIB,
      originalDriver: "nvidia",
    });
    expect((await host.getHostInfo({})).capacity).toMatchObject({
      gpusTotal: 1,
      gpusFree: 0,
      gpuMemoryFreeBytes: 0n,
      numaNodes: [expect.objectContaining({ id: 0 })],
    });
    // Another VM may not have it.
    const other = await failure(gpus.assignGpu({ name: GPU, vm: "vms/other" }));
    expect(other).toMatchObject({ code: Code.FailedPrecondition, reason: "GPU_IN_USE" });

    await done(c, await c.vms.createVm(stoppedVm("train", { gpu: true })));
    const vm = await c.vms.getVm({ name: "vms/train" });
    expect(vm.spec?.gpus).toEqual([expect.objectContaining({ id: "gpu0", gpu: GPU })]);
    expect(vm.devices.map((d) => d.kind)).toEqual([VmDeviceKind.GPU]);

    const busy = await failure(gpus.releaseGpu({ name: GPU }));
    expect(busy).toMatchObject({
      code: Code.FailedPrecondition,
      reason: "GPU_IN_USE",
      meta: { vm: "vms/train" },
    });

    await done(c, await c.vms.deleteVm({ name: "vms/train" }));
    const rel = await done(c, await gpus.releaseGpu({ name: GPU }));
    expect(gpuOf(rel)).toMatchObject({ state: GpuState.AVAILABLE, vm: "", driver: "nvidia" });
    expect(await link("0000:01:00.0")).toBe("nvidia");
    // What the agent wrote to clear it (the kernel then shows "(null)").
    expect(await file("bus/pci/devices/0000:01:00.0/driver_override")).toBe("\n");
  });

  it("the CLI lists, assigns, gets and releases", async () => {
    const list = await vmenv("gpu", "list");
    expect(list.code, list.stderr).toBe(0);
    expect(list.stdout).toMatch(
      /0000:01:00\.0\s+NVIDIA H100 80GB HBM3\s+nvidia\s+1\s+17\s+79\.6 GiB\s+available/,
    );

    const assign = await vmenv("gpu", "assign", "01:00.0", "cli-vm");
    expect(assign.code, assign.stderr).toBe(0);
    expect(assign.stdout).toMatch(/State:\s+assigned \(assigned to vms\/cli-vm\)/);
    expect(assign.stdout).toMatch(/Driver:\s+vfio-pci \(was nvidia\)/);

    const get = await vmenv("-o", "json", "gpu", "get", "0000:01:00.0");
    expect(JSON.parse(get.stdout)).toMatchObject({ vm: "vms/cli-vm", state: "GPU_STATE_ASSIGNED" });

    const refused = await vmenv("gpu", "assign", "01:00.0", "someone-else");
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain("assigned to vms/cli-vm");

    const release = await vmenv("gpu", "release", "01:00.0");
    expect(release.code, release.stderr).toBe(0);
    expect(release.stdout).toMatch(/State:\s+available/);
    expect(await link("0000:01:00.0")).toBe("nvidia");

    const info = await vmenv("host", "info");
    expect(info.stdout).toMatch(/GPUs\s+0\s+1\s+1 free/);
  });

  it("refuses a VM that does not fit with RESOURCE_EXHAUSTED, and leaves no VM", async () => {
    // 64 vCPUs: more than 2 logical CPUs × the default overcommit 16.
    const cpus = await failure(c.vms.createVm(stoppedVm("wide", { vcpus: 64 })));
    expect(cpus).toMatchObject({
      code: Code.ResourceExhausted,
      reason: "INSUFFICIENT_CAPACITY",
      meta: { vm: "vms/wide", resource: "vcpus", requested: "64" },
    });
    expect(cpus.message).toMatch(
      /needs 64 vCPUs, and \d+ are left \(\d+ allocatable = \d+ logical CPUs × overcommit 16/,
    );

    // Memory: defined VMs count, running or not. Half the host fits once, not twice.
    const total = (await host.getHostInfo({})).capacity?.memoryAllocatableBytes ?? 0n;
    const half = ((total / 2n + MIB) / MIB) * MIB;
    await done(c, await c.vms.createVm(stoppedVm("half", { memory: half })));
    const mem = await failure(c.vms.createVm(stoppedVm("other-half", { memory: half })));
    expect(mem).toMatchObject({
      code: Code.ResourceExhausted,
      reason: "INSUFFICIENT_CAPACITY",
      meta: { vm: "vms/other-half", resource: "memory" },
    });
    expect((await c.vms.listVms({})).vms.map((v) => v.name)).toEqual(["vms/half"]);
    expect((await host.getHostInfo({})).capacity).toMatchObject({
      memoryAllocatedBytes: half,
      vcpusAllocated: 1,
      vms: 1,
      runningVms: 0,
    });
    await done(c, await c.vms.deleteVm({ name: "vms/half" }));
    expect(total).toBeGreaterThan(GIB);
  });
});
