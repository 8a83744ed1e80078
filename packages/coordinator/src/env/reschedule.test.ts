import { create } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { VmState } from "@vmenv/api/agent/v1";
import { MemberSchema, RescheduleMode } from "@vmenv/api/coordinator/v1";
import pino from "pino";
import { describe, expect, it } from "vitest";
import {
  addUsage,
  type StoredUsage,
  subUsage,
  type Usage,
  usageFromStore,
  usageToStore,
} from "../domain/usage.js";
import { checkEvacuable, EVACUATE_KIND, type EvacuateDeps, evacuateKind } from "../fleet/evacuate.js";
import { Fencer } from "../fleet/fencing.js";
import type { AgentView } from "../fleet/fleet.js";
import { OperationEngine } from "../ops/engine.js";
import { keys } from "../store/keys.js";
import { memoryStore } from "../store/memory.js";
import type { Txn } from "../store/store.js";
import { memberFromPb } from "./convert.js";
import { MemberEvents } from "./events.js";
import type { EnvRecord, MemberRecord } from "./model.js";
import { type CreateInput, environmentKinds } from "./ops.js";
import { type RescheduleDeps, Rescheduler, rescheduleKind, reschedulePolicy } from "./reschedule.js";
import { FakeAgent } from "./testing/fake-agent.js";
import { acmeTree } from "./testing/tree.js";

const MIB = 1024n * 1024n;

const capacity = { vcpus: 8, memoryBytes: 4096n * MIB, gpus: 0, gpuMemoryBytes: 0n };

async function setup() {
  const store = memoryStore();
  let now = 1_000_000;
  const clock = { now: () => now };
  const logger = pino({ level: "silent" });
  const tree = await acmeTree(store, clock);
  const agents = new Map([
    ["a1", new FakeAgent("a1")],
    ["a2", new FakeAgent("a2")],
  ]);
  const allocs = new Map<string, Usage>();
  /** Agent state the fake fleet reports: ready, down (since ms) or fencing. */
  const state = new Map<string, { down: boolean; since: number; fencing: boolean }>();
  const view = (id: string) => {
    const s = state.get(id);
    return {
      id,
      state: s?.down ? "down" : "ready",
      stateMessage: s?.fencing ? "fencing: back" : s?.down ? "no heartbeat" : "",
      labels: {},
      capacity,
      allocated: allocs.get(id) ?? usageFromStore(undefined),
      networks: [],
    } as unknown as AgentView;
  };
  const fleet: RescheduleDeps["fleet"] & EvacuateDeps["fleet"] = {
    views: () => [...agents.keys()].map(view),
    get: view,
    clients: (id) => (agents.get(id) as FakeAgent).clients(),
    clientsEvenIfDown: (id) => (agents.get(id) as FakeAgent).clients(),
    async charge(tx: Txn, id: string, d: Usage) {
      const next = addUsage(usageFromStore(await tx.get<StoredUsage>(keys.alloc(id))), d);
      tx.put(keys.alloc(id), usageToStore(next));
      tx.afterCommit(() => allocs.set(id, next));
    },
    async release(tx: Txn, id: string, d: Usage) {
      const next = subUsage(usageFromStore(await tx.get<StoredUsage>(keys.alloc(id))), d);
      tx.put(keys.alloc(id), usageToStore(next));
      tx.afterCommit(() => allocs.set(id, next));
    },
    async replaceable(_tx: Txn, id: string) {
      const s = state.get(id);
      return !!s?.down && !s.fencing;
    },
    downSinceMs: (id) => (state.get(id)?.down ? state.get(id)?.since : undefined),
    // Forced evacuations are tested with a real fleet (fleet/evacuate.test.ts).
    holdDown: async () => undefined,
    releaseHold: async () => undefined,
  };
  const deps: RescheduleDeps = { store, tree, fleet, clock, logger, reservationTtlMs: 60_000 };
  const engine = new OperationEngine({ store, clock, logger, retry: { attempts: 0 } });
  for (const k of environmentKinds(deps)) engine.register(k);
  engine.register(rescheduleKind(deps));
  const events = new MemberEvents(deps);
  engine.register(evacuateKind({ store, fleet, events }));
  const rescheduler = new Rescheduler({ ...deps, engine });
  const env = async () => (await store.get<EnvRecord>(keys.env("shop"))) as EnvRecord;
  const m = async (id: string) => (await env()).members.find((x) => x.id === id) as MemberRecord;
  const alloc = async (id: string) => usageFromStore(await store.get<StoredUsage>(keys.alloc(id))).vms;
  /** Marks agent `id` DOWN as the fleet would, with the member events. */
  const down = async (id: string) => {
    state.set(id, { down: true, since: now, fencing: false });
    await events.agentDown(id, "no heartbeat since test");
  };
  const create = async (members: MemberRecord[]) => {
    const input: CreateInput = {
      env: "shop",
      node: "acme",
      description: "",
      labels: {},
      members,
      start: true,
      fingerprint: "fp",
    };
    const op = await engine.start("environment.create", "environments/shop", input);
    const done = await engine.wait(op.id, 10_000);
    expect(done.state, JSON.stringify(done.error)).toBe("succeeded");
  };
  const settle = async (ids: string[]) => {
    for (const id of ids) await engine.wait(id, 10_000);
  };
  return {
    store,
    engine,
    agents,
    state,
    deps,
    rescheduler,
    events,
    env,
    m,
    alloc,
    down,
    create,
    settle,
    tick: (ms: number) => {
      now += ms;
    },
    usage: async () => usageFromStore(await store.get<StoredUsage>(keys.usage("acme"))),
    fencer: new Fencer({ store, clock, logger }),
  };
}

function member(
  id: string,
  mode: RescheduleMode,
  opts: { delayMs?: number; maxAttempts?: number; agent?: string } = {},
) {
  return memberFromPb(
    create(MemberSchema, {
      id,
      role: id.replace(/-\d+$/, ""),
      spec: {
        vcpus: 1,
        memoryBytes: 128n * MIB,
        disks: [{ id: "d", volume: "volumes/data" }],
        boot: { method: { case: "directKernel", value: { kernelPath: "/k" } } },
      },
      volumes: [{ id: "data", sizeBytes: 64n * MIB }],
      placement: opts.agent ? { agent: `agents/${opts.agent}` } : {},
      reschedulePolicy: {
        mode,
        ...(opts.delayMs !== undefined ? { delay: durationFromMs(opts.delayMs) } : {}),
        ...(opts.maxAttempts ? { maxAttempts: opts.maxAttempts } : {}),
      },
    }),
  );
}

describe("reschedule policy", () => {
  it("defaults to NEVER, 5 minutes, 3 attempts", () => {
    expect(reschedulePolicy({ reschedulePolicy: null })).toEqual({
      mode: "NEVER",
      delayMs: 300_000,
      maxAttempts: 3,
    });
    const m = member("w-1", RescheduleMode.RECREATE, { delayMs: 1500, maxAttempts: 5 });
    expect(reschedulePolicy(m)).toEqual({ mode: "RECREATE", delayMs: 1500, maxAttempts: 5 });
  });
});

describe("rescheduling LOST members of a DOWN agent (fake agents)", () => {
  it("recreates a RECREATE member elsewhere after its delay, moving its allocation; NEVER stays LOST", async () => {
    const t = await setup();
    await t.create([
      member("web-1", RescheduleMode.RECREATE, { delayMs: 2000 }),
      member("pet-1", RescheduleMode.NEVER),
    ]);
    const a = (await t.m("web-1")).agent;
    expect((await t.m("pet-1")).agent).toBe(a); // bin-packing puts both on one agent
    const b = a === "a1" ? "a2" : "a1";
    const usageBefore = await t.usage();
    await t.down(a);
    expect((await t.m("web-1")).state).toBe("LOST");
    expect((await t.m("web-1")).stateMessage).toContain(`agents/${a} is down`);

    // Before the delay: nothing.
    t.tick(1000);
    expect(await t.rescheduler.runOnce()).toEqual([]);
    t.tick(1500);
    const started = await t.rescheduler.runOnce();
    expect(started.map((o) => o.kind)).toEqual(["environment.reschedule"]);
    await t.settle(started.map((o) => o.id));
    const op = await t.engine.get(started[0]?.id ?? "");
    expect(op.state, JSON.stringify(op.error)).toBe("succeeded");

    const web = await t.m("web-1");
    expect([web.agent, web.state]).toEqual([b, "RUNNING"]);
    expect(web.stateMessage).toMatch(/recreated on agents\/a\d after agents\/a\d went down.*lost/);
    const onB = t.agents.get(b) as FakeAgent;
    expect(onB.vms.get("vms/shop-web-1")?.state).toBe(VmState.RUNNING);
    expect([...onB.volumes.keys()]).toEqual(["volumes/shop-web-1-data"]);
    expect((await t.m("pet-1")).state).toBe("LOST");
    // Allocation: web-1 moved from a to b; pet-1 still counted on a. Tree usage unchanged.
    expect([await t.alloc(a), await t.alloc(b)]).toEqual([1, 1]);
    expect(await t.usage()).toEqual(usageBefore);
    expect(await t.store.list(keys.movePrefix)).toEqual([]);
    // Nothing more to do.
    t.tick(10_000);
    expect(await t.rescheduler.runOnce()).toEqual([]);
  });

  it("the balancer drops a LOST member from its upstreams and lists it again once it runs elsewhere", async () => {
    const t = await setup();
    await t.create([
      member("web-1", RescheduleMode.RECREATE, { delayMs: 0 }),
      member("web-2", RescheduleMode.NEVER),
    ]);
    expect((await t.m("web-lb")).outputs.upstreams).toBe("web-1,web-2");
    const a = (await t.m("web-1")).agent;
    await t.down(a);
    // Everything sits on one agent (bin-packing): both web members are LOST.
    expect((await t.m("web-lb")).outputs.upstreams ?? "").not.toContain("web-1");
    await t.settle((await t.rescheduler.runOnce()).map((o) => o.id));
    const web1 = await t.m("web-1");
    expect([web1.state, web1.agent === a]).toEqual(["RUNNING", false]);
    expect((await t.m("web-lb")).outputs.upstreams?.split(",")).toContain("web-1");
  });

  it("fencing destroys the moved member's stale copy and keeps the NEVER member's, which is adopted back", async () => {
    const t = await setup();
    await t.create([
      member("web-1", RescheduleMode.RECREATE, { delayMs: 0 }),
      member("pet-1", RescheduleMode.NEVER),
    ]);
    const a = (await t.m("web-1")).agent;
    await t.down(a);
    await t.settle((await t.rescheduler.runOnce()).map((o) => o.id));
    const stale = t.agents.get(a) as FakeAgent;
    expect([...stale.vms.keys()].sort()).toEqual(["vms/shop-pet-1", "vms/shop-web-1"]);

    const report = await t.fencer.fence(a, stale.clients());
    expect(report.vmsRemoved).toEqual(["vms/shop-web-1"]);
    expect(report.volumesRemoved).toEqual(["volumes/shop-web-1-data"]);
    expect([...stale.vms.keys()]).toEqual(["vms/shop-pet-1"]);
    expect([...stale.volumes.keys()]).toEqual(["volumes/shop-pet-1-data"]);
    // Idempotent: a second fence (after a crash) finds nothing more.
    expect((await t.fencer.fence(a, stale.clients())).vmsRemoved).toEqual([]);

    t.state.set(a, { down: false, since: 0, fencing: false });
    await t.events.agentUp(a);
    expect((await t.m("pet-1")).state).toBe("RUNNING");
    expect((await t.m("pet-1")).agent).toBe(a);
  });

  it("does not move members off an agent that is being fenced: the new copy is undone, the room given back", async () => {
    const t = await setup();
    await t.create([member("web-1", RescheduleMode.RECREATE, { delayMs: 0, maxAttempts: 2 })]);
    const a = (await t.m("web-1")).agent;
    const b = a === "a1" ? "a2" : "a1";
    await t.down(a);
    // The agent answers while the reschedule runs: fencing starts between placement and the switch.
    const onB = t.agents.get(b) as FakeAgent;
    const createVm = onB.clients().vms.createVm;
    const clients = onB.clients.bind(onB);
    onB.clients = () => {
      const c = clients();
      (c.vms as unknown as { createVm: typeof createVm }).createVm = async (r) => {
        t.state.set(a, { down: true, since: 0, fencing: true });
        return (clients().vms as unknown as { createVm: typeof createVm }).createVm(r);
      };
      return c;
    };
    const started = await t.rescheduler.runOnce();
    await t.settle(started.map((o) => o.id));
    const op = await t.engine.get(started[0]?.id ?? "");
    expect(op.state).toBe("failed");
    expect(op.error?.reason).toBe("AGENT_RETURNED");
    const web = await t.m("web-1");
    expect([web.agent, web.state]).toEqual([a, "LOST"]);
    expect([...onB.vms.keys()]).toEqual([]);
    expect([...onB.volumes.keys()]).toEqual([]);
    expect([await t.alloc(a), await t.alloc(b)]).toEqual([1, 0]);
    expect(await t.store.list(keys.movePrefix)).toEqual([]);
  });

  it("leaves a member FAILED after max_attempts failed reschedules", async () => {
    const t = await setup();
    // Pinned to its agent: nowhere else fits, every attempt fails.
    await t.create([member("web-1", RescheduleMode.RECREATE, { delayMs: 0, maxAttempts: 2, agent: "a1" })]);
    await t.down("a1");
    for (let i = 0; i < 2; i++) {
      t.tick(5000);
      const started = await t.rescheduler.runOnce();
      expect(started).toHaveLength(1);
      await t.settle(started.map((o) => o.id));
    }
    const web = await t.m("web-1");
    expect(web.state).toBe("FAILED");
    expect(web.stateMessage).toContain("failed 2 times (max_attempts 2)");
    t.tick(5000);
    expect(await t.rescheduler.runOnce()).toEqual([]);
    // Its agent returns (fenced: the VM is still its own): the member is adopted back.
    t.state.set("a1", { down: false, since: 0, fencing: false });
    expect((await t.fencer.fence("a1", (t.agents.get("a1") as FakeAgent).clients())).kept).toEqual([
      "vms/shop-web-1",
    ]);
    await t.events.agentUp("a1");
    expect([(await t.m("web-1")).state, (await t.m("web-1")).agent]).toEqual(["RUNNING", "a1"]);
  });
});

describe("agent.evacuate", () => {
  it("is refused for an agent that is not DOWN, naming its state", async () => {
    const t = await setup();
    const fleet = t.deps.fleet as unknown as { get(id: string): AgentView };
    expect(() => checkEvacuable(fleet, "a1")).toThrow(/agents\/a1 is READY, not DOWN/);
    t.state.set("a1", { down: true, since: 0, fencing: true });
    expect(() => checkEvacuable(fleet, "a1")).toThrow(/being fenced/);
  });

  it("recreates RECREATE members now, ignoring their delay, as child operations; NEVER members stay LOST", async () => {
    const t = await setup();
    await t.create([
      member("web-1", RescheduleMode.RECREATE, { delayMs: 3_600_000 }),
      member("pet-1", RescheduleMode.NEVER),
    ]);
    const a = (await t.m("web-1")).agent;
    await t.down(a);
    expect(await t.rescheduler.runOnce()).toEqual([]);
    const op = await t.engine.start(EVACUATE_KIND, `agents/${a}`, { agent: a });
    const done = await t.engine.wait(op.id, 10_000);
    expect(done.state, JSON.stringify(done.error)).toBe("succeeded");
    expect(done.children).toHaveLength(1);
    expect(done.data.never).toEqual(["environments/shop/pet-1"]);
    expect((await t.m("web-1")).state).toBe("RUNNING");
    expect((await t.m("web-1")).agent).not.toBe(a);
    expect((await t.m("pet-1")).state).toBe("LOST");
  });
});
