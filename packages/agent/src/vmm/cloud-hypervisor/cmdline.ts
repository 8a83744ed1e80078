/**
 * What the driver starts: the files of a cloud-hypervisor VMM in its VM's folder, its command line, and
 * the launch spec of its VM. Pure: the same request gives the same answer.
 */
import { join } from "node:path";
import { VmenvError } from "@vmenv/rpc/errors";
import type { LaunchRequest, VmPaths } from "../driver.js";
import type { ChLaunchSpec } from "./config.js";

/** The VMM's files, besides those every driver has (`VmPaths`). */
export interface ChFiles {
  /** `--api-socket`: the REST API (`VmPaths.control`). */
  apiSocket: string;
  /** The VMM's own serial socket (`Socket` mode), read by the agent's relay; not `VmPaths.serialSocket`. */
  vmmSerialSocket: string;
  /** `--event-monitor`: lifecycle events, JSON. */
  events: string;
  /** The VMM's standard output and error: its log (warnings and errors) and why it failed to start. */
  log: string;
}

export function chFiles(paths: VmPaths): ChFiles {
  return {
    apiSocket: paths.control,
    vmmSerialSocket: join(paths.dir, "ch-serial.sock"),
    events: join(paths.dir, "ch-events.json"),
    log: join(paths.dir, "cloud-hypervisor.log"),
  };
}

/** The id of the VM whose folder this is (`<state>/vms/<id>`), to name it in messages. */
export function vmName(paths: VmPaths): string {
  const id = paths.dir.replace(/\/+$/, "").split("/").pop() ?? paths.dir;
  return `vms/${id}`;
}

/**
 * The command line: an empty VMM that serves its API and writes events; the VM comes through the API
 * (`vm.create`), so the VM's config is checked against the same schema whether it is created or
 * restored. No `--log-file`: the VMM's log goes to its standard error, which the driver sends to
 * `cloud-hypervisor.log` — where the error that ends a failed start is printed too (the log file option
 * would get the log but not that error, and truncates the file on every start).
 */
export function chArgs(vm: string, files: ChFiles): string[] {
  for (const path of [files.apiSocket, files.events]) {
    // The VMM splits option values at commas and treats quotes and brackets specially.
    if (/[,"[\]\n]/.test(path)) {
      throw startFailed(
        vm,
        `its folder's path ${JSON.stringify(path)} has a character (,"[]) cloud-hypervisor options cannot take`,
      );
    }
  }
  return ["--api-socket", `path=${files.apiSocket}`, "--event-monitor", `path=${files.events}`];
}

/**
 * The VM's launch spec. Kernel boot only; the serial port goes to the VMM's socket, which the agent
 * relays (see `serial-relay.ts`). Host CPU pinning pins every vCPU, hot-pluggable ones included, to the
 * whole set, as the domain's pinning is for the VM as a whole.
 */
export function chLaunchSpec(req: LaunchRequest, files: ChFiles): ChLaunchSpec {
  const vm = `vms/${req.id}`;
  const { spec } = req;
  if (req.accelerator !== "kvm") {
    throw startFailed(
      vm,
      `cloud-hypervisor runs guests with KVM only, and this VM is to run with ${req.accelerator}`,
    );
  }
  if (spec.boot.kind !== "kernel") {
    throw startFailed(
      vm,
      "the cloud-hypervisor driver boots a kernel directly; disk boot is not supported yet",
    );
  }
  const launch: ChLaunchSpec = {
    id: req.id,
    vcpus: spec.vcpus,
    maxVcpus: spec.maxVcpus,
    memoryBytes: spec.memoryBytes,
    maxMemoryBytes: spec.maxMemoryBytes,
    boot: {
      kind: "kernel",
      kernel: spec.boot.kernelPath,
      cmdline: spec.boot.cmdline,
      ...(spec.boot.initrdPath !== undefined ? { initrd: spec.boot.initrdPath } : {}),
    },
    serial: { kind: "socket", path: files.vmmSerialSocket },
    nics: req.nics.map((n) => ({ id: n.id, tap: n.tap, mac: n.mac })),
    disks: req.disks.map((d) => ({
      id: d.id,
      path: d.path,
      format: d.format,
      readOnly: d.readOnly,
      ...(d.serial ? { serial: d.serial } : {}),
    })),
  };
  if (spec.hostCpus.length > 0) {
    launch.cpuAffinity = Array.from({ length: spec.maxVcpus }, (_, vcpu) => ({
      vcpu,
      hostCpus: [...spec.hostCpus],
    }));
  }
  return launch;
}

/** VMM_START_FAILED for `vm` ("vms/<id>"). */
export function startFailed(vm: string, why: string, cause?: unknown): VmenvError {
  return new VmenvError("failed-precondition", `cloud-hypervisor did not start ${vm}: ${why}`, {
    reason: "VMM_START_FAILED",
    metadata: { vm, vmm: "cloud-hypervisor" },
    ...(cause !== undefined ? { cause } : {}),
  });
}
