import type { Client } from "@connectrpc/connect";
import type {
  BlockService,
  DiagnosticsService,
  HostService,
  NetworkService,
  VmService,
} from "@vmenv/api/agent/v1";

/** What the coordinator calls on one agent (over its TCP endpoint). */
export interface AgentClients {
  host: Client<typeof HostService>;
  vms: Client<typeof VmService>;
  blocks: Client<typeof BlockService>;
  networks: Client<typeof NetworkService>;
  diagnostics: Client<typeof DiagnosticsService>;
}

/** Clocks are injected so tests can move time (deadlines, heartbeats, reservations). */
export interface Clock {
  now(): number;
}

export const systemClock: Clock = { now: () => Date.now() };
