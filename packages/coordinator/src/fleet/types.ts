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
