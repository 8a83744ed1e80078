/**
 * Fleet vocabulary shared by the fleet (fleet.ts) and placement (placement/place.ts): plain data, no I/O.
 */

/** Whether an agent takes work (AgentState in the API, lower-case). */
export type AgentStateName = "ready" | "cordoned" | "draining" | "down";

/**
 * What an agent offers to VMs (its allocatable figures). Derived from the agent's HostInfo.capacity;
 * see `capacityFromHost` in fleet.ts for the fallback when an agent does not report capacity.
 */
export interface AgentCapacity {
  vcpus: number;
  memoryBytes: bigint;
  gpus: number;
  gpuMemoryBytes: bigint;
}

/**
 * A network as an agent reports it (ListNetworks), reduced to what the coordinator needs to tell a
 * shared network from a local one and to allocate its addresses (ADR 20).
 */
export interface AgentNetwork {
  [k: string]: string;
  /** `networks/{network}`. */
  name: string;
  /** IPv4 subnet, e.g. "10.20.0.0/24". */
  cidr: string;
  /** The guests' default gateway. */
  gateway: string;
  /** The host interface joining it to a segment shared with other hosts; "" for a local network. */
  uplink: string;
}
