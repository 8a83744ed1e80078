import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import {
  type Agent,
  AgentSchema,
  AgentState,
  type Usage as PbUsage,
  UsageSchema,
} from "@vmenv/api/coordinator/v1";
import type { Usage } from "../domain/usage.js";
import type { AgentStateName, AgentView } from "./fleet.js";

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
