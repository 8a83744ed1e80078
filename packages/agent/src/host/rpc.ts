import { HostService } from "@vmenv/api/agent/v1";
import { bind, type ServiceBinding } from "@vmenv/rpc";
import { type AcceleratorSetting, effectiveAccelerator } from "./accelerator.js";
import { type AgentFacts, toHostInfo } from "./convert.js";
import type { AcceleratorInfo, HostInventory } from "./inventory.js";

export interface HostServiceDeps {
  /** The inventory as of now (static part cached, memory and uptime read per call). */
  inventory: () => Promise<Omit<HostInventory, "accelerators">>;
  /** The accelerator probes' results; resolves once they have run (they start with the agent). */
  accelerators: () => Promise<AcceleratorInfo[]>;
  setting: AcceleratorSetting;
  version: string;
  startTimeMs: number;
  now: () => number;
}

/** HostService: check, convert, call, convert back. */
export function hostService(d: HostServiceDeps): ServiceBinding {
  return bind(HostService, {
    async getHostInfo() {
      const [inv, accelerators] = await Promise.all([d.inventory(), d.accelerators()]);
      const facts: AgentFacts = {
        version: d.version,
        startTimeMs: d.startTimeMs,
        nowMs: d.now(),
        effectiveAccelerator: effectiveAccelerator(d.setting, accelerators),
      };
      return toHostInfo({ ...inv, accelerators }, facts);
    },
  });
}
