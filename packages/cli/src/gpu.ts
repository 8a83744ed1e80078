import { createRegistry, toJson } from "@bufbuild/protobuf";
import { anyUnpack, durationFromMs } from "@bufbuild/protobuf/wkt";
import {
  DiagnosticsService,
  type Gpu,
  GpuSchema,
  GpuService,
  GpuState,
  MigMode,
  type Operation,
  OperationSchema,
  OperationState,
} from "@vmenv/api/agent/v1";
import { type ClientConfig, createDaemonClient } from "@vmenv/rpc";
import type { Command } from "commander";
import { bytes, keyValues, table } from "./output.js";

type Print = (json: unknown, text: () => string) => void;

const stateName = (s: GpuState) => (GpuState[s] ?? "?").toLowerCase();
const migName = (m: MigMode) => (MigMode[m] ?? "?").toLowerCase().replace("_", "-");
const hex = (n: number) => n.toString(16).padStart(4, "0");

/** "01:00.0", "0000:01:00.0" or "gpus/0000:01:00.0" → "gpus/0000:01:00.0". */
export function gpuName(s: string): string {
  const a = s.replace(/^gpus\//, "").toLowerCase();
  return `gpus/${/^[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$/.test(a) ? `0000:${a}` : a}`;
}

function gpuTable(gpus: Gpu[]): string {
  return table(
    ["GPU", "DEVICE", "DRIVER", "NUMA", "IOMMU", "MEMORY", "STATE", "VM"],
    gpus.map((g) => [
      g.pciAddress,
      g.model || g.deviceName || `${hex(g.vendorId)}:${hex(g.deviceId)}`,
      g.driver || "-",
      g.numaNode === undefined ? "-" : String(g.numaNode),
      g.iommuGroup === undefined ? "off" : String(g.iommuGroup),
      g.memoryTotalBytes ? bytes(g.memoryTotalBytes) : "-",
      stateName(g.state),
      g.vm.replace(/^vms\//, "") || "-",
    ]),
  );
}

function gpuDetail(g: Gpu): string {
  return keyValues([
    ["Name", g.name],
    ["Vendor", `${g.vendorName || "?"} [${hex(g.vendorId)}]`],
    ["Device", `${g.deviceName || "?"} [${hex(g.deviceId)}]`],
    ["Model", g.model || "-"],
    ["NUMA node", g.numaNode === undefined ? "-" : String(g.numaNode)],
    [
      "IOMMU group",
      g.iommuGroup === undefined
        ? "none (IOMMU off)"
        : `${g.iommuGroup}${g.iommuGroupDevices.length ? ` (with ${g.iommuGroupDevices.join(", ")})` : ""}`,
    ],
    ["Driver", `${g.driver || "none"}${g.originalDriver ? ` (was ${g.originalDriver})` : ""}`],
    [
      "Memory",
      g.memoryTotalBytes
        ? `${bytes(g.memoryTotalBytes)} (${bytes(g.memoryUsedBytes)} used by the host)`
        : "-",
    ],
    ["MIG", migName(g.migMode)],
    ["State", `${stateName(g.state)}${g.stateMessage ? ` (${g.stateMessage})` : ""}`],
    ["VM", g.vm || "-"],
  ]);
}

/** `vmenv gpu …` */
export function gpuCommands(program: Command, cfg: () => ClientConfig, print: Print): void {
  const gpu = program.command("gpu").description("GPUs of the agent's host, for passthrough to VMs");
  const client = () => createDaemonClient(GpuService, cfg());
  const registry = createRegistry(GpuSchema);

  /** Waits for the operation; prints the GPU it ends with, or fails with its error. */
  const finish = async (op: Operation, wait: boolean) => {
    let cur = op;
    if (wait) {
      const diag = createDaemonClient(DiagnosticsService, cfg());
      while (cur.state === OperationState.RUNNING || cur.state === OperationState.PENDING) {
        cur = await diag.waitOperation(
          { name: op.name, timeout: durationFromMs(60_000) },
          { timeoutMs: 70_000 },
        );
      }
      if (cur.state !== OperationState.SUCCEEDED) {
        throw new Error(
          `${cur.kind} ${cur.target} ${OperationState[cur.state].toLowerCase()}: ${cur.error?.message ?? ""}`,
        );
      }
    }
    const g = cur.result ? anyUnpack(cur.result, GpuSchema) : undefined;
    if (g) print(toJson(GpuSchema, g), () => gpuDetail(g));
    else
      print(
        toJson(OperationSchema, cur, { registry }),
        () => `${cur.kind} ${cur.target}: ${OperationState[cur.state].toLowerCase()} (${cur.name})`,
      );
  };

  gpu
    .command("list")
    .description("every GPU: device, driver, NUMA node, IOMMU group, memory, state, VM")
    .option("--vm <vm>", "only the GPUs assigned to this VM")
    .action(async (o: { vm?: string }) => {
      const r = await client().listGpus({
        pageSize: 1000,
        ...(o.vm ? { vm: o.vm.startsWith("vms/") ? o.vm : `vms/${o.vm}` } : {}),
      });
      print(
        r.gpus.map((g) => toJson(GpuSchema, g)),
        () => (r.gpus.length ? gpuTable(r.gpus) : "no GPUs on this host"),
      );
    });

  gpu
    .command("get <gpu>")
    .description("one GPU (its PCI address, e.g. 0000:41:00.0)")
    .action(async (id: string) => {
      const g = await client().getGpu({ name: gpuName(id) });
      print(toJson(GpuSchema, g), () => gpuDetail(g));
    });

  gpu
    .command("assign <gpu> <vm>")
    .description("bind a GPU (and its IOMMU group) to vfio-pci for a VM")
    .option("--no-wait", "return the operation at once")
    .action(async (id: string, vm: string, o: { wait: boolean }) => {
      const op = await client().assignGpu({
        name: gpuName(id),
        vm: vm.startsWith("vms/") ? vm : `vms/${vm}`,
      });
      await finish(op, o.wait);
    });

  gpu
    .command("release <gpu>")
    .description("end a GPU's assignment and give it back to its original driver")
    .option("--no-wait", "return the operation at once")
    .action(async (id: string, o: { wait: boolean }) => {
      await finish(await client().releaseGpu({ name: gpuName(id) }), o.wait);
    });
}
