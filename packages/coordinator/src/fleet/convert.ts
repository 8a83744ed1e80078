import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import {
  type Agent,
  AgentSchema,
  AgentState,
  type Usage as PbUsage,
  type RebalanceFleetResponse,
  RebalanceFleetResponseSchema,
  UsageSchema,
} from "@vmenv/api/coordinator/v1";
import type { Usage } from "../domain/usage.js";
import type { AgentStateName, AgentView } from "./fleet.js";
import type { RebalanceResult } from "./rebalance.js";

const STATES: Record<AgentStateName, AgentState> = {
  ready: AgentState.READY,
  cordoned: AgentState.CORDONED,
  draining: AgentState.DRAINING,
  down: AgentState.DOWN,
};

export function toPbState(s: AgentStateName): AgentState {
  return STATES[s];
}

export function toPbUsage(u: Usage): PbUsage {
  return create(UsageSchema, {
    vms: u.vms,
    vcpus: u.vcpus,
    memoryBytes: u.memoryBytes,
    blockBytes: u.blockBytes,
    gpus: u.gpus,
    gpuMemoryBytes: u.gpuMemoryBytes,
  });
}

/** An agent for the API. */
export function toPbAgent(v: AgentView): Agent {
  return create(AgentSchema, {
    name: `agents/${v.id}`,
    address: v.address,
    labels: v.labels,
    state: toPbState(v.state),
    stateMessage: v.stateMessage,
    ...(v.lastHeartbeatMs !== undefined ? { lastHeartbeatTime: timestampFromMs(v.lastHeartbeatMs) } : {}),
    ...(v.host ? { host: v.host } : {}),
    allocated: toPbUsage(v.allocated),
    createTime: timestampFromMs(v.createMs),
    updateTime: timestampFromMs(v.updateMs),
    etag: v.etag,
    operation: v.operation ? `operations/${v.operation}` : "",
  });
}

/** A rebalancer pass for the API. */
export function toPbRebalance(r: RebalanceResult): RebalanceFleetResponse {
  return create(RebalanceFleetResponseSchema, {
    watermark: r.watermark,
    reason: r.reason,
    moves: r.moves.map((m) => ({
      environment: `environments/${m.env}`,
      memberId: m.member,
      usage: toPbUsage(m.usage),
      sourceAgent: `agents/${m.from}`,
      destinationAgent: `agents/${m.to}`,
      sourceLoadBefore: m.sourceLoadBefore,
      sourceLoadAfter: m.sourceLoadAfter,
      destinationLoadBefore: m.destinationLoadBefore,
      destinationLoadAfter: m.destinationLoadAfter,
      operation: m.operation ? `operations/${m.operation}` : "",
    })),
  });
}
