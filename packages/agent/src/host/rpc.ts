import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { type HostInfo, HostService } from "@vmenv/api/agent/v1";
import { bind, type ServiceBinding } from "@vmenv/rpc";
import { type AcceleratorSetting, effectiveAccelerator } from "./accelerator.js";
import type { Capacity } from "./capacity.js";
import { toHostInfo, toPbCapacity } from "./convert.js";
import type { AcceleratorInfo, HostInventory } from "./inventory.js";
import { Sampler } from "./sampler.js";

export interface HostServiceDeps {
  /** Reads the inventory (static part cached by the source; memory, huge pages and uptime read anew). */
  inventory: () => Promise<Omit<HostInventory, "accelerators">>;
  /** The accelerator probes' results; resolves once they have run (they start with the agent). */
  accelerators: () => Promise<AcceleratorInfo[]>;
  setting: AcceleratorSetting;
  version: string;
  startTimeMs: number;
  now: () => number;
  /** How long one reading of the host's memory figures serves. Default 1000 ms. */
  sampleMaxAgeMs?: number;
  /** Allocatable and allocated capacity, computed at each call (VMs and GPUs change between samples). */
  capacity?: () => Promise<Capacity>;
}

/**
 * HostService. The answer is built once per sample of the host (at most one per `sampleMaxAgeMs`,
 * shared by concurrent calls); each call only stamps the agent's and the host's uptime.
 */
export function hostService(d: HostServiceDeps): ServiceBinding {
  const sampler = new Sampler(
    async (): Promise<HostInfo> => {
      const [inv, accelerators] = await Promise.all([d.inventory(), d.accelerators()]);
      return toHostInfo(
        { ...inv, accelerators },
        {
          version: d.version,
          startTimeMs: d.startTimeMs,
          nowMs: d.now(),
          effectiveAccelerator: effectiveAccelerator(d.setting, accelerators),
        },
      );
    },
    d.sampleMaxAgeMs ?? 1000,
    d.now,
  );
  return bind(HostService, {
    async getHostInfo() {
      const [{ at, value }, capacity] = await Promise.all([sampler.get(), d.capacity?.()]);
      const now = d.now();
      const hostUptimeMs =
        value.hostUptime === undefined
          ? 0
          : Number(value.hostUptime.seconds) * 1000 + value.hostUptime.nanos / 1e6;
      return {
        ...value,
        ...(capacity ? { capacity: toPbCapacity(capacity) } : {}),
        agentUptime: durationFromMs(now - d.startTimeMs),
        hostUptime: durationFromMs(Math.round(hostUptimeMs + (now - at))),
      };
    },
  });
}
