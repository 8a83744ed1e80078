import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import {
  AcceleratorKind,
  type Vm,
  VmDeviceKind,
  VmDeviceState,
  type VmDisk,
  type VmGpu,
  VmmKind,
  type VmNic,
  VmRestartPolicy,
  VmSchema,
  type VmSnapshot,
  VmSnapshotSchema,
  type VmSpec as VmSpecPb,
  VmState as VmStatePb,
} from "@vmenv/api/agent/v1";
import { invalidArgument, unimplemented } from "@vmenv/rpc/errors";
import {
  checkDeviceId,
  type Device,
  type DeviceState,
  type DiskDevice,
  type GpuDevice,
  type NicDevice,
} from "./devices.js";
import type { RestartPolicy, VmRecord, VmSpec, VmState } from "./domain.js";
import type { SnapshotRecord } from "./snapshots.js";

const states: Record<VmState, VmStatePb> = {
  creating: VmStatePb.CREATING,
  stopped: VmStatePb.STOPPED,
  starting: VmStatePb.STARTING,
  running: VmStatePb.RUNNING,
  paused: VmStatePb.PAUSED,
  stopping: VmStatePb.STOPPING,
  crashed: VmStatePb.CRASHED,
  migrating: VmStatePb.MIGRATING,
  deleting: VmStatePb.DELETING,
};

export function toPbState(s: VmState): VmStatePb {
  return states[s];
}

export function fromPbState(s: VmStatePb): VmState | undefined {
  return (Object.keys(states) as VmState[]).find((k) => states[k] === s);
}

const policies: Record<RestartPolicy, VmRestartPolicy> = {
  never: VmRestartPolicy.NEVER,
  "on-crash": VmRestartPolicy.ON_CRASH,
  always: VmRestartPolicy.ALWAYS,
};

export function fromPbRestartPolicy(p: VmRestartPolicy): RestartPolicy {
  return (Object.keys(policies) as RestartPolicy[]).find((k) => policies[k] === p) ?? "never";
}

/** The API's VmSpec → the domain's, defaults filled in; INVALID_ARGUMENT naming the field when it cannot be. */
export function fromPbSpec(s: VmSpecPb | undefined): VmSpec {
  if (!s) throw invalidArgument("vm.spec", "is required");
  if (s.hugepageSizeBytes !== 0n)
    throw unimplemented(
      "vm.spec.hugepage_size_bytes",
      "guest memory on huge pages is not built yet (HostInfo.capacity reports the pools; docs/adr/0012)",
    );
  if ((s.pinning?.numaNodes.length ?? 0) > 0 || (s.pinning?.vcpuPins.length ?? 0) > 0) {
    throw unimplemented(
      "vm.spec.pinning",
      "NUMA and per-vCPU pinning are not built yet (host_cpus pinning is; docs/adr/0012)",
    );
  }
  const b = s.boot?.method;
  let boot: VmSpec["boot"];
  if (b?.case === "directKernel") {
    if (!b.value.kernelPath) throw invalidArgument("vm.spec.boot.direct_kernel.kernel_path", "is required");
    boot = {
      kind: "kernel",
      kernelPath: b.value.kernelPath,
      initrdPath: b.value.initrdPath || undefined,
      cmdline: b.value.cmdline,
    };
  } else if (b?.case === "disk") {
    throw unimplemented("vm.spec.boot.disk", "booting from a disk arrives with the block service (issue #4)");
  } else {
    throw invalidArgument("vm.spec.boot", "set direct_kernel (or disk)");
  }
  const vmm = s.vmm === VmmKind.CLOUD_HYPERVISOR ? "cloud-hypervisor" : "qemu";
  return {
    vmm,
    accelerator:
      s.accelerator === AcceleratorKind.KVM
        ? "kvm"
        : s.accelerator === AcceleratorKind.TCG
          ? "tcg"
          : undefined,
    vcpus: s.vcpus,
    maxVcpus: s.maxVcpus || s.vcpus,
    memoryBytes: s.memoryBytes,
    maxMemoryBytes: s.maxMemoryBytes || s.memoryBytes,
    hostCpus: [...(s.pinning?.hostCpus ?? [])],
    boot,
  };
}

function toPbSpec(s: VmSpec) {
  return {
    vmm: s.vmm === "cloud-hypervisor" ? VmmKind.CLOUD_HYPERVISOR : VmmKind.QEMU,
    accelerator:
      s.accelerator === "kvm"
        ? AcceleratorKind.KVM
        : s.accelerator === "tcg"
          ? AcceleratorKind.TCG
          : AcceleratorKind.UNSPECIFIED,
    vcpus: s.vcpus,
    maxVcpus: s.maxVcpus,
    memoryBytes: s.memoryBytes,
    maxMemoryBytes: s.maxMemoryBytes,
    ...(s.hostCpus.length > 0 ? { pinning: { hostCpus: s.hostCpus } } : {}),
    boot:
      s.boot.kind === "kernel"
        ? {
            method: {
              case: "directKernel" as const,
              value: {
                kernelPath: s.boot.kernelPath,
                initrdPath: s.boot.initrdPath ?? "",
                cmdline: s.boot.cmdline,
              },
            },
          }
        : {
            method: {
              case: "disk" as const,
              value: { diskId: s.boot.diskId, firmwarePath: s.boot.firmwarePath ?? "" },
            },
          },
  };
}

/** A snapshot record → the API's VmSnapshot. */
export function toPbSnapshot(r: SnapshotRecord): VmSnapshot {
  return create(VmSnapshotSchema, {
    name: `vms/${r.vmId}/snapshots/${r.id}`,
    spec: toPbSpec(r.spec),
    vmState: states[r.vmState],
    includesMemory: r.includesMemory,
    memoryStateBytes: BigInt(r.memoryStateBytes),
    labels: r.labels,
    createTime: timestampFromMs(r.createTimeMs),
  });
}

/** `vms/{vm}/snapshots/{snapshot}` → [vm, snapshot]. */
export function snapshotFromName(name: string, field = "snapshot"): [string, string] {
  const m = /^vms\/([^/]+)\/snapshots\/([^/]+)$/.exec(name);
  if (!m?.[1] || !m[2])
    throw invalidArgument(
      field,
      `"${name.slice(0, 80)}" is not a snapshot name (vms/{vm}/snapshots/{snapshot})`,
    );
  return [m[1], m[2]];
}

/** The API's VmDisk → a domain disk device; INVALID_ARGUMENT naming the field when it is not one. */
export function fromPbDisk(d: VmDisk, field: string): DiskDevice {
  checkDeviceId(d.id, `${field}.id`);
  if (!/^volumes\/[a-z]([a-z0-9-]{0,61}[a-z0-9])?$/.test(d.volume)) {
    throw invalidArgument(
      `${field}.volume`,
      `"${d.volume.slice(0, 80)}" is not a volume name (volumes/{volume})`,
    );
  }
  return { kind: "disk", id: d.id, volume: d.volume, readOnly: d.readOnly, serial: d.serial };
}

/** The API's VmNic → a domain NIC device. */
export function fromPbNic(n: VmNic, field: string): NicDevice {
  checkDeviceId(n.id, `${field}.id`);
  if (!/^networks\/[a-z]([a-z0-9-]{0,61}[a-z0-9])?$/.test(n.network)) {
    throw invalidArgument(
      `${field}.network`,
      `"${n.network.slice(0, 80)}" is not a network name (networks/{network})`,
    );
  }
  return { kind: "nic", id: n.id, network: n.network, mac: n.macAddress, ip: n.ipAddress };
}

/** The API's VmGpu → a domain GPU device. */
export function fromPbGpu(g: VmGpu, field: string): GpuDevice {
  checkDeviceId(g.id, `${field}.id`);
  if (!/^gpus\/[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$/.test(g.gpu)) {
    throw invalidArgument(
      `${field}.gpu`,
      `"${g.gpu.slice(0, 80)}" is not a GPU name (gpus/{pci address}, e.g. gpus/0000:41:00.0)`,
    );
  }
  return { kind: "gpu", id: g.id, gpu: g.gpu };
}

/** The disks, NICs and GPUs of a create request, as devices bound from the start. */
export function devicesFromPbSpec(s: VmSpecPb | undefined): DeviceState[] {
  const ids = new Set<string>();
  const devices: [string, Device][] = [
    ...(s?.disks ?? []).map((d, i): [string, Device] => [
      `vm.spec.disks[${i}]`,
      fromPbDisk(d, `vm.spec.disks[${i}]`),
    ]),
    ...(s?.nics ?? []).map((n, i): [string, Device] => [
      `vm.spec.nics[${i}]`,
      fromPbNic(n, `vm.spec.nics[${i}]`),
    ]),
    ...(s?.gpus ?? []).map((g, i): [string, Device] => [
      `vm.spec.gpus[${i}]`,
      fromPbGpu(g, `vm.spec.gpus[${i}]`),
    ]),
  ];
  return devices.map(([field, device]) => {
    if (ids.has(device.id)) throw invalidArgument(`${field}.id`, `"${device.id}" is used by another device`);
    ids.add(device.id);
    return { device, bound: true, slot: undefined };
  });
}

/** The domain's record → the API's Vm. */
export function toPbVm(r: VmRecord): Vm {
  const ts = (ms: number | undefined) => (ms === undefined ? undefined : timestampFromMs(ms));
  return create(VmSchema, {
    name: `vms/${r.id}`,
    spec: {
      ...toPbSpec(r.spec),
      disks: r.devices.flatMap(({ device: d }) =>
        d.kind === "disk" ? [{ id: d.id, volume: d.volume, readOnly: d.readOnly, serial: d.serial }] : [],
      ),
      nics: r.devices.flatMap(({ device: d, plug }) =>
        d.kind === "nic"
          ? [
              {
                id: d.id,
                network: d.network,
                macAddress: plug?.mac ?? d.mac,
                ipAddress: plug?.ip ?? d.ip,
                port: plug?.port ?? "",
              },
            ]
          : [],
      ),
      gpus: r.devices.flatMap(({ device: d }) => (d.kind === "gpu" ? [{ id: d.id, gpu: d.gpu }] : [])),
    },
    devices: r.devices.map((d) => ({
      id: d.device.id,
      kind: { disk: VmDeviceKind.DISK, nic: VmDeviceKind.NIC, gpu: VmDeviceKind.GPU }[d.device.kind],
      state: d.bound ? VmDeviceState.BOUND : VmDeviceState.JOINED,
      guestAddress: d.slot === undefined || !d.bound ? "" : `rp${d.slot}`,
    })),
    labels: r.labels,
    restartPolicy: policies[r.restartPolicy],
    state: states[r.state],
    stateMessage: r.stateMessage,
    vmm: r.spec.vmm === "cloud-hypervisor" ? VmmKind.CLOUD_HYPERVISOR : VmmKind.QEMU,
    accelerator:
      r.accelerator === "kvm"
        ? AcceleratorKind.KVM
        : r.accelerator === "tcg"
          ? AcceleratorKind.TCG
          : AcceleratorKind.UNSPECIFIED,
    pid: r.pid ?? 0,
    restartCount: r.restartCount,
    createTime: ts(r.createTimeMs),
    updateTime: ts(r.updateTimeMs),
    startTime: ts(r.startTimeMs),
    guestReadyTime: ts(r.guestReadyTimeMs),
    etag: `"${r.generation}"`,
  });
}
