import { anyPack } from "@bufbuild/protobuf/wkt";
import { GpuSchema, GpuService } from "@vmenv/api/agent/v1";
import { bind, type ServiceBinding } from "@vmenv/rpc";
import { toPbOperation } from "../diagnostics/convert.js";
import { noFilter, page } from "../paging.js";
import { vmIdFromName } from "../vmm/domain.js";
import { fromPbGpuState, toPbGpu } from "./convert.js";
import { type GpuView, gpuAddressFromName } from "./domain.js";
import type { GpuManager } from "./manager.js";

/** Packs a GPU operation's result (a GpuView) for the API; anything else undefined. */
export function packResult(r: unknown) {
  if (r === null || typeof r !== "object" || !("vendorId" in r) || !("iommuGroupDevices" in r))
    return undefined;
  return anyPack(GpuSchema, toPbGpu(r as GpuView));
}

/** GpuService: check, convert, call the manager, convert back. */
export function gpuService(m: GpuManager): ServiceBinding {
  const op = (o: Parameters<typeof toPbOperation>[0]) => toPbOperation(o, packResult);
  return bind(GpuService, {
    async listGpus(req) {
      noFilter(req.filter, "use states and vm");
      const states = new Set(req.states.map(fromPbGpuState));
      const vm = req.vm ? `vms/${vmIdFromName(req.vm, "vm")}` : undefined;
      const all = (await m.list()).filter(
        (g) => (states.size === 0 || states.has(g.state)) && (vm === undefined || g.vm === vm),
      );
      const p = page(all, (g) => g.address, req.pageSize, req.pageToken);
      return { gpus: p.items.map(toPbGpu), nextPageToken: p.next };
    },
    async getGpu(req) {
      return toPbGpu(await m.get(gpuAddressFromName(req.name)));
    },
    async assignGpu(req) {
      const address = gpuAddressFromName(req.name);
      const vm = `vms/${vmIdFromName(req.vm, "vm")}`;
      return op(await m.assign(address, vm, req.requestId));
    },
    async releaseGpu(req) {
      return op(await m.release(gpuAddressFromName(req.name), req.requestId));
    },
  });
}
