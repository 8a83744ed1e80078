/**
 * The fleet: the agents the coordinator places VMs on, their connections, their health and what the
 * coordinator has placed on each.
 *
 * Records: `agent/{agent}` (address, labels, cordon, down flag, last heartbeat, last inventory) and
 * `alloc/{agent}` (usage placed there, written by `charge`/`release` in the caller's transaction).
 * The fleet keeps every agent in memory as well (a coordinator holds thousands, not millions), so
 * placement and the RPC layer read without touching the store.
 *
 * Health: every `heartbeatIntervalMs` each agent is called (HostService.GetHostInfo with a deadline;
 * its network list is refreshed every few beats). The time of the last answer is kept in memory and
 * persisted at most every HEARTBEAT_PERSIST_MS, or at once on a state change. An agent not reached
 * for `heartbeatTimeoutMs` is DOWN (event `down`); when it answers again it is up (event `up`), READY
 * or still CORDONED. After a coordinator (re)start every agent gets a full timeout before it can be
 * marked DOWN, so a coordinator that was itself away does not condemn the whole fleet at once.
 */
import { EventEmitter } from "node:events";
import { fromJson, toJson } from "@bufbuild/protobuf";
import { ConnectError, createClient } from "@connectrpc/connect";
import {
  BlockService,
  DiagnosticsService,
  type HostInfo,
  HostInfoSchema,
  HostService,
  NetworkService,
  VmService,
} from "@vmenv/api/agent/v1";
import { createDaemonTransport, type Logger } from "@vmenv/rpc";
import { alreadyExists, failedPrecondition, invalidArgument, notFound, VmenvError } from "@vmenv/rpc/errors";
import {
  addUsage,
  isZeroUsage,
  type StoredUsage,
  subUsage,
  type Usage,
  usageFromStore,
  usageToStore,
} from "../domain/usage.js";
import type { AgentClients, Clock } from "../ports.js";
import { keys } from "../store/keys.js";
import type { JsonValue, Store, Txn } from "../store/store.js";
import type { AgentCapacity, AgentNetwork, AgentStateName } from "./types.js";

export type { AgentCapacity, AgentNetwork, AgentStateName } from "./types.js";

/** An agent as the rest of the coordinator sees it. */
export interface AgentView {
  /** Bare id (`a1`; the API name is `agents/a1`). */
  id: string;
  /** TCP endpoint, "host:port". */
  address: string;
  labels: Record<string, string>;
  state: AgentStateName;
  /** Why it is in its state, e.g. "cordoned: disk swap", "no heartbeat since …: connection refused". */
  stateMessage: string;
  /** When the coordinator last reached the agent (ms since the epoch). */
  lastHeartbeatMs?: number;
  /** The agent's last inventory. */
  host?: HostInfo;
  /** What the agent offers to VMs (allocatable figures). */
  capacity: AgentCapacity;
  /** What the coordinator has placed there (alloc/ records; claims included). */
  allocated: Usage;
  /** Networks present on the agent, "networks/x". */
  networks: string[];
  /**
   * The same networks with their CIDR, gateway and uplink (a network with an uplink is shared with the
   * other agents that report it with one: ADR 20). Absent or empty: not known yet.
   */
  networkDetails?: AgentNetwork[];
  createMs: number;
  updateMs: number;
  /** Changes with address, labels and state (not with heartbeats). */
  etag: string;
  /** Id of the drain operation running on it (state DRAINING), if any. */
  operation?: string;
}

/** Memory kept back from an agent that does not report its capacity (HostInfo.capacity). */
export const FALLBACK_RESERVED_MEMORY = 1024n * 1024n * 1024n;
/** vCPU overcommit assumed for an agent that does not report its capacity. */
export const FALLBACK_CPU_OVERCOMMIT = 4;
/** The last heartbeat is written to the store at most this often (and on every state change). */
export const HEARTBEAT_PERSIST_MS = 5000;
/** The agent's network list is refreshed every this many heartbeats (and whenever it comes back). */
const NETWORK_REFRESH_BEATS = 10;

/**
 * What an agent offers: its reported allocatable figures (HostInfo.capacity) when it reports them;
 * otherwise its CPU threads × FALLBACK_CPU_OVERCOMMIT and its memory less FALLBACK_RESERVED_MEMORY,
 * no GPUs.
 */
export function capacityFromHost(host: HostInfo | undefined): AgentCapacity {
  const c = host?.capacity;
  if (c && (c.vcpusAllocatable > 0 || c.memoryAllocatableBytes > 0n)) {
    return {
      vcpus: c.vcpusAllocatable,
      memoryBytes: c.memoryAllocatableBytes,
      gpus: c.gpusTotal,
      gpuMemoryBytes: c.gpuMemoryTotalBytes,
    };
  }
  const total = host?.memory?.totalBytes ?? 0n;
  return {
    vcpus: (host?.cpu?.threads ?? 0) * FALLBACK_CPU_OVERCOMMIT,
    memoryBytes: total > FALLBACK_RESERVED_MEMORY ? total - FALLBACK_RESERVED_MEMORY : 0n,
    gpus: 0,
    gpuMemoryBytes: 0n,
  };
}

// ---- validation ---------------------------------------------------------------------------------

/** AIP-122 ids, the rules of VM ids: lower-case letters, digits and hyphens, at most 63. */
const ID = /^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$/;

/** Throws INVALID_ARGUMENT (INVALID_AGENT_ID) unless `id` follows the rules of VM ids. */
export function checkAgentId(id: string, field = "agent_id"): void {
  if (!ID.test(id))
    throw invalidArgument(
      field,
      `"${id.slice(0, 80)}" is not a valid agent id: use 1-63 lower-case letters, digits and hyphens, starting with a letter and not ending with a hyphen`,
      "INVALID_AGENT_ID",
    );
}

/** `agents/{agent}` → id (INVALID_ARGUMENT otherwise). */
export function agentIdFromName(name: string, field = "name"): string {
  if (!name.startsWith("agents/"))
    throw invalidArgument(
      field,
      `"${name.slice(0, 80)}" is not an agent name (agents/{agent})`,
      "INVALID_AGENT_NAME",
    );
  const id = name.slice("agents/".length);
  checkAgentId(id, field);
  return id;
}

/** Throws INVALID_ARGUMENT (INVALID_AGENT_ADDRESS) unless `address` is "host:port" with a port 1-65535. */
export function checkAddress(address: string, field = "agent.address"): void {
  const m = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252}):(\d{1,5})$/.exec(address);
  const port = Number(m?.[2]);
  if (!m || port < 1 || port > 65535)
    throw invalidArgument(
      field,
      `"${address.slice(0, 120)}" is not host:port (e.g. host-7.dc1.example:7443 or 10.0.0.7:7443)`,
      "INVALID_AGENT_ADDRESS",
    );
}

// ---- records ------------------------------------------------------------------------------------

interface StoredAgent {
  address: string;
  labels: Record<string, string>;
  cordoned: boolean;
  cordonReason: string;
  /** Id of the drain operation moving its members away (cordoned while it runs: DRAINING). */
  drainOp?: string;
  down: boolean;
  downMessage: string;
  /** Set while a DOWN agent that answers again is being fenced (fencing.ts); cleared at start. */
  fencing?: boolean;
  /**
   * Id of the EvacuateAgent (force) operation that marked it DOWN: while it runs, answered heartbeats
   * neither fence it nor bring it back. Cleared in that operation's final transaction.
   */
  evacuation?: string;
  /** When it was marked DOWN. */
  downSinceMs?: number;
  lastHeartbeatMs?: number;
  /** HostInfo as proto JSON. */
  host?: JsonValue;
  networks: string[];
  /** CIDR, gateway and uplink of each network; absent in records written before ADR 20. */
  networkDetails?: AgentNetwork[];
  createMs: number;
  updateMs: number;
  /** Bumped on every change of address, labels or state: the etag. */
  gen: number;
  [k: string]: JsonValue | undefined;
}

/** `agentreq/{request id}`: what a request id did, for replay. */
interface StoredRequest {
  method: string;
  agent: string;
  atMs: number;
  [k: string]: JsonValue | undefined;
}

interface Entry {
  id: string;
  rec: StoredAgent;
  host: HostInfo | undefined;
  alloc: Usage;
  clients: AgentClients;
  close: () => void;
  /** Last successful heartbeat (in memory; persisted at most every HEARTBEAT_PERSIST_MS). */
  lastOkMs: number | undefined;
  lastPersistMs: number;
  lastError: string;
  beats: number;
  inFlight: boolean;
}

export interface FleetOptions {
  store: Store;
  clock: Clock;
  logger: Logger;
  heartbeatIntervalMs: number;
  heartbeatTimeoutMs: number;
  /** Clients of an agent at `address` (default: gRPC over TCP with @vmenv/rpc's transport). */
  connect?: (address: string) => AgentClients;
  /** Do not run heartbeats on a timer (tests call `heartbeatOnce`). */
  manualHeartbeat?: boolean;
  /**
   * Fences a DOWN agent that answers again, before it is READY (fencing.ts): destroys its copies that
   * were replaced elsewhere. Absent: a returning agent is READY at once.
   */
  fence?: (id: string, clients: AgentClients) => Promise<void>;
}

/** Clients of the agent at `address`, over one HTTP/2 transport. */
export function connectAgent(address: string): AgentClients {
  const transport = createDaemonTransport({ address });
  return {
    host: createClient(HostService, transport),
    vms: createClient(VmService, transport),
    blocks: createClient(BlockService, transport),
    networks: createClient(NetworkService, transport),
    diagnostics: createClient(DiagnosticsService, transport),
  };
}

const agentName = (id: string) => `agents/${id}`;

function errorText(err: unknown): string {
  if (err instanceof ConnectError) return err.rawMessage;
  return err instanceof Error ? err.message : String(err);
}

/**
 * The fleet. Events: `changed` (address, labels, state or allocation of an agent changed), `down` (an
 * agent missed its heartbeat deadline), `up` (a DOWN agent answers again). The collector and fencing
 * (issue 7) attach to `down`/`up`.
 */
export class Fleet extends EventEmitter<{ changed: [AgentView]; down: [AgentView]; up: [AgentView] }> {
  readonly #o: FleetOptions;
  readonly #connect: (address: string) => AgentClients;
  readonly #agents = new Map<string, Entry>();
  #timer: NodeJS.Timeout | undefined;
  /** Heartbeats in flight (each agent has at most one; a slow agent does not hold the others back). */
  readonly #beating = new Set<Promise<void>>();
  /** Agents are not marked DOWN before a full timeout after this (the fleet's start). */
  #graceFromMs = 0;
  #stopped = false;

  constructor(opts: {
    store: Store;
    clock: Clock;
    logger: Logger;
    heartbeatIntervalMs: number;
    heartbeatTimeoutMs: number;
    connect?: (address: string) => AgentClients;
    manualHeartbeat?: boolean;
    fence?: (id: string, clients: AgentClients) => Promise<void>;
  }) {
    super();
    this.#o = opts;
    this.#connect = opts.connect ?? connectAgent;
  }

  /** Loads the agents from the store and starts their heartbeats. */
  async start(): Promise<void> {
    this.#graceFromMs = this.#o.clock.now();
    const allocs = new Map<string, Usage>();
    for (const [k, v] of await this.#o.store.list<StoredUsage>(keys.allocPrefix))
      allocs.set(k.slice(keys.allocPrefix.length), usageFromStore(v));
    for (const [k, stored] of await this.#o.store.list<StoredAgent>(keys.agentPrefix)) {
      const id = k.slice(keys.agentPrefix.length);
      // A fencing cut short by a crash starts over when the agent answers (fencing is idempotent).
      const rec = stored.fencing ? await this.#setFencing(id, false, stored.downMessage) : stored;
      this.#add(id, rec ?? stored, allocs.get(id));
    }
    this.#o.logger.info({ agents: this.#agents.size }, "fleet loaded");
    if (!this.#o.manualHeartbeat) {
      this.#timer = setInterval(() => {
        for (const e of this.#agents.values()) {
          if (e.inFlight) continue;
          const p = this.#beat(e).finally(() => this.#beating.delete(p));
          this.#beating.add(p);
        }
      }, this.#o.heartbeatIntervalMs);
      this.#timer.unref();
    }
  }

  /** Stops the heartbeats (waiting for those in flight) and drops every connection. */
  async stop(): Promise<void> {
    this.#stopped = true;
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = undefined;
    await Promise.all([...this.#beating]);
    for (const e of this.#agents.values()) e.close();
  }

  /** The agent `id`, or undefined. */
  view(id: string): AgentView | undefined {
    const e = this.#agents.get(id);
    return e ? this.#view(e) : undefined;
  }

  /** The agent `id`; NOT_FOUND (AGENT_NOT_FOUND) when it is not in the fleet. */
  get(id: string): AgentView {
    return this.#view(this.#entry(id));
  }

  /** Every agent, in id order. */
  views(): AgentView[] {
    return [...this.#agents.keys()].sort().map((id) => this.#view(this.#agents.get(id) as Entry));
  }

  /**
   * The clients of agent `id`. Throws NOT_FOUND (AGENT_NOT_FOUND) for an unknown agent, UNAVAILABLE
   * (AGENT_UNAVAILABLE) for a DOWN one; both name the agent.
   */
  clients(id: string): AgentClients {
    const e = this.#agents.get(id);
    if (!e) throw notFound("agent", agentName(id));
    if (e.rec.down)
      throw new VmenvError("unavailable", `agent ${agentName(id)} is down: ${e.rec.downMessage}`, {
        reason: "AGENT_UNAVAILABLE",
        metadata: { agent: agentName(id) },
      });
    return e.clients;
  }

  /**
   * The clients of agent `id` whether or not it is DOWN, for the callers that must reach an agent the
   * fleet has given up on: a forced evacuation stopping a live agent's copies. NOT_FOUND for an unknown
   * agent.
   */
  clientsEvenIfDown(id: string): AgentClients {
    const e = this.#agents.get(id);
    if (!e) throw notFound("agent", agentName(id));
    return e.clients;
  }

  /**
   * Adds `delta` to what is placed on agent `agentId` (`alloc/{agent}`), in the caller's transaction.
   * No capacity check (placement checks). NOT_FOUND for an agent not in the fleet.
   */
  async charge(tx: Txn, agentId: string, delta: Usage): Promise<void> {
    if (!(await tx.get(keys.agent(agentId)))) throw notFound("agent", agentName(agentId));
    const next = addUsage(usageFromStore(await tx.get<StoredUsage>(keys.alloc(agentId))), delta);
    tx.put(keys.alloc(agentId), usageToStore(next));
    tx.afterCommit(() => this.#allocated(agentId, next));
  }

  /**
   * Takes `delta` off what is placed on agent `agentId`, never below zero, in the caller's
   * transaction. Releasing on an agent no longer in the fleet does nothing.
   */
  async release(tx: Txn, agentId: string, delta: Usage): Promise<void> {
    const cur = await tx.get<StoredUsage>(keys.alloc(agentId));
    if (!cur) return;
    const next = subUsage(usageFromStore(cur), delta);
    if (isZeroUsage(next)) tx.del(keys.alloc(agentId));
    else tx.put(keys.alloc(agentId), usageToStore(next));
    tx.afterCommit(() => this.#allocated(agentId, next));
  }

  // ---- operations of the RPC layer --------------------------------------------------------------

  /**
   * Registers agent `id` at `address`: reaches it and reads its inventory first (UNAVAILABLE
   * AGENT_UNREACHABLE naming the address when it cannot). The same id and address again: no change.
   * A different address: ALREADY_EXISTS. An address registered under another id: ALREADY_EXISTS.
   */
  async register(
    id: string,
    address: string,
    labels: Record<string, string>,
    requestId = "",
  ): Promise<AgentView> {
    checkAgentId(id);
    checkAddress(address);
    checkLabels(labels, "agent.labels");
    const replay = await this.#replay(requestId, "register", id);
    if (replay) return replay;
    const same = this.#sameOrConflict(id, address);
    if (same) return same;
    const clients = this.#connect(address);
    let host: HostInfo;
    let networks: AgentNetwork[];
    try {
      ({ host, networks } = await this.#probe(clients, id, address));
    } catch (err) {
      closeClients(clients);
      throw err;
    }
    const now = this.#o.clock.now();
    const rec: StoredAgent = {
      address,
      labels: { ...labels },
      cordoned: false,
      cordonReason: "",
      down: false,
      downMessage: "",
      lastHeartbeatMs: now,
      host: toJson(HostInfoSchema, host) as JsonValue,
      networks: networks.map((n) => n.name),
      networkDetails: networks,
      createMs: now,
      updateMs: now,
      gen: 1,
    };
    const created = await this.#o.store.transact(async (tx) => {
      // A concurrent RegisterAgent of the same id may have won the race.
      const cur = await tx.get<StoredAgent>(keys.agent(id));
      if (cur) {
        if (cur.address !== address) throw alreadyExists("agent", agentName(id), `at ${cur.address}`);
        return false;
      }
      this.#remember(tx, requestId, "register", id);
      tx.put(keys.agent(id), rec);
      return true;
    });
    if (!created) {
      closeClients(clients);
      return this.view(id) as AgentView;
    }
    const e = this.#add(id, rec, undefined, clients, host);
    e.lastOkMs = now;
    e.lastPersistMs = now;
    this.#o.logger.info({ agent: id, address }, "agent registered");
    const v = this.#view(e);
    this.emit("changed", v);
    return v;
  }

  /** Changes labels and/or address (the new address is reached first). ABORTED on a stale etag. */
  async update(
    id: string,
    change: { labels?: Record<string, string>; address?: string },
    etag = "",
    requestId = "",
  ): Promise<AgentView> {
    if (change.labels) checkLabels(change.labels, "agent.labels");
    if (change.address !== undefined) checkAddress(change.address);
    const replay = await this.#replay(requestId, "update", id);
    if (replay) return replay;
    const e = this.#entry(id);
    this.#checkEtag(e, etag);
    let clients: AgentClients | undefined;
    let host: HostInfo | undefined;
    if (change.address !== undefined && change.address !== e.rec.address) {
      const other = this.#byAddress(change.address);
      if (other && other !== id)
        throw alreadyExists("agent", agentName(other), `at ${change.address}; one agent per address`);
      clients = this.#connect(change.address);
      try {
        ({ host } = await this.#probe(clients, id, change.address));
      } catch (err) {
        closeClients(clients);
        throw err;
      }
    }
    try {
      return await this.#mutate(
        id,
        requestId,
        "update",
        (rec) => {
          if (etag && etag !== String(rec.gen)) throw staleEtag(id);
          const labels = change.labels ?? rec.labels;
          const address = change.address ?? rec.address;
          if (sameLabels(labels, rec.labels) && address === rec.address) return undefined;
          return { ...rec, labels: { ...labels }, address };
        },
        (entry) => {
          if (clients) {
            entry.close();
            entry.clients = clients;
            entry.close = () => closeClients(clients as AgentClients);
            entry.host = host;
            entry.lastOkMs = this.#o.clock.now();
            clients = undefined;
          }
        },
      );
    } finally {
      if (clients) closeClients(clients);
    }
  }

  /** Stops placing on the agent. Cordoning a cordoned agent changes nothing. */
  async cordon(id: string, reason: string, requestId = ""): Promise<AgentView> {
    const replay = await this.#replay(requestId, "cordon", id);
    if (replay) return replay;
    this.#entry(id);
    return this.#mutate(id, requestId, "cordon", (rec) =>
      rec.cordoned ? undefined : { ...rec, cordoned: true, cordonReason: reason },
    );
  }

  /**
   * Marks the agent DRAINING by drain operation `op` (cordoning it), or, with `op` undefined, ends the
   * drain: the agent stays CORDONED.
   */
  async setDraining(id: string, op: string | undefined, reason = ""): Promise<AgentView> {
    this.#entry(id);
    return this.#mutate(id, "", "drain", (rec) => {
      if (op === undefined)
        return rec.drainOp === undefined ? undefined : { ...rec, cordoned: true, drainOp: undefined };
      if (rec.drainOp === op && rec.cordoned) return undefined;
      return { ...rec, cordoned: true, cordonReason: reason || rec.cordonReason || "drained", drainOp: op };
    });
  }

  /** Makes a CORDONED agent READY; FAILED_PRECONDITION (AGENT_DOWN) while it is DOWN. */
  async uncordon(id: string, requestId = ""): Promise<AgentView> {
    const replay = await this.#replay(requestId, "uncordon", id);
    if (replay) return replay;
    this.#entry(id);
    return this.#mutate(id, requestId, "uncordon", (rec) => {
      if (!rec.cordoned) return undefined;
      if (rec.drainOp)
        throw failedPrecondition(
          `agent ${agentName(id)} is being drained by operations/${rec.drainOp}; cancel it first`,
          "AGENT_DRAINING",
          { agent: agentName(id), operation: `operations/${rec.drainOp}` },
        );
      if (rec.down)
        throw failedPrecondition(
          `agent ${agentName(id)} is down (${rec.downMessage}); it can be uncordoned once it answers again`,
          "AGENT_DOWN",
          { agent: agentName(id) },
        );
      return { ...rec, cordoned: false, cordonReason: "" };
    });
  }

  /**
   * Takes the agent out of the fleet. FAILED_PRECONDITION (AGENT_IN_USE) while something is placed on
   * it, unless `force`. NOT_FOUND unless `allowMissing`.
   */
  async remove(id: string, opts: { force?: boolean; allowMissing?: boolean; requestId?: string } = {}) {
    const requestId = opts.requestId ?? "";
    checkAgentId(id, "name");
    if (requestId) {
      const seen = await this.#o.store.get<StoredRequest>(keys.agentRequest(requestId));
      if (seen && seen.method === "remove" && seen.agent === id) return;
      if (seen) throw requestReused(requestId);
    }
    let removed = false;
    await this.#o.store.transact(async (tx) => {
      const rec = await tx.get<StoredAgent>(keys.agent(id));
      if (!rec) {
        if (opts.allowMissing) return;
        throw notFound("agent", agentName(id));
      }
      const alloc = usageFromStore(await tx.get<StoredUsage>(keys.alloc(id)));
      if (!isZeroUsage(alloc) && !opts.force)
        throw failedPrecondition(
          `agent ${agentName(id)} still has ${alloc.vms} VMs, ${alloc.vcpus} vCPUs and ${alloc.memoryBytes} bytes of memory placed on it; move them first or remove it with force`,
          "AGENT_IN_USE",
          { agent: agentName(id) },
        );
      this.#remember(tx, requestId, "remove", id);
      tx.del(keys.agent(id));
      tx.del(keys.alloc(id));
      removed = true;
    });
    if (!removed) return;
    const e = this.#agents.get(id);
    this.#agents.delete(id);
    e?.close();
    this.#o.logger.info({ agent: id, force: !!opts.force }, "agent removed");
  }

  // ---- heartbeats -------------------------------------------------------------------------------

  /** One heartbeat round: every agent not already being called is called once. */
  async heartbeatOnce(): Promise<void> {
    await Promise.all([...this.#agents.values()].map((e) => this.#beat(e)));
  }

  /** Deadline of one heartbeat call. */
  get #callTimeoutMs(): number {
    return Math.min(this.#o.heartbeatTimeoutMs, Math.max(2 * this.#o.heartbeatIntervalMs, 1000));
  }

  async #beat(e: Entry): Promise<void> {
    if (e.inFlight || this.#stopped) return;
    e.inFlight = true;
    try {
      let info: HostInfo;
      let networks: AgentNetwork[] | undefined;
      try {
        info = await e.clients.host.getHostInfo({}, { timeoutMs: this.#callTimeoutMs });
        if (e.rec.down || e.beats % NETWORK_REFRESH_BEATS === 0)
          networks = await listNetworks(e.clients, this.#callTimeoutMs);
        e.beats++;
      } catch (err) {
        await this.#failed(e, errorText(err));
        return;
      }
      await this.#answered(e, info, networks);
    } catch (err) {
      // The store failed (closing): the next round tries again.
      this.#o.logger.warn({ agent: e.id, err: errorText(err) }, "heartbeat bookkeeping failed");
    } finally {
      e.inFlight = false;
    }
  }

  async #answered(e: Entry, info: HostInfo, networks: AgentNetwork[] | undefined): Promise<void> {
    if (this.#agents.get(e.id) !== e) return;
    const now = this.#o.clock.now();
    e.lastOkMs = now;
    e.host = info;
    e.lastError = "";
    const netsChanged =
      networks !== undefined && JSON.stringify(networks) !== JSON.stringify(e.rec.networkDetails ?? []);
    if (!e.rec.down && !netsChanged && now - e.lastPersistMs < HEARTBEAT_PERSIST_MS) return;
    const wasDown = e.rec.down;
    // Held DOWN by a forced evacuation: the answer is kept (in memory); fencing waits for its end.
    if (wasDown && e.rec.evacuation) return;
    if (wasDown && this.#o.fence && !(await this.#fenced(e))) return;
    const hostJson = toJson(HostInfoSchema, info) as JsonValue;
    const next = await this.#o.store.transact(async (tx) => {
      const rec = await tx.get<StoredAgent>(keys.agent(e.id));
      if (!rec) return undefined;
      if (rec.down && rec.evacuation) return undefined;
      const out: StoredAgent = { ...rec, lastHeartbeatMs: now, host: hostJson };
      if (networks) {
        out.networks = networks.map((n) => n.name);
        out.networkDetails = networks;
      }
      if (rec.down) {
        out.down = false;
        out.downMessage = "";
        out.fencing = false;
        out.gen = rec.gen + 1;
        out.updateMs = now;
      }
      tx.put(keys.agent(e.id), out);
      return out;
    });
    if (!next || this.#agents.get(e.id) !== e) return;
    e.rec = next;
    e.lastPersistMs = now;
    if (wasDown) {
      this.#o.logger.info({ agent: e.id }, "agent is up");
      const v = this.#view(e);
      this.emit("up", v);
      this.emit("changed", v);
    } else if (netsChanged) this.emit("changed", this.#view(e));
  }

  /**
   * Whether a DOWN agent that answers again may be READY: marks it fencing (persisted, so no member
   * is moved off it from now on — see `replaceable`), runs the fence, and clears the mark when the
   * fence fails (the agent stays DOWN; the next heartbeat tries again).
   */
  async #fenced(e: Entry): Promise<boolean> {
    const fence = this.#o.fence;
    if (!fence) return true;
    const downMessage = e.rec.downMessage.replace(/^fencing[^;]*; /, "");
    const marked = await this.#setFencing(
      e.id,
      true,
      `fencing: agents/${e.id} answers again; its copies replaced elsewhere are destroyed before it takes work; ${downMessage}`,
    );
    if (!marked || this.#agents.get(e.id) !== e) return false;
    e.rec = marked;
    this.emit("changed", this.#view(e));
    try {
      await fence(e.id, e.clients);
      this.#o.logger.info({ agent: e.id }, "agent fenced");
      return true;
    } catch (err) {
      this.#o.logger.warn({ agent: e.id, err: errorText(err) }, "fencing failed; the agent stays down");
      const back = await this.#setFencing(e.id, false, `fencing failed: ${errorText(err)}; ${downMessage}`);
      if (back && this.#agents.get(e.id) === e) {
        e.rec = back;
        this.emit("changed", this.#view(e));
      }
      return false;
    }
  }

  /** Sets or clears the fencing mark of a DOWN agent (with its down message); undefined if not DOWN. */
  async #setFencing(id: string, on: boolean, downMessage: string): Promise<StoredAgent | undefined> {
    const now = this.#o.clock.now();
    return this.#o.store.transact(async (tx) => {
      const rec = await tx.get<StoredAgent>(keys.agent(id));
      if (!rec?.down || (on && rec.evacuation)) return undefined;
      const out: StoredAgent = { ...rec, fencing: on, downMessage, gen: rec.gen + 1, updateMs: now };
      tx.put(keys.agent(id), out);
      return out;
    });
  }

  /**
   * Whether members may be moved off agent `id` now, read in the caller's transaction: the agent is
   * DOWN and not being fenced. A move commits only while this holds, so a fence that starts later sees
   * it (and destroys the old copy) before the agent is READY again.
   */
  async replaceable(tx: Txn, id: string): Promise<boolean> {
    const rec = await tx.get<StoredAgent>(keys.agent(id));
    return !!rec?.down && !rec.fencing;
  }

  /** When agent `id` was marked DOWN (ms since the epoch), or undefined while it is not DOWN. */
  downSinceMs(id: string): number | undefined {
    const e = this.#agents.get(id);
    return e?.rec.down ? (e.rec.downSinceMs ?? e.rec.updateMs) : undefined;
  }

  async #failed(e: Entry, why: string): Promise<void> {
    if (this.#agents.get(e.id) !== e) return;
    e.lastError = why;
    const now = this.#o.clock.now();
    const since = Math.max(e.lastOkMs ?? 0, this.#graceFromMs);
    if (e.rec.down || now - since < this.#o.heartbeatTimeoutMs) return;
    const last = e.lastOkMs ?? e.rec.lastHeartbeatMs;
    const message = `no heartbeat since ${last ? new Date(last).toISOString() : "the coordinator started"}: ${why}`;
    const next = await this.#o.store.transact(async (tx) => {
      const rec = await tx.get<StoredAgent>(keys.agent(e.id));
      if (!rec || rec.down) return undefined;
      const out = this.#downRecord(e, rec, message, now);
      tx.put(keys.agent(e.id), out);
      return out;
    });
    if (!next || this.#agents.get(e.id) !== e) return;
    e.rec = next;
    this.#wentDown(e, why);
  }

  /** `rec` marked DOWN now with `message` (the last answer's time kept). */
  #downRecord(e: Entry, rec: StoredAgent, message: string, now: number): StoredAgent {
    return {
      ...rec,
      down: true,
      downMessage: message,
      downSinceMs: now,
      gen: rec.gen + 1,
      updateMs: now,
      ...(e.lastOkMs !== undefined ? { lastHeartbeatMs: e.lastOkMs } : {}),
    };
  }

  /** After a DOWN mark is committed: log it, and emit `down` (members become LOST) and `changed`. */
  #wentDown(e: Entry, why: string): void {
    this.#o.logger.warn({ agent: e.id, why }, "agent is down");
    const v = this.#view(e);
    this.emit("down", v);
    this.emit("changed", v);
  }

  /**
   * Marks agent `id` DOWN now, as a missed heartbeat deadline does (same record, same `down` event, so
   * its members become LOST and the kinds' `isDown` hooks run), and holds it DOWN for operation `op`
   * (EvacuateAgent with force): heartbeats it answers are noted but neither fence it nor make it READY
   * until `releaseHold` runs in that operation's final transaction; the next answer after that fences
   * it as usual. An agent DOWN already only gets the hold; the same `op` again changes nothing.
   * FAILED_PRECONDITION while it is being fenced (AGENT_FENCING) or drained (AGENT_DRAINING).
   */
  async holdDown(id: string, op: string, message: string): Promise<AgentView> {
    const e = this.#entry(id);
    const now = this.#o.clock.now();
    let wentDown = false;
    const next = await this.#o.store.transact(async (tx) => {
      const rec = await tx.get<StoredAgent>(keys.agent(id));
      if (!rec) throw notFound("agent", agentName(id));
      if (rec.down && rec.evacuation === op) return undefined;
      if (rec.fencing)
        throw failedPrecondition(
          `agent ${agentName(id)} answers again and is being fenced; evacuate it once it is READY`,
          "AGENT_FENCING",
          { agent: agentName(id) },
        );
      if (rec.drainOp)
        throw failedPrecondition(
          `agent ${agentName(id)} is being drained by operations/${rec.drainOp}; cancel the drain first`,
          "AGENT_DRAINING",
          { agent: agentName(id), operation: `operations/${rec.drainOp}` },
        );
      wentDown = !rec.down;
      const out: StoredAgent = rec.down
        ? { ...rec, gen: rec.gen + 1, updateMs: now }
        : this.#downRecord(e, rec, message, now);
      out.evacuation = op;
      tx.put(keys.agent(id), out);
      return out;
    });
    if (next && this.#agents.get(id) === e) {
      e.rec = next;
      if (wentDown) this.#wentDown(e, message);
      else this.emit("changed", this.#view(e));
    }
    return this.#view(e);
  }

  /**
   * Ends operation `op`'s hold on agent `id` (see `holdDown`) in the caller's transaction: the agent
   * stays DOWN until its next answer, which fences it. Nothing happens when `op` holds nothing there.
   */
  async releaseHold(tx: Txn, id: string, op: string): Promise<void> {
    const rec = await tx.get<StoredAgent>(keys.agent(id));
    if (!rec || rec.evacuation !== op) return;
    const out: StoredAgent = {
      ...rec,
      evacuation: undefined,
      gen: rec.gen + 1,
      updateMs: this.#o.clock.now(),
    };
    tx.put(keys.agent(id), out);
    tx.afterCommit(() => {
      const e = this.#agents.get(id);
      if (!e) return;
      e.rec = out;
      this.emit("changed", this.#view(e));
    });
  }

  // ---- internals --------------------------------------------------------------------------------

  #add(id: string, rec: StoredAgent, alloc?: Usage, clients?: AgentClients, host?: HostInfo): Entry {
    const c = clients ?? this.#connect(rec.address);
    let h = host;
    if (!h && rec.host !== undefined) {
      try {
        h = fromJson(HostInfoSchema, rec.host as never, { ignoreUnknownFields: true });
      } catch {
        h = undefined;
      }
    }
    const e: Entry = {
      id,
      rec,
      host: h,
      alloc: alloc ?? usageFromStore(undefined),
      clients: c,
      close: () => closeClients(c),
      lastOkMs: undefined,
      lastPersistMs: 0,
      lastError: "",
      beats: 0,
      inFlight: false,
    };
    this.#agents.set(id, e);
    return e;
  }

  #view(e: Entry): AgentView {
    const r = e.rec;
    const state: AgentStateName = r.down
      ? "down"
      : r.cordoned && r.drainOp
        ? "draining"
        : r.cordoned
          ? "cordoned"
          : "ready";
    const stateMessage = r.down
      ? r.downMessage
      : r.cordoned
        ? `${r.drainOp ? "draining" : "cordoned"}${r.cordonReason ? `: ${r.cordonReason}` : ""}`
        : "";
    const last = e.lastOkMs ?? r.lastHeartbeatMs;
    return {
      id: e.id,
      address: r.address,
      labels: { ...r.labels },
      state,
      stateMessage,
      ...(last !== undefined ? { lastHeartbeatMs: last } : {}),
      ...(e.host ? { host: e.host } : {}),
      capacity: capacityFromHost(e.host),
      allocated: { ...e.alloc },
      networks: [...r.networks],
      networkDetails: (r.networkDetails ?? []).map((n) => ({ ...n })),
      createMs: r.createMs,
      updateMs: r.updateMs,
      etag: String(r.gen),
      ...(r.drainOp ? { operation: r.drainOp } : {}),
    };
  }

  #entry(id: string): Entry {
    checkAgentId(id, "name");
    const e = this.#agents.get(id);
    if (!e) throw notFound("agent", agentName(id));
    return e;
  }

  #checkEtag(e: Entry, etag: string): void {
    if (etag && etag !== String(e.rec.gen)) throw staleEtag(e.id);
  }

  #byAddress(address: string): string | undefined {
    for (const e of this.#agents.values()) if (e.rec.address === address) return e.id;
    return undefined;
  }

  /** The view when `id` is registered at `address` already; ALREADY_EXISTS when it is elsewhere. */
  #sameOrConflict(id: string, address: string): AgentView | undefined {
    const e = this.#agents.get(id);
    if (e) {
      if (e.rec.address === address) return this.#view(e);
      throw alreadyExists("agent", agentName(id), `at ${e.rec.address}`);
    }
    const other = this.#byAddress(address);
    if (other) throw alreadyExists("agent", agentName(other), `at ${address}; one agent per address`);
    return undefined;
  }

  async #probe(clients: AgentClients, id: string, address: string) {
    try {
      const host = await clients.host.getHostInfo({}, { timeoutMs: 5000 });
      const networks = await listNetworks(clients, 5000);
      return { host, networks };
    } catch (err) {
      throw new VmenvError(
        "unavailable",
        `cannot reach agent ${agentName(id)} at ${address}: ${errorText(err)}`,
        {
          reason: "AGENT_UNREACHABLE",
          metadata: { agent: agentName(id), address },
          cause: err,
        },
      );
    }
  }

  /** Applies `change` to the stored record (undefined: nothing to do) in one transaction. */
  async #mutate(
    id: string,
    requestId: string,
    method: string,
    change: (rec: StoredAgent) => StoredAgent | undefined,
    onCommit?: (e: Entry) => void,
  ): Promise<AgentView> {
    const now = this.#o.clock.now();
    const next = await this.#o.store.transact(async (tx) => {
      const rec = await tx.get<StoredAgent>(keys.agent(id));
      if (!rec) throw notFound("agent", agentName(id));
      const out = change(rec);
      this.#remember(tx, requestId, method, id);
      if (!out) return undefined;
      const written = { ...out, gen: rec.gen + 1, updateMs: now };
      tx.put(keys.agent(id), written);
      return written;
    });
    const e = this.#agents.get(id);
    if (!e) throw notFound("agent", agentName(id));
    if (onCommit) onCommit(e);
    if (next) {
      e.rec = next;
      const v = this.#view(e);
      this.emit("changed", v);
      return v;
    }
    return this.#view(e);
  }

  #remember(tx: Txn, requestId: string, method: string, agent: string): void {
    if (!requestId) return;
    const r: StoredRequest = { method, agent, atMs: this.#o.clock.now() };
    tx.put(keys.agentRequest(requestId), r);
  }

  /** The agent as it is now when `requestId` already did `method` on it. */
  async #replay(requestId: string, method: string, id: string): Promise<AgentView | undefined> {
    if (!requestId) return undefined;
    const seen = await this.#o.store.get<StoredRequest>(keys.agentRequest(requestId));
    if (!seen) return undefined;
    if (seen.method !== method || seen.agent !== id) throw requestReused(requestId);
    const e = this.#agents.get(id);
    return e ? this.#view(e) : undefined;
  }

  #allocated(id: string, alloc: Usage): void {
    const e = this.#agents.get(id);
    if (!e) return;
    e.alloc = alloc;
    this.emit("changed", this.#view(e));
  }
}

/** The agent's networks, by name. */
async function listNetworks(c: AgentClients, timeoutMs: number): Promise<AgentNetwork[]> {
  const out: AgentNetwork[] = [];
  let pageToken = "";
  do {
    const r = await c.networks.listNetworks({ pageSize: 1000, pageToken }, { timeoutMs });
    for (const n of r.networks)
      out.push({ name: n.name, cidr: n.cidr, gateway: n.gateway, uplink: n.uplink });
    pageToken = r.nextPageToken;
  } while (pageToken);
  return out.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

/**
 * Drops a set of clients. The transport has no close of its own: its HTTP/2 connection is unref'd and
 * closes when idle, so a dropped agent keeps nothing running.
 */
function closeClients(_c: AgentClients): void {}

const LABEL_KEY = /^[a-z0-9]([a-z0-9._/-]{0,62})?$/i;

function checkLabels(labels: Record<string, string>, field: string): void {
  for (const [k, v] of Object.entries(labels)) {
    if (!LABEL_KEY.test(k))
      throw invalidArgument(
        `${field}`,
        `label key "${k.slice(0, 80)}" must be 1-63 letters, digits, ".", "_", "-", "/"`,
        "INVALID_LABEL",
      );
    if (v.length > 253)
      throw invalidArgument(`${field}`, `label ${k} is longer than 253 characters`, "INVALID_LABEL");
  }
}

function sameLabels(a: Record<string, string>, b: Record<string, string>): boolean {
  const ka = Object.keys(a);
  return ka.length === Object.keys(b).length && ka.every((k) => a[k] === b[k]);
}

function staleEtag(id: string): VmenvError {
  return new VmenvError("aborted", `agent ${agentName(id)} changed since its etag was read; read it again`, {
    reason: "ETAG_MISMATCH",
    metadata: { agent: agentName(id) },
  });
}

/** INVALID_ARGUMENT (REQUEST_ID_REUSED): `requestId` did something else before. */
export function requestReused(requestId: string): VmenvError {
  return new VmenvError("invalid-argument", `request_id ${requestId} was used for a different request`, {
    reason: "REQUEST_ID_REUSED",
    metadata: { request_id: requestId },
    fieldViolations: [{ field: "request_id", description: "was used for a different request" }],
  });
}
