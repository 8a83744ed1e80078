import type { VmManager } from "../vmm/manager.js";
import type { StatsVm } from "./stats.js";

/** The VMs statistics are taken of: those with a VMM process, with their disks and NICs' taps. */
export function statsVms(vms: VmManager): () => StatsVm[] {
  return () =>
    vms
      .list()
      .filter((r) => r.pid !== undefined && (r.state === "running" || r.state === "paused"))
      .map((r) => ({
        id: r.id,
        pid: r.pid as number,
        memoryBytes: r.spec.memoryBytes,
        disks: r.devices.flatMap((d) =>
          d.bound && d.device.kind === "disk" ? [{ id: d.device.id, volume: d.device.volume }] : [],
        ),
        nics: r.devices.flatMap((d) =>
          d.bound && d.device.kind === "nic" && d.plug ? [{ id: d.device.id, tap: d.plug.tap }] : [],
        ),
        counters: () => vms.vmm(r.id).counters(),
      }));
}
