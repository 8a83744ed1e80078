/**
 * The VM domain: specs, records, states, validation. Plain TypeScript, no I/O.
 */
import { invalidArgument, VmenvError } from "@vmenv/rpc/errors";
import type { DeviceState } from "./devices.js";

export type VmmKind = "qemu" | "cloud-hypervisor";
export type Accelerator = "kvm" | "tcg";
export type RestartPolicy = "never" | "on-crash" | "always";
export type VmState =
  | "creating"
  | "stopped"
  | "starting"
  | "running"
  | "paused"
  | "stopping"
  | "crashed"
  | "migrating"
  | "deleting";

export type VmBoot =
  | { kind: "kernel"; kernelPath: string; initrdPath: string | undefined; cmdline: string }
  | { kind: "disk"; diskId: string; firmware: "bios" | "uefi"; firmwarePath: string | undefined };

/** What the caller asked for; normalised (defaults filled in) so that two equal asks compare equal. */
export interface VmSpec {
  vmm: VmmKind;
  /** undefined = the agent's effective accelerator at start time. */
  accelerator: Accelerator | undefined;
  vcpus: number;
  maxVcpus: number;
  memoryBytes: bigint;
  maxMemoryBytes: bigint;
  hostCpus: number[];
  boot: VmBoot;
}

/** A VM as the agent keeps it (vm.json in its folder). */
export interface VmRecord {
  id: string;
  spec: VmSpec;
  labels: Record<string, string>;
  restartPolicy: RestartPolicy;
  state: VmState;
  stateMessage: string;
  /** The accelerator of the running VMM. */
  accelerator: Accelerator | undefined;
  pid: number | undefined;
  restartCount: number;
  createTimeMs: number;
  updateTimeMs: number;
  startTimeMs: number | undefined;
  guestReadyTimeMs: number | undefined;
  /** Bumped on every change; the etag. */
  generation: number;
  /** Disks (later NICs and GPUs), joined or bound (seed 002). */
  devices: DeviceState[];
  /** Set while the VM takes part in a live migration (state migrating; docs/adr/0015). */
  migration?: MigrationMark;
}

/** A VM's part in a live migration, kept in its record so that an agent restart knows it too. */
export interface MigrationMark {
  role: "source" | "destination";
  /**
   * Source: the destination holds the complete state (the VM is paused here until DeleteVm confirms or
   * ResumeVm rolls back). Destination: unused (FinishVmMigration ends the mark).
   */
  completed: boolean;
  /** Source: whether the guest ran when the migration started (a rollback resumes it). */
  wasRunning: boolean;
  /** Destination: where the source sends (PrepareVmMigration's answer, for a repeated call). */
  migrationUri?: string;
  storageUri?: string;
  /** Destination: volumes PrepareVmMigration created; deleted with the VM when it never finished. */
  createdVolumes?: string[];
  /** Destination: when the source's guest was ready (the guest does not boot again here). */
  guestReadyTimeMs?: number;
}

export const MIB = 1024n * 1024n;
/** Limits that make a spec "absurd" whatever the host. */
export const MAX_VCPUS = 255;
export const MIN_MEMORY_BYTES = 32n * MIB;

/** AIP-122 style ids: lower-case letters, digits and hyphens, starting with a letter, at most 63. */
const ID = /^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$/;

export function checkVmId(id: string, field = "vm_id"): void {
  if (!ID.test(id)) {
    throw invalidArgument(
      field,
      `"${id.slice(0, 80)}" is not a valid VM id: use 1-63 lower-case letters, digits and hyphens, starting with a letter and not ending with a hyphen`,
      "INVALID_VM_ID",
    );
  }
}

/** `vms/{id}` → id, or INVALID_ARGUMENT naming the field. */
export function vmIdFromName(name: string, field = "name"): string {
  const m = /^vms\/(.+)$/.exec(name);
  if (!m?.[1])
    throw invalidArgument(field, `"${name.slice(0, 80)}" is not a VM name (vms/{vm})`, "INVALID_VM_NAME");
  checkVmId(m[1], field);
  return m[1];
}

export interface HostLimits {
  /** Logical CPUs of the host. */
  cpus: number;
  /** Memory of the host, in bytes. */
  memoryBytes: bigint;
}

/** Checks a normalised spec against fixed limits and the host; throws INVALID_ARGUMENT naming the field. */
export function validateSpec(s: VmSpec, host: HostLimits): void {
  const bad = (field: string, why: string) => invalidArgument(`vm.spec.${field}`, why);
  if (!Number.isInteger(s.vcpus) || s.vcpus < 1 || s.vcpus > MAX_VCPUS) {
    throw bad("vcpus", `must be between 1 and ${MAX_VCPUS}, got ${s.vcpus}`);
  }
  if (s.maxVcpus < s.vcpus || s.maxVcpus > MAX_VCPUS) {
    throw bad("max_vcpus", `must be between vcpus (${s.vcpus}) and ${MAX_VCPUS}, got ${s.maxVcpus}`);
  }
  if (s.memoryBytes < MIN_MEMORY_BYTES || s.memoryBytes % MIB !== 0n) {
    throw bad(
      "memory_bytes",
      `must be a whole number of MiB, at least ${MIN_MEMORY_BYTES / MIB} MiB, got ${s.memoryBytes}`,
    );
  }
  if (s.maxMemoryBytes < s.memoryBytes || s.maxMemoryBytes % MIB !== 0n) {
    throw bad(
      "max_memory_bytes",
      `must be a whole number of MiB and at least memory_bytes, got ${s.maxMemoryBytes}`,
    );
  }
  if (s.maxMemoryBytes > host.memoryBytes) {
    throw bad(
      s.maxMemoryBytes === s.memoryBytes ? "memory_bytes" : "max_memory_bytes",
      `${s.maxMemoryBytes / MIB} MiB is more than this host has (${host.memoryBytes / MIB} MiB)`,
    );
  }
  for (const c of s.hostCpus) {
    if (!Number.isInteger(c) || c < 0 || c >= host.cpus) {
      throw bad("pinning.host_cpus", `CPU ${c} does not exist on this host (it has 0-${host.cpus - 1})`);
    }
  }
  if (s.boot.kind === "kernel") {
    if (!s.boot.kernelPath.startsWith("/"))
      throw bad("boot.direct_kernel.kernel_path", "must be an absolute path");
    if (s.boot.initrdPath !== undefined && !s.boot.initrdPath.startsWith("/")) {
      throw bad("boot.direct_kernel.initrd_path", "must be an absolute path");
    }
    if (/[\0\n]/.test(s.boot.cmdline) || s.boot.cmdline.length > 4096) {
      throw bad("boot.direct_kernel.cmdline", "must be one line of at most 4096 characters");
    }
  }
}

/** Whether two normalised specs ask for the same VM. */
export function sameSpec(a: VmSpec, b: VmSpec): boolean {
  return canonical(a) === canonical(b);
}

function canonical(v: unknown): string {
  return JSON.stringify(v, (_k, x) => (typeof x === "bigint" ? `${x}n` : x));
}

/** The transitions a caller may ask for, by current state: measure first, then act. */
export function checkTransition(
  id: string,
  from: VmState,
  action: "start" | "stop" | "pause" | "resume" | "reboot",
): "act" | "noop" {
  const table: Record<typeof action, { act: VmState[]; noop: VmState[] }> = {
    start: { act: ["stopped", "crashed"], noop: ["running", "starting", "paused"] },
    stop: { act: ["running", "paused", "starting"], noop: ["stopped", "crashed"] },
    pause: { act: ["running"], noop: ["paused"] },
    resume: { act: ["paused"], noop: ["running"] },
    reboot: { act: ["running", "paused"], noop: [] },
  };
  const t = table[action];
  if (t.act.includes(from)) return "act";
  if (t.noop.includes(from)) return "noop";
  throw new VmenvError("failed-precondition", `cannot ${action} vms/${id}: it is ${from}`, {
    reason: "VM_STATE_CONFLICT",
    metadata: { vm: `vms/${id}`, state: from, action },
  });
}
