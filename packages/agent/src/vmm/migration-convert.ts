/** Live migration: the API's messages ↔ the domain's (see convert.ts for the VM itself). */
import {
  type MigrationSettings as MigrationSettingsPb,
  type VmDeviceStatus,
  VmMigrationPhase,
  type Volume,
  VolumeBackend,
  VolumeFormat,
} from "@vmenv/api/agent/v1";
import { invalidArgument } from "@vmenv/rpc/errors";
import type { DeviceState } from "./devices.js";
import type { SourceVolume } from "./migration.js";
import {
  DEFAULT_DOWNTIME_LIMIT_MS,
  type MigrationProgress,
  type MigrationSettings,
} from "./migration-domain.js";

const ms = (d: { seconds: bigint; nanos: number } | undefined) =>
  d ? Number(d.seconds) * 1000 + Math.round(d.nanos / 1e6) : undefined;

/** MigrationSettings → the domain's, defaults filled in; INVALID_ARGUMENT for absurd values. */
export function migrationSettings(s: MigrationSettingsPb | undefined): MigrationSettings {
  const downtime = ms(s?.downtimeLimit);
  if (downtime !== undefined && (downtime < 1 || downtime > 3_600_000))
    throw invalidArgument("settings.downtime_limit", "must be between 1 ms and 1 h");
  const timeout = ms(s?.timeout);
  if (timeout !== undefined && timeout < 1) throw invalidArgument("settings.timeout", "must be positive");
  const bw = s?.maxBandwidthBytesPerSecond ?? 0n;
  if (bw > BigInt(Number.MAX_SAFE_INTEGER))
    throw invalidArgument("settings.max_bandwidth_bytes_per_second", "is too large");
  return {
    maxBandwidthBytesPerSecond: bw > 0n ? Number(bw) : undefined,
    downtimeLimitMs: downtime ?? DEFAULT_DOWNTIME_LIMIT_MS,
    timeoutMs: timeout,
    autoConverge: s?.autoConverge ?? false,
    postCopy: s?.postCopy ?? false,
  };
}

const phases = {
  storage: VmMigrationPhase.STORAGE,
  "pre-copy": VmMigrationPhase.PRE_COPY,
  "post-copy": VmMigrationPhase.POST_COPY,
  switchover: VmMigrationPhase.SWITCHOVER,
  completed: VmMigrationPhase.COMPLETED,
} as const;

const u64 = (n: number) => BigInt(Math.max(0, Math.round(n)));

/** Progress → VmMigrationProgress's fields. */
export function toPbMigrationProgress(p: MigrationProgress) {
  return {
    phase: phases[p.phase],
    storageTransferredBytes: u64(p.storageTransferredBytes),
    storageTotalBytes: u64(p.storageTotalBytes),
    memoryTransferredBytes: u64(p.memoryTransferredBytes),
    memoryRemainingBytes: u64(p.memoryRemainingBytes),
    memoryTotalBytes: u64(p.memoryTotalBytes),
    dirtyRateBytesPerSecond: u64(p.dirtyRateBytesPerSecond),
    iterations: p.iterations,
    expectedDowntime: {
      seconds: BigInt(Math.floor(p.expectedDowntimeMs / 1000)),
      nanos: Math.round((p.expectedDowntimeMs % 1000) * 1e6),
    },
    cpuThrottlePercent: p.cpuThrottlePercent,
  };
}

/**
 * The source's devices keep their PCIe root ports on the destination (`Vm.devices[].guest_address`,
 * "rpN"): QEMU's migration stream needs the same machine on both ends.
 */
export function withSlots(devices: DeviceState[], pb: VmDeviceStatus[]): DeviceState[] {
  return devices.map((d) => {
    const m = /^rp(\d+)$/.exec(pb.find((x) => x.id === d.device.id)?.guestAddress ?? "");
    return m ? { ...d, slot: Number(m[1]) } : d;
  });
}

/** PrepareVmMigrationRequest.volumes → the domain's. */
export function fromPbSourceVolumes(vs: Volume[]): SourceVolume[] {
  return vs.map((v, i) => {
    if (!/^volumes\/[a-z]([a-z0-9-]{0,61}[a-z0-9])?$/.test(v.name))
      throw invalidArgument(
        `volumes[${i}].name`,
        `"${v.name.slice(0, 80)}" is not a volume name (volumes/{volume})`,
      );
    if (v.sizeBytes === 0n || v.sizeBytes % 512n !== 0n)
      throw invalidArgument(`volumes[${i}].size_bytes`, "must be a positive multiple of 512");
    return {
      name: v.name,
      store: v.store || "stores/default",
      format: v.format === VolumeFormat.RAW ? "raw" : "qcow2",
      sizeBytes: v.sizeBytes,
      backend:
        v.backend === VolumeBackend.NBD
          ? "nbd"
          : v.backend === VolumeBackend.VHOST_USER_BLK
            ? "vhost-user-blk"
            : "file",
      labels: { ...v.labels },
    };
  });
}
