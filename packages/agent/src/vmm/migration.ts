/**
 * Live migration between agents (docs/adr/0015): PrepareVmMigration on the destination, MigrateVm on
 * the source, FinishVmMigration on the destination; DeleteVm confirms (source) or aborts (destination),
 * ResumeVm rolls a migrated source back. The VMM's side is behind `RunningVmm.migration()`.
 */
import { failedPrecondition, invalidArgument, unimplemented, VmenvError } from "@vmenv/rpc/errors";
import type { Logger } from "pino";
import type { VolumeFile } from "../block/ports.js";
import type { OperationHandle, OperationRecord, Operations } from "../diagnostics/operations.js";
import type { DeviceState } from "./devices.js";
import {
  checkVmId,
  type MigrationMark,
  type RestartPolicy,
  sameSpec,
  type VmRecord,
  type VmSpec,
} from "./domain.js";
import type { RunningVmm } from "./driver.js";
import {
  checkMigrationUri,
  type MigrationProgress,
  type MigrationSettings,
  type MigrationTarget,
  migrationPercent,
  parseStorageUri,
} from "./migration-domain.js";

/** A volume as the source has it (PrepareVmMigrationRequest.volumes). */
export interface SourceVolume {
  name: string;
  store: string;
  format: "raw" | "qcow2";
  sizeBytes: bigint;
  backend: "file" | "vhost-user-blk" | "nbd";
  labels: Record<string, string>;
}

/** What migration needs of the rest of the agent (wired in wire.ts). */
export interface MigrationDeps {
  /** The host the incoming VMM listens on when the request names none (the agent's TCP listen host). */
  listenHost: string;
  /** Whether `networks/{n}` exists on this agent. */
  networkExists(network: string): Promise<boolean>;
  /** The volume, or undefined when this agent has none of that name. */
  findVolume(name: string): Promise<VolumeFile | undefined>;
  /** Creates an empty volume like the source's (waits until it is ready). */
  createVolume(v: SourceVolume): Promise<void>;
  /** Deletes a volume (a no-op when it is gone). */
  deleteVolume(name: string): Promise<void>;
}

/** What migration needs of the VM manager: its records, lock, launch and bookkeeping. */
export interface MigrationPort {
  operations: Operations;
  logger: Logger;
  has(id: string): boolean;
  record(id: string): VmRecord;
  vmm(id: string): RunningVmm | undefined;
  /** Checks a new VM's spec and files against this host, and that it fits beside the others. */
  admit(id: string, spec: VmSpec): Promise<void>;
  /** Records a new VM and builds it as an operation; the VM is removed again when `build` fails. */
  newVm(
    kind: string,
    id: string,
    spec: VmSpec,
    opts: {
      labels: Record<string, string>;
      restartPolicy: RestartPolicy;
      requestId?: string;
      devices: DeviceState[];
    },
    build: (op: OperationHandle) => Promise<unknown>,
  ): Promise<OperationRecord>;
  locked<T>(id: string, fn: () => Promise<T>): Promise<T>;
  set(id: string, patch: Partial<VmRecord>): Promise<void>;
  /** Starts the VMM waiting for an incoming migration (`-incoming defer`); the VM is then MIGRATING. */
  launchIncoming(id: string, signal: AbortSignal): Promise<void>;
}

/** The three steps of a live migration and the rollbacks, on one agent. */
export class VmMigrations {
  constructor(
    private readonly p: MigrationPort,
    private readonly d: MigrationDeps | undefined,
  ) {}

  #deps(): MigrationDeps {
    if (!this.d) throw unimplemented("live migration", "this agent was built without migration support");
    return this.d;
  }

  // ---- destination ------------------------------------------------------------------------------

  /**
   * PrepareVmMigration: defines the VM (MIGRATING) with the source's spec, devices on the same slots and
   * NICs with the same MACs and addresses, creates the missing volumes (with `receiveStorage`), starts a
   * VMM that waits for the stream and, with `receiveStorage`, exports the writable disks over NBD.
   */
  async prepare(req: {
    id: string;
    spec: VmSpec;
    devices: DeviceState[];
    labels: Record<string, string>;
    restartPolicy: RestartPolicy;
    guestReadyTimeMs: number | undefined;
    listenAddress: string;
    receiveStorage: boolean;
    volumes: SourceVolume[];
    requestId?: string;
  }): Promise<OperationRecord> {
    const replay = this.p.operations.byRequestId(req.requestId);
    if (replay) return replay;
    const d = this.#deps();
    checkVmId(req.id);
    if (req.spec.vmm !== "qemu")
      throw unimplemented("vm.spec.vmm", `live migration is built for QEMU only, not ${req.spec.vmm}`);
    const host = req.listenAddress || d.listenHost;
    if (!/^[A-Za-z0-9.:-]+$/.test(host))
      throw invalidArgument("listen_address", `"${host.slice(0, 80)}" is not a host address`);
    if (this.p.has(req.id)) {
      const r = this.p.record(req.id);
      const m = r.migration;
      if (
        r.state === "migrating" &&
        m?.role === "destination" &&
        sameSpec(r.spec, req.spec) &&
        m.migrationUri
      ) {
        const target: MigrationTarget = {
          vm: `vms/${req.id}`,
          migrationUri: m.migrationUri,
          storageUri: m.storageUri ?? "",
        };
        return this.p.operations.done("vm.prepare_migration", `vms/${req.id}`, target, req.requestId);
      }
      throw new VmenvError("already-exists", `vms/${req.id} already exists on this agent (${r.state})`, {
        reason: "VM_ALREADY_EXISTS",
        metadata: { vm: `vms/${req.id}` },
      });
    }
    for (const [i, dev] of req.devices.entries()) {
      const x = dev.device;
      if (x.kind === "gpu") {
        throw failedPrecondition(
          `vms/${req.id} passes GPU ${x.gpu} through: a VM with a GPU cannot live-migrate`,
          "MIGRATION_UNSUPPORTED",
          { vm: `vms/${req.id}`, device: x.id },
        );
      }
      if (x.kind === "nic" && !(await d.networkExists(x.network))) {
        throw failedPrecondition(
          `${x.network} does not exist on this agent: create it before migrating vms/${req.id} here (NIC ${x.id})`,
          "NETWORK_NOT_FOUND",
          { network: x.network, device: x.id, field: `vm.spec.nics[${i}]` },
        );
      }
    }
    // Volumes: those that exist must match the source's; missing ones are created (receive_storage).
    const toCreate: SourceVolume[] = [];
    for (const dev of req.devices) {
      const x = dev.device;
      if (x.kind !== "disk") continue;
      const src = req.volumes.find((v) => v.name === x.volume);
      const have = await d.findVolume(x.volume);
      if (have) {
        if (src && (have.format !== src.format || have.sizeBytes !== src.sizeBytes)) {
          throw failedPrecondition(
            `${x.volume} exists here as ${have.format} of ${have.sizeBytes} bytes, the source's is ${src.format} of ${src.sizeBytes}`,
            "VOLUME_MISMATCH",
            { volume: x.volume, device: x.id },
          );
        }
        if (req.receiveStorage && !x.readOnly && have.export?.kind === "vhost-user-blk") {
          throw failedPrecondition(
            `${x.volume} is served over vhost-user-blk here: its contents cannot be received; use a FILE or NBD volume`,
            "DISK_NOT_COPYABLE",
            { volume: x.volume, device: x.id },
          );
        }
        continue;
      }
      if (!req.receiveStorage || x.readOnly || !src) {
        throw failedPrecondition(
          `${x.volume} does not exist on this agent${
            x.readOnly
              ? " (read-only disks are not copied: put the volume here first)"
              : req.receiveStorage
                ? " and the request does not describe it in `volumes`"
                : " (set receive_storage, with the source's volumes, to copy it)"
          }`,
          "VOLUME_NOT_FOUND",
          { volume: x.volume, device: x.id },
        );
      }
      toCreate.push(src);
    }
    await this.p.admit(req.id, req.spec);
    const exported = req.receiveStorage
      ? req.devices.flatMap((x) => (x.device.kind === "disk" && !x.device.readOnly ? [x.device.id] : []))
      : [];
    return this.p.newVm(
      "vm.prepare_migration",
      req.id,
      req.spec,
      {
        labels: req.labels,
        restartPolicy: req.restartPolicy,
        devices: req.devices,
        ...(req.requestId ? { requestId: req.requestId } : {}),
      },
      async (op) => {
        const created: string[] = [];
        try {
          for (const v of toCreate) {
            op.progress(10, `creating ${v.name}`);
            await d.createVolume(v);
            created.push(v.name);
          }
          const mark: MigrationMark = {
            role: "destination",
            completed: false,
            wasRunning: false,
            createdVolumes: created,
            ...(req.guestReadyTimeMs !== undefined ? { guestReadyTimeMs: req.guestReadyTimeMs } : {}),
          };
          await this.p.set(req.id, { migration: mark });
          op.progress(40, "starting the incoming VMM");
          await this.p.launchIncoming(req.id, op.signal);
          const vmm = this.p.vmm(req.id);
          const mig = vmm?.migration?.();
          if (!mig) throw unimplemented("live migration", "this VMM cannot receive a migration");
          op.progress(70, "listening for the migration stream");
          const migrationUri = await mig.listen(host);
          const storageUri = exported.length > 0 ? await mig.exportDisks(host, exported) : "";
          await this.p.set(req.id, {
            migration: { ...mark, migrationUri, storageUri },
            stateMessage: `waiting for the migration stream on ${migrationUri}`,
          });
          const target: MigrationTarget = { vm: `vms/${req.id}`, migrationUri, storageUri };
          return target;
        } catch (err) {
          for (const v of created) await d.deleteVolume(v).catch(() => undefined);
          throw err;
        }
      },
    );
  }

  /** FinishVmMigration: once the stream is complete, stop the NBD export and start the vCPUs. */
  async finish(id: string, opts: { paused: boolean; requestId?: string }): Promise<OperationRecord> {
    const replay = this.p.operations.byRequestId(opts.requestId);
    if (replay) return replay;
    const r = this.p.record(id);
    if (r.migration?.role !== "destination" || r.state !== "migrating") {
      if (!r.migration && ["running", "paused"].includes(r.state))
        return this.p.operations.done("vm.finish_migration", `vms/${id}`, r, opts.requestId);
      throw failedPrecondition(
        `vms/${id} is not waiting for an incoming migration (it is ${r.state})`,
        "VM_NOT_MIGRATING",
        { vm: `vms/${id}` },
      );
    }
    return this.p.operations.start(
      "vm.finish_migration",
      `vms/${id}`,
      (op) =>
        this.p.locked(id, async () => {
          const vmm = this.p.vmm(id);
          const mig = vmm?.migration?.();
          if (!vmm || !mig)
            throw failedPrecondition(`the VMM of vms/${id} is gone`, "VM_NOT_RUNNING", { vm: `vms/${id}` });
          op.progress(10, "waiting for the migration stream to complete");
          // MigrateVm succeeded: the stream is complete or about to be. A stream that never came fails.
          const end = Date.now() + 30_000;
          for (;;) {
            op.signal.throwIfAborted();
            const s = await mig.incoming();
            if (s.status === "completed") break;
            if (s.status === "failed" || Date.now() > end) {
              throw failedPrecondition(
                s.status === "failed"
                  ? `the incoming migration of vms/${id} failed: ${s.error}`
                  : `the incoming migration of vms/${id} has not completed (${s.status}); finish it after MigrateVm succeeded`,
                "MIGRATION_NOT_COMPLETE",
                { vm: `vms/${id}` },
              );
            }
            await mig.nextChange(100);
          }
          await mig.stopExport();
          const ready = this.p.record(id).migration?.guestReadyTimeMs;
          if (!opts.paused) await vmm.resume();
          await this.p.set(id, {
            state: opts.paused ? "paused" : "running",
            migration: undefined,
            stateMessage: "migrated in",
            ...(ready !== undefined ? { guestReadyTimeMs: ready } : {}),
          });
          return this.p.record(id);
        }),
      opts.requestId ? { requestId: opts.requestId } : {},
    );
  }

  /** Volumes a prepared destination created, to delete when the VM is deleted before it finished. */
  async dropReceived(r: VmRecord): Promise<void> {
    if (r.migration?.role !== "destination") return;
    for (const v of r.migration.createdVolumes ?? []) {
      await this.d
        ?.deleteVolume(v)
        .catch((err: unknown) =>
          this.p.logger.warn({ err, volume: v, vm: `vms/${r.id}` }, "could not delete a received volume"),
        );
    }
  }

  // ---- source -----------------------------------------------------------------------------------

  /** MigrateVm: sends the running VM (and its disks' contents, with `storageUri`) to a prepared destination. */
  async migrate(
    id: string,
    req: { migrationUri: string; storageUri: string; settings: MigrationSettings; requestId?: string },
  ): Promise<OperationRecord> {
    const replay = this.p.operations.byRequestId(req.requestId);
    if (replay) return replay;
    const r = this.p.record(id);
    const uri = checkMigrationUri(req.migrationUri);
    const storage = req.storageUri ? parseStorageUri(req.storageUri) : undefined;
    if (storage && req.settings.postCopy)
      throw invalidArgument(
        "settings.post_copy",
        "post-copy cannot be combined with copying storage (storage_uri)",
      );
    if (r.spec.vmm !== "qemu")
      throw unimplemented("MigrateVm", `live migration is built for QEMU only, not ${r.spec.vmm}`);
    if (!["running", "paused"].includes(r.state) || !this.p.vmm(id)) {
      throw new VmenvError("failed-precondition", `cannot migrate vms/${id}: it is ${r.state}`, {
        reason: "VM_STATE_CONFLICT",
        metadata: { vm: `vms/${id}`, state: r.state, action: "migrate" },
      });
    }
    const gpu = r.devices.find((x) => x.device.kind === "gpu");
    if (gpu)
      throw failedPrecondition(
        `vms/${id} passes a GPU through (${gpu.device.id}): a VM with a GPU cannot live-migrate`,
        "MIGRATION_UNSUPPORTED",
        { vm: `vms/${id}`, device: gpu.device.id },
      );
    const disks = storage
      ? r.devices.flatMap((x) =>
          x.bound && x.device.kind === "disk" && !x.device.readOnly ? [x.device.id] : [],
        )
      : [];
    return this.p.operations.start(
      "vm.migrate",
      `vms/${id}`,
      (op) =>
        this.p.locked(id, async () => {
          const cur = this.p.record(id);
          const vmm = this.p.vmm(id);
          const mig = vmm?.migration?.();
          if (!vmm || !mig || !["running", "paused"].includes(cur.state)) {
            throw new VmenvError("failed-precondition", `cannot migrate vms/${id}: it is ${cur.state}`, {
              reason: "VM_STATE_CONFLICT",
              metadata: { vm: `vms/${id}`, state: cur.state, action: "migrate" },
            });
          }
          const wasRunning = cur.state === "running";
          await this.p.set(id, {
            state: "migrating",
            stateMessage: `migrating to ${uri}`,
            migration: { role: "source", completed: false, wasRunning },
          });
          const report = (p: MigrationProgress) => {
            // From post-copy on, the guest runs on the destination: cancelling could not bring it back.
            if (p.phase === "post-copy") this.p.operations.get(op.id).mayCancel = false;
            op.metadata(p);
            op.progress(migrationPercent(p, storage !== undefined), p.phase);
          };
          report({
            phase: storage ? "storage" : "pre-copy",
            storageTransferredBytes: 0,
            storageTotalBytes: 0,
            memoryTransferredBytes: 0,
            memoryRemainingBytes: 0,
            memoryTotalBytes: 0,
            dirtyRateBytesPerSecond: 0,
            iterations: 0,
            expectedDowntimeMs: 0,
            cpuThrottlePercent: 0,
          });
          try {
            const out = await mig.send({
              uri,
              storage,
              disks,
              settings: req.settings,
              wasRunning,
              onProgress: report,
              signal: op.signal,
            });
            const postcopy = await mig.wentPostcopy().catch(() => true);
            this.p.logger.info({ vm: `vms/${id}`, to: uri, ...out, postcopy }, "migration completed");
            await this.p.set(id, {
              migration: { role: "source", completed: true, wasRunning },
              stateMessage: postcopy
                ? `migrated to ${uri} in post-copy (downtime ${out.downtimeMs} ms); paused here until DeleteVm confirms (the guest runs there: no rollback)`
                : `migrated to ${uri} (downtime ${out.downtimeMs} ms); paused here until DeleteVm confirms or ResumeVm rolls back`,
            });
            return this.p.record(id);
          } catch (err) {
            // The VMM's side has cancelled and resumed; the record follows (unless the VMM died). An
            // interrupted post-copy leaves the source paused and MIGRATING: it must not run again.
            if (err instanceof VmenvError && err.reason === "POSTCOPY_INTERRUPTED") {
              await this.p.set(id, {
                stateMessage: `migration to ${uri} failed in post-copy: ${err.message}`,
              });
            } else if (this.p.vmm(id)) {
              const running = await vmm.status().catch(() => (wasRunning ? "running" : "paused"));
              await this.p.set(id, {
                state: running,
                migration: undefined,
                stateMessage: `migration to ${uri} did not complete: ${(err as Error).message}`,
              });
            } else await this.p.set(id, { migration: undefined });
            throw err;
          }
        }),
      { mayCancel: true, ...(req.requestId ? { requestId: req.requestId } : {}) },
    );
  }

  /**
   * After an agent restart: a source whose MigrateVm was cut short (its operation is gone) is settled
   * now. A migration still running is cancelled and the guest runs on here; one that had completed
   * leaves the source waiting for DeleteVm or ResumeVm, as after a MigrateVm that succeeded.
   */
  async settleAfterRestart(id: string): Promise<void> {
    const r = this.p.record(id);
    const m = r.migration;
    if (r.state !== "migrating" || m?.role !== "source" || m.completed) return;
    const mig = this.p.vmm(id)?.migration?.();
    if (!mig) return;
    const outcome = await mig.settle(m.wasRunning);
    if (outcome === "completed") {
      await this.p.set(id, {
        migration: { ...m, completed: true },
        stateMessage:
          "migrated (completed while the agent restarted); paused here until DeleteVm confirms or ResumeVm rolls back",
      });
    } else {
      await this.p.set(id, {
        state: m.wasRunning ? "running" : "paused",
        migration: undefined,
        stateMessage: "migration cut short by an agent restart; cancelled, the VM runs on here",
      });
    }
    this.p.logger.warn({ vm: `vms/${id}`, outcome }, "settled a migration cut short by an agent restart");
  }

  /**
   * ResumeVm of a migrated source: the rollback after the destination did not finish. QEMU takes its
   * disks back and the guest goes on here.
   */
  async rollBackSource(id: string): Promise<VmRecord> {
    const r = this.p.record(id);
    const vmm = this.p.vmm(id);
    if (!vmm) throw failedPrecondition(`the VMM of vms/${id} is gone`, "VM_NOT_RUNNING", { vm: `vms/${id}` });
    if (await vmm.migration?.().wentPostcopy()) {
      throw failedPrecondition(
        `vms/${id} was migrated in post-copy: the guest has run on the destination since the switch, this copy is out of date and cannot run again (DeleteVm confirms the migration)`,
        "POSTCOPY_NO_ROLLBACK",
        { vm: `vms/${id}` },
      );
    }
    const wasRunning = r.migration?.wasRunning ?? true;
    if (wasRunning) await vmm.resume();
    await this.p.set(id, {
      state: wasRunning ? "running" : "paused",
      migration: undefined,
      stateMessage: "migration rolled back; the VM runs on here",
    });
    return this.p.record(id);
  }
}
