import { mkdir, readFile, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { failedPrecondition, VmenvError } from "@vmenv/rpc/errors";
import type { Logger } from "pino";
import type { OperationRecord, Operations } from "../diagnostics/operations.js";
import {
  type GpuView,
  gpuName,
  gpuNotFound,
  isGpu,
  isPciAddress,
  type PciFunction,
  planGroup,
  sameSlot,
  type VendorGpuInfo,
} from "./domain.js";
import type { PciNames } from "./pci-ids.js";
import type { SysfsPci } from "./sysfs.js";

/** What the agent keeps about one assigned GPU (in `<state>/gpus/state.json`). */
interface Assignment {
  /** `vms/{vm}`. */
  vm: string;
  /** Every device moved to vfio-pci for it, with the driver it had ("" = none), restored on release. */
  original: Record<string, string>;
  assignTimeMs: number;
}

interface State {
  assignments: Record<string, Assignment>;
  /** Last figures nvidia-smi gave per GPU: kept while the GPU is on vfio-pci, where nvidia-smi is blind. */
  known: Record<string, { model: string; memoryTotalBytes: string }>;
}

export interface GpuManagerDeps {
  pci: SysfsPci;
  names: PciNames;
  /** The vendor tool's view (nvidia-smi); undefined when there is none. */
  vendor: () => Promise<VendorGpuInfo[] | undefined>;
  stateDir: string;
  operations: Operations;
  logger: Logger;
  now?: () => number;
  /** VMs that have a GPU device bound, by GPU name (the VM service answers). */
  boundBy?: (gpu: string) => string[];
  /** How long the kernel may take to bind a driver after a probe. Default 5000 ms. */
  bindTimeoutMs?: number;
  /** How long one answer of the vendor tool serves (nvidia-smi takes a while). Default 5000 ms. */
  vendorMaxAgeMs?: number;
}

/** A device the VM side may pass through: the GPU and the other functions of its slot. */
export interface PassthroughGpu {
  address: string;
  /** Other functions of the GPU's PCI device in its IOMMU group (its audio), also on vfio-pci. */
  functions: string[];
}

/**
 * The GPUs of this host: inventory from sysfs (and nvidia-smi), assignment to VMs by moving each GPU's
 * IOMMU group to vfio-pci, and release back to the drivers they had. What was assigned, and the drivers
 * to restore, are written to the state directory before sysfs is touched, so a new agent releases
 * correctly.
 */
export class GpuManager {
  readonly #now: () => number;
  readonly #file: string;
  #state: State = { assignments: {}, known: {} };
  /** Serialises sysfs changes: one assign or release at a time. */
  #lock: Promise<unknown> = Promise.resolve();

  constructor(private readonly d: GpuManagerDeps) {
    this.#now = d.now ?? Date.now;
    this.#file = join(d.stateDir, "gpus", "state.json");
  }

  async init(): Promise<void> {
    const text = await readFile(this.#file, "utf8").catch(() => undefined);
    if (text) {
      const s = JSON.parse(text) as Partial<State>;
      this.#state = { assignments: s.assignments ?? {}, known: s.known ?? {} };
    }
  }

  // ---- queries -------------------------------------------------------------------------------

  /** Every GPU of the host, in address order. A host without any has none (no error). */
  async list(): Promise<GpuView[]> {
    const all = await this.d.pci.functions();
    const vendor = await this.#vendor();
    await this.#remember(vendor);
    const out: GpuView[] = [];
    for (const f of all.filter(isGpu)) out.push(await this.#view(f, all, vendor));
    return out;
  }

  async get(address: string): Promise<GpuView> {
    const g = (await this.list()).find((x) => x.address === address);
    if (!g) throw gpuNotFound(address);
    return g;
  }

  /** GPU names assigned to `vms/{vm}`. */
  assignedTo(vm: string): string[] {
    return Object.entries(this.#state.assignments)
      .filter(([, a]) => a.vm === vm)
      .map(([addr]) => gpuName(addr));
  }

  /**
   * What a VM needs to pass `gpus/{address}` through, once checked: it is assigned to this VM and it and
   * its functions are on vfio-pci. Otherwise FAILED_PRECONDITION naming the GPU (or NOT_FOUND).
   */
  async passthrough(address: string, vm: string): Promise<PassthroughGpu> {
    const name = gpuName(address);
    const f = isPciAddress(address) ? await this.d.pci.function(address) : undefined;
    if (!f || !isGpu(f)) throw gpuNotFound(address);
    const a = this.#state.assignments[address];
    if (a?.vm !== vm) {
      throw failedPrecondition(
        a
          ? `${name} is assigned to ${a.vm}, not ${vm}`
          : `${name} is not assigned to ${vm}: assign it first (vmenv gpu assign ${address} ${vm.replace(/^vms\//, "")})`,
        a ? "GPU_IN_USE" : "GPU_NOT_ASSIGNED",
        { gpu: name, vm, ...(a ? { assigned_to: a.vm } : {}) },
      );
    }
    // The GPU's other functions in its group (its audio), on vfio-pci since the assignment.
    const members = f.iommuGroup === undefined ? [] : await this.d.pci.group(f.iommuGroup);
    const functions = members.filter((x) => x !== address && sameSlot(x, address));
    for (const x of [address, ...functions]) {
      const now = await this.d.pci.function(x);
      if (now?.driver !== "vfio-pci") {
        throw failedPrecondition(
          `${name} is assigned to ${vm} but ${x} is bound to ${now?.driver ?? "no driver"}, not vfio-pci: release and assign it again`,
          "GPU_NOT_VFIO_BOUND",
          { gpu: name, vm, device: x },
        );
      }
    }
    return { address, functions };
  }

  // ---- mutations -----------------------------------------------------------------------------

  /**
   * Assigns a GPU to a VM: its IOMMU group moves to vfio-pci. Idempotent for the same VM; refused for a
   * GPU assigned elsewhere, without IOMMU, or whose group holds a device the host still drives.
   */
  async assign(address: string, vm: string, requestId?: string): Promise<OperationRecord> {
    const replay = this.d.operations.byRequestId(requestId);
    if (replay) return replay;
    const name = gpuName(address);
    const all = await this.d.pci.functions();
    const gpu = all.find((f) => f.address === address && isGpu(f));
    if (!gpu) throw gpuNotFound(address);
    const cur = this.#state.assignments[address];
    if (cur?.vm === vm) return this.d.operations.done("gpu.assign", name, await this.get(address), requestId);
    if (cur) {
      throw failedPrecondition(`${name} is assigned to ${cur.vm}; release it first`, "GPU_IN_USE", {
        gpu: name,
        vm: cur.vm,
      });
    }
    const members = gpu.iommuGroup === undefined ? [] : await this.d.pci.group(gpu.iommuGroup);
    const group = all.filter((f) => members.includes(f.address));
    const p = planGroup(gpu, group.length > 0 ? group : [gpu]);
    if (!p.ok) throw p.error;
    // Reserved now, before any await: a second assign of this GPU sees it taken.
    const original = Object.fromEntries(p.bind.map((f) => [f.address, f.driver ?? ""]));
    const a: Assignment = { vm, original, assignTimeMs: this.#now() };
    this.#state.assignments[address] = a;
    return this.d.operations.start(
      "gpu.assign",
      name,
      (op) =>
        this.#locked(async () => {
          try {
            await this.#save();
            const done: string[] = [];
            try {
              for (const f of p.bind) {
                op.progress(
                  Math.round((done.length * 100) / p.bind.length),
                  `binding ${f.address} to vfio-pci`,
                );
                // Listed before the writes: a device half-moved when a write fails is given back too.
                done.push(f.address);
                await this.#toVfio(f);
              }
            } catch (err) {
              for (const x of done.reverse())
                await this.#restore(x, original[x] ?? "").catch(() => undefined);
              throw err;
            }
          } catch (err) {
            delete this.#state.assignments[address];
            await this.#save().catch(() => undefined);
            throw err;
          }
          this.d.logger.info({ gpu: name, vm, devices: p.bind.map((f) => f.address) }, "GPU assigned");
          return this.get(address);
        }),
      requestId ? { requestId } : {},
    );
  }

  /** Ends an assignment and gives every device back to the driver it had. Releasing a free GPU is a NOOP. */
  async release(address: string, requestId?: string): Promise<OperationRecord> {
    const replay = this.d.operations.byRequestId(requestId);
    if (replay) return replay;
    const name = gpuName(address);
    const a = this.#state.assignments[address];
    if (!a) return this.d.operations.done("gpu.release", name, await this.get(address), requestId);
    const users = this.d.boundBy?.(name) ?? [];
    if (users.length > 0) {
      throw failedPrecondition(
        `${name} is in use by ${users.join(", ")}: unbind its device from the VM first`,
        "GPU_IN_USE",
        { gpu: name, vm: users[0] ?? "" },
      );
    }
    return this.d.operations.start(
      "gpu.release",
      name,
      (op) =>
        this.#locked(async () => {
          const devices = Object.keys(a.original).sort().reverse(); // function 0 last, as it was bound first
          let i = 0;
          for (const x of devices) {
            op.progress(
              Math.round((i++ * 100) / devices.length),
              `giving ${x} back to ${a.original[x] || "no driver"}`,
            );
            await this.#restore(x, a.original[x] ?? "");
          }
          delete this.#state.assignments[address];
          await this.#save();
          this.d.logger.info({ gpu: name, vm: a.vm }, "GPU released");
          return this.get(address);
        }),
      requestId ? { requestId } : {},
    );
  }

  // ---- internals ---------------------------------------------------------------------------

  #vendorAnswer: { at: number; value: Promise<VendorGpuInfo[]> } | undefined;

  /** The vendor tool's answer, shared by the calls of a few seconds (HostInfo asks on each call). */
  #vendor(): Promise<VendorGpuInfo[]> {
    const now = Date.now();
    if (!this.#vendorAnswer || now - this.#vendorAnswer.at > (this.d.vendorMaxAgeMs ?? 5000)) {
      const value = this.d.vendor().then(
        (v) => v ?? [],
        () => [],
      );
      this.#vendorAnswer = { at: now, value };
    }
    return this.#vendorAnswer.value;
  }

  /** unbind from the host driver, driver_override = vfio-pci, drivers_probe; then wait for vfio-pci. */
  async #toVfio(f: PciFunction): Promise<void> {
    const now = await this.d.pci.function(f.address);
    if (now?.driver === "vfio-pci") return;
    if (now?.driver) await this.d.pci.unbind(f.address, now.driver);
    await this.d.pci.setOverride(f.address, "vfio-pci");
    await this.d.pci.probe(f.address);
    if (!(await this.#waitDriver(f.address, "vfio-pci"))) {
      throw new VmenvError(
        "failed-precondition",
        `${f.address} did not bind to vfio-pci within ${this.#timeout} ms (is the vfio-pci module loaded? modprobe vfio-pci)`,
        { reason: "VFIO_BIND_FAILED", metadata: { gpu: gpuName(f.address), device: f.address } },
      );
    }
  }

  /** unbind from vfio-pci, clear driver_override, drivers_probe (the kernel picks the original driver). */
  async #restore(address: string, original: string): Promise<void> {
    const now = await this.d.pci.function(address);
    if (!now) return;
    if (now.driver === "vfio-pci") await this.d.pci.unbind(address, "vfio-pci");
    if (now.driverOverride !== undefined || now.driver === "vfio-pci")
      await this.d.pci.setOverride(address, undefined);
    if (!original || now.driver === original) return;
    await this.d.pci.probe(address);
    if (await this.#waitDriver(address, original)) return;
    // The kernel may prefer another driver for it: ask for the original one by name.
    await this.d.pci.bind(address, original).catch(() => undefined);
    if (await this.#waitDriver(address, original)) return;
    throw new VmenvError(
      "internal",
      `${address} did not go back to ${original} within ${this.#timeout} ms; bind it by hand (echo ${address} > /sys/bus/pci/drivers/${original}/bind)`,
      { reason: "GPU_REBIND_FAILED", metadata: { device: address, driver: original } },
    );
  }

  get #timeout(): number {
    return this.d.bindTimeoutMs ?? 5000;
  }

  async #waitDriver(address: string, driver: string): Promise<boolean> {
    const end = Date.now() + this.#timeout;
    for (;;) {
      if ((await this.d.pci.function(address))?.driver === driver) return true;
      if (Date.now() >= end) return false;
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  async #view(f: PciFunction, all: PciFunction[], vendor: VendorGpuInfo[]): Promise<GpuView> {
    const v = vendor.find((x) => x.address === f.address);
    const known = this.#state.known[f.address];
    const a = this.#state.assignments[f.address];
    const members = f.iommuGroup === undefined ? [] : await this.d.pci.group(f.iommuGroup);
    const group = all.filter((x) => members.includes(x.address));
    let state: GpuView["state"] = "available";
    let stateMessage = "";
    if (a) {
      state = "assigned";
      stateMessage = `assigned to ${a.vm}`;
    } else {
      const p = planGroup(f, group.length > 0 ? group : [f]);
      if (!p.ok) {
        state = "unavailable";
        stateMessage = p.message;
      }
    }
    return {
      address: f.address,
      vendorId: f.vendorId,
      vendorName: await this.d.names.vendor(f.vendorId),
      deviceId: f.deviceId,
      deviceName: await this.d.names.device(f.vendorId, f.deviceId),
      model: v?.model ?? known?.model ?? "",
      numaNode: f.numaNode,
      iommuGroup: f.iommuGroup,
      iommuGroupDevices: members.filter((x) => x !== f.address),
      driver: f.driver,
      originalDriver: a?.original[f.address] || undefined,
      memoryTotalBytes: v?.memoryTotalBytes ?? (known ? BigInt(known.memoryTotalBytes) : 0n),
      memoryUsedBytes: a ? 0n : (v?.memoryUsedBytes ?? 0n),
      migMode: v?.migMode ?? "not-supported",
      state,
      stateMessage,
      vm: a?.vm,
    };
  }

  async #remember(vendor: VendorGpuInfo[]): Promise<void> {
    let changed = false;
    for (const v of vendor) {
      const k = { model: v.model, memoryTotalBytes: String(v.memoryTotalBytes) };
      const had = this.#state.known[v.address];
      if (had?.model !== k.model || had.memoryTotalBytes !== k.memoryTotalBytes) {
        this.#state.known[v.address] = k;
        changed = true;
      }
    }
    if (changed) await this.#save();
  }

  async #save(): Promise<void> {
    await mkdir(join(this.d.stateDir, "gpus"), { recursive: true, mode: 0o750 });
    const tmp = `${this.#file}.tmp`;
    await writeFile(tmp, `${JSON.stringify(this.#state, null, 2)}\n`);
    await rename(tmp, this.#file);
  }

  #locked<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#lock.then(fn, fn);
    this.#lock = run.catch(() => undefined);
    return run;
  }
}
