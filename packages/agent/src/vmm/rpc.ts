import { create, fromJson, type JsonValue } from "@bufbuild/protobuf";
import { anyPack, timestampFromMs, ValueSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  DeviceChangeOutcome,
  VmMigrationProgressSchema,
  VmMigrationTargetSchema,
  VmSchema,
  VmService,
  VmSnapshotSchema,
  WatchEventType,
} from "@vmenv/api/agent/v1";
import { bind, failedPrecondition, invalidArgument, type ServiceBinding, unimplemented } from "@vmenv/rpc";
import { toPbOperation, toStatus } from "../diagnostics/convert.js";
import { changeSourceOf, watchChanges } from "../diagnostics/watch.js";
import { noFilter, page } from "../paging.js";
import { readConsole } from "./console.js";
import {
  devicesFromPbSpec,
  fromPbDisk,
  fromPbGpu,
  fromPbNic,
  fromPbRestartPolicy,
  fromPbSpec,
  fromPbState,
  snapshotFromName,
  toPbSnapshot,
  toPbVm,
} from "./convert.js";
import { type Change, checkDeviceId } from "./devices.js";
import { checkVmId, type VmRecord, vmIdFromName } from "./domain.js";
import type { VmChange, VmManager } from "./manager.js";
import {
  fromPbSourceVolumes,
  migrationSettings,
  toPbMigrationProgress,
  withSlots,
} from "./migration-convert.js";
import type { SnapshotRecord } from "./snapshots.js";

/** Packs an operation's result for the API: a VM record becomes a Vm. */
export function packResult(r: unknown) {
  if (r === null || typeof r !== "object") return undefined;
  if ("includesMemory" in r) return anyPack(VmSnapshotSchema, toPbSnapshot(r as SnapshotRecord));
  if ("migrationUri" in r && "storageUri" in r)
    return anyPack(
      VmMigrationTargetSchema,
      create(VmMigrationTargetSchema, r as { vm: string; migrationUri: string; storageUri: string }),
    );
  if ("memoryTransferredBytes" in r && "phase" in r)
    return anyPack(
      VmMigrationProgressSchema,
      create(
        VmMigrationProgressSchema,
        toPbMigrationProgress(r as Parameters<typeof toPbMigrationProgress>[0]),
      ),
    );
  if ("spec" in r && "id" in r) return anyPack(VmSchema, toPbVm(r as VmRecord));
  return undefined;
}

const ms = (d: { seconds: bigint; nanos: number } | undefined) =>
  d ? Number(d.seconds) * 1000 + d.nanos / 1e6 : undefined;

/** Watch: how many changes a watcher may fall behind before it is cut off. */
const WATCH_QUEUE = 256;

/** VmService: check, convert, call the manager, convert back. */
export function vmService(m: VmManager): ServiceBinding {
  const op = (o: Parameters<typeof toPbOperation>[0]) => toPbOperation(o, packResult);
  const matches = (vm: VmRecord, states: Set<string>, labels: Record<string, string>) =>
    (states.size === 0 || states.has(vm.state)) &&
    Object.entries(labels).every(([k, v]) => vm.labels[k] === v);
  const stateSet = (s: number[]) => new Set(s.map((x) => fromPbState(x)).filter((x) => x !== undefined));

  return bind(VmService, {
    async createVm(req) {
      checkVmId(req.vmId);
      if (!req.vm) throw invalidArgument("vm", "is required");
      const spec = fromPbSpec(req.vm.spec);
      const devices = devicesFromPbSpec(req.vm.spec);
      return op(
        await m.create(req.vmId, spec, {
          labels: { ...req.vm.labels },
          restartPolicy: fromPbRestartPolicy(req.vm.restartPolicy),
          start: req.start,
          requestId: req.requestId,
          devices,
        }),
      );
    },
    getVm(req) {
      return toPbVm(m.get(vmIdFromName(req.name)));
    },
    listVms(req) {
      noFilter(req.filter, "use states and labels");
      const states = stateSet(req.states);
      const p = page(
        m.list().filter((vm) => matches(vm, states, req.labels)),
        (vm) => vm.id,
        req.pageSize,
        req.pageToken,
      );
      return { vms: p.items.map(toPbVm), nextPageToken: p.next };
    },
    async deleteVm(req) {
      return op(
        await m.delete(vmIdFromName(req.name), {
          force: req.force,
          allowMissing: req.allowMissing,
          requestId: req.requestId,
        }),
      );
    },
    async startVm(req) {
      return op(await m.start(vmIdFromName(req.name), { paused: req.paused, requestId: req.requestId }));
    },
    async stopVm(req) {
      const timeoutMs = ms(req.gracefulTimeout);
      return op(
        await m.stop(vmIdFromName(req.name), {
          force: req.force,
          requestId: req.requestId,
          ...(timeoutMs ? { timeoutMs } : {}),
        }),
      );
    },
    async rebootVm(req) {
      const timeoutMs = ms(req.gracefulTimeout);
      return op(
        await m.reboot(vmIdFromName(req.name), {
          force: req.force,
          requestId: req.requestId,
          ...(timeoutMs ? { timeoutMs } : {}),
        }),
      );
    },
    async pauseVm(req) {
      return toPbVm(await m.pause(vmIdFromName(req.name)));
    },
    async resumeVm(req) {
      return toPbVm(await m.resume(vmIdFromName(req.name)));
    },
    async *watchVms(req, ctx) {
      if (req.filter)
        throw invalidArgument("filter", "filter expressions are not supported yet; use states and labels");
      const states = stateSet(req.states);
      const event = (type: WatchEventType, vm: VmRecord | undefined, seq: number, timeMs: number) => ({
        type,
        ...(vm ? { vm: toPbVm(vm) } : {}),
        resumeToken: String(seq),
        eventTime: timestampFromMs(timeMs),
      });
      const types = {
        created: WatchEventType.CREATED,
        updated: WatchEventType.UPDATED,
        deleted: WatchEventType.DELETED,
      } as const;
      yield* watchChanges<VmChange, ReturnType<typeof event>>(changeSourceOf(m), {
        resumeToken: req.resumeToken,
        signal: ctx.signal,
        queueLimit: WATCH_QUEUE,
        snapshot: function* (seq) {
          for (const vm of m.list())
            if (matches(vm, states, req.labels)) yield event(WatchEventType.INITIAL, vm, seq, Date.now());
          yield event(WatchEventType.SYNCED, undefined, seq, Date.now());
        },
        toEvent: (c) =>
          c.type !== "deleted" && !matches(c.vm, states, req.labels)
            ? undefined
            : event(types[c.type], c.vm, c.seq, c.timeMs),
      });
    },
    async *streamConsole(req, ctx) {
      const id = vmIdFromName(req.name);
      m.get(id);
      if (req.since)
        throw unimplemented(
          "StreamConsoleRequest.since",
          "use last_lines; timestamps of console output arrive later",
        );
      for await (const chunk of readConsole(m.logPath(id), {
        ...(req.lastLines > 0 ? { lastLines: req.lastLines } : {}),
        follow: req.follow,
        signal: ctx.signal,
      })) {
        yield { data: chunk.data, offset: BigInt(chunk.offset), time: timestampFromMs(Date.now()) };
      }
    },
    sendConsoleInput(req) {
      const id = vmIdFromName(req.name);
      const tap = m.get(id) && m.consoleTap(id);
      if (!tap?.write(req.data)) {
        throw failedPrecondition(
          `the console of vms/${id} is not connected (is the VM running?)`,
          "CONSOLE_NOT_CONNECTED",
          {
            vm: `vms/${id}`,
          },
        );
      }
      return { writtenBytes: BigInt(req.data.length) };
    },
    async executeQmpCommand(req) {
      const vmm = m.vmm(vmIdFromName(req.name));
      if (!req.command) throw invalidArgument("command", "is required");
      try {
        const r = await vmm.passthrough(req.command, req.arguments as Record<string, unknown> | undefined);
        return { returnValue: fromJson(ValueSchema, (r ?? null) as JsonValue) };
      } catch (e) {
        if (e instanceof Error && e.name === "QmpError")
          throw new ConnectError(e.message, Code.InvalidArgument);
        throw e;
      }
    },
    async updateVm(req) {
      if (!req.vm) throw invalidArgument("vm", "is required");
      const paths = req.updateMask?.paths ?? [];
      if (paths.length === 0)
        throw invalidArgument("update_mask", 'name the fields to change: "labels", "restart_policy"');
      const patch: Parameters<typeof m.update>[1] = {};
      for (const p of paths) {
        if (p === "labels") patch.labels = { ...req.vm.labels };
        else if (p === "restart_policy") patch.restartPolicy = fromPbRestartPolicy(req.vm.restartPolicy);
        else
          throw invalidArgument(
            "update_mask",
            `"${p}" cannot be changed (only labels and restart_policy can)`,
          );
      }
      return toPbVm(await m.update(vmIdFromName(req.vm.name, "vm.name"), patch, req.vm.etag || undefined));
    },
    async snapshotVm(req) {
      return op(
        await m.snapshot(vmIdFromName(req.name), req.snapshotId, {
          includeMemory: req.includeMemory,
          labels: { ...req.labels },
          requestId: req.requestId,
        }),
      );
    },
    async listVmSnapshots(req) {
      if (req.filter) throw invalidArgument("filter", "filter expressions are not supported yet");
      const all = await m.listSnapshots(vmIdFromName(req.parent, "parent"));
      const start = req.pageToken ? Number(Buffer.from(req.pageToken, "base64url").toString()) : 0;
      if (!Number.isInteger(start) || start < 0)
        throw invalidArgument("page_token", "is not a token this agent gave");
      const size = req.pageSize > 0 ? Math.min(req.pageSize, 1000) : 100;
      return {
        vmSnapshots: all.slice(start, start + size).map(toPbSnapshot),
        nextPageToken:
          start + size < all.length ? Buffer.from(String(start + size)).toString("base64url") : "",
      };
    },
    async deleteVmSnapshot(req) {
      const [vm, sid] = snapshotFromName(req.name, "name");
      await m.deleteSnapshot(vm, sid);
      return {};
    },
    async restoreVm(req) {
      const id = vmIdFromName(req.name);
      const [vm, sid] = snapshotFromName(req.snapshot);
      if (vm !== id) throw invalidArgument("snapshot", `${req.snapshot} is not a snapshot of ${req.name}`);
      return op(await m.restore(id, sid, { force: req.force, requestId: req.requestId }));
    },
    async cloneVm(req) {
      const id = vmIdFromName(req.name);
      let snapshot: string | undefined;
      if (req.snapshot) {
        const [vm, sid] = snapshotFromName(req.snapshot);
        if (vm !== id) throw invalidArgument("snapshot", `${req.snapshot} is not a snapshot of ${req.name}`);
        snapshot = sid;
      }
      return op(
        await m.clone(id, req.vmId, {
          labels: { ...req.labels },
          start: req.start,
          requestId: req.requestId,
          ...(snapshot ? { snapshot } : {}),
        }),
      );
    },
    async resizeVm(req) {
      if (req.vcpus === undefined && req.memoryBytes === undefined)
        throw invalidArgument("vcpus", "set vcpus, memory_bytes or both");
      return op(
        await m.resize(vmIdFromName(req.name), {
          requestId: req.requestId,
          ...(req.vcpus !== undefined ? { vcpus: req.vcpus } : {}),
          ...(req.memoryBytes !== undefined ? { memoryBytes: req.memoryBytes } : {}),
        }),
      );
    },
    async commitVmDeviceChanges(req) {
      const id = vmIdFromName(req.name);
      if (req.changes.length === 0) throw invalidArgument("changes", "is empty");
      const changes = req.changes.map((c, i): Change => {
        const field = `changes[${i}]`;
        const action = ({ 1: "join", 2: "bind", 3: "unbind", 4: "leave" } as const)[
          c.action as 1 | 2 | 3 | 4
        ];
        if (!action) throw invalidArgument(`${field}.action`, "set JOIN, BIND, UNBIND or LEAVE");
        const d = c.device;
        if (d.case === "deviceId") {
          checkDeviceId(d.value, `${field}.device_id`);
          return { action, deviceId: d.value, device: undefined };
        }
        if (d.case === "disk") {
          const device = fromPbDisk(d.value, `${field}.disk`);
          return { action, deviceId: device.id, device };
        }
        if (d.case === "nic") {
          const device = fromPbNic(d.value, `${field}.nic`);
          return { action, deviceId: device.id, device };
        }
        if (d.case === "gpu") {
          const device = fromPbGpu(d.value, `${field}.gpu`);
          return { action, deviceId: device.id, device };
        }
        throw invalidArgument(`${field}.device`, "set device_id, a disk, a nic or a gpu");
      });
      const { results, vm } = await m.commitDevices(id, changes, {
        validateOnly: req.validateOnly,
        etag: req.etag || undefined,
      });
      return {
        results: results.map((r) => ({
          deviceId: r.deviceId,
          action: { join: 1, bind: 2, unbind: 3, leave: 4 }[r.action],
          outcome: {
            applied: DeviceChangeOutcome.APPLIED,
            noop: DeviceChangeOutcome.NOOP,
            error: DeviceChangeOutcome.ERROR,
          }[r.outcome],
          ...(r.error ? { error: toStatus(r.error) } : {}),
        })),
        vm: toPbVm(vm),
      };
    },
    async prepareVmMigration(req) {
      checkVmId(req.vmId);
      if (!req.vm) throw invalidArgument("vm", "is required");
      if (req.vm.name && req.vm.name !== `vms/${req.vmId}`)
        throw invalidArgument("vm.name", `is ${req.vm.name.slice(0, 80)}, not vms/${req.vmId}`);
      const spec = fromPbSpec(req.vm.spec);
      const devices = withSlots(devicesFromPbSpec(req.vm.spec), req.vm.devices);
      const ready = req.vm.guestReadyTime;
      return op(
        await m.migrations.prepare({
          id: req.vmId,
          spec,
          devices,
          labels: { ...req.vm.labels },
          restartPolicy: fromPbRestartPolicy(req.vm.restartPolicy),
          guestReadyTimeMs: ready ? Number(ready.seconds) * 1000 + ready.nanos / 1e6 : undefined,
          listenAddress: req.listenAddress,
          receiveStorage: req.receiveStorage,
          volumes: fromPbSourceVolumes(req.volumes),
          requestId: req.requestId,
        }),
      );
    },
    async migrateVm(req) {
      const id = vmIdFromName(req.name);
      if (!req.migrationUri) throw invalidArgument("migration_uri", "is required");
      return op(
        await m.migrations.migrate(id, {
          migrationUri: req.migrationUri,
          storageUri: req.storageUri,
          settings: migrationSettings(req.settings),
          requestId: req.requestId,
        }),
      );
    },
    async finishVmMigration(req) {
      return op(
        await m.migrations.finish(vmIdFromName(req.name), { paused: req.paused, requestId: req.requestId }),
      );
    },
  });
}
