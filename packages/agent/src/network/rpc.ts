import { anyPack } from "@bufbuild/protobuf/wkt";
import { NetworkSchema, NetworkService, PortSchema } from "@vmenv/api/agent/v1";
import { bind, invalidArgument, type ServiceBinding } from "@vmenv/rpc";
import { noFilter, page } from "../paging.js";
import { fromPbNetwork, toPbNetwork, toPbPort } from "./convert.js";
import { checkId, networkIdFromName, portFromName, vmIdOf } from "./domain.js";
import type { NetworkManager, NetworkView, PortView } from "./manager.js";

/**
 * Packs a network result for the API (for operations that carry one): a network becomes a Network, a
 * port a Port; anything else undefined (so the agent can chain it with the others).
 */
export function packResult(r: unknown) {
  if (r === null || typeof r !== "object" || !("kind" in r)) return undefined;
  switch (r.kind) {
    case "network":
      return anyPack(NetworkSchema, toPbNetwork(r as NetworkView));
    case "port":
      return anyPack(PortSchema, toPbPort(r as PortView));
    default:
      return undefined;
  }
}

/** NetworkService: check, convert, call the manager, convert back. Create and Delete are quick, so they
 * answer with the resource (and Empty) as the proto says, not an operation. */
export function networkService(m: NetworkManager): ServiceBinding {
  return bind(NetworkService, {
    async createNetwork(req) {
      checkId("network", req.networkId, "network_id");
      if (!req.network) throw invalidArgument("network", "is required");
      return toPbNetwork(await m.createNetwork(req.networkId, fromPbNetwork(req.network)));
    },
    async getNetwork(req) {
      return toPbNetwork(await m.getNetwork(networkIdFromName(req.name)));
    },
    async listNetworks(req) {
      noFilter(req.filter);
      const p = page(await m.listNetworks(), (n) => n.record.id, req.pageSize, req.pageToken);
      return { networks: p.items.map(toPbNetwork), nextPageToken: p.next };
    },
    async deleteNetwork(req) {
      await m.deleteNetwork(networkIdFromName(req.name), { allowMissing: req.allowMissing });
      return {};
    },
    async getPort(req) {
      const [n, p] = portFromName(req.name);
      return toPbPort(await m.getPort(n, p));
    },
    async listPorts(req) {
      noFilter(req.filter);
      const network = req.parent === "networks/-" ? undefined : networkIdFromName(req.parent, "parent");
      const vm = req.vm ? vmIdOf(req.vm, "vm") : undefined;
      if (req.vm && !req.vm.startsWith("vms/"))
        throw invalidArgument("vm", `"${req.vm.slice(0, 80)}" is not a VM name (vms/{vm})`);
      const all = await m.listPorts({ ...(network ? { network } : {}), ...(vm ? { vm } : {}) });
      const p = page(all, (x) => `${x.record.network}/${x.record.id}`, req.pageSize, req.pageToken);
      return { ports: p.items.map(toPbPort), nextPageToken: p.next };
    },
  });
}
