import { EventEmitter } from "node:events";
import { access, constants, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import {
  alreadyExists,
  failedPrecondition,
  invalidArgument,
  notFound,
  unimplemented,
  VmenvError,
} from "@vmenv/rpc/errors";
import type { Logger } from "pino";
import type { VolumeFile, VolumeResolver } from "../block/ports.js";
import type { OperationHandle, OperationRecord, Operations } from "../diagnostics/operations.js";
import type { NicBackend } from "../network/ports.js";
import { ConsoleTap } from "./console.js";
import {
  type Change,
  type ChangeAction,
  type Device,
  type DeviceState,
  type DiskDevice,
  freeSlot,
  type GpuDevice,
  type NicDevice,
  type NicPlug,
  plan,
  type Step,
} from "./devices.js";
import {
  type Accelerator,
  checkTransition,
  checkVmId,
  type HostLimits,
  type RestartPolicy,
  sameSpec,
  type VmmKind,
  type VmRecord,
  type VmSpec,
  type VmState,
  validateSpec,
} from "./domain.js";
import {
  type AttachedDisk,
  type AttachedGpu,
  type AttachedNic,
  type ExitCause,
  HOTPLUG_SLOTS,
  type RunningVmm,
  type VmmDriver,
} from "./driver.js";
import { type MigrationDeps, VmMigrations } from "./migration.js";
import {
  loadSnapshots,
  receiveInto,
  removeSnapshot,
  type SnapshotRecord,
  saveSnapshotRecord,
  sendFrom,
  snapshotDir,
} from "./snapshots.js";
import type { VmStore } from "./store.js";

export interface VmManagerDeps {
  store: VmStore;
  drivers: Partial<Record<VmmKind, VmmDriver>>;
  operations: Operations;
  logger: Logger;
  /** The accelerator VMs get when their spec does not name one. */
  effectiveAccelerator: () => Promise<Accelerator>;
  hostLimits: () => Promise<HostLimits>;
  /** A console line matching this means the guest is up. */
  guestReadyPattern: RegExp;
  now?: () => number;
  /** Default graceful stop timeout. */
  stopTimeoutMs?: number;
  /** Resolves `volumes/{id}` for disks (the block service). */
  volumes?: VolumeResolver;
  /** Reserves and releases NIC ports on networks (the network service). */
  nics?: NicBackend;
  /**
   * The GPU service: a GPU device passes through only a GPU assigned to its VM and on vfio-pci (the
   * answer names its other functions, which go along).
   */
  gpus?: { passthrough(address: string, vm: string): Promise<{ address: string; functions: string[] }> };
  /**
   * Capacity: reads the host's facts and answers a synchronous check that throws RESOURCE_EXHAUSTED when
   * a VM with this spec does not fit beside the others (called right before the VM is recorded).
   */
  capacity?: () => Promise<(id: string, spec: VmSpec) => void>;
  /** Live migration's needs of the other services (docs/adr/0015); unset: migration is refused. */
  migration?: MigrationDeps;
}

/** The outcome of one element of a device change set. */
export interface ChangeResult {
  deviceId: string;
  action: ChangeAction;
  outcome: "applied" | "noop" | "error";
  error: VmenvError | Error | undefined;
}

/** A change the Watch stream reports. */
export interface VmChange {
  type: "created" | "updated" | "deleted";
  vm: VmRecord;
  seq: number;
  timeMs: number;
}

interface Entry {
  record: VmRecord;
  vmm: RunningVmm | undefined;
  console: ConsoleTap | undefined;
  /** Serialises actions on this VM. */
  lock: Promise<unknown>;
  /** Set while the agent itself stops the VMM, so its exit is not a crash. */
  stopping: boolean;
}

/**
 * The VMs of this agent: their lifecycle, their VMM processes, and what the agent finds again after
 * a restart. Every action on one VM is serialised; every mutation is written to the VM's folder before it
 * is reported.
 */
export class VmManager extends EventEmitter<{ change: [VmChange] }> {
  readonly #vms = new Map<string, Entry>();
  readonly #now: () => number;
  #seq = 0;
  /** Recent changes, for Watch resume tokens. */
  readonly history: VmChange[] = [];
  /** Live migration in and out of this agent (migration.ts). */
  readonly migrations: VmMigrations;

  constructor(private readonly d: VmManagerDeps) {
    super();
    this.setMaxListeners(0);
    this.#now = d.now ?? Date.now;
    this.migrations = new VmMigrations(
      {
        operations: d.operations,
        logger: d.logger,
        has: (id) => this.#vms.has(id),
        record: (id) => this.get(id),
        vmm: (id) => this.#vms.get(id)?.vmm,
        admit: async (id, spec) => {
          validateSpec(spec, await this.d.hostLimits());
          await this.#driver(spec.vmm);
          await this.#checkFiles(spec);
          const fits = await this.d.capacity?.();
          fits?.(id, spec);
        },
        newVm: (kind, id, spec, opts, build) => this.#newVm(kind, id, spec, opts, (_e, op) => build(op)),
        locked: (id, fn) => this.#locked(this.#entry(id), fn),
        set: (id, patch) => this.#set(this.#entry(id), patch),
        launchIncoming: async (id, signal) => {
          const e = this.#entry(id);
          await this.#launch(e, await this.#driver(e.record.spec.vmm), true, undefined, signal, true);
        },
      },
      d.migration,
    );
  }

  get seq(): number {
    return this.#seq;
  }

  // ---- queries -------------------------------------------------------------------------------

  get(id: string): VmRecord {
    const e = this.#vms.get(id);
    if (!e) throw notFound("vm", `vms/${id}`);
    return e.record;
  }

  list(): VmRecord[] {
    return [...this.#vms.values()].map((e) => e.record).sort((a, b) => a.id.localeCompare(b.id));
  }

  /** The running VMM of a VM, for console and passthrough. */
  vmm(id: string): RunningVmm {
    const e = this.#entry(id);
    if (!e.vmm) throw failedPrecondition(`vms/${id} is not running`, "VM_NOT_RUNNING", { vm: `vms/${id}` });
    return e.vmm;
  }

  /** The VM's serial console log. */
  logPath(id: string): string {
    return this.d.store.paths(id).serialLog;
  }

  consoleTap(id: string): ConsoleTap | undefined {
    return this.#entry(id).console;
  }

  // ---- mutations -----------------------------------------------------------------------------

  /**
   * Creates a VM (and boots it when `start`). Idempotent: the same id and spec again returns the VM
   * as it is; a different spec is ALREADY_EXISTS. Nothing is left behind when it fails.
   */
  async create(
    id: string,
    spec: VmSpec,
    opts: {
      labels: Record<string, string>;
      restartPolicy: RestartPolicy;
      start: boolean;
      requestId?: string;
      /** Disks bound from the start. */
      devices?: DeviceState[];
    },
  ): Promise<OperationRecord> {
    const replay = this.d.operations.byRequestId(opts.requestId);
    if (replay) return replay;
    checkVmId(id);
    // Creates of one id are serialised: the second sees the first's VM (and is a NOOP or a conflict).
    const previous = this.#creating.get(id);
    const mine = (previous ?? Promise.resolve()).then(() => this.#create(id, spec, opts));
    const settled = mine.then(
      () => undefined,
      () => undefined,
    );
    this.#creating.set(id, settled);
    void settled.then(() => {
      if (this.#creating.get(id) === settled) this.#creating.delete(id);
    });
    return mine;
  }

  readonly #creating = new Map<string, Promise<void>>();

  async #create(
    id: string,
    spec: VmSpec,
    opts: {
      labels: Record<string, string>;
      restartPolicy: RestartPolicy;
      start: boolean;
      requestId?: string;
      /** Disks bound from the start. */
      devices?: DeviceState[];
    },
  ): Promise<OperationRecord> {
    const existing = this.#vms.get(id);
    const devices = opts.devices ?? [];
    if (existing) {
      const sameDevices =
        JSON.stringify(existing.record.devices.map((d) => d.device)) ===
        JSON.stringify(devices.map((d) => d.device));
      if (!sameSpec(existing.record.spec, spec) || !sameDevices) throw alreadyExists("vm", `vms/${id}`);
      return this.d.operations.done("vm.create", `vms/${id}`, existing.record, opts.requestId);
    }
    validateSpec(spec, await this.d.hostLimits());
    const driver = await this.#driver(spec.vmm);
    await this.#checkFiles(spec);
    // Volumes must exist now; NIC ports are reserved when the VM starts.
    for (const d of devices) if (d.device.kind === "disk") await this.#volume(d.device);
    // GPUs must be assigned to this VM (and on vfio-pci) now; nothing is recorded otherwise.
    for (const d of devices) if (d.device.kind === "gpu") await this.#gpu(spec.vmm, id, d.device);
    // Checked and recorded with no await in between, so two creates cannot both take the last room.
    const fits = await this.d.capacity?.();
    fits?.(id, spec);
    return this.#newVm("vm.create", id, spec, opts, async (entry, op) => {
      if (opts.start) {
        op.progress(10, "starting the VMM");
        await this.#launch(entry, driver, false, undefined, op.signal);
      } else {
        await this.#set(entry, { state: "stopped" });
      }
    });
  }

  /**
   * Records a new VM (folder and record, state creating) and runs `build` as an operation. When `build`
   * fails nothing is left: the VMM (if any) is killed and the folder removed.
   */
  async #newVm(
    kind: string,
    id: string,
    spec: VmSpec,
    opts: {
      labels: Record<string, string>;
      restartPolicy: RestartPolicy;
      requestId?: string;
      devices?: DeviceState[];
    },
    build: (e: Entry, op: OperationHandle) => Promise<unknown>,
  ): Promise<OperationRecord> {
    const t = this.#now();
    const record: VmRecord = {
      id,
      spec,
      labels: opts.labels,
      restartPolicy: opts.restartPolicy,
      state: "creating",
      stateMessage: "",
      accelerator: undefined,
      pid: undefined,
      restartCount: 0,
      createTimeMs: t,
      updateTimeMs: t,
      startTimeMs: undefined,
      guestReadyTimeMs: undefined,
      generation: 1,
      devices: opts.devices ?? [],
    };
    const entry: Entry = {
      record,
      vmm: undefined,
      console: undefined,
      lock: Promise.resolve(),
      stopping: false,
    };
    this.#vms.set(id, entry);
    await this.d.store.save(record);
    this.#emit("created", record);
    return this.d.operations.start(
      kind,
      `vms/${id}`,
      (op) =>
        this.#locked(entry, async () => {
          try {
            const result = await build(entry, op);
            // Cancelled while it was being built: undone below, like a failure.
            op.signal.throwIfAborted();
            return result ?? entry.record;
          } catch (err) {
            entry.stopping = true;
            await entry.vmm?.kill().catch(() => undefined);
            this.#release(entry);
            for (const d of entry.record.devices) await this.#unplug(id, d.device).catch(() => undefined);
            this.#vms.delete(id);
            await this.d.store.remove(id);
            this.#emit("deleted", entry.record);
            throw err;
          }
        }),
      { mayCancel: true, ...(opts.requestId ? { requestId: opts.requestId } : {}) },
    );
  }

  async start(id: string, opts: { paused?: boolean; requestId?: string } = {}): Promise<OperationRecord> {
    return this.#action(id, "start", opts.requestId, async (e) => {
      await this.#launch(e, await this.#driver(e.record.spec.vmm), opts.paused ?? false);
    });
  }

  async stop(
    id: string,
    opts: { force?: boolean; timeoutMs?: number; requestId?: string } = {},
  ): Promise<OperationRecord> {
    return this.#action(id, "stop", opts.requestId, (e) =>
      this.#stop(e, opts.force ?? false, opts.timeoutMs),
    );
  }

  async reboot(
    id: string,
    opts: { force?: boolean; timeoutMs?: number; requestId?: string } = {},
  ): Promise<OperationRecord> {
    return this.#action(id, "reboot", opts.requestId, async (e) => {
      if (opts.force) {
        await e.vmm?.reset();
        await this.#set(e, { guestReadyTimeMs: undefined, state: "running", stateMessage: "reset" });
        return;
      }
      // A graceful reboot is a graceful stop and a fresh start: the guest shuts down cleanly and the new
      // VMM starts from the spec as it is now.
      await this.#stop(e, false, opts.timeoutMs);
      await this.#launch(e, await this.#driver(e.record.spec.vmm), false);
    });
  }

  async pause(id: string): Promise<VmRecord> {
    const e = this.#entry(id);
    return this.#locked(e, async () => {
      if (checkTransition(id, e.record.state, "pause") === "act") {
        await e.vmm?.pause();
        await this.#set(e, { state: "paused" });
      }
      return e.record;
    });
  }

  async resume(id: string): Promise<VmRecord> {
    const e = this.#entry(id);
    return this.#locked(e, async () => {
      // A migrated source that was not confirmed: ResumeVm is the rollback (docs/adr/0015).
      const m = e.record.migration;
      if (e.record.state === "migrating" && m?.role === "source" && m.completed)
        return this.migrations.rollBackSource(id);
      if (checkTransition(id, e.record.state, "resume") === "act") {
        await e.vmm?.resume();
        await this.#set(e, { state: "running" });
      }
      return e.record;
    });
  }

  async delete(
    id: string,
    opts: { force?: boolean; allowMissing?: boolean; requestId?: string } = {},
  ): Promise<OperationRecord> {
    const replay = this.d.operations.byRequestId(opts.requestId);
    if (replay) return replay;
    const e = this.#vms.get(id);
    if (!e) {
      if (opts.allowMissing)
        return this.d.operations.done("vm.delete", `vms/${id}`, undefined, opts.requestId);
      throw notFound("vm", `vms/${id}`);
    }
    // Deleting a migrated source confirms the migration; deleting a prepared destination aborts it.
    const m = e.record.migration;
    const migrated = e.record.state === "migrating" && !(m?.role === "source" && !m.completed);
    if (
      !opts.force &&
      !migrated &&
      (e.vmm || ["running", "paused", "starting", "stopping", "migrating"].includes(e.record.state))
    ) {
      throw failedPrecondition(
        `vms/${id} is ${e.record.state}: stop it first, or delete with force`,
        "VM_RUNNING",
        {
          vm: `vms/${id}`,
        },
      );
    }
    return this.d.operations.start(
      "vm.delete",
      `vms/${id}`,
      () =>
        this.#locked(e, async () => {
          await this.#set(e, { state: "deleting" });
          e.stopping = true;
          await e.vmm?.kill();
          this.#release(e);
          for (const d of e.record.devices) await this.#unplug(id, d.device);
          this.#vms.delete(id);
          await this.d.store.remove(id);
          this.#emit("deleted", e.record);
          await this.migrations.dropReceived(e.record);
          return undefined;
        }),
      opts.requestId ? { requestId: opts.requestId } : {},
    );
  }

  /** Saves the VM's memory and device state (the guest paused meanwhile) as `vms/{id}/snapshots/{sid}`. */
  async snapshot(
    id: string,
    sid: string,
    opts: { includeMemory: boolean; labels: Record<string, string>; requestId?: string },
  ): Promise<OperationRecord> {
    const replay = this.d.operations.byRequestId(opts.requestId);
    if (replay) return replay;
    const e = this.#entry(id);
    checkVmId(sid, "snapshot_id");
    if (!opts.includeMemory) {
      throw unimplemented(
        "SnapshotVmRequest.include_memory=false",
        "disk-only snapshots arrive with volumes (issue #4)",
      );
    }
    const dir = this.d.store.paths(id).dir;
    if ((await loadSnapshots(dir)).some((x) => x.id === sid))
      throw alreadyExists("snapshot", `vms/${id}/snapshots/${sid}`, "");
    return this.d.operations.start(
      "vm.snapshot",
      `vms/${id}`,
      () =>
        this.#locked(e, async () => {
          const vmm = e.vmm;
          if (!vmm || !["running", "paused"].includes(e.record.state)) {
            throw failedPrecondition(
              `vms/${id} is ${e.record.state}: only a running or paused VM has memory to save`,
              "VM_NOT_RUNNING",
              {
                vm: `vms/${id}`,
              },
            );
          }
          const wasRunning = e.record.state === "running";
          const sdir = snapshotDir(dir, sid);
          try {
            if (wasRunning) await vmm.pause();
            const sock = join(sdir, "save.sock");
            const bytes = await receiveInto(sock, join(sdir, "state.bin"), () => vmm.saveState(sock));
            const r: SnapshotRecord = {
              vmId: id,
              id: sid,
              spec: e.record.spec,
              vmState: wasRunning ? "running" : "paused",
              includesMemory: true,
              memoryStateBytes: bytes,
              guestReady: e.record.guestReadyTimeMs !== undefined,
              labels: opts.labels,
              createTimeMs: this.#now(),
            };
            await saveSnapshotRecord(dir, r);
            return r;
          } catch (err) {
            await removeSnapshot(dir, sid);
            throw err;
          } finally {
            if (wasRunning) {
              await vmm.resume();
              await this.#set(e, { state: "running" });
            }
          }
        }),
      opts.requestId ? { requestId: opts.requestId } : {},
    );
  }

  async listSnapshots(id: string): Promise<SnapshotRecord[]> {
    this.#entry(id);
    return loadSnapshots(this.d.store.paths(id).dir);
  }

  async deleteSnapshot(id: string, sid: string): Promise<void> {
    await this.#snapshotOf(id, sid);
    await removeSnapshot(this.d.store.paths(id).dir, sid);
  }

  async #snapshotOf(id: string, sid: string): Promise<SnapshotRecord> {
    const snap = (await this.listSnapshots(id)).find((x) => x.id === sid);
    if (!snap) throw notFound("snapshot", `vms/${id}/snapshots/${sid}`);
    return snap;
  }

  /** Puts a stopped VM (or, with force, any) back where its snapshot was. */
  async restore(
    id: string,
    sid: string,
    opts: { force?: boolean; requestId?: string } = {},
  ): Promise<OperationRecord> {
    const replay = this.d.operations.byRequestId(opts.requestId);
    if (replay) return replay;
    const e = this.#entry(id);
    const snap = await this.#snapshotOf(id, sid);
    if (!opts.force && !["stopped", "crashed"].includes(e.record.state)) {
      throw failedPrecondition(
        `vms/${id} is ${e.record.state}: stop it before restoring, or restore with force`,
        "VM_RUNNING",
        {
          vm: `vms/${id}`,
        },
      );
    }
    return this.d.operations.start(
      "vm.restore",
      `vms/${id}`,
      () =>
        this.#locked(e, async () => {
          if (e.vmm) await this.#stop(e, true, undefined);
          await this.#set(e, { spec: snap.spec });
          await this.#launch(e, await this.#driver(snap.spec.vmm), snap.vmState === "paused", snap);
          return e.record;
        }),
      opts.requestId ? { requestId: opts.requestId } : {},
    );
  }

  /**
   * A new VM from a snapshot of `id` (it goes on from the snapshot, as an independent VM), or from a
   * stopped `id` (it boots afresh from the same spec).
   */
  async clone(
    id: string,
    newId: string,
    opts: { snapshot?: string; labels: Record<string, string>; start: boolean; requestId?: string },
  ): Promise<OperationRecord> {
    const replay = this.d.operations.byRequestId(opts.requestId);
    if (replay) return replay;
    const src = this.#entry(id);
    checkVmId(newId);
    if (this.#vms.has(newId)) throw alreadyExists("vm", `vms/${newId}`, "");
    const snap = opts.snapshot ? await this.#snapshotOf(id, opts.snapshot) : undefined;
    if (!snap && !["stopped", "crashed"].includes(src.record.state)) {
      throw failedPrecondition(
        `vms/${id} is ${src.record.state}: clone a running VM from one of its snapshots`,
        "VM_RUNNING",
        {
          vm: `vms/${id}`,
        },
      );
    }
    const spec = snap?.spec ?? src.record.spec;
    const driver = await this.#driver(spec.vmm);
    const policy = {
      labels: opts.labels,
      restartPolicy: src.record.restartPolicy,
      ...(opts.requestId ? { requestId: opts.requestId } : {}),
    };
    const fits = await this.d.capacity?.();
    fits?.(newId, spec);
    return this.#newVm("vm.clone", newId, spec, policy, async (entry) => {
      if (snap) await this.#launch(entry, driver, !opts.start || snap.vmState === "paused", snap);
      else if (opts.start) await this.#launch(entry, driver, false);
      else await this.#set(entry, { state: "stopped" });
    });
  }

  /**
   * Changes vCPUs and memory. A running VM grows by hotplug (up to max_vcpus and max_memory_bytes); a
   * stopped one takes the new values at its next start.
   */
  async resize(
    id: string,
    opts: { vcpus?: number; memoryBytes?: bigint; requestId?: string },
  ): Promise<OperationRecord> {
    const replay = this.d.operations.byRequestId(opts.requestId);
    if (replay) return replay;
    const e = this.#entry(id);
    const spec = e.record.spec;
    const vcpus = opts.vcpus ?? spec.vcpus;
    const memoryBytes = opts.memoryBytes ?? spec.memoryBytes;
    const next = {
      ...spec,
      vcpus,
      memoryBytes,
      maxVcpus: Math.max(spec.maxVcpus, vcpus),
      // biome-ignore lint/complexity/useMathMinMax: bigints; Math.max takes numbers only
      maxMemoryBytes: spec.maxMemoryBytes > memoryBytes ? spec.maxMemoryBytes : memoryBytes,
    };
    validateSpec(next, await this.d.hostLimits());
    const live = e.vmm !== undefined;
    if (live) {
      if (vcpus < spec.vcpus || memoryBytes < spec.memoryBytes) {
        throw failedPrecondition(
          `vms/${id} runs: a running VM can grow, not shrink; stop it to shrink it`,
          "VM_SHRINK_LIVE",
          { vm: `vms/${id}` },
        );
      }
      if (vcpus > spec.maxVcpus) {
        throw invalidArgument(
          "vcpus",
          `vms/${id} runs with max_vcpus ${spec.maxVcpus}: it cannot grow to ${vcpus} vCPUs until restarted`,
        );
      }
      if (memoryBytes > spec.maxMemoryBytes) {
        throw invalidArgument(
          "memory_bytes",
          `vms/${id} runs with max_memory_bytes ${spec.maxMemoryBytes}: it cannot grow to ${memoryBytes} until restarted`,
        );
      }
      const block = 128n * 1024n * 1024n;
      if ((memoryBytes - spec.memoryBytes) % block !== 0n) {
        throw invalidArgument(
          "memory_bytes",
          "memory is added to a running VM in steps of 128 MiB (the guest's memory block)",
        );
      }
    }
    // What the VM grows to must fit beside the other VMs.
    const fits = await this.d.capacity?.();
    fits?.(id, next);
    return this.d.operations.start(
      "vm.resize",
      `vms/${id}`,
      () =>
        this.#locked(e, async () => {
          const vmm = e.vmm;
          if (vmm) {
            if (vcpus > e.record.spec.vcpus) await vmm.hotplugVcpus(vcpus);
            if (memoryBytes > e.record.spec.memoryBytes)
              await vmm.hotplugMemory(memoryBytes - e.record.spec.memoryBytes);
          }
          await this.#set(e, { spec: { ...e.record.spec, ...(vmm ? { vcpus, memoryBytes } : next) } });
          return e.record;
        }),
      opts.requestId ? { requestId: opts.requestId } : {},
    );
  }

  /** Changes labels and/or the restart policy; `etag` (when given) must be the current one. */
  async update(
    id: string,
    patch: { labels?: Record<string, string>; restartPolicy?: RestartPolicy },
    etag?: string,
  ): Promise<VmRecord> {
    const e = this.#entry(id);
    return this.#locked(e, async () => {
      if (etag && etag !== `"${e.record.generation}"`) {
        throw new VmenvError(
          "aborted",
          `vms/${id} changed since etag ${etag} (now "${e.record.generation}"); read it again`,
          {
            reason: "ETAG_MISMATCH",
            metadata: { vm: `vms/${id}` },
          },
        );
      }
      await this.#set(e, patch);
      return e.record;
    });
  }

  /** VMs that have `gpus/{gpu}` bound (a GPU cannot be released from under them). */
  gpuUsersOf(gpuName: string): string[] {
    return this.list()
      .filter((vm) => vm.devices.some((d) => d.bound && d.device.kind === "gpu" && d.device.gpu === gpuName))
      .map((vm) => `vms/${vm.id}`);
  }

  /** VMs whose devices use `volumes/{id}` (joined or bound): the "uses X" query of seed 002. */
  usersOf(volumeName: string): string[] {
    return this.list()
      .filter((vm) => vm.devices.some((d) => d.device.kind === "disk" && d.device.volume === volumeName))
      .map((vm) => `vms/${vm.id}`);
  }

  /**
   * VMs whose VMM has `volumes/{id}` open now: the disk bound and the VMM starting, running, paused or
   * stopping. What keeps a volume's storage daemon running.
   */
  activeUsersOf(volumeName: string): string[] {
    return this.list()
      .filter((vm) => ["starting", "running", "paused", "stopping", "migrating"].includes(vm.state))
      .filter((vm) =>
        vm.devices.some((d) => d.bound && d.device.kind === "disk" && d.device.volume === volumeName),
      )
      .map((vm) => `vms/${vm.id}`);
  }

  /**
   * Grows a volume inside the QEMU VMMs that have its file open (QMP `block_resize` on the disk's format
   * node), so their guests see the new size. Answers the VMs reached.
   */
  async resizeVolumeLive(volumeName: string, sizeBytes: bigint): Promise<string[]> {
    const reached: string[] = [];
    for (const e of this.#vms.values()) {
      if (!e.vmm || e.record.spec.vmm !== "qemu") continue;
      for (const d of e.record.devices) {
        if (!d.bound || d.device.kind !== "disk" || d.device.volume !== volumeName) continue;
        await e.vmm.passthrough("block_resize", { "node-name": `d-${d.device.id}`, size: Number(sizeBytes) });
        reached.push(`vms/${e.record.id}`);
      }
    }
    return reached;
  }

  /**
   * Applies a device change set in order, each element on its own: APPLIED, NOOP (already so) or ERROR
   * with its reason; an element that fails leaves no half-attached device (and no port reserved for it).
   * With `validateOnly`, only plans (and resolves volumes).
   */
  async commitDevices(
    id: string,
    changes: Change[],
    opts: { validateOnly?: boolean; etag?: string } = {},
  ): Promise<{ results: ChangeResult[]; vm: VmRecord }> {
    const e = this.#entry(id);
    return this.#locked(e, async () => {
      if (opts.etag && opts.etag !== `"${e.record.generation}"`) {
        throw new VmenvError("aborted", `vms/${id} changed since etag ${opts.etag}; read it again`, {
          reason: "ETAG_MISMATCH",
          metadata: { vm: `vms/${id}` },
        });
      }
      const results: ChangeResult[] = [];
      for (const c of changes) {
        const r: ChangeResult = {
          deviceId: c.deviceId,
          action: c.action,
          outcome: "applied",
          error: undefined,
        };
        results.push(r);
        const step = plan(`vms/${id}`, e.record.devices, c);
        if (step.kind === "error" || step.kind === "noop") {
          r.outcome = step.kind;
          if (step.kind === "error") r.error = step.error;
          continue;
        }
        try {
          if ((step.kind === "join" || (step.kind === "bind" && step.join)) && step.device.kind === "disk") {
            await this.#volume(step.device);
          }
          if ((step.kind === "join" || step.kind === "bind") && step.device.kind === "gpu") {
            await this.#gpu(e.record.spec.vmm, id, step.device);
          }
          if (opts.validateOnly) continue;
          await this.#applyStep(e, step);
        } catch (err) {
          r.outcome = "error";
          r.error = err as Error;
        }
      }
      return { results, vm: e.record };
    });
  }

  async #volume(d: DiskDevice): Promise<VolumeFile> {
    if (!this.d.volumes) throw unimplemented("disks", "volumes arrive with the block service (issue #4)");
    return this.d.volumes.resolve(d.volume);
  }

  /** Checks that a GPU can pass through to `vm` now (assigned to it, on vfio-pci). */
  async #gpu(vmm: VmmKind, vm: string, d: GpuDevice): Promise<{ address: string; functions: string[] }> {
    if (!this.d.gpus) throw unimplemented("gpus", "GPU passthrough needs the GPU service");
    if (vmm !== "qemu") {
      throw unimplemented(`vms/${vm}/devices/${d.id}`, `GPU passthrough is built for QEMU only, not ${vmm}`);
    }
    return this.d.gpus.passthrough(d.gpu.replace(/^gpus\//, ""), `vms/${vm}`);
  }

  /** The volume as this VM's VMM attaches it now (its storage daemon made ready, when it has one). */
  async #open(vm: string, d: DiskDevice): Promise<VolumeFile> {
    if (!this.d.volumes?.open) return this.#volume(d);
    return this.d.volumes.open(d.volume, { vm: `vms/${vm}`, readOnly: d.readOnly });
  }

  /** Reserves the NIC's port on its network (creating its tap), or returns the one it has. */
  async #plug(vm: string, d: NicDevice, have: NicPlug | undefined): Promise<NicPlug> {
    if (have) return have;
    if (!this.d.nics) throw unimplemented("nics", "networks arrive with the network service (issue #4)");
    const a = await this.d.nics.allocate(d.network, `vms/${vm}`, d.id, {
      ...(d.mac ? { mac: d.mac } : {}),
      ...(d.ip ? { ip: d.ip } : {}),
    });
    return { port: a.port, tap: a.tap, mac: a.mac, ip: a.ip, prefix: a.prefix, gateway: a.gateway };
  }

  async #unplug(vm: string, d: Device): Promise<void> {
    if (d.kind === "nic") await this.d.nics?.release(d.network, `vms/${vm}`, d.id);
  }

  async #applyStep(e: Entry, step: Exclude<Step, { kind: "noop" } | { kind: "error" }>): Promise<void> {
    const vm = e.record.id;
    const cur = () => e.record.devices.find((x) => x.device.id === step.device.id);
    const without = () => e.record.devices.filter((x) => x.device.id !== step.device.id);
    const running = e.vmm !== undefined;
    switch (step.kind) {
      case "join": {
        const plug = step.device.kind === "nic" ? await this.#plug(vm, step.device, undefined) : undefined;
        await this.#set(e, {
          devices: [
            ...without(),
            { device: step.device, bound: false, slot: undefined, ...(plug ? { plug } : {}) },
          ],
        });
        return;
      }
      case "bind": {
        const had = cur();
        const plug = step.device.kind === "nic" ? await this.#plug(vm, step.device, had?.plug) : undefined;
        let slot: number | undefined;
        try {
          if (running) {
            slot = freeSlot(e.record.devices, HOTPLUG_SLOTS);
            if (slot === undefined) {
              throw failedPrecondition(
                `vms/${vm} has no free hotplug slot left (${HOTPLUG_SLOTS} in all)`,
                "NO_HOTPLUG_SLOT",
                {
                  vm: `vms/${vm}`,
                },
              );
            }
            if (step.device.kind === "disk")
              await e.vmm?.attachDisk(attachedDisk(step.device, await this.#open(vm, step.device), slot));
            else if (step.device.kind === "gpu") {
              const g = await this.#gpu(e.record.spec.vmm, vm, step.device);
              if (!e.vmm?.attachGpu)
                throw unimplemented("gpu hotplug", `the ${e.record.spec.vmm} VMM cannot hot-plug GPUs`);
              await e.vmm.attachGpu({ id: step.device.id, host: g.address, functions: g.functions, slot });
            } else if (plug)
              await e.vmm?.attachNic({ id: step.device.id, tap: plug.tap, mac: plug.mac, slot });
          }
        } catch (err) {
          // A port reserved by this very element is given back.
          if (!had) await this.#unplug(vm, step.device).catch(() => undefined);
          throw err;
        }
        await this.#set(e, {
          devices: [...without(), { device: step.device, bound: true, slot, ...(plug ? { plug } : {}) }],
        });
        return;
      }
      case "unbind":
      case "leave": {
        const had = cur();
        if (running && had?.bound) {
          if (step.device.kind === "disk") await e.vmm?.detachDisk(step.device.id, 30_000);
          else if (step.device.kind === "gpu") await e.vmm?.detachGpu?.(step.device.id, 30_000);
          else await e.vmm?.detachNic(step.device.id, 30_000);
        }
        if (step.kind === "leave") {
          await this.#unplug(vm, step.device);
          await this.#set(e, { devices: without() });
        } else {
          await this.#set(e, {
            devices: [
              ...without(),
              {
                device: step.device,
                bound: false,
                slot: undefined,
                ...(had?.plug ? { plug: had.plug } : {}),
              },
            ],
          });
        }
        return;
      }
    }
  }

  /** The bound devices of a VM, resolved and plugged, each with its root port (assigned now if it had none). */
  async #boundDevices(e: Entry): Promise<{
    disks: AttachedDisk[];
    nics: AttachedNic[];
    gpus: AttachedGpu[];
    firstNic: NicPlug | undefined;
  }> {
    const disks: AttachedDisk[] = [];
    const nics: AttachedNic[] = [];
    const gpus: AttachedGpu[] = [];
    let firstNic: NicPlug | undefined;
    const devices = e.record.devices.map((d) => ({ ...d }));
    for (const d of devices) {
      if (!d.bound) continue;
      d.slot ??= freeSlot(devices, HOTPLUG_SLOTS);
      if (d.slot === undefined)
        throw failedPrecondition(`vms/${e.record.id} has more devices than hotplug slots`, "NO_HOTPLUG_SLOT");
      if (d.device.kind === "disk") {
        disks.push(attachedDisk(d.device, await this.#open(e.record.id, d.device), d.slot));
      } else if (d.device.kind === "gpu") {
        const g = await this.#gpu(e.record.spec.vmm, e.record.id, d.device);
        gpus.push({ id: d.device.id, host: g.address, functions: g.functions, slot: d.slot });
      } else {
        d.plug = await this.#plug(e.record.id, d.device, d.plug);
        firstNic ??= d.plug;
        nics.push({ id: d.device.id, tap: d.plug.tap, mac: d.plug.mac, slot: d.slot });
      }
    }
    if (devices.length > 0) await this.#set(e, { devices });
    return { disks, nics, gpus, firstNic };
  }

  // ---- start-up and shut-down ------------------------------------------------------------------

  /**
   * Finds every VM again from its folder: a live VMM is re-adopted, a dead one makes its VM crashed (and
   * restarted when its policy says so), a create cut short is cleaned.
   */
  async init(): Promise<void> {
    for (const { id, record } of await this.d.store.loadAll()) {
      const paths = this.d.store.paths(id);
      const pid = record?.pid ?? (await readPid(paths.pidFile));
      const driver = this.d.drivers[record?.spec.vmm ?? "qemu"];
      const vmm =
        pid !== undefined && driver ? await driver.adopt(paths, pid).catch(() => undefined) : undefined;
      if (!record || record.state === "deleting") {
        await vmm?.kill();
        await this.d.store.remove(id);
        this.d.logger.info(
          { vm: `vms/${id}` },
          record ? "finished an interrupted delete" : "removed a half-created VM",
        );
        continue;
      }
      const entry: Entry = {
        record,
        vmm: undefined,
        console: undefined,
        lock: Promise.resolve(),
        stopping: false,
      };
      this.#vms.set(id, entry);
      if (vmm) {
        this.#attach(entry, vmm);
        const status = await vmm.status();
        await this.#set(entry, {
          // A VM in a live migration stays so: the coordinator confirms or rolls it back.
          state: record.state === "migrating" ? "migrating" : status,
          pid: vmm.pid,
          stateMessage: "re-adopted after agent restart",
        });
        this.d.logger.info({ vm: `vms/${id}`, pid: vmm.pid }, "re-adopted VM");
        await this.migrations
          .settleAfterRestart(id)
          .catch((err: unknown) =>
            this.d.logger.error({ err, vm: `vms/${id}` }, "settling a migration failed"),
          );
      } else if (record.state === "creating") {
        await this.d.store.remove(id);
        this.#vms.delete(id);
        this.d.logger.info({ vm: `vms/${id}` }, "removed a VM whose create was cut short");
      } else if (["running", "paused", "starting", "stopping", "migrating"].includes(record.state)) {
        const crashed = record.state !== "stopping";
        await this.#set(entry, {
          state: crashed ? "crashed" : "stopped",
          pid: undefined,
          stateMessage: crashed ? "its VMM was gone when the agent started" : "",
        });
        // A VM caught in a migration is not restarted: the other side may hold it.
        if (crashed && record.state !== "migrating") this.#maybeRestart(entry, "unknown");
      }
    }
  }

  /** Lets go of every VMM (they keep running) and console; the agent is stopping. */
  detachAll(): void {
    for (const e of this.#vms.values()) {
      e.vmm?.detach();
      e.console?.close();
    }
  }

  // ---- internals ---------------------------------------------------------------------------

  #entry(id: string): Entry {
    const e = this.#vms.get(id);
    if (!e) throw notFound("vm", `vms/${id}`);
    return e;
  }

  async #driver(kind: VmmKind): Promise<VmmDriver> {
    const driver = this.d.drivers[kind];
    const a = driver
      ? await driver.availability()
      : { available: false as const, reason: "no driver is built in" };
    if (!driver || !a.available) {
      throw new VmenvError(
        "failed-precondition",
        `the ${kind} VMM is not available on this host: ${"reason" in a ? a.reason : ""}`,
        {
          reason: "VMM_UNAVAILABLE",
          metadata: { vmm: kind },
        },
      );
    }
    return driver;
  }

  async #checkFiles(spec: VmSpec): Promise<void> {
    if (spec.boot.kind !== "kernel") return;
    const files: [string, string | undefined][] = [
      ["vm.spec.boot.direct_kernel.kernel_path", spec.boot.kernelPath],
      ["vm.spec.boot.direct_kernel.initrd_path", spec.boot.initrdPath],
    ];
    for (const [field, path] of files) {
      if (path === undefined) continue;
      await access(path, constants.R_OK).catch(() => {
        throw invalidArgument(field, `${path}: no such readable file on this host`, "FILE_NOT_FOUND");
      });
    }
  }

  #locked<T>(e: Entry, fn: () => Promise<T>): Promise<T> {
    const run = e.lock.then(fn, fn);
    e.lock = run.catch(() => undefined);
    return run;
  }

  async #action(
    id: string,
    action: "start" | "stop" | "reboot",
    requestId: string | undefined,
    act: (e: Entry) => Promise<void>,
  ): Promise<OperationRecord> {
    const replay = this.d.operations.byRequestId(requestId);
    if (replay) return replay;
    const e = this.#entry(id);
    // Checked now, so that a wrong state is an error of the call, not of its operation.
    if (checkTransition(id, e.record.state, action) === "noop") {
      return this.d.operations.done(`vm.${action}`, `vms/${id}`, e.record, requestId);
    }
    return this.d.operations.start(
      `vm.${action}`,
      `vms/${id}`,
      () =>
        this.#locked(e, async () => {
          if (checkTransition(id, e.record.state, action) === "act") await act(e);
          return e.record;
        }),
      requestId ? { requestId } : {},
    );
  }

  async #launch(
    e: Entry,
    driver: VmmDriver,
    paused: boolean,
    from?: SnapshotRecord,
    signal?: AbortSignal,
    /** Wait for a live migration (`-incoming defer`); the VM is then MIGRATING. */
    migrateIn = false,
  ): Promise<void> {
    const accelerator = e.record.spec.accelerator ?? (await this.d.effectiveAccelerator());
    await this.#set(e, { state: "starting", stateMessage: "", guestReadyTimeMs: undefined });
    try {
      const paths = this.d.store.paths(e.record.id);
      const incoming = migrateIn ? "defer" : from ? join(paths.dir, "incoming.sock") : undefined;
      const logOffset = await stat(paths.serialLog).then(
        (st) => st.size,
        () => 0,
      );
      const { disks, nics, gpus, firstNic } = await this.#boundDevices(e);
      const vmm = await driver.launch(
        {
          id: e.record.id,
          spec: withNetworkCmdline(e.record.spec, firstNic),
          accelerator,
          paths,
          paused,
          disks,
          nics,
          ...(gpus.length > 0 ? { gpus } : {}),
          ...(incoming ? { incoming } : {}),
        },
        signal,
      );
      this.#attach(e, vmm, logOffset);
      if (from && incoming) {
        // Stream the saved state in; the guest goes on where it was when the snapshot was taken.
        try {
          await sendFrom(
            join(snapshotDir(this.d.store.paths(from.vmId).dir, from.id), "state.bin"),
            incoming,
          );
          await vmm.incomingDone();
        } catch (err) {
          e.stopping = true;
          await vmm.kill();
          throw err;
        }
        if (!paused) await vmm.resume();
      }
      await this.#set(e, {
        state: migrateIn ? "migrating" : paused ? "paused" : "running",
        pid: vmm.pid,
        accelerator,
        startTimeMs: this.#now(),
        ...(from?.guestReady
          ? { guestReadyTimeMs: this.#now(), stateMessage: `restored from snapshot ${from.id}` }
          : {}),
      });
    } catch (err) {
      await this.#set(e, { state: "stopped", pid: undefined, stateMessage: (err as Error).message });
      throw err;
    }
  }

  /** Watches a VMM: its exit (stop, guest poweroff or crash) and its console. */
  #attach(e: Entry, vmm: RunningVmm, logOffset?: number): void {
    e.vmm = vmm;
    e.stopping = false;
    e.console?.close();
    const paths = this.d.store.paths(e.record.id);
    e.console = new ConsoleTap(
      paths.serialSocket,
      this.d.guestReadyPattern,
      logOffset === undefined ? undefined : { path: paths.serialLog, offset: logOffset },
    );
    e.console.on("ready", () => {
      if (e.record.guestReadyTimeMs === undefined)
        void this.#set(e, { guestReadyTimeMs: this.#now(), stateMessage: "guest ready" });
    });
    vmm.on("reset", () => {
      void this.#set(e, { guestReadyTimeMs: undefined, stateMessage: "guest reset" });
    });
    vmm.on("stop", () => {
      if (e.record.state === "running") void this.#set(e, { state: "paused" });
    });
    vmm.on("resume", () => {
      if (e.record.state === "paused") void this.#set(e, { state: "running" });
    });
    vmm.once("exit", (cause) => {
      if (e.vmm !== vmm) return;
      this.#release(e);
      if (e.stopping || this.#vms.get(e.record.id) !== e) return;
      const crashed = cause !== "guest-shutdown";
      // A VM caught in a migration is not restarted: the other side may hold it.
      const migrating = e.record.state === "migrating";
      void this.#set(e, {
        state: crashed ? "crashed" : "stopped",
        pid: undefined,
        // A prepared destination keeps its mark: DeleteVm then removes the volumes it received.
        migration: e.record.migration?.role === "destination" ? e.record.migration : undefined,
        stateMessage: crashed ? "the VMM process ended without being asked to" : "the guest powered off",
      }).then(() => {
        if (!migrating) this.#maybeRestart(e, cause);
      });
    });
  }

  #release(e: Entry): void {
    e.vmm = undefined;
    e.console?.close();
    e.console = undefined;
  }

  #maybeRestart(e: Entry, cause: ExitCause): void {
    const p = e.record.restartPolicy;
    const restart = p === "always" || (p === "on-crash" && cause !== "guest-shutdown");
    if (!restart) return;
    void this.#locked(e, async () => {
      if (e.vmm || !["crashed", "stopped"].includes(e.record.state) || !this.#vms.has(e.record.id)) return;
      await this.#set(e, { restartCount: e.record.restartCount + 1 });
      this.d.logger.warn(
        { vm: `vms/${e.record.id}`, restartCount: e.record.restartCount, policy: p },
        "restarting VM",
      );
      await this.#launch(e, await this.#driver(e.record.spec.vmm), false);
    }).catch((err: unknown) => this.d.logger.error({ err, vm: `vms/${e.record.id}` }, "restart failed"));
  }

  async #stop(e: Entry, force: boolean, timeoutMs: number | undefined): Promise<void> {
    const vmm = e.vmm;
    e.stopping = true;
    await this.#set(e, { state: "stopping" });
    if (vmm) {
      let gone = false;
      if (!force) {
        await vmm.powerdown().catch(() => undefined);
        const limit = timeoutMs ?? this.d.stopTimeoutMs ?? 60_000;
        gone = await Promise.race([vmm.exited().then(() => true), sleep(limit).then(() => false)]);
      }
      if (!gone) await vmm.kill();
    }
    this.#release(e);
    await this.#set(e, { state: "stopped", pid: undefined, stateMessage: force ? "powered off" : "stopped" });
  }

  async #set(e: Entry, patch: Partial<VmRecord>): Promise<void> {
    const next: VmRecord = {
      ...e.record,
      ...patch,
      updateTimeMs: this.#now(),
      generation: e.record.generation + 1,
    };
    e.record = next;
    if (this.#vms.get(next.id) === e) await this.d.store.save(next);
    this.#emit("updated", next);
  }

  #emit(type: VmChange["type"], vm: VmRecord): void {
    const c: VmChange = { type, vm, seq: ++this.#seq, timeMs: this.#now() };
    this.history.push(c);
    if (this.history.length > 1000) this.history.splice(0, this.history.length - 1000);
    this.emit("change", c);
  }
}

async function readPid(path: string): Promise<number | undefined> {
  const n = Number((await readFile(path, "utf8").catch(() => "")).trim());
  return Number.isInteger(n) && n > 0 ? n : undefined;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms).unref());

export type { VmState };

/**
 * With direct kernel boot, the first NIC's address goes on the kernel command line (`vmenv.ip=`,
 * `vmenv.gw=`: the test guest's convention; a guest with DHCP may ignore them).
 */
function withNetworkCmdline(spec: VmSpec, nic: NicPlug | undefined): VmSpec {
  if (!nic || spec.boot.kind !== "kernel") return spec;
  const extra = `vmenv.ip=${nic.ip}/${nic.prefix}${nic.gateway ? ` vmenv.gw=${nic.gateway}` : ""}`;
  return { ...spec, boot: { ...spec.boot, cmdline: `${spec.boot.cmdline} ${extra}`.trim() } };
}

function attachedDisk(d: DiskDevice, f: VolumeFile, slot: number): AttachedDisk {
  return {
    id: d.id,
    path: f.path,
    format: f.format,
    readOnly: d.readOnly,
    serial: d.serial,
    slot,
    ...(f.export ? { export: f.export } : {}),
  };
}
