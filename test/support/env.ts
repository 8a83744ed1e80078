import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { create } from "@bufbuild/protobuf";
import { anyUnpack, durationFromMs } from "@bufbuild/protobuf/wkt";
import { ConnectError } from "@connectrpc/connect";
import { BlockService, VmService } from "@vmenv/api/agent/v1";
import {
  AffinityEnforcement,
  AffinityType,
  AgentService,
  type Environment,
  EnvironmentSchema,
  EnvironmentService,
  type MemberSchema,
  type Operation,
  OperationService,
  OperationState,
  type PolicySchema,
  ResourceService,
} from "@vmenv/api/coordinator/v1";
import { ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { createDaemonClient } from "@vmenv/rpc";
import { type RunningAgent, startAgent } from "./agent.js";
import { type RunningCoordinator, startCoordinator } from "./coordinator.js";
import { guestImage } from "./guest.js";
import { MIB } from "./vm.js";

/** Clients of a coordinator's services (long deadlines: TCG guests are slow). */
export function coordinatorClients(socket: string) {
  const cfg = { socket, timeoutMs: 120_000 };
  return {
    envs: createDaemonClient(EnvironmentService, cfg),
    ops: createDaemonClient(OperationService, cfg),
    tree: createDaemonClient(ResourceService, cfg),
    agents: createDaemonClient(AgentService, cfg),
  };
}
export type CoordinatorClients = ReturnType<typeof coordinatorClients>;

/** Clients of an agent over its own socket (the test's view of what runs there). */
export function agentClients(a: RunningAgent) {
  const cfg = { socket: a.socket, timeoutMs: 60_000 };
  return { vms: createDaemonClient(VmService, cfg), blocks: createDaemonClient(BlockService, cfg) };
}

/** Waits until a coordinator operation is final and returns it. */
export async function finalOp(c: CoordinatorClients, op: Operation, timeoutMs = 240_000): Promise<Operation> {
  const end = Date.now() + timeoutMs;
  let cur = op;
  while (
    cur.state === OperationState.PENDING ||
    cur.state === OperationState.RUNNING ||
    cur.state === OperationState.ROLLING_BACK
  ) {
    if (Date.now() > end)
      throw new Error(`operation ${op.name} (${op.kind}) not final after ${timeoutMs} ms`);
    cur = await c.ops.waitOperation({ name: op.name, timeout: durationFromMs(30_000) });
  }
  return cur;
}

/** Waits for an operation and fails the test with its error unless it succeeded. */
export async function succeeded(
  c: CoordinatorClients,
  op: Operation | Promise<Operation>,
): Promise<Operation> {
  const done = await finalOp(c, await op);
  if (done.state !== OperationState.SUCCEEDED)
    throw new Error(
      `${done.kind} ${done.target} ended ${OperationState[done.state]}: ${done.error?.message}`,
    );
  return done;
}

/** The Environment an operation produced. */
export function envOf(op: Operation): Environment {
  const e = op.result && anyUnpack(op.result, EnvironmentSchema);
  if (!e) throw new Error(`operation ${op.name} has no Environment result`);
  return e;
}

/** A member running the test guest: 1 vCPU, 128 MiB. */
export async function guestMember(
  id: string,
  role: string,
  opts: { antiAffinityRoles?: string[]; volumeMib?: number } = {},
): Promise<MessageInitShape<typeof MemberSchema>> {
  const { kernel, initrd } = await guestImage();
  return {
    id,
    role,
    spec: {
      vcpus: 1,
      memoryBytes: 128n * MIB,
      boot: {
        method: {
          case: "directKernel",
          value: {
            kernelPath: kernel,
            initrdPath: initrd,
            cmdline: `console=ttyS0 quiet vmenv.hostname=${id}`,
          },
        },
      },
      disks: opts.volumeMib ? [{ id: "data", volume: "volumes/data" }] : [],
    },
    volumes: opts.volumeMib ? [{ id: "data", sizeBytes: BigInt(opts.volumeMib) * MIB }] : [],
    ...(opts.antiAffinityRoles
      ? {
          placement: {
            affinityRules: [
              {
                type: AffinityType.ANTI_AFFINITY,
                enforcement: AffinityEnforcement.HARD,
                roles: opts.antiAffinityRoles,
              },
            ],
          },
        }
      : {}),
  };
}

/** Registers running agents with the coordinator as a1, a2 … and waits until they are READY. */
export async function registerAgents(c: CoordinatorClients, agents: RunningAgent[]): Promise<string[]> {
  const ids: string[] = [];
  for (const [i, a] of agents.entries()) {
    const id = `a${i + 1}`;
    await c.agents.registerAgent({ agentId: id, agent: { address: a.address } });
    ids.push(id);
  }
  return ids;
}

/** A coordinator and its agents, started for one test file by `startFleet`. */
export interface Fleet {
  /** The coordinator last started (it may have been stopped or killed since). */
  readonly coord: RunningCoordinator;
  /**
   * Clients of the coordinator now running: one object for the fleet's life, its services pointed at
   * each new coordinator as it starts (so a test may keep it across restarts).
   */
  readonly c: CoordinatorClients;
  /** The agents in registration order (a restart replaces its entry, `addAgent` appends). */
  readonly agents: RunningAgent[];
  /** Their ids, index for index: a1, a2 …, then those given to `addAgent`. */
  readonly ids: string[];
  /** The agent `id` ("a1" or "agents/a1"). */
  agentOf(id: string): RunningAgent;
  /**
   * Stops the coordinator (a dead one is only reaped) and starts a new one on the same state, with the
   * fleet's flags and `opts.args` and environment `opts.env`; returns its clients (also `c`).
   */
  startCoordinator(opts?: { args?: string[]; env?: NodeJS.ProcessEnv }): Promise<CoordinatorClients>;
  /** Stops the coordinator; its state stays for `startCoordinator`. */
  stopCoordinator(): Promise<void>;
  /**
   * Starts the coordinator so that it SIGKILLs itself at its `n`-th crash point
   * (VMENV_COORDINATOR_CRASH_POINT), submits `call` (its reply may be lost), waits (90 s at most) for it
   * to die, runs `whileDown`, starts it again on the same store and returns the operation of
   * `requestId` once it is final.
   */
  crashAt(
    n: number,
    requestId: string,
    call: (c: CoordinatorClients) => Promise<Operation>,
    whileDown?: () => Promise<void>,
  ): Promise<Operation>;
  /** Starts one more agent (with `args`) and registers it as `id`. */
  addAgent(id: string, args?: string[]): Promise<RunningAgent>;
  /**
   * SIGKILLs agent `id`'s process if it still runs (its VMs and state stay) and starts a new one on its
   * state directory and TCP port, the address the coordinator knows; does not wait for the coordinator.
   */
  restartAgent(id: string): Promise<RunningAgent>;
  /** Stops the coordinator and the agents and removes their state. Safe to call twice. */
  stop(): Promise<void>;
}

/**
 * Starts `agents` real agents and a real coordinator on a state directory of its own that outlives its
 * restarts, registers the agents as a1, a2 … and creates the top-level `node` if given. The coordinator
 * heartbeats every `heartbeatIntervalMs` (default 300), marks an agent DOWN after `heartbeatTimeoutMs`
 * (default 3000), collects every `collectorIntervalMs` (default 500), and gets `coordinatorArgs` too.
 * On failure whatever started is stopped.
 */
export async function startFleet(opts: {
  agents: number;
  heartbeatIntervalMs?: number;
  heartbeatTimeoutMs?: number;
  collectorIntervalMs?: number;
  coordinatorArgs?: string[];
  node?: { id: string; policy: MessageInitShape<typeof PolicySchema> };
}): Promise<Fleet> {
  await guestImage();
  const dir = await mkdtemp(join(tmpdir(), "vmenv-coord-test-"));
  const flags = [
    "--heartbeat-interval-ms",
    String(opts.heartbeatIntervalMs ?? 300),
    "--heartbeat-timeout-ms",
    String(opts.heartbeatTimeoutMs ?? 3000),
    "--collector-interval-ms",
    String(opts.collectorIntervalMs ?? 500),
    ...(opts.coordinatorArgs ?? []),
  ];
  const agents: RunningAgent[] = [];
  const ids: string[] = [];
  let coord: RunningCoordinator | undefined;
  let clients: CoordinatorClients | undefined;
  let stopped: Promise<void> | undefined;
  const index = (id: string) => {
    const i = ids.indexOf(id.replace(/^agents\//, ""));
    if (i < 0) throw new Error(`no agent ${id} in the fleet (${ids.join(", ")})`);
    return i;
  };
  const fleet: Fleet = {
    get coord() {
      if (!coord) throw new Error("the fleet's coordinator was never started");
      return coord;
    },
    get c() {
      if (!clients) throw new Error("the fleet's coordinator was never started");
      return clients;
    },
    agents,
    ids,
    agentOf: (id) => agents[index(id)] as RunningAgent,
    async startCoordinator(o = {}) {
      await coord?.stop();
      coord = await startCoordinator([...flags, ...(o.args ?? [])], o.env ?? {}, { dir, keepDir: true });
      clients = Object.assign(clients ?? {}, coordinatorClients(coord.socket));
      return clients;
    },
    stopCoordinator: async () => coord?.stop(),
    async crashAt(n, requestId, call, whileDown) {
      const crashing = await fleet.startCoordinator({ env: { VMENV_COORDINATOR_CRASH_POINT: String(n) } });
      const exited = fleet.coord.exited;
      await call(crashing).catch(() => undefined);
      const how = await Promise.race([exited, new Promise((r) => setTimeout(() => r("alive"), 90_000))]);
      if (how !== "SIGKILL") throw new Error(`coordinator did not crash at point ${n}: it is ${String(how)}`);
      await whileDown?.();
      const c = await fleet.startCoordinator();
      const op = (await c.ops.listOperations({ requestId })).operations[0];
      if (!op) throw new Error(`no operation for request ${requestId} after crash point ${n}`);
      return finalOp(c, op);
    },
    async addAgent(id, args = []) {
      const a = await startAgent(args);
      agents.push(a);
      ids.push(id);
      await fleet.c.agents.registerAgent({ agentId: id, agent: { address: a.address } });
      return a;
    },
    async restartAgent(id) {
      const i = index(id);
      const old = agents[i] as RunningAgent;
      await old.kill();
      const port = old.address.slice(old.address.lastIndexOf(":") + 1);
      const a = await startAgent([], {}, { dir: old.dir, listen: `127.0.0.1:${port}` });
      agents[i] = a;
      return a;
    },
    stop: () =>
      (stopped ??= (async () => {
        await coord?.stop();
        for (const a of agents) await a.stop();
        await rm(dir, { recursive: true, force: true });
      })()),
  };
  try {
    const started = await Promise.allSettled(Array.from({ length: opts.agents }, () => startAgent()));
    for (const s of started) if (s.status === "fulfilled") agents.push(s.value);
    const failed = started.find((s) => s.status === "rejected");
    if (failed) throw failed.reason;
    await fleet.startCoordinator();
    ids.push(...(await registerAgents(fleet.c, agents)));
    if (opts.node)
      await fleet.c.tree.createNode({ nodeId: opts.node.id, node: { policy: opts.node.policy } });
  } catch (err) {
    await fleet.stop();
    throw err;
  }
  return fleet;
}

/** The ErrorInfo of a failed call. */
export function errorInfo(err: unknown) {
  const e = ConnectError.from(err);
  return { code: e.code, message: e.rawMessage, info: e.findDetails(ErrorInfoSchema)[0] };
}

/** Rejects unless `p` fails; returns its error. */
export async function failure(p: Promise<unknown>) {
  try {
    await p;
  } catch (err) {
    return errorInfo(err);
  }
  throw new Error("expected the call to fail");
}

/** The VMs (name → state and labels) an agent runs. */
export async function vmsOn(a: RunningAgent) {
  const { vms } = await agentClients(a).vms.listVms({ pageSize: 1000 });
  return vms;
}

export { create };
