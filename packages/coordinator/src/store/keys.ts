/**
 * The coordinator's key layout. One prefix per record type; `/` separates the parts of a key. Ids are
 * restricted to `[a-z0-9-]` (tree paths add `/` between segments), so no part can contain a separator.
 *
 * | key                                  | value                                                |
 * |--------------------------------------|------------------------------------------------------|
 * | `meta/layout`                        | layout version of the whole store                    |
 * | `node/{path}`                        | tree node: description, labels, policy, times, etag  |
 * | `usage/{path}`                       | usage of the node's whole subtree (claims included); |
 * |                                      | absent = zero                                        |
 * | `nodereq/{request id}`               | first result of a tree mutation with that request id |
 * | `agent/{agent}`                      | fleet agent: address, labels, state, last heartbeat  |
 * | `alloc/{agent}`                      | usage placed on the agent (claims included)          |
 * | `agentreq/{request id}`              | what an AgentService request id did, for its replay  |
 * | `env/{env}`                          | environment: node, members (spec, agent, state, outputs) |
 * | `op/{op}`                            | operation with its steps and step data               |
 * | `opreq/{request id}`                 | id of the operation a request id started             |
 * | `lock/{env}`                         | id of the operation holding the environment's lock   |
 * | `claim/{op}.{member}`                 | reservation: agent, usage, tree node, deadline, owner |
 * |                                      | (a migration's: `migrationFrom` = source agent; it     |
 * |                                      | counts on the destination's `alloc/` only, not `usage/`) |
 * | `move/{op}.{member}`                  | room a reschedule charged on the new agent before  |
 * |                                      | its switch (agent, usage); undone on rollback       |
 * | `rebalance/{env}`                    | the rebalancer's last move of the environment:      |
 * |                                      | member, agents, request id, operation, start (its   |
 * |                                      | cooldown runs from the operation's end)             |
 * | `addr/{network}/{address}`           | an address of a shared (uplinked) network held by a |
 * |                                      | member's NIC: environment, member, NIC id (ADR 20)   |
 *
 * Records of one change are written in one transaction (store.ts), e.g. a member's VM record, its
 * agent's `alloc/`, and `usage/` of every ancestor of its node.
 */
export const keys = {
  layout: "meta/layout",
  node: (path: string) => `node/${path}`,
  nodePrefix: "node/",
  usage: (path: string) => `usage/${path}`,
  nodeRequest: (requestId: string) => `nodereq/${requestId}`,
  agent: (id: string) => `agent/${id}`,
  agentPrefix: "agent/",
  alloc: (id: string) => `alloc/${id}`,
  allocPrefix: "alloc/",
  agentRequest: (requestId: string) => `agentreq/${requestId}`,
  env: (id: string) => `env/${id}`,
  envPrefix: "env/",
  op: (id: string) => `op/${id}`,
  opPrefix: "op/",
  opRequest: (requestId: string) => `opreq/${requestId}`,
  lock: (env: string) => `lock/${env}`,
  lockPrefix: "lock/",
  claim: (id: string) => `claim/${id}`,
  claimPrefix: "claim/",
  move: (id: string) => `move/${id}`,
  movePrefix: "move/",
  rebalance: (env: string) => `rebalance/${env}`,
  rebalancePrefix: "rebalance/",
  address: (network: string, ip: string) => `addr/${network}/${ip}`,
  /** The addresses held on one network: `addressPrefix("lan")`; every network: `addressPrefix()`. */
  addressPrefix: (network?: string) => (network === undefined ? "addr/" : `addr/${network}/`),
} as const;

/** The layout version this coordinator writes and reads. */
export const LAYOUT_VERSION = 1;
