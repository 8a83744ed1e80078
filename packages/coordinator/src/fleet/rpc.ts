import { durationMs } from "@bufbuild/protobuf/wkt";
import { AgentService, AgentState, type DrainAgentRequest, type Operation } from "@vmenv/api/coordinator/v1";
import { bind, invalidArgument, noFilter, page, type ServiceBinding, unimplemented } from "@vmenv/rpc";
import { toPbAgent, toPbRebalance, toPbState } from "./convert.js";
import { checkDrainable } from "./drain.js";
import { agentIdFromName, checkAgentId, type Fleet } from "./fleet.js";
import { checkWatermark, type Rebalancer } from "./rebalance.js";

/** Starts an "agent.drain" operation (drain.ts) for a checked request. */
export type StartDrain = (
  agent: string,
  req: { reason: string; settings: DrainAgentRequest["migration"]; timeoutMs: number; requestId: string },
) => Promise<Operation>;

/** AgentService: check, convert, call the fleet, convert back. */
export function agentService(
  fleet: Fleet,
  opts: {
    drain?: StartDrain;
    /** EvacuateAgent (evacuate.ts): checks the agent and starts an "agent.evacuate" operation. */
    evacuate?: (agent: string, requestId: string, force: boolean) => Promise<Operation>;
    /** RebalanceFleet (rebalance.ts): one pass of the rebalancer. */
    rebalancer?: Pick<Rebalancer, "runOnce">;
  } = {},
): ServiceBinding {
  return bind(AgentService, {
    async registerAgent(req) {
      checkAgentId(req.agentId);
      if (!req.agent) throw invalidArgument("agent", "is required (with its address)");
      if (!req.agent.address) throw invalidArgument("agent.address", "is required (host:port)");
      return toPbAgent(await fleet.register(req.agentId, req.agent.address, req.agent.labels, req.requestId));
    },
    async getAgent(req) {
      return toPbAgent(fleet.get(agentIdFromName(req.name)));
    },
    async listAgents(req) {
      noFilter(req.filter, "use states and labels");
      for (const s of req.states)
        if (!(s in AgentState) || s === AgentState.UNSPECIFIED)
          throw invalidArgument("states", `${s} is not an agent state`);
      const wanted = new Set(req.states);
      const all = fleet
        .views()
        .filter((v) => wanted.size === 0 || wanted.has(toPbState(v.state)))
        .filter((v) => Object.entries(req.labels).every(([k, x]) => v.labels[k] === x));
      const p = page(all, (v) => v.id, req.pageSize, req.pageToken);
      return { agents: p.items.map(toPbAgent), nextPageToken: p.next };
    },
    async updateAgent(req) {
      if (!req.agent) throw invalidArgument("agent", "is required");
      const id = agentIdFromName(req.agent.name, "agent.name");
      const paths = req.updateMask?.paths ?? [];
      if (paths.length === 0)
        throw invalidArgument("update_mask", 'name the fields to change: "labels" and/or "address"');
      const change: { labels?: Record<string, string>; address?: string } = {};
      for (const p of paths) {
        if (p === "labels") change.labels = req.agent.labels;
        else if (p === "address") change.address = req.agent.address;
        else
          throw invalidArgument(
            "update_mask",
            `"${p.slice(0, 80)}" cannot be changed; only labels and address`,
          );
      }
      return toPbAgent(await fleet.update(id, change, req.agent.etag, req.requestId));
    },
    async cordonAgent(req) {
      return toPbAgent(await fleet.cordon(agentIdFromName(req.name), req.reason, req.requestId));
    },
    async uncordonAgent(req) {
      return toPbAgent(await fleet.uncordon(agentIdFromName(req.name), req.requestId));
    },
    async drainAgent(req) {
      const id = agentIdFromName(req.name);
      if (!opts.drain) throw unimplemented("DrainAgent", "this coordinator has no operation engine wired");
      const view = fleet.get(id);
      checkDrainable(view);
      if (req.timeout && durationMs(req.timeout) < 0)
        throw invalidArgument("timeout", "must not be negative");
      return opts.drain(id, {
        reason: req.reason,
        settings: req.migration,
        timeoutMs: req.timeout ? durationMs(req.timeout) : 0,
        requestId: req.requestId,
      });
    },
    async evacuateAgent(req) {
      const id = agentIdFromName(req.name);
      if (!opts.evacuate) throw unimplemented("EvacuateAgent", "this coordinator has no operation engine");
      return opts.evacuate(id, req.requestId, req.force);
    },
    async rebalanceFleet(req) {
      if (req.watermark !== undefined) checkWatermark(req.watermark);
      if (!opts.rebalancer) throw unimplemented("RebalanceFleet", "this coordinator has no rebalancer wired");
      return toPbRebalance(
        await opts.rebalancer.runOnce({
          ...(req.watermark !== undefined ? { watermark: req.watermark } : {}),
          dryRun: req.dryRun,
          requestId: req.requestId,
        }),
      );
    },
    async removeAgent(req) {
      await fleet.remove(agentIdFromName(req.name), {
        force: req.force,
        allowMissing: req.allowMissing,
        requestId: req.requestId,
      });
      return {};
    },
  });
}
