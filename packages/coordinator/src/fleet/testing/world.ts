import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { MemberSchema, RescheduleMode } from "@vmenv/api/coordinator/v1";
import pino from "pino";
import { expect } from "vitest";
import { memberFromPb } from "../../env/convert.js";
import { MemberEvents } from "../../env/events.js";
import { migrateKind } from "../../env/migrate.js";
import type { EnvRecord, MemberRecord } from "../../env/model.js";
import { type CreateInput, environmentKinds } from "../../env/ops.js";
import { type RescheduleDeps, rescheduleKind } from "../../env/reschedule.js";
import { MigratingFakeAgent } from "../../env/testing/fake-agent.js";
import { acmeTree } from "../../env/testing/tree.js";
import { type EngineOptions, OperationEngine } from "../../ops/engine.js";
import type { AgentClients } from "../../ports.js";
import { keys } from "../../store/keys.js";
import { memoryStore } from "../../store/memory.js";
import { evacuateKind } from "../evacuate.js";
import { Fencer } from "../fencing.js";
import { Fleet } from "../fleet.js";

export const MIB = 1024n * 1024n;

/** Clients that look the agent's up at every call, so a test can swap `agent.clients`. */
function lazyClients(agent: () => MigratingFakeAgent): AgentClients {
  const part = (k: keyof AgentClients) =>
    new Proxy(
      {},
      { get: (_t, method) => (agent().clients()[k] as Record<string | symbol, unknown>)[method] },
    );
  return {
    host: part("host"),
    vms: part("vms"),
    blocks: part("blocks"),
    networks: part("networks"),
    diagnostics: part("diagnostics"),
  } as AgentClients;
}

/**
 * A coordinator in memory for the fleet tests: a real Fleet (manual heartbeats, fenced by a real
 * Fencer) over migrating fake agents at `{id}:7443`, the memory store, the tree with node `acme`, and
 * an operation engine with the environment, migration, reschedule and evacuation kinds, member events
 * attached to the fleet (`newEngine` makes another, e.g. one that crashes). The clock is the test's
 * (`tick`). `opts.networks` gives what each agent's ListNetworks reports from the start.
 */
export async function fleetWorld(
  ids: string[] = ["a1", "a2", "a3"],
  capacity = { vcpus: 8, memoryBytes: 1000n * MIB },
  opts: { networks?: (agent: string) => MigratingFakeAgent["networks"] } = {},
) {
  const store = memoryStore();
  const clock = { t: 1_700_000_000_000, now: () => clock.t };
  const logger = pino({ level: "silent" });
  const tree = await acmeTree(store, clock);
  const agents = new Map(ids.map((id) => [id, new MigratingFakeAgent(id)]));
  for (const a of agents.values()) {
    a.capacity = { ...capacity };
    a.networks = opts.networks?.(a.id) ?? [];
  }
  const agent = (id: string) => agents.get(id) as MigratingFakeAgent;
  const fencer = new Fencer({ store, clock, logger });
  const fleet = new Fleet({
    store,
    clock,
    logger,
    heartbeatIntervalMs: 200,
    heartbeatTimeoutMs: 1000,
    connect: (address) => lazyClients(() => agent(address.replace(/:\d+$/, ""))),
    manualHeartbeat: true,
    fence: async (id, clients) => {
      await fencer.fence(id, clients);
    },
  });
  await fleet.start();
  for (const id of ids) await fleet.register(id, `${id}:7443`, {});
  const deps: RescheduleDeps = { store, tree, fleet, clock, logger, reservationTtlMs: 60_000 };
  const events = new MemberEvents(deps);
  events.attach(fleet);
  /** An engine over the world's store with every kind registered. */
  const newEngine = (o: Partial<EngineOptions> = {}) => {
    const e = new OperationEngine({ store, clock, logger, retry: { attempts: 0 }, ...o });
    for (const k of environmentKinds(deps)) e.register(k);
    e.register(migrateKind(deps));
    e.register(rescheduleKind(deps));
    e.register(evacuateKind({ store, fleet, events }));
    return e;
  };
  const engine = newEngine();

  /** Creates (and starts) environment `env` on agent `on`: the other agents are cordoned meanwhile. */
  const createOn = async (on: string, env: string, members: MemberRecord[]) => {
    const others = ids.filter((id) => id !== on && fleet.get(id).state === "ready");
    for (const id of others) await fleet.cordon(id, "test setup");
    const op = await engine.start("environment.create", `environments/${env}`, createInput(env, members));
    const done = await engine.wait(op.id, 10_000);
    for (const id of others) await fleet.uncordon(id);
    expect(done.state, JSON.stringify(done.error)).toBe("succeeded");
  };
  const env = async (id: string) => (await store.get<EnvRecord>(keys.env(id))) as EnvRecord;
  /** Where each member of `id` is and its state: [[member, agent, state]]. */
  const where = async (id: string) => (await env(id)).members.map((m) => [m.id, m.agent, m.state]);
  /** Operations of `kind`, newest first. */
  const ops = async (kind: string) => (await engine.list({ kind, pageSize: 100, pageToken: "" })).ops;
  /** One heartbeat round, a beat later. */
  const beat = async () => {
    clock.t += 200;
    await fleet.heartbeatOnce();
  };
  return {
    store,
    clock,
    logger,
    tree,
    agents,
    agent,
    fleet,
    engine,
    newEngine,
    deps,
    events,
    createOn,
    env,
    where,
    ops,
    beat,
  };
}

/** The input of an `environment.create` of `env` under node `acme`, started. */
export function createInput(env: string, members: MemberRecord[]): CreateInput {
  return { env, node: "acme", description: "", labels: {}, members, start: true, fingerprint: env };
}

/** A member of `memoryMib` MiB and `vcpus` vCPUs; `pin` puts it on an agent for good. */
export function member(
  id: string,
  memoryMib: number,
  opts: { vcpus?: number; pin?: string; recreate?: boolean } = {},
): MemberRecord {
  return memberFromPb(
    create(MemberSchema, {
      id,
      role: "",
      spec: {
        vcpus: opts.vcpus ?? 1,
        memoryBytes: BigInt(memoryMib) * MIB,
        boot: { method: { case: "directKernel", value: { kernelPath: "/k" } } },
      },
      ...(opts.pin ? { placement: { agent: `agents/${opts.pin}` } } : {}),
      ...(opts.recreate
        ? { reschedulePolicy: { mode: RescheduleMode.RECREATE, delay: durationFromMs(3_600_000) } }
        : {}),
    }),
  );
}
